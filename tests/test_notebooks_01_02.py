"""Notebooks 01 (sink discovery) and 02 (head specialization), run headless with small parameters.

Both write into one run folder, as the runner does; the checks recompute the saved summaries
from the saved tables.
"""

import json
import re

import nbformat
import pandas as pd
import pytest

from helpers import ci_params, execute_notebook

pytestmark = [pytest.mark.notebook, pytest.mark.integration]  # the notebooks run the embedded model

# the runner's --ci parameters; q=0.75 instead of the series' 0.9 in 02 (and 03, which takes 02's list): the saved
# list must follow the q passed, not a default
Q = 0.75
PARAMS = ci_params("01_sink_discovery.ipynb")
PARAMS_02 = ci_params("02_head_specialization.ipynb", q=Q)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    execute_notebook("01_sink_discovery.ipynb", out, **PARAMS)
    execute_notebook("02_head_specialization.ipynb", out, **PARAMS_02)
    return out


@pytest.fixture(scope="module")
def summary(run_dir):
    return json.loads((run_dir / "sink_discovery.json").read_text())


@pytest.fixture(scope="module")
def census(run_dir):
    return pd.read_csv(run_dir / "tables" / "census.csv")


FIGURES_01 = ["sink_heatmap", "sink_rate_by_layer", "massive_profile_resid", "first_token_norms", "norm_share",
              "rank_stability", "bos_comparison"]
FIGURES_02 = ["specialization", "specialization_heatmap", "confidence_vs_alpha", "prompt_consistency"]
VIEWS = ["attention_strongest_head", "attention_specialized_layer"]
TABLES = ["census", "non_first_sinks", "massive_dims", "top_values_resid", "top_values_normalized", "bos_comparison",
          "specialization", "specialized_heads"]


def test_outputs_exist_and_figures_are_offline(run_dir):
    figures = run_dir / "figures"
    assert (figures / "plotly.min.js").stat().st_size > 1_000_000
    for name in FIGURES_01 + FIGURES_02:
        page = (figures / f"{name}.html").read_text()
        assert '<script charset="utf-8" src="plotly.min.js"></script>' in page, name
        assert not re.search(r"<script[^>]*src=\"https?:", page), name
    for name in TABLES:
        assert (run_dir / "tables" / f"{name}.csv").is_file(), name
    for name in ("01_sink_discovery.ipynb", "02_head_specialization.ipynb"):
        executed = nbformat.read(str(run_dir / name), 4)
        outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert outputs and not [o for o in outputs if o.get("output_type") == "error"]


def test_attention_views_are_self_contained(run_dir, summary):
    for name in VIEWS:
        page = (run_dir / "figures" / f"{name}.html").read_text()
        assert not re.search(r"<script[^>]*\bsrc\s*=", page), "no external script in " + name
        assert "unpkg.com" not in page and page.count("var CircuitsVis=") == 1
        assert "CircuitsVis.render(" in page
    strongest = summary["strongest_head"]
    page = (run_dir / "figures" / "attention_strongest_head.html").read_text()
    assert f'"attentionHeadNames": ["L{strongest["layer"]}H{strongest["head"]}"]' in page


def test_census_table_is_complete(census, summary):
    model = summary["model"]
    assert {"prompt", "layer", "head", "alpha0", "confidence", "sink"} <= set(census.columns)
    assert len(census) == PARAMS["n_prompts"] * model["n_layers"] * model["n_heads"]
    assert sorted(census["layer"].unique()) == list(range(model["n_layers"]))
    assert census["alpha0"].between(0, 1).all() and census["confidence"].between(0, 1).all()
    assert summary["prepend_bos"] is True and summary["first_token"]["first_ids"] == [model["bos_id"]]
    assert summary["probe"]["n_prompts"] == PARAMS["n_prompts"] and summary["probe"]["sha256"]


def test_summary_matches_the_saved_tables(run_dir, census, summary):
    eps = PARAMS["eps"]
    assert summary["eps"] == eps
    assert summary["sink_rate_pct"] == pytest.approx((census["alpha0"] > eps).mean() * 100, abs=1e-4)
    by_layer = census.assign(s=census["alpha0"] > eps).groupby("layer")["s"].mean() * 100
    assert [summary["sink_rate_by_layer_pct"][str(l)] for l in by_layer.index] == pytest.approx(by_layer.tolist(),
                                                                                                abs=1e-4)
    head_means = census.groupby(["layer", "head"])["alpha0"].mean()
    assert summary["n_heads_mean_alpha0_above_eps"] == int((head_means > eps).sum())
    best = head_means.idxmax()
    assert (summary["strongest_head"]["layer"], summary["strongest_head"]["head"]) == best
    dims = pd.read_csv(run_dir / "tables" / "massive_dims.csv")
    expected = {str(l): sorted(part["dim"].tolist()) for l, part in dims.groupby("layer")}
    assert summary["massive_dims_by_layer"] == expected
    assert (dims["fraction"] >= 0.5).all()
    comparison = pd.read_csv(run_dir / "tables" / "bos_comparison.csv")
    assert comparison["case"].nunique() == 3 and len(comparison) == 3 * summary["model"]["n_layers"]
    bos_rows = comparison[comparison["case"] == "BOS at position 0"].sort_values("layer")
    assert bos_rows["sink_rate"].tolist() == pytest.approx(by_layer.tolist(), abs=1e-4)
    assert summary["bos_comparison"]["verdict"] in {"position", "token", "mixed", "none"}


def test_specialized_heads_recomputed_from_the_census(run_dir, census):
    saved = json.loads((run_dir / "specialized_heads.json").read_text())
    assert saved["eps"] == PARAMS["eps"] and saved["q"] == Q and saved["n_boot"] == PARAMS_02["n_boot"]
    # notebook 02 measured the same probe prompts again: its heads follow from notebook 01's census table
    frac = census.assign(s=census["alpha0"] > PARAMS["eps"]).groupby(["layer", "head"])["s"].mean()
    expected = sorted(list(lh) for lh in frac[frac >= Q].index)
    assert sorted(saved["heads"]) == expected and saved["n_specialized"] == len(expected)
    table = pd.read_csv(run_dir / "tables" / "specialization.csv")
    assert len(table) == saved["n_heads"] == census.groupby(["layer", "head"]).ngroups
    assert ((table["ci_low"] <= table["mean"] + 1e-6) & (table["mean"] <= table["ci_high"] + 1e-6)).all()
    listed = pd.read_csv(run_dir / "tables" / "specialized_heads.csv")
    assert sorted(map(list, zip(listed["layer"], listed["head"]))) == expected


def test_notebook_03_takes_the_heads_of_notebook_02(run_dir, tmp_path):
    """In a series, 03 prunes from 02's list (heads_from) instead of measuring its own: one count per run."""
    saved = json.loads((run_dir / "specialized_heads.json").read_text())
    heads_from = str(run_dir / "specialized_heads.json")
    out = tmp_path / "nb03"
    # k=8 instead of the default 10: the k passed is the k used
    params = ci_params("03_topk_pruning.ipynb", q=Q, k=8, heads_from=heads_from)
    execute_notebook("03_topk_pruning.ipynb", out, **params)
    summary = json.loads((out / "topk_pruning.json").read_text())
    assert summary["sink_heads"]["heads_from"] == heads_from
    assert summary["n_sink_heads"] == summary["headline"]["n_sink_heads"] == saved["n_specialized"]
    layer = summary["layer"]
    in_layer = sorted(h for h in saved["heads"] if h[0] == layer)
    assert sorted(summary["heads"]) == in_layer and len(in_layer) == max(
        sum(h[0] == l for h in saved["heads"]) for l in {h[0] for h in saved["heads"]})  # layer=-1: the fullest layer
