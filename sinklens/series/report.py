"""The run report: ``index.html`` in a run folder.

The page leads with the run's findings (sentences written from its summaries,
:mod:`sinklens.series.findings`), then the headline numbers of each summary with labels and
units (the raw JSON linked beside them), then per notebook its status, wall time and error if it
failed, its figures (each with a one-line caption of what to look at) and attention views
embedded, the first rows of its tables, and links to everything. It is plain HTML and CSS with
relative links: it opens offline and moves with the folder. PNG copies of the plotly figures
are written first when a Chromium is there (:mod:`sinklens.series.pngs`).

Command line (e.g. for a run folder made before reports existed)::

    python -m sinklens report runs/latest [--no-png]
"""

from __future__ import annotations

import html
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from ..core.files import atomic_write_text
from .findings import findings
from .headline import format_value, headline_numbers, labelled, provenance
from .outputs import (
    INDEX,
    MANIFEST,
    FigureFile,
    NotebookOutputs,
    Summary,
    attribute_outputs,
    read_run_manifest,
    read_summary,
    run_summaries,
)
from .pngs import export_pngs
from .wording import caption

TABLE_ROWS = 10  # first rows of each table shown in the report


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
.findings { background: #f3f8fd; border-left: 4px solid #0b5cad; padding: 8px 12px 8px 28px; margin: 6px 0; }
.findings li { margin: 3px 0; } .caption { color: #444; margin: 0 0 4px; font-size: 13px; }
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
    """Headline numbers as rows of label and value with unit; the raw key is the row's tooltip."""
    if not numbers:
        return '<p class="meta">No scalar numbers in this summary.</p>'
    rows = "".join(f'<tr title="{_e(key)}"><th>{_e(text)}</th><td class="num">{_e(value)}</td></tr>'
                   for key, (text, value) in ((k, labelled(k, v)) for k, v in numbers))
    return f"<table>{rows}</table>"


def _findings_html(summaries: Sequence[Summary]) -> str:
    sentences = findings(summaries)
    if not sentences:
        return ""
    items = "".join(f"<li>{_e(sentence)}</li>" for sentence in sentences)
    return (f'<h2 id="findings">Findings</h2><ul class="findings">{items}</ul>'
            '<p class="meta">Written from the JSON summaries below; every number is measured in this run.</p>')


def _headline_html(run_dir: Path, summaries: Sequence[Summary]) -> str:
    if not summaries:
        return ""
    cards = "".join(
        f'<div class="card"><h4>{_e(s.notebook or s.path.name)} <small><a href="{_href(run_dir, s.path)}">'
        f"{_e(s.path.name)}</a></small></h4>{_numbers_table(headline_numbers(s.data))}</div>" for s in summaries)
    return f'<h2 id="headline">Headline numbers</h2><div class="cards">{cards}</div>'


def _table_html(run_dir: Path, path: Path) -> str:
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
    text = caption(fig.path.stem)
    return (f'<div class="fig" style="width: {width}px"><h3>{_e(fig.path.stem)}{kind} '
            f"<small>{' | '.join(links)}</small></h3>"
            + (f'<p class="caption">{_e(text)}</p>' if text else "")
            + f'<iframe src="{href}" loading="lazy" title="{_e(fig.path.stem)}" style="height: {height}px">'
            "</iframe></div>")


def _summary_html(run_dir: Path, path: Path) -> str:
    data = read_summary(path)
    return (f'<h3>{_e(path.name)} <small><a href="{_href(run_dir, path)}">raw</a></small></h3>'
            "<details><summary>all values (headline numbers above)</summary>"
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
    """The text of ``index.html`` for a run folder.

    Args:
        run_dir: the run folder.
        manifest: its manifest (read from the folder when None).
        notes: one-line notes shown under the title (e.g. about PNGs).
    """
    run_dir = Path(run_dir)
    manifest = manifest if manifest is not None else read_run_manifest(run_dir)
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
             f" | {_e(provenance(manifest))}</p>",
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
    summaries = run_summaries(run_dir, notebooks, unclaimed)
    parts += [_findings_html(summaries), _headline_html(run_dir, summaries)]
    parts += [_notebook_html(run_dir, nb, a) for a, nb in zip(anchors, notebooks, strict=True)]
    if unclaimed:
        parts.append('<h2 id="other">Other files</h2>' + _files_html(run_dir, [run_dir / rel for rel in unclaimed]))
    parts.append(f'<p class="meta">Written by sinklens.series.report at {time.strftime("%Y-%m-%d %H:%M:%S")} | '
                 f'<a href="{MANIFEST}">manifest.json</a></p>')
    body = "\n".join(p for p in parts if p)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>sinklens run {_e(name)}</title>\n<style>{_CSS}</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


def write_report(run_dir: str | os.PathLike, manifest: dict | None = None, png: bool = True,
                 log: Callable[[str], None] = print) -> Path:
    """Write ``index.html`` in a run folder (after PNG copies of its plotly figures, when ``png``);
    return its path. Works for failed and interrupted runs too: it shows what there is.

    Args:
        run_dir: the run folder.
        manifest: its manifest (read from the folder when None).
        png: write PNG copies of the plotly figures first.
        log: where warnings go.
    """
    run_dir = Path(run_dir)
    manifest = manifest if manifest is not None else read_run_manifest(run_dir)
    notes = []
    if png:
        try:
            _, note = export_pngs(run_dir)
        except Exception as err:  # PNGs are a convenience: the report is written without them
            note = f"PNGs failed: {type(err).__name__}: {err}"
        notes.append(note)
        if note.startswith(("PNGs skipped", "PNGs failed")):
            log(f"warning: {note}")
    return atomic_write_text(run_dir / INDEX, report_html(run_dir, manifest, notes), what="report")
