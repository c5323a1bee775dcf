"""Progress bars for long loops: shown interactively, silent in CI logs."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(iterable, desc: str, total: int | None = None, enabled: bool = True):
    """Wrap ``iterable`` in a tqdm bar unless disabled, in CI (``CI=true``) or ``SINKLENS_PROGRESS=0``."""
    quiet = os.environ.get("CI", "").lower() in ("1", "true") or os.environ.get("SINKLENS_PROGRESS") == "0"
    return tqdm(iterable, desc=desc, total=total, disable=quiet or not enabled, leave=False)
