"""Input checks shared by the figure helpers: a package object of the right type, a frame with the right columns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import pandas as pd

from ...core.errors import InputError

T = TypeVar("T")


def check_type(obj, kind: type[T], name: str) -> T:
    """``obj`` when it is a ``kind`` (a sinklens object), else a clear error.

    Args:
        obj: the argument a figure helper got.
        kind: the class it must be.
        name: the argument's name, for the message.
    """
    if not isinstance(obj, kind):
        raise InputError(f"{name} must be a {kind.__name__} (from sinklens), got {type(obj).__name__}.")
    return obj


def check_frame(frame, columns: Sequence[str], name: str, source: str) -> pd.DataFrame:
    """``frame`` when it is a non-empty DataFrame holding ``columns``, else a clear error naming ``source``.

    Args:
        frame: the argument a figure helper got.
        columns: the columns it needs.
        name: the argument's name, for the message.
        source: the sinklens function that returns such a frame, for the message.
    """
    if not isinstance(frame, pd.DataFrame) or frame.empty:
        raise InputError(f"{name} must be a non-empty DataFrame from {source}, got "
                         f"{type(frame).__name__ if not isinstance(frame, pd.DataFrame) else 'an empty one'}.")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(f"{name} lacks columns {missing}: pass the DataFrame returned by {source}.")
    return frame


__all__ = ["check_frame", "check_type"]
