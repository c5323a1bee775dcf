"""The run report: ``index.html`` in a run folder, PNG copies of its plotly figures, and the README's
headline numbers.

Everything is discovered from the run folder, never from a list kept here: the notebooks, their
status, wall time and error from ``manifest.json``; each notebook's outputs from the files the
runner saw it write (``outputs`` in its manifest entry; for older manifests, by modification time
against the executed notebooks); titles from each executed notebook's first heading. Outputs are
told apart by place and content: ``*.json`` at the top are summaries, ``tables/*.csv`` tables,
``figures/*.html`` plotly figures (they load ``plotly.min.js`` from beside them) or circuitsvis
attention views (self-contained). The page is plain HTML and CSS with relative links: it opens
offline and moves with the folder.

PNGs: plotly 7 exports images through kaleido (>= 1), which drives a local Chrome or Chromium
(Debian's ``chromium`` works; ``BROWSER_PATH`` picks another). Without either, the report says
why PNGs were skipped and everything else is written as usual.

Command line (e.g. for a run folder made before reports existed)::

    python -m sinklens.report runs/latest [--readme README.md] [--no-png]
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .errors import InputError

INDEX = "index.html"
MANIFEST = "manifest.json"
HEADLINE_START = "<!-- headline:start -->"
HEADLINE_END = "<!-- headline:end -->"
# keys of a JSON summary that describe the setting, not results: shown in full, never as headline numbers
CONTEXT_KEYS = frozenset({"model", "parameters", "probe", "first_token", "versions"})
TABLE_ROWS = 10  # first rows of each table shown in the report
MAX_HEADLINE = 12  # headline numbers per summary
NO_BROWSER = "PNGs skipped: no Chromium found (apt-get install chromium, or set BROWSER_PATH to a Chrome/Chromium)."
NO_KALEIDO = "PNGs skipped: kaleido is not installed (pip install 'kaleido>=1')."

# --- what a run folder holds ------------------------------------------------------------------------


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


def read_manifest(run_dir: str | os.PathLike) -> dict:
    """``manifest.json`` of a run folder written by ``python -m sinklens run``."""
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
    """The first Markdown heading of a notebook, else its file name in words."""
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
    files, executed notebooks and the assets in ``figures/`` (``plotly.min.js``, PNG copies)."""
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
    """A plotly figure (with its fixed size, if it has one), a circuitsvis attention view or another page."""
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


# --- headline numbers ---------------------------------------------------------------------------------


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 80)


def headline_numbers(summary: Any, limit: int = MAX_HEADLINE) -> list[tuple[str, Any]]:
    """The key numbers of one JSON summary, as ``(name, value)``.

    A summary may choose them itself with a top-level ``"headline"`` mapping; otherwise they are its
    top-level scalars (numbers, flags, short strings) and the scalars of its small mappings (at most
    6 entries, named ``outer.inner``), skipping the setting (``model``, ``parameters``, ``probe``,
    ``first_token``, ``versions``).
    """
    if not isinstance(summary, dict):
        return []
    if isinstance(summary.get("headline"), dict):
        summary = summary["headline"]
    items: list[tuple[str, Any]] = []
    for key, value in summary.items():
        if key in CONTEXT_KEYS:
            continue
        if _is_scalar(value):
            items.append((key, value))
        elif isinstance(value, dict) and len(value) <= 6:
            items += [(f"{key}.{inner}", v) for inner, v in value.items() if _is_scalar(v)]
    return items[:limit]


def format_value(value: Any) -> str:
    """A number or flag as text: floats to 4 significant digits, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return {"error": f"cannot read {path.name}: {err}"}


def headline(run_dir: str | os.PathLike, manifest: dict | None = None) -> list[dict]:
    """Headline numbers of every JSON summary of a run, in notebook order:
    ``[{"notebook": title or None, "file": "x.json", "numbers": [(name, value), ...]}, ...]``."""
    run_dir = Path(run_dir)
    return _headline_blocks(run_dir, *attribute_outputs(run_dir, manifest if manifest is not None
                                                        else read_manifest(run_dir)))


def _headline_blocks(run_dir: Path, notebooks: list[NotebookOutputs], unclaimed: list[str]) -> list[dict]:
    sources = [(nb.title, path) for nb in notebooks for path in nb.summaries]
    sources += [(None, run_dir / rel) for rel in unclaimed if "/" not in rel and rel.endswith(".json")]
    return [{"notebook": title, "file": path.name, "numbers": headline_numbers(_load_json(path))}
            for title, path in sources]


def _provenance(manifest: dict) -> str:
    git = manifest.get("git") or {}
    commit = git.get("commit")
    text = f"commit {commit[:10]}" if commit else "no git commit recorded"
    if git.get("dirty"):
        text += " with uncommitted changes"
    return text


def headline_markdown(run_dir: str | os.PathLike, manifest: dict | None = None) -> str:
    """The README block: which run and commit produced the numbers, then one table per summary."""
    run_dir = Path(run_dir)
    manifest = manifest if manifest is not None else read_manifest(run_dir)
    name = Path(manifest.get("run_dir") or run_dir).name
    command = " ".join(["python -m sinklens", *map(str, manifest.get("argv") or ["run"])])
    lines = [f"Run `{name}`: `{command}`, model `{manifest.get('model')}`, {_provenance(manifest)}, "
             f"started {manifest.get('started', '?')}, status {manifest.get('status', '?')}."]
    blocks = headline(run_dir, manifest)
    if not blocks:
        lines += ["", "(This run wrote no JSON summaries.)"]
    for block in blocks:
        source = f" ({block['notebook']})" if block["notebook"] else ""
        lines += ["", f"`{block['file']}`{source}:", "", "| number | value |", "| --- | --- |"]
        lines += [f"| {k} | {format_value(v).replace('|', '/')} |" for k, v in block["numbers"]] or ["| - | - |"]
    return "\n".join(lines)


def update_readme_headline(readme: str | os.PathLike, run_dir: str | os.PathLike,
                           manifest: dict | None = None) -> bool:
    """Rewrite the README text between ``<!-- headline:start -->`` and ``<!-- headline:end -->`` with the
    run's headline numbers; nothing else changes. Returns whether the file changed (False when it
    already held the same block)."""
    readme = Path(readme)
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"Cannot read {readme}: {err.strerror or err}. Pass the project's README.md.") from None
    starts, ends = text.count(HEADLINE_START), text.count(HEADLINE_END)
    if starts != 1 or ends != 1 or text.index(HEADLINE_START) > text.index(HEADLINE_END):
        raise InputError(f"{readme} needs exactly one `{HEADLINE_START}` line followed by one `{HEADLINE_END}` line "
                         f"(found {starts} and {ends}): add both where the headline numbers should go.")
    head, rest = text.split(HEADLINE_START)
    _, tail = rest.split(HEADLINE_END)
    new = f"{head}{HEADLINE_START}\n{headline_markdown(run_dir, manifest)}\n{HEADLINE_END}{tail}"
    if new == text:
        return False
    tmp = readme.with_name(f".{readme.name}.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, readme)
    return True


# --- PNG copies of the plotly figures -----------------------------------------------------------------


def plotly_spec(path: Path) -> dict:
    """The ``{"data", "layout"}`` of the figure in a plotly HTML file (the arguments of ``Plotly.newPlot``)."""
    text = path.read_text(encoding="utf-8")
    start = re.search(r"Plotly\.newPlot\(\s*", text)
    if not start:
        raise InputError(f"{path} holds no Plotly.newPlot call: it is not a plotly figure page.")
    decoder, pos, args = json.JSONDecoder(), start.end(), []
    for _ in range(3):  # element id, data, layout
        value, pos = decoder.raw_decode(text, pos)
        args.append(value)
        pos = re.compile(r"\s*,?\s*").match(text, pos).end()
    return {"data": args[1], "layout": args[2]}


def export_pngs(run_dir: str | os.PathLike, scale: float = 2) -> tuple[list[Path], str]:
    """Write ``figures/<name>.png`` beside every plotly figure that has none newer than its HTML,
    with kaleido and a local Chromium. Returns the PNGs written and a one-line note for the report."""
    figures = [f for f in (classify_figure(p) for p in sorted((Path(run_dir) / "figures").glob("*.html")))
               if f.kind == "plotly"]
    if not figures:
        return [], "No plotly figures, no PNGs."
    todo = [f for f in figures if not f.path.with_suffix(".png").is_file()
            or f.path.with_suffix(".png").stat().st_mtime_ns < f.path.stat().st_mtime_ns]
    if not todo:
        return [], f"PNGs: {len(figures)} up to date (figures/*.png)."
    try:
        import kaleido
        from kaleido.errors import ChromeNotFoundError
    except ImportError:
        return [], NO_KALEIDO
    specs = []
    for fig in todo:
        spec = plotly_spec(fig.path)
        layout = spec["layout"]
        specs.append({"fig": spec, "path": fig.path.with_suffix(".png"),
                      "opts": {"format": "png", "scale": scale, "width": layout.get("width") or 700,
                               "height": layout.get("height") or 500}})
    for spec in specs:  # a stale copy must not pass for a new one
        spec["path"].unlink(missing_ok=True)
    try:
        kaleido.write_fig_from_object_sync(specs, kopts={"mathjax": False, "timeout": 120})
    except ChromeNotFoundError:
        return [], NO_BROWSER
    written = [s["path"] for s in specs if s["path"].is_file()]
    missing = len(specs) - len(written)
    return written, (f"PNGs: {len(written)} written (figures/*.png)" + (f", {missing} failed." if missing else "."))


# --- the HTML page ------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1280px; padding: 0 24px 48px; color: #222; }
h1 { margin: 24px 0 4px; font-size: 24px; } h2 { margin: 36px 0 6px; padding-top: 12px; border-top: 2px solid #ddd; }
h3 { margin: 22px 0 6px; font-size: 15px; } a { color: #0b5cad; }
.meta { color: #555; margin: 2px 0; } .note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 6px 10px; }
.status { display: inline-block; padding: 1px 8px; border-radius: 9px; font-size: 12px; font-weight: 600;
  vertical-align: middle; color: #fff; background: #777; }
.status.ok { background: #2e7d32; } .status.failed, .status.interrupted { background: #c62828; }
.error { background: #fdecea; border-left: 4px solid #c62828; padding: 8px 12px; white-space: pre-wrap;
  font-family: ui-monospace, monospace; }
table { border-collapse: collapse; font-size: 13px; margin: 4px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; max-width: 100%; }
.cards { display: flex; flex-wrap: wrap; gap: 12px 24px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 6px 10px; min-width: 220px; }
.card h4 { margin: 0 0 4px; font-size: 13px; }
.figs { display: flex; flex-wrap: wrap; gap: 8px 20px; align-items: flex-start; }
.fig { flex: 0 1 auto; max-width: 100%; } .fig h3 { margin-top: 14px; }
iframe { border: 1px solid #ddd; width: 100%; background: #fff; }
details { margin: 6px 0; } summary { cursor: pointer; color: #0b5cad; }
code { font-family: ui-monospace, monospace; font-size: 12px; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _href(run_dir: Path, path: Path | str) -> str:
    rel = Path(path).relative_to(run_dir) if Path(path).is_absolute() else Path(path)
    return quote(rel.as_posix())


def _size(path: Path) -> str:
    size = path.stat().st_size
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def _status(status: str) -> str:
    return f'<span class="status {_e(status.replace(" ", "-"))}">{_e(status)}</span>'


def _wall(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _count(items: list, one: str, many: str | None = None) -> str:
    return f"{len(items)} {one if len(items) == 1 else many or one + 's'}"


def _compact(value: Any, limit: int = 300) -> str:
    text = json.dumps(value, separators=(", ", ": "), default=str)
    if len(text) > limit:
        count = f" ({len(value)} items)" if isinstance(value, (list, dict)) else ""
        text = text[:limit] + " ..." + count
    return text


def _render_json(value: Any, depth: int = 0) -> str:
    """A JSON value as nested key/value tables (two levels), deeper or long values as compact JSON."""
    if isinstance(value, dict) and value and depth < 2 and len(value) <= 40:
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_render_json(v, depth + 1)}</td></tr>" for k, v in value.items())
        return f"<table>{rows}</table>"
    if isinstance(value, (dict, list)):
        return f"<code>{_e(_compact(value))}</code>"
    return _e(format_value(value))


def _numbers_table(numbers: list[tuple[str, Any]]) -> str:
    if not numbers:
        return '<p class="meta">No scalar numbers in this summary.</p>'
    rows = "".join(f'<tr><th>{_e(k)}</th><td class="num">{_e(format_value(v))}</td></tr>' for k, v in numbers)
    return f"<table>{rows}</table>"


def _table_html(run_dir: Path, path: Path) -> str:
    import pandas as pd

    link = f'<a href="{_href(run_dir, path)}">{_e(path.name)}</a> ({_size(path)})'
    try:
        frame = pd.read_csv(path)
    except Exception as err:  # an unreadable table must not stop the report
        return f"<h3>{_e(path.stem)}</h3><p>{link}: could not be read ({_e(type(err).__name__)}: {_e(err)})</p>"
    shown = frame.head(TABLE_ROWS).to_html(index=False, border=0, na_rep="",
                                           float_format=lambda x: format_value(float(x)))
    more = f"first {min(TABLE_ROWS, len(frame))} of " if len(frame) > TABLE_ROWS else ""
    return (f"<h3>{_e(path.stem)}</h3><p class=\"meta\">{link}: {more}{len(frame)} rows, {frame.shape[1]} columns</p>"
            f'<div class="scroll">{shown}</div>')


def _figure_html(run_dir: Path, fig: FigureFile) -> str:
    href = _href(run_dir, fig.path)
    links = [f'<a href="{href}">open</a>']
    png = fig.path.with_suffix(".png")
    if fig.kind == "plotly" and png.is_file():
        links.append(f'<a href="{_href(run_dir, png)}">PNG</a>')
    # plotly figures without a fixed size fill their frame; attention views need the whole width
    height = {"plotly": (fig.height or 450) + 30, "attention": 760}.get(fig.kind, 600)
    width = {"plotly": (fig.width or 560) + 30, "attention": 1230}.get(fig.kind, 1230)
    kind = {"plotly": "", "attention": " (attention view)"}.get(fig.kind, "")
    return (f'<div class="fig" style="width: {width}px"><h3>{_e(fig.path.stem)}{kind} '
            f"<small>{' | '.join(links)}</small></h3>"
            f'<iframe src="{href}" loading="lazy" title="{_e(fig.path.stem)}" style="height: {height}px">'
            "</iframe></div>")


def _summary_html(run_dir: Path, path: Path) -> str:
    data = _load_json(path)
    return (f'<h3>{_e(path.name)} <small><a href="{_href(run_dir, path)}">raw</a></small></h3>'
            f"<details><summary>all values (headline numbers above)</summary>"
            f'<div class="scroll">{_render_json(data)}</div></details>')


def _files_html(run_dir: Path, paths: list[Path]) -> str:
    items = "".join(f'<li><a href="{_href(run_dir, p)}">{_e(p.relative_to(run_dir).as_posix())}</a> ({_size(p)})</li>'
                    for p in paths)
    return f"<ul>{items}</ul>"


def _notebook_html(run_dir: Path, nb: NotebookOutputs, anchor: str) -> str:
    entry = nb.entry
    status = entry.get("status", "?")
    executed = run_dir / entry["notebook"]
    parts = [f'<h2 id="{anchor}">{_e(nb.title)} {_status(status)}</h2>',
             f'<p class="meta">{_e(entry["notebook"])}, wall time {_wall(entry.get("wall_s"))}'
             + (f' | <a href="{_href(run_dir, executed)}">executed notebook</a>' if executed.is_file() else "")
             + "</p>"]
    error = entry.get("error")
    if error:
        where = f"cell {error['exec_count']}: " if error.get("exec_count") is not None else ""
        parts.append(f'<div class="error">{_e(where)}{_e(error.get("ename"))}: {_e(error.get("evalue"))}'
                     + ("\nFull traceback in the executed notebook." if executed.is_file() else "") + "</div>")
    if status == "not run":
        parts.append('<p class="meta">Not run: an earlier notebook failed.</p>')
    params = entry.get("parameters") or {}
    if params:
        passed = set(entry.get("passed") or {}) - {"model_name", "out_dir"}
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_render_json(v)}{' (set for this run)' if k in passed else ''}"
                       "</td></tr>" for k, v in params.items() if k != "out_dir")
        parts.append(f"<details><summary>parameters</summary><table>{rows}</table></details>")
    parts += [_summary_html(run_dir, p) for p in nb.summaries]
    if nb.figures:  # plotly figures first, then the attention views
        ordered = sorted(nb.figures, key=lambda f: f.kind == "attention")
        parts.append('<div class="figs">' + "".join(_figure_html(run_dir, f) for f in ordered) + "</div>")
    parts += [_table_html(run_dir, p) for p in nb.tables]
    if nb.other:
        parts.append("<h3>Other files</h3>" + _files_html(run_dir, nb.other))
    return "\n".join(p for p in parts if p)


def report_html(run_dir: str | os.PathLike, manifest: dict | None = None, notes: list[str] | None = None) -> str:
    """The text of ``index.html`` for a run folder."""
    run_dir = Path(run_dir)
    manifest = manifest if manifest is not None else read_manifest(run_dir)
    notebooks, unclaimed = attribute_outputs(run_dir, manifest)
    name = Path(manifest.get("run_dir") or run_dir).name
    status = manifest.get("status", "?")
    versions = ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items() if v)
    flags = []
    if manifest.get("ci"):
        flags.append("--ci (small parameters for a quick check: not the numbers to report)")
    if manifest.get("argv"):
        flags.append("command: <code>python -m sinklens " + _e(" ".join(map(str, manifest["argv"]))) + "</code>")
    parts = [f"<h1>sinklens run {_e(name)} {_status(status)}</h1>",
             f'<p class="meta">model <b>{_e(manifest.get("model"))}</b> | started {_e(manifest.get("started", "?"))}'
             f' | finished {_e(manifest.get("finished", "-"))} | wall time {_wall(manifest.get("wall_s"))}'
             f" | {_e(_provenance(manifest))}</p>",
             f'<p class="meta">{_e(versions)}</p>' if versions else ""]
    parts += [f'<p class="meta">{flag}</p>' for flag in flags]
    parts += [f'<p class="note">{_e(note)}</p>' for note in notes or []]
    anchors = [f"nb-{re.sub(r'[^A-Za-z0-9_-]', '-', Path(nb.entry['notebook']).stem)}" for nb in notebooks]
    rows = "".join(f'<tr><td><a href="#{a}">{_e(nb.title)}</a></td><td>{_status(nb.entry.get("status", "?"))}</td>'
                   f'<td class="num">{_wall(nb.entry.get("wall_s"))}</td>'
                   f"<td>{_count(nb.summaries, 'summary', 'summaries')}, {_count(nb.figures, 'figure')}, "
                   f"{_count(nb.tables, 'table')}</td></tr>"
                   for a, nb in zip(anchors, notebooks, strict=True))
    parts.append(f"<table><tr><th>notebook</th><th>status</th><th>wall time</th><th>outputs</th></tr>{rows}</table>")
    blocks = _headline_blocks(run_dir, notebooks, unclaimed)
    if blocks:
        parts.append('<h2 id="headline">Headline numbers</h2><div class="cards">' + "".join(
            f'<div class="card"><h4>{_e(b["notebook"] or "")}{" - " if b["notebook"] else ""}'
            f'<code>{_e(b["file"])}</code></h4>{_numbers_table(b["numbers"])}</div>' for b in blocks) + "</div>")
    parts += [_notebook_html(run_dir, nb, a) for a, nb in zip(anchors, notebooks, strict=True)]
    if unclaimed:
        parts.append('<h2 id="other">Other files</h2>' + _files_html(run_dir, [run_dir / rel for rel in unclaimed]))
    parts.append(f'<p class="meta">Written by sinklens.report at {time.strftime("%Y-%m-%d %H:%M:%S")} | '
                 f'<a href="{MANIFEST}">manifest.json</a></p>')
    body = "\n".join(p for p in parts if p)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>sinklens run {_e(name)}</title>\n<style>{_CSS}</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


def write_report(run_dir: str | os.PathLike, manifest: dict | None = None, png: bool = True,
                 log: Callable[[str], None] = print) -> Path:
    """Write ``index.html`` in a run folder (after PNG copies of its plotly figures, when ``png``);
    return its path. Works for failed and interrupted runs too: it shows what there is."""
    run_dir = Path(run_dir)
    manifest = manifest if manifest is not None else read_manifest(run_dir)
    notes = []
    if png:
        try:
            _, note = export_pngs(run_dir)
        except Exception as err:  # PNGs are a convenience: the report is written without them
            note = f"PNGs failed: {type(err).__name__}: {err}"
        notes.append(note)
        if note.startswith(("PNGs skipped", "PNGs failed")):
            log(f"warning: {note}")
    path = run_dir / INDEX
    tmp = run_dir / f".{INDEX}.tmp"
    tmp.write_text(report_html(run_dir, manifest, notes), encoding="utf-8")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sinklens.report",
                                     description="Write index.html (and PNGs) for an existing run folder.")
    parser.add_argument("run_dir", help="run folder, e.g. runs/latest")
    parser.add_argument("--readme", metavar="FILE", help="also rewrite this README's headline-numbers block")
    parser.add_argument("--no-png", action="store_true", help="skip the PNG copies of the plotly figures")
    args = parser.parse_args(argv)
    try:
        run_dir = Path(args.run_dir).resolve()
        manifest = read_manifest(run_dir)
        print(f"Report: {write_report(run_dir, manifest, png=not args.no_png)}")
        if args.readme:
            changed = update_readme_headline(args.readme, run_dir, manifest)
            print(f"{args.readme}: headline numbers {'updated' if changed else 'already up to date'}")
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
