#!/usr/bin/env bash
# The GPU check of issue 8, made to travel (issue 22): Llama-2-7B shape (random weights, 32 layers, bf16) on CUDA,
# then the notebook series --ci on it, in one call of at most 10 minutes on a GPU host without a package index.
#
# On the device machine, from the repository root, the carried folder made by bench/gpu_wheels.sh (about 42 MiB):
#
#   run(command="bash bench/gpu_check.sh .gpu", carry=[".gpu"], timeout_s=600)
#
# (The host's copy of the tree has no .git: prefix COMMIT=<git rev-parse --short HEAD> to name the commit in the log.)
#
# Rehearsal on a CPU machine: `make gpu-rehearsal` (DEVICE=cpu LAYERS=2, a fresh Python 3.12 holding only the host's
# packages). The host brings Python 3.12, torch 2.11 (CUDA), transformers 5.17, accelerate, pandas, numpy,
# safetensors, tokenizers, jaxtyping, pyyaml, jinja2, tqdm, pytest; the rest comes from the folder (.gpu/):
# wheels.tar.xz (the wheels of bench/gpu_wheels.txt), manifest.json, tokenizer/ (the embedded model's).
#
# Steps, with their time budget on the GPU host: estimates, since nothing has run on a GPU yet. What the rehearsal
# measured on 2 busy CPU cores (2 layers, float32) follows in brackets. Steps 0-5 stop the script on failure; a
# failing bench does not stop the series.
#   0. carried folder complete: every distribution of bench/gpu_wheels.txt, wheels for this Python,     2 s  [0 s]
#      archive intact, tokenizer present (names what is missing or wrong)
#   1. device: CUDA visible (else stop, naming the visible devices; DEVICE=cpu: the rehearsal only)     10 s  [4 s]
#   2. disk: free space for the checkpoint and the install (names the need)                             1 s  [0 s]
#   3. install: unpack the wheels, pip install --no-index --no-deps --target $WORK/site                30 s  [6 s]
#      (a distribution the host already has is skipped and named, never shadowed)
#   4. versions.txt, and every import the check needs                                                 20 s  [12 s]
#   5. the checkpoint: sinklens.core.testing.random_llama, $LAYERS layers, bf16 (13.8 GB for 32)          150 s  [38 s]
#   6. scale.txt, scale.json: bench/scale.py on $DEVICE                                               90 s  [632 s]
#   7. series.tar.gz: python -m sinklens run --ci on the checkpoint, 7 model loads              the rest  [596 s]
#      (about 280 s; SERIES_MIN=120 s must be left, else it is skipped with a message; stopped at the deadline)
# DEADLINE (570 s from the start) bounds steps 6 and 7 (each runs under `timeout`; the bench first, it may take
# all the time there is), so the outputs are written inside timeout_s=600. $OUT receives 5 files: gpu_check.log,
# versions.txt, scale.txt, scale.json, series.tar.gz (the series' run folder; without figures/*.html if it would
# pass 16 MiB). If the series was skipped or cut, a second call while the machine is still warm (it keeps the
# checkpoint in $WORK) runs only the series, or its remaining notebooks:
#
#   run(command="BENCH=0 SERIES_ARGS='-p eps=0.1 -p q=0.5 --only 05 06 07' bash bench/gpu_check.sh .gpu",
#       carry=[".gpu"], timeout_s=...)
#
# Settings (environment): OUT (set by the host; default runs/gpu-check-<timestamp>), DEVICE (cuda), LAYERS (32),
# DTYPE (bf16), DEADLINE (570), SERIES_MIN (120), BENCH (0: skip step 6), WORK (${TMPDIR:-/tmp}/sinklens-gpu-check:
# site, checkpoint, run folder), PYTHON (python3), SCALE_ARGS (more bench/scale.py arguments), SERIES_ARGS (default
# "-p eps=0.1 -p q=0.5": random weights need a low sink bar to have sink-specialized heads, as in
# tests/test_family_series.py), AUDIT (1: list the carried distributions each process imported, and those none did;
# the rehearsal sets it).
# Random weights test mechanics, cost and memory at 7B scale, never the phenomenon: no sink number here means anything.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
FOLDER=$(realpath -m "${1:-$ROOT/.gpu}")
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
LAYERS=${LAYERS:-32}
DTYPE=${DTYPE:-bf16}
DEADLINE=${DEADLINE:-570}
SERIES_MIN=${SERIES_MIN:-120}
SERIES_ARGS=${SERIES_ARGS:--p eps=0.1 -p q=0.5}
SCALE_ARGS=${SCALE_ARGS:-}
OUT=$(realpath -m "${OUT:-$ROOT/runs/gpu-check-$(date +%Y%m%d-%H%M%S)}")
WORK=$(realpath -m "${WORK:-${TMPDIR:-/tmp}/sinklens-gpu-check}")
SITE=$WORK/site
CKPT=$WORK/llama-2-7b-${LAYERS}L
export SINKLENS_CACHE=$WORK/cache JUPYTER_DATA_DIR=$WORK/jupyter
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1  # the host has no network
export TQDM_DISABLE=1  # no progress bars in the log
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE=$!
trap 'exec >&- 2>&-; wait "$TEE" 2>/dev/null || true' EXIT  # the log complete before the host takes $OUT
cd "$ROOT"
SECONDS=0
TIMES=()
step() {  # NAME BUDGET
    NAME=$1; T0=$SECONDS
    echo; echo "== $(date +%H:%M:%S) +${SECONDS}s  $1  (budget $2 s; $((DEADLINE - SECONDS)) s to the deadline)"
}
done_step() {  # [NOTE]
    TIMES+=("$(printf '%5d s  %s%s' $((SECONDS - T0)) "$NAME" "${1:+  ($1)}")")
    echo "-- $NAME: $((SECONDS - T0)) s${1:+, $1}"
}
summary() {
    echo; echo "== $(date +%H:%M:%S) +${SECONDS}s  steps:"; printf '%s\n' "${TIMES[@]}"
    echo "   total ${SECONDS} s; $OUT:"; ls -l "$OUT" | tail -n +2
}
fail() { echo "gpu_check: $*" >&2; TIMES+=("      failed: $NAME"); summary; exit 2; }
echo "sinklens GPU check: folder $FOLDER, DEVICE=$DEVICE LAYERS=$LAYERS DTYPE=$DTYPE DEADLINE=${DEADLINE}s, OUT=$OUT"
COMMIT=${COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo 'unknown (no .git here: set COMMIT=)')}
echo "commit $COMMIT, host $(hostname)"

step "0/7 carried folder" 2
"$PY" - "$FOLDER" "$HERE/gpu_wheels.txt" <<'PYTHON' || fail "$FOLDER is not usable (above): nothing ran."
import hashlib, json, platform, re, sys
from pathlib import Path

folder, listing = Path(sys.argv[1]), Path(sys.argv[2])
make = "make it with `bash bench/gpu_wheels.sh` on a machine with the package index and carry it (carry=['.gpu'])"
if not (folder / "manifest.json").is_file():
    sys.exit(f"{folder} is missing or has no manifest.json: {make}.")
try:
    manifest = json.loads((folder / "manifest.json").read_text())
except ValueError as err:
    sys.exit(f"{folder / 'manifest.json'} is not valid JSON ({err}): {make}.")
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
wanted = {}
for line in listing.read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
        name, version = line.split("==")
        wanted[norm(name)] = version
carried = {e["name"]: e for e in manifest["wheels"]}
problems = [f"missing distribution {name}=={version} (bench/gpu_wheels.txt)" for name, version in wanted.items()
            if name not in carried]
problems += [f"{name}: the folder has {carried[name]['version']}, bench/gpu_wheels.txt wants {version}"
             for name, version in wanted.items() if name in carried and carried[name]["version"] != version]
try:
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename
except ImportError:
    sys.exit("this Python has no `packaging` (transformers needs it): is this the GPU host's Python? Set PYTHON=...")
supported = set(sys_tags())
python = f"CPython {platform.python_version()}" if sys.implementation.name == "cpython" else sys.version.split()[0]
for entry in manifest["wheels"]:
    tags = parse_wheel_filename(entry["file"])[3]
    if not tags & supported:
        built = sorted({f"{t.interpreter}-{t.abi}-{t.platform}" for t in tags})
        problems.append(f"wheel {entry['file']} is built for {', '.join(built)}, not for this {python} "
                        f"({platform.machine()})")
archive = folder / manifest["archive"]
if not archive.is_file():
    problems.append(f"{archive.name} is missing")
elif archive.stat().st_size != manifest["archive_bytes"]:
    problems.append(f"{archive.name} has {archive.stat().st_size:,} bytes, the manifest says "
                    f"{manifest['archive_bytes']:,}: truncated or replaced")
elif hashlib.sha256(archive.read_bytes()).hexdigest() != manifest["archive_sha256"]:
    problems.append(f"{archive.name} does not match the sha256 of the manifest: corrupt or replaced")
problems += [f"tokenizer/{name} is missing" for name in ("tokenizer.json", "tokenizer_config.json")
             if not (folder / "tokenizer" / name).is_file()]
total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
print(f"{folder}: {total:,} bytes ({total / 2**20:.1f} MiB), made {manifest['made']}; "
      f"{len(manifest['wheels'])} wheels ({sum(e['bytes'] for e in manifest['wheels']):,} bytes as wheels):")
print("  " + ", ".join(f"{e['name']} {e['version']}" for e in manifest["wheels"]))
for path in sorted(p for p in folder.rglob("*") if p.is_file()):
    print(f"  {path.stat().st_size:>12,}  {path.relative_to(folder)}")
if problems:
    print("\n".join(f"  PROBLEM: {p}" for p in problems))
    if any(p.startswith("wheel ") for p in problems):
        make = (f"the folder is made for {manifest['python']}: run the check with the host's CPython 3.12 "
                f"(PYTHON=...), or make the folder for this Python")
    sys.exit(f"{len(problems)} problem(s) in {folder}: {make}.")
PYTHON
done_step

step "1/7 device $DEVICE" 10
"$PY" - "$DEVICE" <<'PYTHON' || fail "no usable device $DEVICE (above): stopped before installing anything."
import os, shutil, subprocess, sys

import torch

device = sys.argv[1]
count = torch.cuda.device_count() if torch.cuda.is_available() else 0
names = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(count)]
smi = "not installed"
if shutil.which("nvidia-smi"):
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    smi = (result.stdout.strip() or result.stderr.strip() or f"exit {result.returncode}").replace("\n", "; ")
visible = ", ".join(["cpu", *names])
print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none, CPU-only'}); visible devices: {visible}")
print(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}; nvidia-smi -L: {smi}")
if device == "cpu":
    print("DEVICE=cpu: the rehearsal (no GPU needed); on the GPU host leave DEVICE unset.")
elif device.startswith("cuda"):
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        sys.exit(f"{device} is not visible: the visible devices are {visible}. This check is for a GPU host "
                 "(DEVICE=cpu is for the rehearsal only).")
else:
    sys.exit(f"DEVICE={device}: use cuda, cuda:N, or cpu (the rehearsal).")
PYTHON
done_step

step "2/7 disk for the checkpoint and the install" 1
"$PY" - "$FOLDER" "$WORK" "$CKPT" "$LAYERS" <<'PYTHON' || fail "not enough disk (above): nothing installed."
import json, shutil, sys
from pathlib import Path

folder, work, ckpt, layers = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
tokenizer = json.loads((folder / "tokenizer" / "tokenizer.json").read_text())
vocab = len(set(tokenizer["model"]["vocab"].values()) | {t["id"] for t in tokenizer.get("added_tokens", [])})
d, mlp = 4096, 11008  # Llama-2-7B widths (sinklens.core.testing.SHAPES); bf16: 2 bytes a weight
weights = 2 * (2 * vocab * d + layers * (4 * d * d + 3 * d * mlp + 2 * d) + d)
manifest = json.loads((folder / "manifest.json").read_text())
install = 2 * manifest["unpacked_bytes"]  # the wheels zipped again (stored), and installed
reuse = (ckpt / "config.json").is_file() and (ckpt / "SINKLENS_RANDOM_WEIGHTS.txt").is_file()
need = install + 200 * 2**20 + (0 if reuse else weights)  # + the series' run folder
free = shutil.disk_usage(work).free
print(f"{work}: {free / 2**30:.1f} GiB free; needs {need / 2**30:.1f} GiB: checkpoint "
      f"{'reused, ' + ckpt.name if reuse else f'{weights / 2**30:.1f} GiB ({layers} layers, vocab {vocab}, bf16)'}, "
      f"install {install / 2**30:.1f} GiB, series 0.2 GiB")
if free < need:
    sys.exit(f"{work} has {free / 2**30:.1f} GiB free but the check needs {need / 2**30:.1f} GiB: free some, or point "
             "WORK (or TMPDIR) at a larger disk.")
PYTHON
done_step

step "3/7 install the carried wheels into $SITE" 30
rm -rf "$SITE" "$WORK/wheels"
"$PY" - "$FOLDER" "$WORK/wheels" <<'PYTHON' > "$WORK/install.txt" || fail "could not unpack the carried wheels (above)."
import base64, csv, hashlib, importlib.metadata as md, json, sys, tarfile, zipfile
from pathlib import Path

folder, wheels = Path(sys.argv[1]), Path(sys.argv[2])
manifest = json.loads((folder / "manifest.json").read_text())
install, skipped = set(), []
for entry in manifest["wheels"]:
    try:
        skipped.append(f"{entry['name']} {md.version(entry['name'])} (carried {entry['version']})")
    except md.PackageNotFoundError:
        install.add(entry["file"])
if skipped:
    print(f"the host has, not installed again: {', '.join(skipped)}", file=sys.stderr)
wheels.mkdir(parents=True)
files: dict[str, dict[str, bytes]] = {name: {} for name in install}
with tarfile.open(folder / manifest["archive"], "r:xz") as tar:
    for member in tar:
        wheel, _, path = member.name.partition("/")
        if wheel in files and member.isfile():
            files[wheel][path] = tar.extractfile(member).read()
for wheel, content in files.items():
    record = next((p for p in content if p.endswith(".dist-info/RECORD")), None)
    if record is None:
        sys.exit(f"{manifest['archive']} holds no {wheel} (or not its RECORD): make the folder again with "
                 "bash bench/gpu_wheels.sh.")
    for path, digest, _ in csv.reader(content[record].decode().splitlines()):  # every file as RECORD describes it
        if digest:
            algorithm, _, expected = digest.partition("=")
            data = content.get(path)
            actual = data is not None and base64.urlsafe_b64encode(hashlib.new(algorithm, data).digest()).rstrip(b"=")
            if actual != expected.encode():
                sys.exit(f"{wheel}: {path} is {'missing' if data is None else 'not the file its RECORD describes'}: "
                         "the carried archive is damaged; make the folder again with bash bench/gpu_wheels.sh.")
    with zipfile.ZipFile(wheels / wheel, "w", zipfile.ZIP_STORED) as out:
        for path, data in content.items():
            out.writestr(path, data)
    print(wheels / wheel)
print(f"{len(files)} wheels rebuilt from {manifest['archive']}, every file checked against its RECORD", file=sys.stderr)
PYTHON
mapfile -t WHEEL_FILES < "$WORK/install.txt"
mkdir -p "$SITE"
if [ "${#WHEEL_FILES[@]}" -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${WHEEL_FILES[@]}" || fail "pip could not install the carried wheels (above)."
fi
rm -rf "$WORK/wheels"
echo "$SITE: $(du -sh "$SITE" | cut -f1), ${#WHEEL_FILES[@]} distributions"
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
done_step

step "4/7 versions and imports" 20
COMMIT=$COMMIT "$PY" - "$SITE" <<'PYTHON' | tee "$OUT/versions.txt" \
    || fail "an import the check needs fails here (above)."
import importlib, importlib.metadata as md, os, platform, shutil, subprocess, sys

site = sys.argv[1]
import torch

print(f"sinklens commit {os.environ['COMMIT']}; python {platform.python_version()} ({sys.executable}), "
      f"{platform.platform()}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"{torch.cuda.device_count()} GPU(s), {torch.get_num_threads()} CPU threads")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.used,memory.total", "--format=csv"],
                         capture_output=True, text=True).stdout.strip())
for module in ("sinklens", "transformer_lens.model_bridge", "datasets", "pyarrow", "papermill", "nbclient",
               "ipykernel", "plotly", "circuitsvis"):
    importlib.import_module(module)  # fails here, naming the module, rather than minutes later
for dist in sorted(md.distributions(), key=lambda d: d.metadata["Name"].lower()):
    where = "carried" if str(dist.locate_file("")).startswith(site) else "host"
    print(f"{dist.metadata['Name']} {dist.version} ({where})")
import sinklens

print(f"sinklens {sinklens.__version__} from {sinklens.__file__}")
PYTHON
done_step

if [ "${AUDIT:-0}" = 1 ]; then  # every Python process of steps 5-7 lists the carried distributions it imported
    mkdir -p "$WORK/audit"; rm -f "$WORK/audit/imports.txt"
    cat > "$WORK/audit/sitecustomize.py" <<'PYTHON'
import atexit, os, sys


def _imported_carried():
    import importlib.metadata as md
    site, names = os.environ["SINKLENS_AUDIT_SITE"], md.packages_distributions()
    found = {d for m in {n.split(".")[0] for n in list(sys.modules)} for d in names.get(m, ())
             if str(md.distribution(d).locate_file("")).startswith(site)}
    with open(os.environ["SINKLENS_AUDIT_FILE"], "a") as fh:
        fh.write(" ".join(sys.argv[:1]).rsplit("/", 1)[-1] + ": " + " ".join(sorted(found)) + "\n")


atexit.register(_imported_carried)
PYTHON
    export PYTHONPATH="$WORK/audit:$PYTHONPATH" SINKLENS_AUDIT_SITE=$SITE SINKLENS_AUDIT_FILE=$WORK/audit/imports.txt
fi

step "5/7 checkpoint: Llama-2-7B shape, $LAYERS layers, bf16, in $CKPT" 150
if [ -f "$CKPT/config.json" ] && [ -f "$CKPT/SINKLENS_RANDOM_WEIGHTS.txt" ]; then
    echo "reused (built by an earlier run)"
else
    rm -rf "$CKPT" "$CKPT.partial"
    "$PY" -c "import sys; from sinklens.core.testing import random_llama; \
random_llama(sys.argv[1], 'llama-2-7b', n_layers=int(sys.argv[2]), vocab_from=sys.argv[3], dtype='bf16')" \
        "$CKPT.partial" "$LAYERS" "$FOLDER/tokenizer" || fail "could not write the checkpoint (above)."
    mv "$CKPT.partial" "$CKPT"
fi
echo "$(du -sh "$CKPT" | cut -f1) in $(ls "$CKPT" | wc -l) files"
done_step

STATUS=0
step "6/7 bench/scale.py on $DEVICE, $DTYPE" 90
if [ "${BENCH:-1}" = 0 ]; then
    done_step "skipped: BENCH=0"
else
    left=$((DEADLINE - SECONDS - 10)); [ "$left" -ge 60 ] || left=60  # the bench comes first: all the time there is
    if timeout --kill-after=10 "$left" "$PY" bench/scale.py --shape llama-2-7b --layers "$LAYERS" --device "$DEVICE" \
            --dtype "$DTYPE" --folder "$CKPT" --json "$OUT/scale.json" $SCALE_ARGS | tee "$OUT/scale.txt"; then
        done_step
    else
        code=$?; STATUS=1
        done_step "FAILED, exit $code$([ "$code" = 124 ] && echo ": stopped at the deadline after $left s")"
    fi
fi

step "7/7 the notebook series --ci on the checkpoint" "$((DEADLINE - SECONDS))"
left=$((DEADLINE - SECONDS - 10))  # 10 s to archive the run folder
if [ "$left" -lt "$SERIES_MIN" ]; then
    echo "series SKIPPED: $left s left before the deadline (DEADLINE=$DEADLINE), it needs at least $SERIES_MIN s."
    done_step "skipped: short of time"
else
    rm -rf "$WORK/series"
    if timeout --kill-after=10 "$left" "$PY" -m sinklens run --ci --model "$CKPT" --out "$WORK/series" \
            $SERIES_ARGS; then
        note=""
    else
        code=$?; STATUS=1
        note="FAILED, exit $code$([ "$code" = 124 ] && echo ": stopped at the deadline after $left s")"
    fi
    run=$(ls -d "$WORK"/series/2*/ 2>/dev/null | head -1 || true)
    if [ -n "$run" ]; then
        tar -czf "$OUT/series.tar.gz" -C "$WORK/series" "$(basename "$run")"
        if [ "$(stat -c %s "$OUT/series.tar.gz")" -gt $((16 * 1024 * 1024)) ]; then
            tar -czf "$OUT/series.tar.gz" -C "$WORK/series" --exclude='figures/*.html' "$(basename "$run")"
            echo "series.tar.gz without figures/*.html: the whole run folder passed 16 MiB"
        fi
        echo "$(basename "$run") -> series.tar.gz, $(stat -c %s "$OUT/series.tar.gz") bytes"
    fi
    done_step "$note"
fi

if [ "${AUDIT:-0}" = 1 ]; then
    "$PY" - "$WORK/audit/imports.txt" "$FOLDER/manifest.json" <<'PYTHON'
import json, re, sys

norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
lines = open(sys.argv[1]).read().splitlines()
used = {norm(d) for line in lines for d in line.partition(": ")[2].split()}
carried = [e["name"] for e in json.load(open(sys.argv[2]))["wheels"]]
print(f"\naudit: {len(lines)} Python processes; {len(used & set(carried))} of the {len(carried)} carried "
      f"distributions imported; never imported: {', '.join(sorted(set(carried) - used)) or 'none'}")
PYTHON
fi
summary
exit "$STATUS"
