"""PNG copies of a run's plotly figures, for papers and slides.

plotly 7 exports images through kaleido (>= 1), which drives a local Chrome or Chromium
(Debian's ``chromium`` works; ``BROWSER_PATH`` picks another). Without either, the caller gets a
one-line note saying why PNGs were skipped, and everything else goes on as usual. kaleido is an
optional dependency: it is imported when PNGs are asked for.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..core.errors import InputError
from .outputs import classify_figure

NO_BROWSER = "PNGs skipped: no Chromium found (apt-get install chromium, or set BROWSER_PATH to a Chrome/Chromium)."
NO_KALEIDO = "PNGs skipped: kaleido is not installed (pip install 'kaleido>=1')."


def plotly_spec(path: Path) -> dict:
    """The ``{"data", "layout"}`` of the figure in a plotly HTML file (the arguments of ``Plotly.newPlot``).

    Args:
        path: a plotly ``figures/*.html`` file.
    """
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
    with kaleido and a local Chromium. Returns the PNGs written and a one-line note for the report.

    Args:
        run_dir: the run folder.
        scale: pixels per layout pixel.
    """
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

