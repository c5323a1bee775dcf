"""Sink + window attention and StreamingLLM's loop on the embedded model: two costs against their baselines.

1. Restricted forward: one forward of a probe prompt of T tokens (default 4,096) through the fused restriction
   (``sinklens.prune.attention_window.fused_restriction``: each layer's HF attention module, SDPA for the other heads,
   blocked sink + window attention for the restricted ones) with every head, and with half the KV groups,
   restricted (sink 4, window 256), against the same path with no head restricted (a dense SDPA forward) and
   against the Hugging Face model loaded with ``attn_implementation="sdpa"``. Target: <= 1.3x the dense forward.
2. Streaming: ``streaming_perplexity(engine="loop")`` over N tokens (default 512; sink 4, window 252: the cache is
   full after 256 tokens) against a plain HF KV-cached decode of the same tokens (the ``sdpa`` HF model, one token
   per call with ``past_key_values``, logits and loss per step). Target: <= 1.5x its time. The chunked engine's
   time on the same text is printed too.

Times are the best of ``--repeats`` alternating runs (wall time). Run:
`.venv/bin/python bench/streaming.py [--length 4096] [--stream 512] [--repeats 2]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

import sinklens as sl
from sinklens.core.sources import resolve_checkpoint
from sinklens.prune.attention_window import fused_restriction


def note(text: str) -> None:
    """Progress on stderr (the report on stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def hf_decode(hf, ids: torch.Tensor) -> torch.Tensor:
    """Plain KV-cached decode: one token per call, the loss of the next token from each step's logits."""
    past, losses = None, []
    with torch.inference_mode():
        for t in range(len(ids) - 1):
            out = hf(input_ids=ids[t:t + 1][None], past_key_values=past, use_cache=True)
            past = out.past_key_values
            losses.append(torch.nn.functional.cross_entropy(out.logits[0, -1:].float(), ids[t + 1:t + 2]))
    return torch.stack(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--stream", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    bridge = sl.load_model(args.model, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(args.model), dtype=torch.float32,
                                              attn_implementation="sdpa").eval()
    ids = sl.probe_tokens(bridge, 1, args.length).tokens
    info = sl.model_info(bridge)

    def fused():
        with fused_restriction(bridge), torch.inference_mode():
            bridge.original_model.base_model(input_ids=ids, use_cache=False)

    def plain():
        with torch.inference_mode():
            hf.base_model(input_ids=ids, use_cache=False)

    half = [(l, g) for l in range(info.n_layers) for g in range(info.n_kv_heads) if g % 2 == 0]
    times = {"hf_sdpa": [], "dense": [], "restricted_all": [], "restricted_half_kv": []}
    fused(), plain()  # warm-up
    for i in range(args.repeats):
        note(f"forwards at T={args.length}, repeat {i + 1}/{args.repeats}")
        times["hf_sdpa"].append(best(plain, 1))
        times["dense"].append(best(fused, 1))
        with sl.restrict_attention(bridge, sink=4, window=256):
            times["restricted_all"].append(best(fused, 1))
        with sl.restrict_attention(bridge, kv_heads=half, sink=4, window=256):
            times["restricted_half_kv"].append(best(fused, 1))
    forward = {k: min(v) for k, v in times.items()}
    forward |= {"ratio_all": forward["restricted_all"] / forward["dense"],
                "ratio_half_kv": forward["restricted_half_kv"] / forward["dense"]}

    text = sl.probe_tokens(bridge, 1, args.stream, split="held_out").tokens[0]
    window = max(1, args.stream // 2 - 4)
    hf_decode(hf, text[:16])
    stream = {"hf_decode": [], "loop": [], "chunked": []}
    for i in range(args.repeats):
        note(f"streaming {len(text)} tokens, repeat {i + 1}/{args.repeats}")
        stream["hf_decode"].append(best(lambda: hf_decode(hf, text), 1))
        stream["loop"].append(sl.streaming_perplexity(bridge, text, sink=4, window=window, engine="loop").seconds)
        stream["chunked"].append(sl.streaming_perplexity(bridge, text, sink=4, window=window).seconds)
    decode = {k: min(v) for k, v in stream.items()}
    decode |= {"tokens": len(text), "window": window, "loop_tokens_per_s": len(text) / decode["loop"],
               "chunked_tokens_per_s": len(text) / decode["chunked"],
               "hf_tokens_per_s": len(text) / decode["hf_decode"], "ratio_loop": decode["loop"] / decode["hf_decode"]}
    report = {"model": info.name, "threads": torch.get_num_threads(), "length": args.length,
              "forward_s": forward, "streaming_s": decode}
    print(json.dumps(report, indent=1))
    print(f"restricted forward / dense SDPA forward at T={args.length}: all heads {forward['ratio_all']:.2f}x, "
          f"half the KV groups {forward['ratio_half_kv']:.2f}x (target <= 1.3x)")
    print(f"streaming loop / HF KV-cached decode over {len(text)} tokens: {decode['ratio_loop']:.2f}x "
          f"(target <= 1.5x); loop {decode['loop_tokens_per_s']:.0f} tokens/s, chunked "
          f"{decode['chunked_tokens_per_s']:.0f} tokens/s")


if __name__ == "__main__":
    main()
