"""Small argument checks shared by every public function (one place, one wording)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from .errors import InputError


def as_int(value) -> int | None:
    """``value`` as an int when it is an integer (Python or numpy, not bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """One of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"Unknown {name} {value!r}: use one of {tuple(choices)}.")
    return value


def check_fraction(name: str, value: float, *, open_low: bool = False) -> float:
    """A number in [0, 1] (or (0, 1] with ``open_low``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name} must be a number in [0, 1], got {value!r} ({type(value).__name__}).")
    low_ok = value > 0 if open_low else value >= 0
    if not (low_ok and value <= 1):
        interval = "(0, 1]" if open_low else "[0, 1]"
        raise InputError(f"{name} must lie in {interval}, got {value}. Pass a fraction, not a percentage.")
    return float(value)


def check_index(name: str, value: int, size: int, what: str) -> int:
    """An integer index in [0, size)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if not 0 <= value < size:
        raise InputError(f"{name}={value} is out of range: the model has {size} {what} (valid: 0..{size - 1}).")
    return value


def check_k(k: int, d_model: int) -> int:
    """Number of kept dimensions, 1 <= k <= d_model."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise InputError(f"k must be an int, got {k!r} ({type(k).__name__}).")
    if not 1 <= k <= d_model:
        raise InputError(f"k={k} is out of range: choose 1 <= k <= d_model = {d_model}.")
    return k


def check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """A non-empty list of distinct valid layer indices (None means all layers)."""
    if layers is None:
        return list(range(n_layers))
    layers = list(layers)
    if not layers:
        raise InputError("The layer set is empty: pass at least one layer index, or None for all layers.")
    for layer in layers:
        check_index("layer", layer, n_layers, "layers")
    if len(set(layers)) != len(layers):
        raise InputError(f"Duplicate layers in {layers}: list each layer once.")
    return sorted(layers)
