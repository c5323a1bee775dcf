"""Notebooks 03 (top-k pruning of one layer) and 04 (reconstruction error against k) run headless and write
real content: the numbers in their tables agree with each other and with the package's definitions."""

import json

import nbformat
import pandas as pd
import pytest

from helpers import ci_params, execute_notebook

pytestmark = [pytest.mark.notebook, pytest.mark.integration]

# the runner's --ci parameters; 03 overrides k (below)
PARAMS_03 = ci_params("03_topk_pruning.ipynb", k=8)  # not the default 10: the k passed is the k used
PARAMS_04 = ci_params("04_reconstruction_error.ipynb")


def outputs_text(path):
    nb = nbformat.read(path, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    return "\n".join(o.get("text", "") for o in outputs)


def test_notebook_03_topk_pruning(tmp_path):
    out = tmp_path / "nb03"
    executed = execute_notebook("03_topk_pruning.ipynb", out, **PARAMS_03)
    assert "sink-specialized heads" in outputs_text(executed)
    summary = json.loads((out / "topk_pruning.json").read_text())
    layer, heads = summary["layer"], [tuple(h) for h in summary["heads"]]
    assert heads and all(l == layer for l, _ in heads) and summary["n_sink_heads"] >= len(heads)
    record = summary["pruning"]
    assert record["k"] == PARAMS_03["k"] and record["policy"] == "bos_top" and record["basis"] == "normalized"
    assert record["gqa"] == "exact" and record["params_zeroed"]["total"] > 0
    kept = pd.read_csv(out / "tables" / "kept_dims.csv")
    assert len(kept) == PARAMS_03["k"] * len(heads)
    kept_dims = {(d["layer"], d["head"]): d["dims"] for d in record["dims"]}
    assert all(sorted(part["dim"]) == kept_dims[(l, h)] for (l, h), part in kept.groupby(["layer", "head"]))
    errors = pd.read_csv(out / "tables" / "reconstruction_error.csv")
    assert sorted(zip(errors["layer"], errors["head"])) == sorted(heads)
    assert errors["frob_rel"].between(0, 2).all() and (errors["kl"] >= 0).all()
    assert (errors["alpha0"] > 0.3 * 0.9).all()  # sink-specialized: above eps on >= 90% of the prompts
    assert (errors["alpha0"] + errors["d_alpha0"]).between(0, 1).all()
    head = summary["headline"]
    assert head["n_heads_pruned"] == len(heads)
    assert head["frob_rel_median"] == pytest.approx(errors["frob_rel"].median())
    assert head["alpha0_pruned_mean"] == pytest.approx((errors["alpha0"] + errors["d_alpha0"]).mean())
    assert errors["next_kl"].nunique() == 1 and errors["next_kl"].iloc[0] > 0
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"kept_dims.html", "patterns_before_after.html", "alpha0_before_after.html",
            "attention_views_before_after.html"} <= figures
    views = (out / "figures" / "attention_views_before_after.html").read_text()
    assert views.count("CircuitsVis.render(") == 2 and "cdn.jsdelivr" not in views


def test_notebook_04_reconstruction_error(tmp_path):
    out = tmp_path / "nb04"
    execute_notebook("04_reconstruction_error.ipynb", out, **PARAMS_04)
    k, ks, seeds = PARAMS_04["k"], PARAMS_04["ks"], PARAMS_04["seeds"]
    summary = json.loads((out / "reconstruction_error.json").read_text())
    n_heads = summary["n_sink_heads"]
    assert n_heads > 0 and len(summary["sink_heads"]) == n_heads
    sweep = pd.read_csv(out / "tables" / "k_sweep.csv")
    assert set(sweep["policy"]) == {"bos_top", "random", "weight_norm", "head_removal"}
    assert sorted(sweep["k"].unique()) == sorted(ks) and k in ks
    sizes = sweep.groupby("policy").size()
    assert sizes["random"] == len(seeds) * len(ks) * n_heads and sizes["bos_top"] == len(ks) * n_heads
    whole = sweep[sweep["policy"] == "head_removal"]
    assert (whole["out_rel"].round(6) == 1).all() and whole["frob_rel"].isna().all()
    # BOS dims: more kept dims, less error; and far less than random dims at the same k
    med = sweep[sweep["policy"] != "head_removal"].groupby(["policy", "k"])["frob_rel"].median().unstack()
    bos_top, random = med.loc["bos_top"], med.loc["random"]
    assert bos_top[max(ks)] < bos_top[min(ks)] and bos_top[max(ks)] < random[max(ks)]
    quantiles = pd.read_csv(out / "tables" / "frob_rel_quantiles_at_k.csv")
    bos = sweep[(sweep["policy"] == "bos_top") & (sweep["k"] == k)]["frob_rel"]
    assert quantiles.set_index("policy").loc["bos_top", "q50"] == pytest.approx(bos.median())
    smallest = pd.read_csv(out / "tables" / "smallest_k.csv")
    assert len(smallest) == 4 * 2 and set(smallest["threshold"]) == {0.2, 0.1}
    every = pd.read_csv(out / "tables" / "all_heads_at_k.csv")
    model = summary["model"]
    assert len(every) == model["n_layers"] * model["n_heads"] and (every["k"] == k).all()
    level = pd.read_csv(out / "tables" / "model_level_at_k.csv")
    assert set(level["level"]) == {"model"} and (level["next_kl"] >= 0).all()
    assert level["n_prompts"].eq(PARAMS_04["model_prompts"]).all()
    assert 0 < summary["params_zeroed_all_sink_heads_at_k"]["share"] < 1
    head = summary["headline"]
    assert head["frob_rel_median_at_k"]["bos_top"] == pytest.approx(bos.median())
    assert set(head["smallest_k_median_below_0.2"]) == {"bos_top", "random", "weight_norm"}
    assert head["d_loss_at_k"]["bos_top"] == pytest.approx(level[level["policy"] == "bos_top"]["d_loss"].mean())
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"frob_rel_vs_k.html", "out_rel_vs_k.html", "frob_rel_vs_k_by_layer.html", "frob_rel_vs_k_by_head.html",
            "frob_rel_heatmap_at_k.html", "model_level_at_k.html"} <= figures
