"""The cross-model report: several run folders side by side (``python -m sinklens compare RUN_FOLDER...``).

Built from the files the notebooks wrote into each run folder, whatever made it (``run``, ``run --models ...
--ray``, a notebook run by hand): nothing is measured again. Per model:

- the sink rate Sink^eps (% of heads whose BOS attention exceeds eps, over prompts) and its profile over
  relative depth (``sink_discovery.json``, notebook 01);
- the share of sink-specialized heads (``specialized_heads.json``, notebook 02);
- the massive dims of the BOS residual and the layers they appear in (``sink_discovery.json``);
- the sink rate against context length (``tables/sink_rate_by_length.csv``, notebook 06; mean over layers);
- the held-out retention of the best layer set of the layer selection, with its k (``layer_selection.json``,
  notebook 05: the configuration with the most pruned heads meeting the target).

A number a run did not produce (a notebook not run, or failed) is left empty and said so. The page is plain HTML
with the plotly figures inline and ``plotly.min.js`` beside it: it opens offline and moves with its folder.
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..core.errors import InputError
from ..core.files import atomic_write_text
from .plots.compare import model_bars, sink_rate_by_depth, sink_rate_by_length

INDEX = "index.html"
SOURCES = {"sink_discovery.json": "01", "specialized_heads.json": "02", "layer_selection.json": "05",
           "tables/sink_rate_by_length.csv": "06"}


@dataclass
class ModelComparison:
    """The tables of the cross-model report.

    ``summary``: one row per run folder (model, run, layers, heads, sink rate, share of sink-specialized heads, massive
    dims and their layers, sink rate at the shortest and longest context, best layer set's k, layers, heads and
    retention). ``depth``: sink rate per layer and relative depth. ``length``: sink rate per context length.
    ``missing``: per model, the files its run folder lacks.
    """

    summary: pd.DataFrame
    depth: pd.DataFrame
    length: pd.DataFrame
    missing: dict[str, list[str]]


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is not readable JSON ({err}): write the run folder again (python -m sinklens "
                         "report, or rerun its notebook).") from None


def _label(folder: Path, labels: set[str]) -> str:
    manifest = _read_json(folder / "manifest.json") or {}
    model = str(manifest.get("model") or folder.name)
    label = Path(model.rstrip("/")).name or model
    return label if label not in labels else f"{label} ({folder.name})"


def _massive_text(by_layer: dict[str, list[int]]) -> tuple[list[int], str]:
    layers_of: dict[int, list[int]] = {}
    for layer, dims in by_layer.items():
        for dim in dims:
            layers_of.setdefault(int(dim), []).append(int(layer))
    parts = []
    for dim, layers in sorted(layers_of.items(), key=lambda item: (-len(item[1]), item[0])):
        layers = sorted(layers)
        span = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]} ({len(layers)} layers)"
        parts.append(f"{dim}: {span}")
    return sorted(layers_of), "; ".join(parts)


def compare_runs(folders: Sequence[str | os.PathLike]) -> ModelComparison:
    """The comparison tables of run folders (module docstring).

    Args:
        folders: run folders (each with a ``manifest.json`` or at least one notebook's summary).
    """
    if not folders:
        raise InputError("No run folders: pass at least one, e.g. python -m sinklens compare runs/A runs/B.")
    rows, depth, length, missing, labels = [], [], [], {}, set()
    for given in folders:
        folder = Path(given).expanduser().resolve()
        if not folder.is_dir():
            raise InputError(f"Run folder {given} does not exist: pass folders made by python -m sinklens run.")
        present = [name for name in SOURCES if (folder / name).is_file()]
        if not present and not (folder / "manifest.json").is_file():
            raise InputError(f"{given} is not a run folder (no manifest.json and none of {', '.join(SOURCES)}).")
        label = _label(folder, labels)
        labels.add(label)
        missing[label] = [f"{name} (notebook {nb})" for name, nb in SOURCES.items() if name not in present]
        row: dict = {"model": label, "run": folder.name, "folder": str(folder)}
        discovery = _read_json(folder / "sink_discovery.json")
        if discovery is not None:
            info = discovery.get("model", {})
            n_layers = int(info.get("n_layers") or len(discovery["sink_rate_by_layer_pct"]))
            row |= {"family": info.get("model_type"), "n_layers": n_layers, "n_heads": discovery.get("n_heads"),
                    "eps": discovery.get("eps"), "sink_rate_pct": discovery.get("sink_rate_pct")}
            for layer, rate in sorted(discovery["sink_rate_by_layer_pct"].items(), key=lambda item: int(item[0])):
                layer = int(layer)
                depth.append({"model": label, "layer": layer, "sink_rate_pct": rate,
                              "relative_depth": layer / (n_layers - 1) if n_layers > 1 else 0.0})
            dims, text = _massive_text(discovery.get("massive_dims_by_layer") or {})
            row |= {"massive_dims": dims, "massive_dims_layers": text or "none"}
        heads = _read_json(folder / "specialized_heads.json")
        if heads is not None:
            row |= {"n_specialized": heads["n_specialized"],
                    "specialized_share": heads["n_specialized"] / heads["n_heads"] if heads["n_heads"] else None}
        by_length = folder / "tables" / "sink_rate_by_length.csv"
        if by_length.is_file():
            table = pd.read_csv(by_length).groupby("length", as_index=False)["sink_rate"].mean()
            for item in table.itertuples():
                length.append({"model": label, "length": int(item.length), "sink_rate_pct": float(item.sink_rate)})
            row |= {"sink_rate_pct_shortest": float(table["sink_rate"].iloc[0]),
                    "sink_rate_pct_longest": float(table["sink_rate"].iloc[-1]),
                    "lengths": f"{int(table['length'].iloc[0])}..{int(table['length'].iloc[-1])}"}
        selection = _read_json(folder / "layer_selection.json")
        if selection is not None:
            settings = selection.get("settings", {})
            best = selection.get("best")
            row |= {"k": settings.get("k"), "target_retention": settings.get("target_retention")}
            if best:
                row |= {"best_layers": ",".join(str(layer) for layer in best["layers"]),
                        "best_n_heads": best["n_heads"], "best_retention": best["retention"]}
            else:
                row |= {"best_layers": "none met the target"}
        rows.append(row)
    columns = ["model", "family", "n_layers", "n_heads", "eps", "sink_rate_pct", "n_specialized", "specialized_share",
               "massive_dims", "massive_dims_layers", "lengths", "sink_rate_pct_shortest", "sink_rate_pct_longest",
               "k", "target_retention", "best_layers", "best_n_heads", "best_retention", "run", "folder"]
    summary = pd.DataFrame(rows).reindex(columns=columns)
    return ModelComparison(summary=summary,
                           depth=pd.DataFrame(depth, columns=["model", "layer", "relative_depth", "sink_rate_pct"]),
                           length=pd.DataFrame(length, columns=["model", "length", "sink_rate_pct"]), missing=missing)


# --- the page ----------------------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1340px; padding: 0 24px 48px; color: #222; }
h1 { margin: 24px 0 4px; font-size: 24px; } h2 { margin: 30px 0 6px; padding-top: 10px; border-top: 2px solid #ddd; }
a { color: #0b5cad; } .meta { color: #555; margin: 2px 0; }
table { border-collapse: collapse; font-size: 13px; margin: 4px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.figs { display: flex; flex-wrap: wrap; gap: 8px 20px; } .fig { flex: 0 1 auto; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 6px 10px; }
"""

_LABELS = {"model": "model", "family": "family", "n_layers": "layers", "n_heads": "heads", "eps": "eps",
           "sink_rate_pct": "sink rate Sink^eps (%)", "specialized_share": "sink-specialized heads (share)",
           "massive_dims_layers": "massive dims: layers", "lengths": "context lengths",
           "sink_rate_pct_shortest": "sink rate, shortest (%)", "sink_rate_pct_longest": "sink rate, longest (%)",
           "k": "k", "best_layers": "best layer set", "best_n_heads": "its heads",
           "best_retention": "its retention (held out)", "run": "run folder"}


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<td class="num">-</td>'
    if isinstance(value, float):
        return f'<td class="num">{value:.3g}</td>' if abs(value) < 1 else f'<td class="num">{value:.1f}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def comparison_html(comparison: ModelComparison, *, links: dict[str, str] | None = None) -> str:
    """The report page of ``comparison`` (figures inline; ``plotly.min.js`` expected beside it).

    Args:
        comparison: from :func:`compare_runs`.
        links: model -> relative link to its run report.
    """
    links = links or {}
    summary = comparison.summary
    head = "".join(f"<th>{html.escape(_LABELS[c])}</th>" for c in _LABELS)
    body = []
    for row in summary.to_dict("records"):
        cells = []
        for column in _LABELS:
            value = row.get(column)
            if column == "run" and row["model"] in links:
                cells.append(f'<td><a href="{html.escape(links[row["model"]])}">{html.escape(str(value))}</a></td>')
            else:
                cells.append(_cell(value))
        body.append("<tr>" + "".join(cells) + "</tr>")
    figures = [("sink_rate_by_depth", sink_rate_by_depth(comparison.depth)),
               ("sink_rate_by_length", sink_rate_by_length(comparison.length)),
               ("specialized_share", model_bars(summary, "specialized_share", "Share of sink-specialized heads",
                                                "share of heads")),
               ("best_retention", model_bars(summary, "best_retention", "Held-out retention of the best layer set",
                                             "retention"))]
    divs = "".join(f'<div class="fig" id="{name}">{fig.to_html(full_html=False, include_plotlyjs=False)}</div>'
                   for name, fig in figures)
    gaps = [f"<li>{html.escape(model)}: no {html.escape(', '.join(files))}</li>"
            for model, files in comparison.missing.items() if files]
    missing = (f'<div class="note"><p>Not in every run folder (shown as -):</p><ul>{"".join(gaps)}</ul></div>'
               if gaps else "")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>sinklens: {len(summary)} models compared"
            f"</title><style>{_CSS}</style><script src=\"plotly.min.js\"></script></head><body>"
            f"<h1>sinklens: {len(summary)} models compared</h1>"
            f"<p class=\"meta\">Written {time.strftime('%Y-%m-%d %H:%M')} from the run folders' own files "
            f"(nothing measured again).</p>{missing}"
            f"<h2>Per model</h2><div style=\"overflow-x: auto\"><table id=\"summary\"><tr>{head}</tr>"
            f"{''.join(body)}</table></div><h2>Side by side</h2><div class=\"figs\">{divs}</div></body></html>")


def write_comparison(folders: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Write the cross-model report of ``folders`` into folder ``out`` (``index.html``, ``plotly.min.js``, the
    tables as CSV); returns the page's path.

    Args:
        folders: run folders.
        out: the report's folder (created; an existing report there is replaced).
    """
    comparison = compare_runs(folders)
    out = Path(out).expanduser().resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"Cannot create the report folder {out}: {err}. Pass a writable --out.") from None
    from plotly.offline import get_plotlyjs

    bundle = out / "plotly.min.js"
    if not bundle.is_file():
        atomic_write_text(bundle, get_plotlyjs(), what="plotly bundle")
    for name in ("summary", "depth", "length"):
        atomic_write_text(out / f"{name}.csv", getattr(comparison, name).to_csv(index=False), what="table")
    links = {}
    for row in comparison.summary.itertuples():
        report = Path(row.folder) / INDEX
        if report.is_file():
            links[row.model] = os.path.relpath(report, out)
    page = out / INDEX
    atomic_write_text(page, comparison_html(comparison, links=links), what="comparison report")
    return page


__all__ = ["ModelComparison", "compare_runs", "comparison_html", "write_comparison"]
