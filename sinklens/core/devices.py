"""Devices and dtypes: which devices are visible, what ``device=``, ``device_map=`` and ``dtype=`` mean, checked
before any weight is read."""

from __future__ import annotations

import warnings

import torch

from .errors import InputError

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


def map_uses_cuda(device_map: str | dict) -> bool:
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
