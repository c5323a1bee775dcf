"""Writing results into a run folder: figures (offline HTML), tables (CSV) and JSON.

Plotly HTML files reference one ``plotly.min.js`` written beside them (no CDN), so a run folder
opens offline and stays small however many figures it holds. Every JSON file of a run is written by
:func:`json_text`: strict JSON (no ``NaN`` or ``Infinity``; a missing value is ``null``), which any
parser reads.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import InputError
from ..core.files import atomic_path, atomic_write_text

if TYPE_CHECKING:
    import pandas as pd


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
        atomic_write_text(path, json_text(data), what="JSON file")
        return path


def json_ready(value: Any) -> Any:
    """``value`` with every number JSON can hold: numpy scalars and arrays as Python numbers and lists, NaN,
    infinities and missing values (``None``, ``pd.NA``, ``NaT``) as None (JSON ``null``), mappings and sequences
    converted recursively (mapping keys that are numpy scalars as Python ones); anything else left as it is.

    Args:
        value: a JSON-ready structure, possibly holding numpy or pandas values.
    """
    if isinstance(value, dict):
        return {json_ready(key) if hasattr(key, "item") else key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if type(value).__name__ in ("NAType", "NaTType"):  # pd.NA, pd.NaT (without importing pandas)
        return None
    if hasattr(value, "tolist") and getattr(value, "ndim", None) is not None:  # numpy scalar or array
        return json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(data: Any) -> str:
    """``data`` as strict JSON text (indented): :func:`json_ready`, then anything JSON has no type for as its text.

    Args:
        data: the mapping (or list) to write.
    """
    return json.dumps(json_ready(data), indent=2, default=str, allow_nan=False)
