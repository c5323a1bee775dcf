"""What a run folder holds: its manifest, each notebook's outputs, the JSON summaries.

Everything is discovered from the run folder, never from a list kept here: the notebooks, their
status, wall time and error from ``manifest.json``; each notebook's outputs from the files the
runner saw it write (``outputs`` in its manifest entry; for older manifests, by modification time
against the executed notebooks); titles from each executed notebook's first heading. Outputs are
told apart by place and content: ``*.json`` at the top are summaries, ``tables/*.csv`` tables,
``figures/*.html`` plotly figures (they load ``plotly.min.js`` from beside them) or circuitsvis
attention views (self-contained).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import InputError

INDEX = "index.html"
MANIFEST = "manifest.json"


@dataclass
class FigureFile:
    """One ``figures/*.html`` page: a plotly figure (``kind="plotly"``), an attention view or another page."""

    path: Path
    kind: str
    width: int | None = None
    height: int | None = None


@dataclass
class NotebookOutputs:
    """One manifest entry and the files it wrote."""

    entry: dict
    title: str
    summaries: list[Path] = field(default_factory=list)
    tables: list[Path] = field(default_factory=list)
    figures: list[FigureFile] = field(default_factory=list)
    other: list[Path] = field(default_factory=list)


def read_run_manifest(run_dir: str | os.PathLike) -> dict:
    """``manifest.json`` of a run folder written by ``python -m sinklens run``.

    Args:
        run_dir: the run folder.
    """
    path = Path(run_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} does not exist: pass a run folder made by `python -m sinklens run`.") from None
    except (OSError, ValueError) as err:
        raise InputError(f"Cannot read {path}: {err}. Re-run the notebooks to write a new run folder.") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("notebooks"), list):
        raise InputError(f"{path} is not a sinklens run manifest (no 'notebooks' list).")
    return manifest


def notebook_title(path: Path) -> str:
    """The first Markdown heading of a notebook, else its file name in words.

    Args:
        path: the (executed) notebook file.
    """
    try:
        cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
    except (OSError, ValueError):
        cells = []
    for cell in cells:
        if cell.get("cell_type") == "markdown":
            source = "".join(cell.get("source", []))
            for line in source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return path.stem.replace("_", " ")


def run_files(run_dir: Path) -> list[str]:
    """Relative paths of the outputs in a run folder: everything but the manifest, the report, hidden
    files, executed notebooks and the assets in ``figures/`` (``plotly.min.js``, PNG copies).

    Args:
        run_dir: the run folder.
    """
    found = []
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if (not path.is_file() or any(part.startswith(".") for part in rel.parts)
                or rel.as_posix() in (MANIFEST, INDEX) or (len(rel.parts) == 1 and rel.suffix == ".ipynb")
                or (rel.parts[0] == "figures" and rel.suffix != ".html")):
            continue
        found.append(rel.as_posix())
    return found


def classify_figure(path: Path) -> FigureFile:
    """A plotly figure (with its fixed size, if it has one), a circuitsvis attention view or another page.

    Args:
        path: a ``figures/*.html`` file.
    """
    with open(path, encoding="utf-8", errors="replace") as fh:
        head = fh.read(8192)
    if "CircuitsVis" in head:
        return FigureFile(path, "attention")
    if "plotly-graph-div" in head:  # write_html puts the layout's size on the outer div: "height:660px; width:100%;"
        style = re.search(r'<div style="height:([^;"]*); width:([^;"]*);">', head)
        height, width = (_pixels(v) for v in (style.groups() if style else ("", "")))
        return FigureFile(path, "plotly", width, height)
    return FigureFile(path, "page")


def _pixels(css: str) -> int | None:
    match = re.fullmatch(r"\s*([0-9.]+)px\s*", css)
    return round(float(match.group(1))) if match else None


def attribute_outputs(run_dir: Path, manifest: dict) -> tuple[list[NotebookOutputs], list[str]]:
    """Each notebook with the files it wrote, and the files no notebook claims.

    The runner records ``outputs`` per notebook; manifests without them (older runs) get the files
    by modification time: a file belongs to the first notebook whose executed copy (written last,
    when it finishes) is not older than the file.

    Args:
        run_dir: the run folder.
        manifest: its manifest.
    """
    files = run_files(run_dir)
    entries = manifest["notebooks"]
    claimed: dict[int, list[str]] = {i: [] for i in range(len(entries))}
    if all("outputs" in e for e in entries if e.get("status") not in ("pending", "not run")):
        for i, entry in enumerate(entries):
            claimed[i] = [f for f in entry.get("outputs", []) if f in files]
    else:
        ends = [(run_dir / e["notebook"]).stat().st_mtime_ns if (run_dir / e["notebook"]).is_file() else None
                for e in entries]
        for rel in files:
            mtime = (run_dir / rel).stat().st_mtime_ns
            owner = next((i for i, end in enumerate(ends) if end is not None and mtime <= end), None)
            if owner is not None:
                claimed[owner].append(rel)
    taken = {f for part in claimed.values() for f in part}
    notebooks = []
    for i, entry in enumerate(entries):
        out = NotebookOutputs(entry, notebook_title(run_dir / entry["notebook"]))
        for rel in claimed[i]:
            path = run_dir / rel
            if len(path.relative_to(run_dir).parts) == 1 and path.suffix == ".json":
                out.summaries.append(path)
            elif rel.startswith("tables/") and path.suffix == ".csv":
                out.tables.append(path)
            elif rel.startswith("figures/"):
                out.figures.append(classify_figure(path))
            else:
                out.other.append(path)
        notebooks.append(out)
    return notebooks, [f for f in files if f not in taken]



def read_summary(path: Path) -> Any:
    """A JSON summary's content; an unreadable file gives ``{"error": ...}`` (a report shows what there is).

    Args:
        path: the ``*.json`` file.
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return {"error": f"cannot read {path.name}: {err}"}


@dataclass
class Summary:
    """One JSON summary of a run: the title of the notebook that wrote it (None: no notebook claims it), its
    file and its content."""

    notebook: str | None
    path: Path
    data: Any


def run_summaries(run_dir: Path, notebooks: list[NotebookOutputs], unclaimed: list[str]) -> list[Summary]:
    """Every JSON summary of a run, in notebook order, then the ones no notebook claims.

    Args:
        run_dir: the run folder.
        notebooks: its notebooks with their outputs (:func:`attribute_outputs`).
        unclaimed: the files no notebook claims.
    """
    sources = [(nb.title, path) for nb in notebooks for path in nb.summaries]
    sources += [(None, run_dir / rel) for rel in unclaimed if "/" not in rel and rel.endswith(".json")]
    return [Summary(title, path, read_summary(path)) for title, path in sources]
