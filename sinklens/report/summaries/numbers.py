"""Rounding rules shared by the notebook summaries: percentages and means as JSON numbers (None when there is
nothing to average, never NaN)."""

from __future__ import annotations

import pandas as pd


def pct(share: float, digits: int = 1) -> float:
    """A share in [0, 1] as a percentage rounded to ``digits`` decimals (0.4567 -> 45.7).

    Args:
        share: the fraction to show.
        digits: decimals kept.
    """
    return round(float(share) * 100, digits)


def mean_or_none(values: pd.Series, digits: int = 4) -> float | None:
    """The mean of ``values`` rounded to ``digits`` decimals, or None for an empty series (JSON has no NaN).

    Args:
        values: the numbers to average.
        digits: decimals kept.
    """
    return round(float(values.mean()), digits) if len(values) else None
