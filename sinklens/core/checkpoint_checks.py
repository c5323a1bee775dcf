"""Checks of a checkpoint folder before its weights are loaded: a supported decoder family, a readable config,
weights whose names and shapes belong to that config, tokenizer files."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch

from .errors import InputError, UnsupportedArchitectureError

# the decoder families with a Q/K layout in sinklens.core.qk (docs/families.md: what each one was checked for)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "olmo2", "gpt2", "gpt_neox")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _read_config(folder: Path) -> dict:
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


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
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


def _model_names(skeleton, names: list[str]) -> dict[str, str]:
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
    _read_config(folder)
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
        for tensor, shape in _safetensors_shapes(path).items():
            found[tensor] = (shape, path)
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds (validation, type, key) for one cause
        raise InputError(f"{folder / 'config.json'} is not a configuration transformers can read ({err}): restore it "
                         "from the original checkpoint.") from err
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    renamed = _model_names(skeleton, list(found))
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


def check_architecture(folder: Path) -> None:
    """Refuse a checkpoint whose ``model_type`` has no Q/K layout, before any weight is read."""
    config = _read_config(folder)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"{folder} holds a {model_type!r} model; sinklens supports the decoder families "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (see docs/families.md). Pick a checkpoint of one of them.")
