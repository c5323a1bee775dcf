"""Full sink census vs one bare HF eager forward on the same tokens (8 x 128 by default).

Prints the median time of each over alternating runs and their ratio (target <= 1.2, floor 1.0).
Run with `make bench` or `.venv/bin/python bench/census.py [--model NAME] [--repeats N]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

import sinklens as sl
from sinklens.core.sources import resolve_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    bridge = sl.load_model(args.model, device="cpu")
    eager = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(args.model), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    batch = sl.probe_tokens(bridge, n_prompts=args.batch, seq_len=args.seq_len)

    def census():
        sl.run_census(bridge, batch, batch_size=args.batch, show_progress=False)

    def forward():
        eager(batch.tokens, attention_mask=batch.attention_mask)

    census(), forward()  # warm-up
    times = {"census": [], "forward": []}
    for _ in range(args.repeats):
        for name, fn in (("census", census), ("forward", forward)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"model {args.model}, tokens {args.batch} x {args.seq_len}, {torch.get_num_threads()} threads, "
          f"{args.repeats} alternating runs")
    print(f"HF eager forward (median): {med['forward']:.3f} s")
    print(f"full sink census (median): {med['census']:.3f} s")
    print(f"census / forward ratio: {med['census'] / med['forward']:.3f}  (target <= 1.2, floor 1.0)")


if __name__ == "__main__":
    main()
