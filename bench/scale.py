"""Time and peak memory of every sinklens step on a random-init model of a real model's shape.

    python bench/scale.py --shape llama-2-7b --layers 2 --device cpu --dtype fp32     # the issue's sizes
    python bench/scale.py --layers 2 --prompts 16 --long-prompts 2                     # `make bench` (2 CPU cores)
    python bench/scale.py --shape llama-2-7b --layers 32 --device cuda --dtype bf16   # bench/gpu_check.sh

The checkpoint is written once by ``sinklens.core.testing.random_llama`` (bf16 weights, the embedded model's
tokenizer) into ``--folder`` (default: under the sinklens cache) and loaded with ``sl.load_model(folder)``.
Random weights test cost and mechanics, never the phenomenon: no number here says anything about sinks.

Per step: wall time and peak memory during the step (CUDA: ``max_memory_allocated``; CPU: peak RSS of
the process, its high-water mark reset before each step through ``/proc/self/clear_refs``). Then the
census/forward time ratio per probe shape, and the census' memory above a bare forward's peak set
against the size of one layer's fp32 attention pattern for one census batch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

import sinklens as sl
from sinklens.core.devices import resolve_device, resolve_dtype
from sinklens.core.embedded import cache_root
from sinklens.core.testing import SHAPES, random_llama

CENSUS_BATCH = 8  # run_census' default batch size: one layer's pattern is [8, heads, T, T]


class Meter:
    """Wall time and peak memory of one step (CUDA: max allocated; CPU: peak RSS since the step began)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rows: list[dict] = []

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)

    def _peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not resettable: lifetime peak

    @contextlib.contextmanager
    def step(self, name: str, note: str = ""):
        self._reset()
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        row = {"step": name, "seconds": seconds, "peak_bytes": self._peak(), "note": note}
        self.rows.append(row)
        print(f"{name:<44} {seconds:9.2f} s {row['peak_bytes'] / 2**30:9.2f} GiB  {note}", flush=True)

    def get(self, name: str) -> dict:
        return next(row for row in self.rows if row["step"] == name)


def bare_forward(model, batch, batch_size: int) -> None:
    """The model's forward on ``batch`` in census-sized batches, without hooks."""
    with torch.inference_mode():
        for start in range(0, batch.tokens.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            model(batch.tokens[rows], attention_mask=batch.attention_mask[rows])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-2-7b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2; the real model: all)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="model dtype (default: fp32 on the CPU, bf16 on CUDA)")
    parser.add_argument("--folder", default=None, help="checkpoint folder (built there when missing)")
    parser.add_argument("--eval-limit", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=128, help="prompts of 64 tokens (default 128)")
    parser.add_argument("--long-prompts", type=int, default=8, help="prompts of 1,024 tokens (default 8)")
    parser.add_argument("--json", default=None, help="also write the table as JSON to this file")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device.type == "cuda")
    folder = Path(args.folder or cache_root() / "bench" / f"{args.shape}-{args.layers}L")
    print(f"sinklens bench/scale.py: shape {args.shape}, {args.layers} layers, device {device}, dtype {dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    meter = Meter(device)
    if not (folder / "config.json").is_file():
        with meter.step("write random checkpoint (bf16)", str(folder)):
            random_llama(folder, args.shape, n_layers=args.layers, dtype=torch.bfloat16)
    with meter.step("load_model"):
        model = sl.load_model(str(folder), device=str(device), dtype=dtype)
    info = sl.model_info(model)
    print(f"model: d_model {info.d_model}, {info.n_heads} heads / {info.n_kv_heads} KV, d_head {info.d_head}, "
          f"{info.n_layers} layers, vocab {info.d_vocab}, {info.dtype} on {info.device}")

    short, long = f"{args.prompts}x64", f"{args.long_prompts}x1024"
    probes = {short: sl.probe_tokens(model, n_prompts=args.prompts, seq_len=64),
              long: sl.probe_tokens(model, n_prompts=args.long_prompts, seq_len=1024)}
    warm_up = probes[short]
    bare_forward(model, sl.TokenBatch(warm_up.tokens[:2, :16], warm_up.attention_mask[:2, :16], True), 2)
    for shape, batch in probes.items():
        with meter.step(f"bare forward {shape}"):
            bare_forward(model, batch, CENSUS_BATCH)
        with meter.step(f"run_census {shape}"):
            sl.run_census(model, batch, batch_size=CENSUS_BATCH, show_progress=False)
    probe = probes[short]
    with meter.step(f"massive_activations {short}"):
        stats = sl.massive_activations(model, probe, batch_size=CENSUS_BATCH, show_progress=False)
    layer = info.n_layers // 2
    heads = [(layer, h) for h in range(info.n_heads)]
    with meter.step(f"select_dims bos_top k=10, layer {layer}"):
        sl.select_dims(model, heads, k=10, dims="bos_top", calibration=probe)
    with meter.step(f"prune_qk all {info.n_heads} heads of layer {layer}, k=10", "apply + restore"):
        with sl.prune_qk(model, heads, k=10, dims="bos_top", calibration=stats):
            pass
    with meter.step(f"reconstruction_error k=10, {len(heads)} heads", f"model level, {short}"):
        sl.reconstruction_error(model, probe, heads, k=10, calibration=stats, batch_size=CENSUS_BATCH,
                                show_progress=False)
    with meter.step(f"evaluate(limit={args.eval_limit})"):
        sl.evaluate(model, limit=args.eval_limit, show_progress=False)

    print()
    summary = {}
    for shape, batch in probes.items():
        forward, census = meter.get(f"bare forward {shape}"), meter.get(f"run_census {shape}")
        length = batch.tokens.shape[1]
        pattern = CENSUS_BATCH * info.n_heads * length * length * 4  # one layer's fp32 pattern, one batch
        above = census["peak_bytes"] - forward["peak_bytes"]
        summary[shape] = {"census_over_forward": census["seconds"] / forward["seconds"],
                          "census_peak_above_forward_bytes": above, "one_layer_fp32_pattern_bytes": pattern}
        print(f"census/forward {shape}: time ratio {census['seconds'] / forward['seconds']:.2f}; census peak above "
              f"a bare forward's: {above / 2**20:+.0f} MiB against one layer's fp32 pattern "
              f"[{CENSUS_BATCH}, {info.n_heads}, {length}, {length}] = {pattern / 2**20:.0f} MiB")
    result = {"shape": args.shape, "layers": args.layers, "device": str(device), "dtype": str(dtype),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": meter.rows, "census": summary,
              "host": os.uname().nodename, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
