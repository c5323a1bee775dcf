"""The same layer selection on the embedded model serially and on local Ray workers.

One layer selection (the single-layer ranking and greedy steps over a pool of layers, CI-sized evaluation plans,
the sink-specialized heads measured once beforehand and passed in) is run four times in one process, each with an
in-memory results file:

- ``serial (2 threads)``: the local executor, torch on 2 threads;
- ``local (1 thread)``: the local executor on 1 thread (the baseline of the Ray overhead);
- ``ray 1 x 1``: one Ray worker with 1 CPU (1 torch thread); the driver on 1 thread;
- ``ray 2 x 1``: two Ray workers with 1 CPU each.

Printed: wall time of each (the Ray ones include starting the workers and loading the model in each), the Ray
overhead of 1 worker against the local executor on 1 thread (target <= 10 %), the 2-worker speedup against
both, and the largest difference of any number from the serial run's. The local cluster's own start (``ray.init``)
is timed separately, not in the runs. Exit status 1 when a difference exceeds 1e-6 (the overhead and speedup are
reported as measured, not gated: they depend on what else runs on the machine).
Run with `.venv/bin/python bench/ray_sweep.py [--layers 12-20] [--greedy-pool 4]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

import sinklens as sl


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="12-20", help="candidate layers, first-last")
    parser.add_argument("--greedy-pool", type=int, default=4)
    parser.add_argument("--limit", type=int, default=2, help="evaluation items per task (CI size: 2)")
    args = parser.parse_args()
    import ray

    first, last = (int(v) for v in args.layers.split("-"))
    torch.set_num_threads(2)
    model = sl.load_model(args.model, device="cpu")
    probe = sl.probe_tokens(model, 8, 32, split="probe")
    census = sl.run_census(model, probe, show_progress=False)
    heads = sl.sink_specialized_heads(census.sink_scores(0), eps=0.3, q=0.9)
    kwargs = dict(layers=list(range(first, last + 1)), heads=heads, n_prompts=8, seq_len=32, n_boot=50,
                  evaluation=sl.EvalOptions(limit=args.limit, n_lm_prompts=2, n_copy=2),
                  search=sl.SearchOptions(strategy=["single_layer_rank", "greedy"], greedy_pool=args.greedy_pool,
                                          patience=1, head_removal="best"),
                  show_progress=False)

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray_start = time.perf_counter() - start

    runs = [("serial (2 threads)", 2, None), ("local (1 thread)", 1, None),
            ("ray 1 worker x 1 thread", 1, 1), ("ray 2 workers x 1 thread", 1, 2)]
    times, tables = {}, {}
    for name, threads, workers in runs:
        torch.set_num_threads(threads)
        executor = None if workers is None else sl.RayExecutor(workers=workers, num_cpus=1)
        start = time.perf_counter()
        selection = sl.layer_selection(model, sl.PruneSpec.template(10), executor=executor, **kwargs)
        times[name] = time.perf_counter() - start
        tables[name] = selection.table
        where = "the driver" if workers is None else "the workers"
        print(f"{name}: {times[name]:.1f} s, {len(selection.table)} rows, "
              f"{selection.cost['configs_evaluated']} configurations evaluated by {where}", flush=True)
    ray.shutdown()

    reference = tables["serial (2 threads)"]
    numbers = [c for c in reference.columns if reference[c].dtype.kind == "f"]
    worst = 0.0
    for name, table in tables.items():
        assert table["key"].tolist() == reference["key"].tolist(), f"{name}: other configurations than serial"
        worst = max(worst, float(np.nanmax(np.abs(table[numbers].to_numpy() - reference[numbers].to_numpy()))))
    load = os.getloadavg()[0]
    print(f"\nlayer selection of {args.model}: layers {first}-{last}, greedy pool {args.greedy_pool}, "
          f"{len(reference)} table rows; local cluster start {ray_start:.1f} s (not counted); load average "
          f"{load:.2f} on {os.cpu_count()} cores at the end")
    print("| run | wall (s) |\n| --- | --- |")
    for name in times:
        print(f"| {name} | {times[name]:.1f} |")
    overhead = times["ray 1 worker x 1 thread"] / times["local (1 thread)"] - 1
    print(f"\nRay overhead, 1 worker x 1 thread against the local executor on 1 thread: {overhead:+.1%} "
          f"(target <= +10 %)")
    print(f"2 workers x 1 thread: speedup {times['local (1 thread)'] / times['ray 2 workers x 1 thread']:.2f}x "
          f"against local 1 thread, {times['serial (2 threads)'] / times['ray 2 workers x 1 thread']:.2f}x against "
          "serial 2 threads")
    print(f"largest difference from the serial run: {worst:.3g} (limit 1e-6)")
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
