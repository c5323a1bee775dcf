"""Writing results into a run folder: figures (offline HTML), tables (CSV) and JSON.

Plotly HTML files reference one ``plotly.min.js`` written beside them (no CDN), so a run folder
opens offline and stays small however many figures it holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from ..core.errors import InputError
from ..core.files import atomic_path, atomic_write_text


def project_path(path: str | os.PathLike) -> Path:
    """``path`` as given, except that a relative path used from inside the project's ``notebooks/``
    folder (an interactive Jupyter session) is taken relative to the project root, as papermill and
    ``python -m sinklens run`` (which run notebooks from the root) take it.

    Args:
        path: the path as a notebook gives it.
    """
    path = Path(path)
    cwd = Path.cwd()
    if not path.is_absolute() and cwd.name == "notebooks" and (cwd.parent / "pyproject.toml").is_file():
        return cwd.parent / path
    return path


class RunFolder:
    """A folder that notebooks write their outputs into (``figures/``, ``tables/`` and JSON files).

    Args:
        path: the folder (a notebook's ``out_dir``), created with ``figures/`` and ``tables/`` if missing.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = project_path(path)
        try:
            (self.path / "figures").mkdir(parents=True, exist_ok=True)
            (self.path / "tables").mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"Cannot create run folder {self.path}: {err}. Pass a writable out_dir.") from err
        if not os.access(self.path, os.W_OK):
            raise InputError(f"Run folder {self.path} is not writable: pass a writable out_dir.")

    def save_figure(self, fig, name: str) -> Path:
        """Write a plotly figure as ``figures/<name>.html`` sharing one local plotly.min.js.

        Args:
            fig: the plotly figure.
            name: file name without ``.html`` (the report's captions are keyed by it).

        Raises :class:`~sinklens.core.errors.WriteError` (path and cause) if it cannot be written; nothing
        half-written is left, also of the shared plotly.min.js.
        """
        path = self.path / "figures" / f"{name}.html"
        bundle = path.parent / "plotly.min.js"
        if not bundle.is_file():  # written whole here: plotly's own write would leave a truncated one on a full disk
            from plotly.offline import get_plotlyjs

            atomic_write_text(bundle, get_plotlyjs(), what="plotly bundle")
        atomic_write_text(path, fig.to_html(include_plotlyjs="directory", full_html=True), what="figure")
        return path

    def save_html(self, html: str, name: str) -> Path:
        """Write a self-contained HTML page (e.g. a circuitsvis view) as ``figures/<name>.html``.

        Args:
            html: the page.
            name: file name without ``.html``.
        """
        path = self.path / "figures" / f"{name}.html"
        atomic_write_text(path, html, what="page")
        return path

    def save_table(self, frame: pd.DataFrame, name: str) -> Path:
        """Write ``tables/<name>.csv``.

        Args:
            frame: the table.
            name: file name without ``.csv``.
        """
        path = self.path / "tables" / f"{name}.csv"
        with atomic_path(path, what="table") as tmp:
            frame.to_csv(tmp, index=False)
        return path

    def save_json(self, data: dict, name: str) -> Path:
        """Write ``<name>.json`` at the top of the run folder (a summary: the report reads its ``headline``).

        Args:
            data: JSON-ready mapping (numpy scalars and missing values are converted).
            name: file name without ``.json``.
        """
        path = self.path / f"{name}.json"
        atomic_write_text(path, json.dumps(data, indent=2, default=_json_value), what="JSON file")
        return path


def _json_value(value):
    """numpy scalars as numbers, missing values (pd.NA, NaT) as null, anything else as text."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return str(value)
