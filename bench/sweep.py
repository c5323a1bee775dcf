"""Single-layer QK pruning sweep with prefix reuse against naive full forwards.

For every layer holding sink-specialized heads (census on probe prompts), prune them all at k and
evaluate the default suite (held-out half). The sweep engine starts each configuration from the
dense residual stream cached at its layer; the naive way runs the whole model every time.
Prints the forward-equivalents per evaluated configuration (decoder layers run / n_layers, the dense
pass included; target <= 0.6, naive 1.0), the measured time ratio (higher: the final norm and
unembedding of every scored position, e.g. each LM token, cannot be skipped), and checks that the
metrics equal those of full forwards on ``--check`` layers (all with --check 0). Exit status 1 if
a check fails or the target is missed.
Run with `.venv/bin/python bench/sweep.py [--model NAME] [--limit N] [--k K] [--check N]`.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

import sinklens as sl
from sinklens.assess.evaluation import build_plan
from sinklens.assess.sweep import Sweep

ATOL = 1e-4  # on summed log-likelihoods of an item (float32 forwards); hits must be identical


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--limit", type=int, default=8, help="evaluation items per task")
    parser.add_argument("--n-prompts", type=int, default=32, help="probe prompts for the census")
    parser.add_argument("--check", type=int, default=3, help="layers checked against full forwards (0: all)")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model = sl.load_model(args.model, device="cpu")
    info = sl.model_info(model)
    probe = sl.probe_tokens(model, n_prompts=args.n_prompts, seq_len=64)
    heads = sl.sink_specialized_heads(sl.run_census(model, probe, show_progress=False).sink_scores(0))
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    layers = sorted(by_layer)
    massive = sl.massive_activations(model, probe, layers=layers, show_progress=False)
    plan = build_plan(model, "default", limit=args.limit, split="held_out", n_lm_prompts=args.limit, lm_seq_len=64,
                      n_copy=args.limit)
    print(f"model {args.model}: {info.n_layers} layers, {len(heads)} sink-specialized heads in layers {layers}; "
          f"plan {plan.n_tokens} tokens; {torch.get_num_threads()} threads")

    sweep = Sweep(model, {"held_out": plan}, sl.PruneSpec(heads, args.k), calibration=massive, show_progress=False)
    start = time.perf_counter()
    records = sweep.run([("qk", (layer,), "held_out") for layer in layers])
    cached_time = time.perf_counter() - start
    cost = sweep.cost()

    spread = np.unique(np.linspace(0, len(layers) - 1, max(args.check, 1)).round().astype(int))
    checked = layers if args.check == 0 else [layers[i] for i in spread]
    naive_times, worst, same_hits = [], 0.0, True
    for layer in checked:
        record = records[layers.index(layer)]
        begin = time.perf_counter()
        with sl.prune_qk(model, sweep.heads_of((layer,)), args.k, dims="bos_top", calibration=massive):
            full = plan.run(model).per_item
        naive_times.append(time.perf_counter() - begin)
        got = record.result.per_item
        worst = max(worst, float(np.abs(got["nll"] - full["nll"]).max()), float(np.nanmax(
            np.abs(got["mc_nll"] - full["mc_nll"]).to_numpy(na_value=0.0))))
        same_hits &= bool((got[["n_correct", "acc"]].to_numpy() == full[["n_correct", "acc"]].to_numpy()).all())
        same_hits &= bool(np.array_equal(got["acc_norm"].fillna(-1).to_numpy(), full["acc_norm"].fillna(-1).to_numpy()))

    per_config = cached_time / len(layers)
    naive = float(np.mean(naive_times))
    print(f"single-layer sweep: {len(layers)} configurations in {cached_time:.1f} s ({per_config:.2f} s each, dense "
          "pass included)")
    print(f"forward-equivalents per evaluated configuration (decoder layers run / n_layers, dense pass included): "
          f"{cost['forward_equivalents_per_config']:.3f} (target <= 0.6; naive 1.0)")
    print(f"measured time per configuration, prefix reuse / full forward: {per_config / naive:.3f} "
          f"({per_config:.2f} s vs {naive:.2f} s over {len(checked)} checked layers)")
    ok = worst <= ATOL and same_hits
    print(f"metrics equal full forwards on layers {checked}: max |delta log-likelihood| = {worst:.2e} "
          f"(tolerance {ATOL}), identical hits/acc/acc_norm: {same_hits} -> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok and cost["forward_equivalents_per_config"] <= 0.6 else 1


if __name__ == "__main__":
    sys.exit(main())
