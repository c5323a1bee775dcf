"""Notebook 07 (beyond the BOS dims) runs headless with CI parameters and writes tables that agree with each other:
the headline comes from the variant table, the table from the sweep, every error was fitted on other prompts."""

import json

import pandas as pd
import pytest

import sinklens as sl
import sinklens.prune.spec

from helpers import execute_notebook

pytestmark = [pytest.mark.notebook, pytest.mark.integration]

CI = dict(n_prompts=4, n_calibration=4, n_held_out=4, seq_len=24, max_heads=3, compare_ks=[2, 5], k=5, pool=8,
          model_prompts=2, batch_size=4, limit=2, n_lm_prompts=2, lm_seq_len=24, n_copy=2, n_boot=20)
VARIANT = ["policy", "fill", "temperature"]


def variant_of(row) -> str:
    return sl.prune.spec.variant_label(row["policy"], row["fill"], bool(row["temperature"]))


def test_notebook_07_beyond_bos_dims(tmp_path):
    out = tmp_path / "nb07"
    execute_notebook("07_beyond_bos_dims.ipynb", out, **CI)
    summary = json.loads((out / "beyond_bos_dims.json").read_text())
    heads = [tuple(h) for h in summary["heads"]]
    assert 0 < len(heads) <= 3 and summary["n_sink_heads"] >= len(heads)
    sweep = pd.read_csv(out / "tables" / "beyond_bos_k_sweep.csv")
    assert len(sweep) == 3 * 2 * 2 * 2 * len(heads)  # policies x fills x temperatures x ks x heads
    assert set(sweep["fit"]) == {"held_out"} and sweep["frob_rel"].between(0, 2).all() and (sweep["kl"] >= 0).all()
    table = pd.read_csv(out / "tables" / "variants.csv")
    for _, row in table.iterrows():
        part = sweep[(sweep["policy"] == row["policy"]) & (sweep["fill"] == row["fill"])
                     & (sweep["temperature"] == row["temperature"]) & (sweep["k"] == row["k"])]
        assert row["frob_rel_q50"] == pytest.approx(part["frob_rel"].median())
        assert row["frob_rel_q10"] <= row["frob_rel_q50"] <= row["frob_rel_q90"]
    head = summary["headline"]
    at_k = table[table["k"] == 5]  # the sample's best, the optimized search included
    assert head["sample_best_frob_rel_median"] == pytest.approx(at_k["frob_rel_q50"].min())
    assert head["sample_best_variant"] == variant_of(at_k.sort_values(["frob_rel_q50"] + VARIANT).iloc[0])
    in_sample = pd.read_csv(out / "tables" / "optimized_in_sample.csv")  # fitted on the evaluated prompts
    assert set(in_sample["policy"]) == {"optimized"} and len(in_sample) == 2 * 2 * 2  # fills x temperatures x ks
    assert (in_sample["n_heads"] == len(heads)).all()
    assert summary["optimized_in_sample_best_at_k"] == pytest.approx(in_sample.loc[in_sample["k"] == 5,
                                                                                    "frob_rel_q50"].min())
    overlap = pd.read_csv(out / "tables" / "bos_optimized_overlap.csv")
    assert sorted(zip(overlap["layer"], overlap["head"])) == sorted(heads)
    assert overlap["share"].between(0, 1).all() and (overlap["k"] == 5).all()
    assert head["bos_optimized_overlap_mean"] == pytest.approx(overlap["share"].mean())
    cost = pd.read_csv(out / "tables" / "optimized_search_cost.csv")
    assert (cost["seconds"] > 0).all() and (cost["ranked"] >= 5).all()
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
    assert len(everything) == 2 * 2 * 2 * 2 * len(sink_heads)  # policies x fills x temperatures x ks x heads
    all_heads = pd.read_csv(out / "tables" / "variants_all_heads.csv")
    assert len(all_heads) == 2 * 2 * 2 * 2 and (all_heads["n_heads"] == len(sink_heads)).all()
    medians = everything.groupby(VARIANT + ["k"])[["frob_rel", "kl"]].median()
    for _, row in all_heads.iterrows():
        key = tuple(row[VARIANT]) + (row["k"],)
        assert row["frob_rel_q50"] == pytest.approx(medians.loc[key, "frob_rel"])
        assert row["kl_q50"] == pytest.approx(medians.loc[key, "kl"])
        assert row["kl_q10"] <= row["kl_q50"] <= row["kl_q90"]
    assert [r["frob_rel_q50"] for r in summary["variants_all_heads"]] == pytest.approx(list(all_heads["frob_rel_q50"]))

    # layer selection: the all-heads table's best variant at k against bos_top/zero/none, one results file
    best = all_heads[all_heads["k"] == 5].sort_values(["frob_rel_q50"] + VARIANT).iloc[0]
    best_label = variant_of(best)
    assert head["best_variant"] == best_label and summary["selection"]["best_variant"] == {
        "policy": best["policy"], "fill": best["fill"], "temperature": bool(best["temperature"])}
    at_k = all_heads[all_heads["k"] == 5].set_index(VARIANT)  # the headline's medians: every sink head
    assert head["best_frob_rel_median"] == pytest.approx(best["frob_rel_q50"])
    assert head["baseline_frob_rel_median"] == pytest.approx(at_k.loc[("bos_top", "zero", False), "frob_rel_q50"])
    selection = pd.read_csv(out / "tables" / "selection_comparison.csv")
    assert set(selection["variant"]) == {"bos_top/zero/none", best_label} and (selection["target"] == 0.91).all()
    assert (selection["k"] == 5).all() and (selection["n_candidate_heads"] == len(sink_heads)).all()
    for _, row in selection.iterrows():
        assert row["variant"] == variant_of(row)
        if not row["meets"]:
            assert pd.isna(row["layers"]) and row["n_heads"] == 0 and row["params_zeroed"] == 0
            continue
        layers = set(json.loads(row["layers"]))  # a list of ints, [layer, head] lists for heads
        in_layers = [[int(l), int(h)] for l, h in sink_heads if l in layers]  # every sink head of the chosen layers
        assert row["n_heads"] == len(in_layers) and json.loads(row["heads"]) == in_layers
        assert row["retention"] >= 0.91 and row["ci_low"] <= row["retention"] <= row["ci_high"]
        assert row["params_zeroed"] > 0
    by_variant = selection.set_index("variant")
    for name, label in (("bos_top", "bos_top/zero/none"), ("best", best_label)):
        assert head[f"selection_heads_{name}"] == by_variant.loc[label, "n_heads"]
        assert head[f"selection_params_{name}"] == by_variant.loc[label, "params_zeroed"]
    assert len(head) <= 13  # twelve numbers and the per-variant mapping
    assert len([v for v in head.values() if not isinstance(v, dict)]) <= 12  # all of them in the report
    assert (out / "layer_selection.sqlite").exists()  # shared with notebook 05 in a run
    assert "frob_rel_vs_k_all_heads.html" in {p.name for p in (out / "figures").iterdir()}
