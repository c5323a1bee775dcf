"""Long-context sink census against one bare SDPA forward, at T = 2048, 4096, 8192 (batch 1).

For each length, on the same prompt of real text (the probe text): the wall time and the peak memory
growth (resident set size sampled every millisecond, minus the size before the call) of
- ``forward``: one forward of the Hugging Face model loaded with ``attn_implementation="sdpa"``;
- ``sdpa first keys``: ``run_census(engine="sdpa")`` (alpha_0..alpha_3 of every head);
- ``sdpa full``: ``run_census(engine="sdpa", full=True)`` (every key's column mean and the confidences);
- ``eager``: ``run_census(engine="eager")`` where its patterns fit (``--eager-max``, the estimate decides too).
Time ratios are measured in one run, the calls alternating (wall time, and CPU time of all threads, the fairer
ratio on a shared machine). Memory (``--memory``) is measured with a fresh process per call, so that no allocator
cache of an earlier call hides growth: the growth over the forward's, as a share of one layer's float32 eager
pattern [1, heads, T, T]. Targets: first keys <= 1.2x, full <= 2.5x the
forward's time; memory growth of either <= 10 % of one layer's pattern.
Run: `.venv/bin/python bench/long_context.py [--lengths 2048 4096 8192] [--repeats 1] [--memory]`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
from transformers import AutoModelForCausalLM

import sinklens as sl
from sinklens.core.memory import eager_fits, pattern_bytes
from sinklens.core.sources import resolve_checkpoint

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


def setup(model: str):
    """The bridge, a separate HF model with attn_implementation="sdpa", and their warm-up."""
    torch.set_grad_enabled(False)
    bridge = sl.load_model(model, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(model), dtype=torch.float32,
                                              attn_implementation="sdpa").eval()
    warm = sl.probe_tokens(bridge, 1, 128)
    hf(warm.tokens), sl.run_census(bridge, warm, engine="sdpa", show_progress=False)  # warm-up
    return bridge, hf


def calls(bridge, hf, batch) -> dict:
    """The measured calls on one batch."""
    return {
        "forward": lambda: hf(batch.tokens),
        "first": lambda: sl.run_census(bridge, batch, engine="sdpa", show_progress=False),
        "full": lambda: sl.run_census(bridge, batch, engine="sdpa", full=True, show_progress=False),
        "eager": lambda: sl.run_census(bridge, batch, engine="eager", show_progress=False),
    }


def child(model: str, name: str, width: int) -> None:
    """One call, twice, in this (fresh) process: print the memory growth of each in bytes. The first call at a
    new length can grow by a few hundred MiB more (seen for the first-keys census at 2048 and 4096 tokens, where
    a second call in the same process grew no more than the forward): the second
    one is the steady state reported."""
    bridge, hf = setup(model)
    batch = sl.probe_tokens(bridge, 1, width)
    growth = []
    for _ in range(2):
        with PeakSampler() as sampler:
            calls(bridge, hf, batch)[name]()
        growth.append(sampler.growth)
    print(json.dumps({"first_call": growth[0], "growth": growth[1]}))


def memory_table(args, n_heads: int) -> None:
    print("\npeak RSS growth (MiB), a fresh process per call, second of two calls")
    print(f"{'T':>5} | {'pattern/layer':>13} | {'forward':>8} {'first':>8} {'full':>8} {'eager':>8} | "
          f"{'first +%pat':>11} {'full +%pat':>10} | {'eager/pattern':>13}")
    mib = 2**20
    for width in args.lengths:
        names = ["forward", "first", "full"] + (["eager"] if width <= args.eager_max
                                                and eager_fits(1, n_heads, width, "cpu")[0] else [])
        growth = {}
        for name in names:
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--child", name, str(width)],
                                 capture_output=True, text=True, check=True).stdout
            growth[name] = json.loads(out.strip().splitlines()[-1])["growth"]
        pattern = pattern_bytes(1, n_heads, width)
        eager = growth.get("eager", float("nan"))
        print(f"{width:>5} | {pattern / mib:>9.0f} MiB | {growth['forward'] / mib:>8.0f} {growth['first'] / mib:>8.0f} "
              f"{growth['full'] / mib:>8.0f} {eager / mib:>8.0f} | "
              f"{100 * (growth['first'] - growth['forward']) / pattern:>10.1f}% "
              f"{100 * (growth['full'] - growth['forward']) / pattern:>9.1f}% | {eager / pattern:>13.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--eager-max", type=int, default=4096, help="longest T at which the eager engine is run")
    parser.add_argument("--memory", action="store_true", help="also the memory table (a fresh process per call)")
    parser.add_argument("--memory-only", action="store_true", help="only the memory table")
    parser.add_argument("--child", nargs=2, metavar=("CALL", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.child[0], int(args.child[1]))
        return

    if args.memory_only:
        memory_table(args, sl.model_info(sl.load_model(args.model, device="cpu")).n_heads)
        return
    bridge, hf = setup(args.model)
    info = sl.model_info(bridge)
    print(f"model {args.model} ({info.n_layers} layers, {info.n_heads} heads), batch 1, "
          f"{torch.get_num_threads()} threads, {args.repeats} run(s) each, alternating")
    header = (f"{'T':>5} | {'cpu x fwd: first':>16} {'full':>5} | {'forward s':>9} | {'first s':>8} {'x fwd':>6} | "
              f"{'full s':>7} {'x fwd':>6} | {'eager s':>7} {'x fwd':>6}")
    print(header)
    print("-" * len(header))
    for width in args.lengths:
        batch = sl.probe_tokens(bridge, 1, width)
        runs = calls(bridge, hf, batch)
        if width > args.eager_max or not eager_fits(1, info.n_heads, width, "cpu")[0]:
            del runs["eager"]
        res = measure(runs, args.repeats)
        fwd_t, _, fwd_cpu = res["forward"]
        eager_t = res["eager"][0] if "eager" in res else float("nan")
        print(f"{width:>5} | {res['first'][2] / fwd_cpu:>16.2f} {res['full'][2] / fwd_cpu:>5.2f} | {fwd_t:>9.2f} | "
              f"{res['first'][0]:>8.2f} {res['first'][0] / fwd_t:>6.2f} | "
              f"{res['full'][0]:>7.2f} {res['full'][0] / fwd_t:>6.2f} | {eager_t:>7.2f} {eager_t / fwd_t:>6.2f}",
              flush=True)
    print("cpu x fwd: CPU time (all threads) over the forward's. Targets: first-keys <= 1.2x the forward, "
          "full <= 2.5x.")
    if args.memory:
        memory_table(args, info.n_heads)
        print("Target: growth over the forward's <= 10% of one layer's pattern.")


if __name__ == "__main__":
    main()
