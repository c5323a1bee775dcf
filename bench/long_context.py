"""Long-context sink census against one bare SDPA forward, at T = 2048, 4096, 8192 (batch 1).

For each length, on the same prompt of real text (the probe text): the wall time and the peak memory
growth (resident set size sampled every millisecond, minus the size before the call) of
- ``forward``: one forward of the Hugging Face model loaded with ``attn_implementation="sdpa"``;
- ``sdpa first keys``: ``run_census(engine="sdpa")`` (alpha_0..alpha_3 of every head);
- ``sdpa full``: ``run_census(engine="sdpa", full=True)`` (every key's column mean and the confidences);
- ``eager``: ``run_census(engine="eager")`` where its patterns fit (``--eager-max``, the estimate decides too).
Ratios are measured in one run: time over the forward's, and memory growth over the forward's, as a share
of one layer's float32 eager pattern [1, heads, T, T]. Targets: first keys <= 1.2x, full <= 2.5x the
forward's time; memory growth of either <= 10 % of one layer's pattern.
Run: `.venv/bin/python bench/long_context.py [--lengths 2048 4096 8192] [--repeats 1]`.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import threading
import time

import torch
from transformers import AutoModelForCausalLM

import sinklens as sl
from sinklens.loading import resolve_checkpoint
from sinklens.memory import eager_fits, pattern_bytes

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * PAGE


class PeakSampler:
    """Largest RSS seen by a thread polling every millisecond while the block runs."""

    def __enter__(self):
        gc.collect()
        self.base = self.peak = rss()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.done.wait(0.001):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, rss())
        self.growth = self.peak - self.base


def measure(runs: dict, repeats: int) -> dict[str, tuple[float, int, float]]:
    """Median wall time, largest memory growth and median CPU time (all threads) of each function, the functions
    alternating ``repeats`` times. CPU time is the fairer ratio on a machine shared with other work."""
    times = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    growth = dict.fromkeys(runs, 0)
    for _ in range(repeats):
        for name, fn in runs.items():
            with PeakSampler() as sampler:
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
            growth[name] = max(growth[name], sampler.growth)
    return {name: (statistics.median(times[name]), growth[name], statistics.median(cpu[name])) for name in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--eager-max", type=int, default=4096, help="longest T at which the eager engine is timed")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    bridge = sl.load_model(args.model, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(args.model), dtype=torch.float32,
                                              attn_implementation="sdpa").eval()
    info = sl.model_info(bridge)
    warm = sl.probe_tokens(bridge, 1, 128)
    hf(warm.tokens), sl.run_census(bridge, warm, engine="sdpa", show_progress=False)  # warm-up

    print(f"model {args.model} ({info.n_layers} layers, {info.n_heads} heads), batch 1, "
          f"{torch.get_num_threads()} threads, {args.repeats} run(s) each; memory = peak RSS growth during the call")
    header = (f"{'T':>5} | {'cpu x fwd: first':>16} {'full':>5} | {'forward s':>9} | {'first s':>8} {'x fwd':>6} | "
              f"{'full s':>7} {'x fwd':>6} | "
              f"{'eager s':>7} | {'pattern/layer':>13} | {'mem fwd':>8} {'first':>8} {'full':>8} {'eager':>8} | "
              f"{'first +%pat':>11} {'full +%pat':>10}")
    print(header)
    print("-" * len(header))
    mib = 2**20
    for width in args.lengths:
        batch = sl.probe_tokens(bridge, 1, width)
        runs = {
            "forward": lambda: hf(batch.tokens),
            "first": lambda: sl.run_census(bridge, batch, engine="sdpa", show_progress=False),
            "full": lambda: sl.run_census(bridge, batch, engine="sdpa", full=True, show_progress=False),
        }
        fits = eager_fits(1, info.n_heads, width, "cpu")[0]
        if width <= args.eager_max and fits:
            runs["eager"] = lambda: sl.run_census(bridge, batch, engine="eager", show_progress=False)
        res = measure(runs, args.repeats)
        pattern = pattern_bytes(1, info.n_heads, width)
        eager_t, eager_m = res.get("eager", (float("nan"), float("nan"), float("nan")))[:2]
        fwd_t, fwd_m, fwd_cpu = res["forward"]
        share = {name: 100 * (res[name][1] - fwd_m) / pattern for name in ("first", "full")}
        print(f"{width:>5} | {res['first'][2] / fwd_cpu:>16.2f} {res['full'][2] / fwd_cpu:>5.2f} | {fwd_t:>9.2f} | "
              f"{res['first'][0]:>8.2f} {res['first'][0] / fwd_t:>6.2f} | "
              f"{res['full'][0]:>7.2f} {res['full'][0] / fwd_t:>6.2f} | {eager_t:>7.2f} | {pattern / mib:>9.0f} MiB | "
              f"{fwd_m / mib:>8.0f} {res['first'][1] / mib:>8.0f} {res['full'][1] / mib:>8.0f} {eager_m / mib:>8.0f} | "
              f"{share['first']:>10.1f}% {share['full']:>9.1f}%", flush=True)
    print("cpu x fwd: CPU time (all threads) over the forward's. Targets: first-keys <= 1.2x the forward, "
          "full <= 2.5x; memory growth over the forward's <= 10% of one layer's pattern (memory columns in MiB)")


if __name__ == "__main__":
    main()
