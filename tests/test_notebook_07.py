"""Notebook 07 (beyond the BOS dims) runs headless with CI parameters and writes tables that agree with each other:
the headline comes from the variant table, the table from the sweep, every error was fitted on other prompts."""

import json

import pandas as pd
import pytest

from sinklens.prune.spec import variant_label

from helpers import ci_params, execute_notebook

pytestmark = [pytest.mark.notebook, pytest.mark.integration]

CI = ci_params("07_beyond_bos_dims.ipynb")  # the runner's --ci parameters
K = CI["k"]
# rows per head of the k sweep and per variant: the grid of policies, fills, temperatures and ks
GRID = len(CI["fills"]) * len(CI["temperatures"]) * len(CI["compare_ks"])
VARIANT = ["policy", "fill", "temperature"]


def variant_of(row) -> str:
    return variant_label(row["policy"], row["fill"], bool(row["temperature"]))


def named(table, label):
    """The rows of ``table`` whose variant label is ``label``."""
    return table[[variant_of(row) == label for _, row in table.iterrows()]]


def test_notebook_07_beyond_bos_dims(tmp_path):
    out = tmp_path / "nb07"
    execute_notebook("07_beyond_bos_dims.ipynb", out, **CI)
    summary = json.loads((out / "beyond_bos_dims.json").read_text())
    heads = [tuple(h) for h in summary["heads"]]
    assert 0 < len(heads) <= CI["max_heads"] and summary["n_sink_heads"] >= len(heads)
    sweep = pd.read_csv(out / "tables" / "beyond_bos_k_sweep.csv")
    assert len(sweep) == len(CI["policies"]) * GRID * len(heads)
    assert set(sweep["fit"]) == {"held_out"} and sweep["frob_rel"].between(0, 2).all() and (sweep["kl"] >= 0).all()
    table = pd.read_csv(out / "tables" / "variants.csv")
    for _, row in table.iterrows():
        part = sweep[(sweep["policy"] == row["policy"]) & (sweep["fill"] == row["fill"])
                     & (sweep["temperature"] == row["temperature"]) & (sweep["k"] == row["k"])]
        assert row["frob_rel_q50"] == pytest.approx(part["frob_rel"].median())
        assert row["frob_rel_q10"] <= row["frob_rel_q50"] <= row["frob_rel_q90"]
    head = summary["headline"]
    at_k = table[table["k"] == K]  # the sample's best, the optimized search included
    assert head["sample_best_frob_rel_median"] == pytest.approx(at_k["frob_rel_q50"].min())
    # the named variant has the lowest median at k (the tie-break is test_beyond_bos's, on a constructed table)
    chosen = named(at_k, head["sample_best_variant"])
    assert len(chosen) == 1 and chosen["frob_rel_q50"].iloc[0] == at_k["frob_rel_q50"].min()
    in_sample = pd.read_csv(out / "tables" / "optimized_in_sample.csv")  # fitted on the evaluated prompts
    assert set(in_sample["policy"]) == {"optimized"} and len(in_sample) == GRID
    assert (in_sample["n_heads"] == len(heads)).all()
    assert summary["optimized_in_sample_best_at_k"] == pytest.approx(in_sample.loc[in_sample["k"] == K,
                                                                                    "frob_rel_q50"].min())
    overlap = pd.read_csv(out / "tables" / "bos_optimized_overlap.csv")
    assert sorted(zip(overlap["layer"], overlap["head"])) == sorted(heads)
    assert overlap["share"].between(0, 1).all() and (overlap["k"] == K).all()
    assert head["bos_optimized_overlap_mean"] == pytest.approx(overlap["share"].mean())
    cost = pd.read_csv(out / "tables" / "optimized_search_cost.csv")
    assert (cost["seconds"] > 0).all() and (cost["ranked"] >= max(CI["compare_ks"])).all()
    level = pd.read_csv(out / "tables" / "beyond_bos_model_level_at_k.csv")
    assert set(level["level"]) == {"model"} and (level["next_kl"] >= 0).all()
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"beyond_bos_frob_rel_vs_k.html", "beyond_bos_model_level_at_k.html"} <= figures
    assert head["baseline_frob_rel_median"] is not None and "baseline_variant" not in head
    assert summary["baseline_variant"] == "bos_top/zero/none"

    # every sink-specialized head, the policies without a search
    everything = pd.read_csv(out / "tables" / "k_sweep_all_heads.csv")
    sink_heads = sorted(set(zip(everything["layer"], everything["head"])))
    assert len(sink_heads) == summary["n_sink_heads"] and set(heads) <= set(sink_heads)
    assert set(everything["policy"]) == {"bos_top", "act_weight"}
    assert len(everything) == len(CI["all_heads_policies"]) * GRID * len(sink_heads)
    all_heads = pd.read_csv(out / "tables" / "variants_all_heads.csv")
    assert len(all_heads) == len(CI["all_heads_policies"]) * GRID and (all_heads["n_heads"] == len(sink_heads)).all()
    medians = everything.groupby(VARIANT + ["k"])[["frob_rel", "kl"]].median()
    for _, row in all_heads.iterrows():
        key = tuple(row[VARIANT]) + (row["k"],)
        assert row["frob_rel_q50"] == pytest.approx(medians.loc[key, "frob_rel"])
        assert row["kl_q50"] == pytest.approx(medians.loc[key, "kl"])
        assert row["kl_q10"] <= row["kl_q50"] <= row["kl_q90"]
    assert [r["frob_rel_q50"] for r in summary["variants_all_heads"]] == pytest.approx(list(all_heads["frob_rel_q50"]))

    # layer selection: the all-heads table's best variant at k against bos_top/zero/none, one results file
    at_k = all_heads[all_heads["k"] == K]  # the headline's medians: every sink head
    best_label = head["best_variant"]  # the lowest median at k (the tie-break: test_beyond_bos)
    best = named(at_k, best_label).iloc[0]
    assert best["frob_rel_q50"] == at_k["frob_rel_q50"].min()
    assert summary["selection"]["best_variant"] == {"policy": best["policy"], "fill": best["fill"],
                                                    "temperature": bool(best["temperature"])}
    assert head["best_frob_rel_median"] == pytest.approx(best["frob_rel_q50"])
    baseline = named(at_k, "bos_top/zero/none")["frob_rel_q50"].iloc[0]
    assert head["baseline_frob_rel_median"] == pytest.approx(baseline)
    selection = pd.read_csv(out / "tables" / "selection_comparison.csv")
    assert set(selection["variant"]) == {"bos_top/zero/none", best_label}
    assert (selection["target"] == CI["target_retention"]).all()
    assert (selection["k"] == K).all() and (selection["n_candidate_heads"] == len(sink_heads)).all()
    for _, row in selection.iterrows():
        assert row["variant"] == variant_of(row)
        if not row["meets"]:
            assert pd.isna(row["layers"]) and row["n_heads"] == 0 and row["params_zeroed"] == 0
            continue
        layers = set(json.loads(row["layers"]))  # a list of ints, [layer, head] lists for heads
        in_layers = [[int(l), int(h)] for l, h in sink_heads if l in layers]  # every sink head of the chosen layers
        assert row["n_heads"] == len(in_layers) and json.loads(row["heads"]) == in_layers
        assert row["retention"] >= CI["target_retention"] and row["ci_low"] <= row["retention"] <= row["ci_high"]
        assert row["params_zeroed"] > 0
    by_variant = selection.set_index("variant")
    for name, label in (("bos_top", "bos_top/zero/none"), ("best", best_label)):
        assert head[f"selection_heads_{name}"] == by_variant.loc[label, "n_heads"]
        assert head[f"selection_params_{name}"] == by_variant.loc[label, "params_zeroed"]
    assert len(head) <= 13  # twelve numbers and the per-variant mapping
    assert len([v for v in head.values() if not isinstance(v, dict)]) <= 12  # all of them in the report
    assert (out / "layer_selection.sqlite").exists()  # shared with notebook 05 in a run
    assert "frob_rel_vs_k_all_heads.html" in {p.name for p in (out / "figures").iterdir()}
