"""Notebook 07 (beyond the BOS dims) runs headless with CI parameters and writes tables that agree with each other:
the headline comes from the variant table, the table from the sweep, every error was fitted on other prompts."""

import json

import pandas as pd
import pytest

from helpers import execute_notebook

pytestmark = [pytest.mark.notebook, pytest.mark.integration]

CI = dict(n_prompts=4, n_calibration=4, n_heldout=4, seq_len=24, max_heads=3, compare_ks=[2, 5], k=5, pool=8,
          model_prompts=2, batch_size=4)


def test_notebook_07_beyond_bos_dims(tmp_path):
    out = tmp_path / "nb07"
    execute_notebook("07_beyond_bos_dims.ipynb", out, **CI)
    summary = json.loads((out / "beyond_bos_dims.json").read_text())
    heads = [tuple(h) for h in summary["heads"]]
    assert 0 < len(heads) <= 3 and summary["n_sink_heads"] >= len(heads)
    sweep = pd.read_csv(out / "tables" / "k_sweep.csv")
    assert len(sweep) == 3 * 2 * 2 * 2 * len(heads)  # policies x fills x calibrations x ks x heads
    assert set(sweep["fit"]) == {"held_out"} and sweep["frob_rel"].between(0, 2).all() and (sweep["kl"] >= 0).all()
    table = pd.read_csv(out / "tables" / "variants.csv")
    for _, row in table.iterrows():
        part = sweep[(sweep["policy"] == row["policy"]) & (sweep["fill"] == row["fill"])
                     & (sweep["calibration"] == row["calibration"]) & (sweep["k"] == row["k"])]
        assert row["frob_rel_q50"] == pytest.approx(part["frob_rel"].median())
        assert row["frob_rel_q10"] <= row["frob_rel_q50"] <= row["frob_rel_q90"]
    head = summary["headline"]
    at_k = table[table["k"] == 5]
    assert head["best_frob_rel_median"] == pytest.approx(at_k["frob_rel_q50"].min())
    assert head["baseline_frob_rel_median"] == pytest.approx(
        at_k[(at_k["policy"] == "bos_top") & (at_k["fill"] == "zero") & (at_k["calibration"] == "none")]
        ["frob_rel_q50"].iloc[0])
    overlap = pd.read_csv(out / "tables" / "bos_optimized_overlap.csv")
    assert sorted(zip(overlap["layer"], overlap["head"])) == sorted(heads)
    assert overlap["share"].between(0, 1).all() and (overlap["k"] == 5).all()
    assert head["bos_optimized_overlap_mean"] == pytest.approx(overlap["share"].mean())
    cost = pd.read_csv(out / "tables" / "optimized_search_cost.csv")
    assert (cost["seconds"] > 0).all() and (cost["ranked"] >= 5).all()
    level = pd.read_csv(out / "tables" / "model_level_at_k.csv")
    assert set(level["level"]) == {"model"} and (level["next_kl"] >= 0).all()
    assert {"frob_rel_vs_k.html", "model_level_at_k.html"} <= {p.name for p in (out / "figures").iterdir()}
