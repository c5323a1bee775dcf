"""Notebook 05 (layer selection) run headless with tiny CI parameters on a tiny random model."""

from __future__ import annotations

import json
import re

import nbformat
import pandas as pd
import pytest

from helpers import build_tiny_checkpoint, ci_params, execute_notebook, mc_items, write_items

pytestmark = pytest.mark.notebook

ITEMS = mc_items(8)
FIGURES = ["single_layer_retention", "retention_by_n_layers", "pareto_frontier", "head_removal_comparison"]
# the runner's --ci parameters, with a low sink bar (eps, q): random weights have weak sinks
PARAMS = ci_params("05_layer_selection.ipynb", eps=0.05, q=0.5)
TARGET = PARAMS["target_retention"]
TABLES = ["configurations", "dense", "frontier", "largest_meeting", "head_removal_comparison"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nb05")
    model = build_tiny_checkpoint(folder / "tiny", 6, 2)
    items = write_items(folder, ITEMS)
    out = folder / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SINKLENS_PROGRESS", "0")
        # on the tiny model, with items in its vocabulary ("w5 w6 ...")
        params = PARAMS | {"model_name": str(model), "items_file": str(items)}
        execute_notebook("05_layer_selection.ipynb", out, **params)
    return out


def test_outputs_exist_offline_and_notebook_ran_clean(run_dir):
    for name in FIGURES:
        page = (run_dir / "figures" / f"{name}.html").read_text()
        assert 'src="plotly.min.js"' in page and not re.search(r"<script[^>]*src=\"https?:", page), name
    for name in TABLES:
        assert (run_dir / "tables" / f"{name}.csv").is_file(), name
    assert (run_dir / "layer_selection.sqlite").stat().st_size > 0
    executed = nbformat.read(str(run_dir / "05_layer_selection.ipynb"), 4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "sink-specialized heads in layers" in text and ("best: layers" in text or "no configuration" in text)


def test_saved_tables_are_consistent(run_dir):
    table = pd.read_csv(run_dir / "tables" / "configurations.csv",
                        converters={"layers": json.loads, "heads": json.loads})
    table["layers"] = table["layers"].map(tuple)  # layer sets are lists of ints ([1, 3]), heads [layer, head] lists
    assert {"single_layer", "single_layer_rank", "greedy", "exhaustive", "random", "head_removal"} <= set(
        table["strategy"])
    assert all(isinstance(h, list) and len(h) == 2 for heads in table["heads"] for h in heads)
    summary = json.loads((run_dir / "layer_selection.json").read_text())
    confirmed = table[(table["split"] == "held_out") & (table["method"] == "qk")]
    meeting = confirmed[confirmed["retention"] >= TARGET]
    removal_rows = table[(table["split"] == "held_out") & (table["method"] == "head_removal")]
    # on this model and these parameters some configuration meets the target (the case of none: test_selection's
    # constructed one); the best configuration is recomputed from the saved table
    assert not meeting.empty and summary["best"] is not None
    assert summary["best"]["n_heads"] == meeting["n_heads"].max()
    assert summary["best"]["retention"] >= TARGET
    head = summary["headline"]
    assert head["best_retention"] == summary["best"]["retention"]
    assert head["best_layers"] == ",".join(map(str, summary["best"]["layers"]))
    same = removal_rows[removal_rows["layers"] == tuple(summary["best"]["layers"])]["retention"]
    assert head["head_removal_retention_same_heads"] == (pytest.approx(same.iloc[0]) if len(same) else None)
    assert summary["parameters"]["k"] == PARAMS["k"] and summary["settings"]["k"] == PARAMS["k"]
    assert len(summary["heads"]) == table[table["strategy"] == "single_layer"]["n_heads"].sum()
    frontier = pd.read_csv(run_dir / "tables" / "frontier.csv")
    assert frontier["n_heads"].is_monotonic_increasing and frontier["retention"].is_monotonic_decreasing
    dense = pd.read_csv(run_dir / "tables" / "dense.csv")
    assert {"acc/mean", "lm/ppl", "copy/acc", "mc/acc"} <= set(dense["metric"])
    removal = pd.read_csv(run_dir / "tables" / "head_removal_comparison.csv", converters={"layers": json.loads})
    largest = pd.read_csv(run_dir / "tables" / "largest_meeting.csv")
    meeting = largest.loc[(largest["n_layers"] > 0) & (largest["target"] == TARGET), "layers"]
    meeting_sets = {tuple(json.loads(v)) for v in meeting}
    removal_sets = {tuple(v) for v in removal["layers"]}
    assert meeting_sets <= removal_sets <= set(confirmed["layers"]) and len(removal) > 0
