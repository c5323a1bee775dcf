"""Cost of an attention-calibrated (ACT) forward over a plain eager forward of the bridge, and the sink sets that
``min_queries`` gives.

Timing: the same bridge, the same tokens (8 x 128 probe prompts by default), a plain forward and a forward under
``sl.calibrate_attention`` of every head of every layer (the most a calibration can cost), alternating; prints the best
of ``--repeats`` runs of each and their ratio (target <= 1.3).

``--sinks``: on the same prompts, ACT's sink sets with ``min_queries=1`` (ACT's code) and 8 (sinklens's default), over
every head: flagged keys per (prompt, head), and how many of them are seen by fewer than 8 queries (the last 7
positions, whose column mean is mostly a query's attention to itself).

``--search``: the cost of the head search per candidate, on a small evaluation plan (``--limit`` items per task):
one candidate head per layer in ``--layers`` searched alone (``sl.calibration_head_search(candidates=[...])``), its
forward-equivalents per candidate (layers run / L: a head in layer l runs layers l..L-1 from the cached dense
residual) and its seconds per candidate against one plain run of the same plan, measured in the same run; then the
forward-equivalents of the default mass screen's candidates and of a full per-head search (every head), computed
from the same rule.

Run with `.venv/bin/python bench/attention_calibration.py [--model NAME] [--repeats N] [--sinks | --search]`.
"""

from __future__ import annotations

import argparse
import time

import torch

import sinklens as sl


def timing(bridge, batch, heads, repeats: int) -> None:
    def plain():
        bridge(batch.tokens, attention_mask=batch.attention_mask)

    def calibrated():
        with sl.calibrate_attention(bridge, heads):
            bridge(batch.tokens, attention_mask=batch.attention_mask)

    plain(), calibrated()  # warm-up
    times = {"plain": [], "calibrated": []}
    for _ in range(repeats):
        for name, fn in (("plain", plain), ("calibrated", calibrated)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    best = {name: min(ts) for name, ts in times.items()}
    print(f"plain eager forward (best): {best['plain']:.3f} s")
    print(f"calibrated forward, {len(heads)} heads (best): {best['calibrated']:.3f} s")
    print(f"calibrated / plain ratio: {best['calibrated'] / best['plain']:.3f}  (target <= 1.3)")


def sink_sets(bridge, batch, heads, last: int = 8) -> None:
    lengths = batch.attention_mask.sum(1).cpu()
    for min_queries in (1, 8):
        with sl.calibrate_attention(bridge, heads, min_queries=min_queries) as handle:
            flagged = late = 0
            bridge(batch.tokens, attention_mask=batch.attention_mask)
            start = batch.attention_mask.argmax(1).cpu()
            for sinks in handle.sink_sets().values():  # bool [prompt, key], absolute positions
                relative = torch.arange(sinks.shape[1], device="cpu")[None, :] - start[:, None]
                flagged += int(sinks.sum())
                late += int((sinks & (relative > (lengths[:, None] - last))).sum())  # seen by < last queries
        n_units = len(heads) * batch.tokens.shape[0]
        print(f"min_queries={min_queries}: {flagged} flagged keys over {n_units} (prompt, head) pairs "
              f"({flagged / n_units:.2f} per head and prompt); {late} of them seen by fewer than {last} queries "
              f"(the last {last - 1} positions) "
              f"({late / n_units:.2f} per head and prompt, {100 * late / max(flagged, 1):.1f}%)")


def search_cost(bridge, layers: list[int], limit: int) -> None:
    from sinklens.assess.selection import SPLIT_DECIDE

    info = sl.model_info(bridge)
    evaluation = sl.EvalOptions(limit=limit, n_lm_prompts=limit, lm_seq_len=64, n_copy=limit, share_context=False)
    plan = evaluation.plans(bridge)[SPLIT_DECIDE]
    plan.run(bridge)  # warm-up
    start = time.perf_counter()
    plan.run(bridge)
    plain = time.perf_counter() - start
    candidates = [(layer, 0) for layer in layers]
    start = time.perf_counter()
    search = sl.calibration_head_search(bridge, candidates=candidates, evaluation=evaluation, act_recipe=False,
                                        n_boot=100, show_progress=False)
    seconds = time.perf_counter() - start
    stages = search.cost["stages"]
    print(f"search plan: {len(plan.units)} units, one plain run {plain:.2f} s")
    print(f"{len(candidates)} candidates in layers {layers}: {stages['heads']:.2f} forward-equivalents, "
          f"{search.cost['per_head_candidate']:.3f} per candidate (rule: mean of (L - l) / L = "
          f"{sum(info.n_layers - l for l in layers) / info.n_layers / len(layers):.3f})")
    together = stages.get("together", 0.0)
    print(f"whole search {seconds:.1f} s = {seconds / plain:.2f} plain runs for {search.cost['total']:.2f} "
          f"forward-equivalents (dense {stages['dense']:.0f}, heads {stages['heads']:.2f}, together {together:.2f})")
    full = sum((info.n_layers - l) / info.n_layers for l in range(info.n_layers)) * info.n_heads
    print(f"full per-head search ({info.n_layers * info.n_heads} heads): {full:.1f} forward-equivalents of the search "
          f"plan, {full / (info.n_layers * info.n_heads):.3f} per candidate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sinks", action="store_true", help="count the sink sets of min_queries=1 and 8")
    parser.add_argument("--search", action="store_true", help="cost of the head search per candidate")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 10, 20, 28], help="--search: candidate layers")
    parser.add_argument("--limit", type=int, default=2, help="--search: evaluation items per task and split")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    bridge = sl.load_model(args.model, device="cpu")
    info = sl.model_info(bridge)
    heads = [(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)]
    batch = sl.probe_tokens(bridge, n_prompts=args.batch, seq_len=args.seq_len)
    print(f"model {args.model}, tokens {args.batch} x {args.seq_len}, {torch.get_num_threads()} threads")
    if args.sinks:
        sink_sets(bridge, batch, heads)
    elif args.search:
        search_cost(bridge, args.layers, args.limit)
    else:
        print(f"{args.repeats} alternating runs")
        timing(bridge, batch, heads, args.repeats)


if __name__ == "__main__":
    main()
