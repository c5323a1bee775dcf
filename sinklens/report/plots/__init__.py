"""Plotly figure helpers, one module per topic (census, pruning, selection, long context, models compared,
attention calibration, streaming). Each returns the figure. ``sl.plots.census`` imports its module on first use."""

from __future__ import annotations

import importlib

_TOPICS = ("calibration", "census", "compare", "long_context", "pruning", "selection", "streaming")
__all__ = list(_TOPICS)


def __getattr__(name: str):
    if name not in _TOPICS:
        raise AttributeError(f"module 'sinklens.report.plots' has no attribute {name!r}")
    return importlib.import_module(f"{__name__}.{name}")
