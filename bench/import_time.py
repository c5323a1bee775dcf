"""Start-up costs against their targets: ``import sinklens`` (1.5 s), its first public name (``sinklens.PruneSpec``,
which imports torch and the pruning stack: reported, no target) and ``python -m sinklens run -p n_prompts=abc``
refusing a bad value (exit 2 and its one-line message, 3 s).

Each is timed in fresh subprocesses of this interpreter, best of 3 (wall clock from start to exit), with the
checkout this file belongs to first on the path. A ratio below 1 meets the target.

    python bench/import_time.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = [  # (label, command after the interpreter, target in seconds or None, expected exit code)
    ("import sinklens", ["-c", "import sinklens"], 1.5, 0),
    ("import sinklens; sinklens.PruneSpec", ["-c", "import sinklens; sinklens.PruneSpec"], None, 0),
    ("python -m sinklens run -p n_prompts=abc (exit 2)", ["-m", "sinklens", "run", "-p", "n_prompts=abc"], 3.0, 2),
]


def best_time(args: list[str], expected: int, repeat: int, env: dict[str, str]) -> float:
    """The shortest wall time of ``repeat`` fresh ``python ARGS`` runs; each must exit with ``expected``.

    Args:
        args: the interpreter's arguments.
        expected: the exit code a correct run ends with (2 for the refused value).
        repeat: how many runs (the best counts: the others wait on disk or a busy core).
        env: the environment (the checkout first on PYTHONPATH).
    """
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != expected:
            raise SystemExit(f"python {' '.join(args)} exited {proc.returncode}, expected {expected}:\n"
                             f"{proc.stdout}{proc.stderr}")
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="fresh runs per case; the best counts (default 3)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    print(f"start-up costs, best of {args.repeat} fresh processes ({sys.executable})")
    for label, command, target, expected in CASES:
        seconds = best_time(command, expected, args.repeat, env)
        against = f"target {target:.1f} s, ratio {seconds / target:.2f}" if target else "no target"
        print(f"  {label:<52} {seconds:6.2f} s   {against}")


if __name__ == "__main__":
    main()
