"""Small argument checks shared by every public function (one place, one wording)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TypeVar

from .errors import InputError

T = TypeVar("T")


def as_int(value) -> int | None:
    """``value`` as an int when it is an integer (Python or numpy, not bool), else None.

    Args:
        value: anything.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def check_int(name: str, value, *, minimum: int | None = None, allow_none: bool = False,
              meaning: str = "") -> int | None:
    """An integer argument, checked one way everywhere; returns it as a Python int (None when allowed).

    Python and numpy integers are accepted; bools, floats (even ``3.0``), strings and None (unless
    ``allow_none``) are refused with one message, ``"<name> must be an int ..."``, that names the
    argument, so a wrong type never surfaces later as a raw TypeError from deep in torch or numpy.

    Args:
        name: the argument's name, as the caller wrote it (used in the message).
        value: the value given.
        minimum: smallest allowed value, or None for no lower bound.
        allow_none: whether None is a valid value (e.g. ``limit=None`` for "all").
        meaning: a few words on what the integer counts, appended to the message (e.g. "items per task").
    """
    if value is None and allow_none:
        return None
    number = as_int(value)
    if number is None or (minimum is not None and number < minimum):
        wanted = "an int" + (f" >= {minimum}" if minimum is not None else "")
        wanted += f" ({meaning})" if meaning else ""
        wanted += " or None" if allow_none else ""
        hint = ""
        if isinstance(value, float) and value.is_integer():
            hint = f" Pass {int(value)}, not {value}."
        elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
            hint = f" Pass the number {value.strip()}, not the string {value!r}."
        raise InputError(f"{name} must be {wanted}, got {value!r} ({type(value).__name__}).{hint}")
    return number


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """One of ``choices`` (strings); returns it.

    Args:
        name: the argument's name (used in the message).
        value: the value given.
        choices: the allowed strings.
    """
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"Unknown {name} {value!r}: use one of {tuple(choices)}.")
    return value


def check_choices(name: str, values, choices: Sequence[str], *, single: str | None = None,
                  drop_duplicates: bool = False) -> list[str]:
    """A non-empty list drawn from ``choices``; returns it (the one check of "some of these", e.g. policies, fills,
    strategies).

    Args:
        name: the argument's name, plural (used in the messages).
        values: the list given; a single string counts as a list of one.
        choices: the allowed strings.
        single: the singular for "Unknown <single> ..." (default: ``name`` without its last letter).
        drop_duplicates: keep the first of repeated values instead of refusing them.
    """
    if isinstance(values, str):
        values = [values]
    elif values is None or isinstance(values, bytes) or not hasattr(values, "__iter__"):
        raise InputError(f"{name} must be a list drawn from {tuple(choices)}, got {values!r}.")
    values = list(values)
    if not values:
        raise InputError(f"{name} is empty: pass some of {tuple(choices)}.")
    for value in values:
        check_choice(single or name[:-1], value, choices)
    if len(set(values)) != len(values):
        if not drop_duplicates:
            raise InputError(f"{name} holds duplicates: {values}.")
        values = list(dict.fromkeys(values))
    return values


def check_fraction(name: str, value: float, *, open_low: bool = False) -> float:
    """A number in [0, 1] (or (0, 1] with ``open_low``); returns it as a float.

    Args:
        name: the argument's name (used in the message).
        value: the value given.
        open_low: refuse 0 (for confidence levels and the like).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name} must be a number in [0, 1], got {value!r} ({type(value).__name__}).")
    low_ok = value > 0 if open_low else value >= 0
    if not (low_ok and value <= 1):
        interval = "(0, 1]" if open_low else "[0, 1]"
        raise InputError(f"{name} must lie in {interval}, got {value}. Pass a fraction, not a percentage.")
    return float(value)


def check_index(name: str, value: int, size: int, what: str) -> int:
    """An integer index in [0, size); returns it as a Python int.

    Args:
        name: the argument's name (used in the message).
        value: the value given.
        size: number of valid indices.
        what: what is counted, for the message (e.g. "layers").
    """
    value = check_int(name, value)
    if not 0 <= value < size:
        raise InputError(f"{name}={value} is out of range: the model has {size} {what} (valid: 0..{size - 1}).")
    return value


def check_k(k: int, d_model: int) -> int:
    """Number of kept dimensions, 1 <= k <= d_model; returns it as a Python int.

    Args:
        k: the value given.
        d_model: width of the residual stream.
    """
    k = check_int("k", k)
    if not 1 <= k <= d_model:
        raise InputError(f"k={k} is out of range: choose 1 <= k <= d_model = {d_model}.")
    return k


def check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """A non-empty sorted list of distinct valid layer indices (Python ints).

    Args:
        layers: layer indices, or None for all layers.
        n_layers: number of layers of the model.
    """
    if layers is None:
        return list(range(n_layers))
    layers = list(layers)
    if not layers:
        raise InputError("The layer set is empty: pass at least one layer index, or None for all layers.")
    layers = [check_index("layer", layer, n_layers, "layers") for layer in layers]
    if len(set(layers)) != len(layers):
        raise InputError(f"Duplicate layers in {layers}: list each layer once.")
    return sorted(layers)


def check_type(obj, kind: type[T], name: str) -> T:
    """``obj`` when it is a ``kind`` (a sinklens object), else a clear error.

    Args:
        obj: the argument the caller got.
        kind: the class it must be.
        name: the argument's name, for the message.
    """
    if not isinstance(obj, kind):
        raise InputError(f"{name} must be a {kind.__name__} (from sinklens), got {type(obj).__name__}.")
    return obj


def check_frame(frame, columns: Sequence[str], name: str, source: str, *, allow_empty: bool = False):
    """``frame`` when it is a DataFrame holding ``columns`` (and rows, unless ``allow_empty``), else a clear error
    naming ``source``: the one check of "a table from that function" (figure helpers, summaries, sweeps).

    Args:
        frame: the argument the caller got.
        columns: the columns it needs.
        name: the argument's name, for the message.
        source: the sinklens function that returns such a frame, for the message.
        allow_empty: accept a frame without rows (a table of hits that may find none).
    """
    import pandas as pd  # here, not at the top: the command line imports this module and must stay light

    if not isinstance(frame, pd.DataFrame) or frame.empty and not allow_empty:
        wanted = "a DataFrame" if allow_empty else "a non-empty DataFrame"
        raise InputError(f"{name} must be {wanted} from {source}, got "
                         f"{type(frame).__name__ if not isinstance(frame, pd.DataFrame) else 'an empty one'}.")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(f"{name} lacks columns {missing}: pass the DataFrame returned by {source}.")
    return frame
