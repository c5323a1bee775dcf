"""Notebook 09 (streaming heads) runs headless with CI parameters; its summary agrees with its tables and with
independent facts: a KV cache's bytes from the config, the score's sign on the dense model, the table sizes."""

import json

import pandas as pd
import pytest

from sinklens.series import findings

from helpers import ci_params, execute_notebook

pytestmark = [pytest.mark.notebook, pytest.mark.integration]

CI = ci_params("09_streaming_heads.ipynb")  # the runner's --ci parameters


def test_notebook_09_streaming_heads(tmp_path):
    out = tmp_path / "nb09"
    execute_notebook("09_streaming_heads.ipynb", out, **CI)
    summary = json.loads((out / "streaming_heads.json").read_text())
    info = summary["model"]
    n_kv = info["n_layers"] * info["n_kv_heads"]
    scores = pd.read_csv(out / "tables" / "streaming_scores.csv")
    assert len(scores) == n_kv and scores["score"].notna().all()
    assert summary["comparison"]["n_kv_heads"] == n_kv
    assert summary["comparison"]["n_cheap"] == max(1, round(CI["cheap_share"] * n_kv))
    rho = summary["headline"]["spearman_score_alpha0"]
    assert rho is None or -1 <= rho <= 1
    # the KV budget: bytes from the config (keys and values, fp32 here), restricted heads keep sink + window tokens
    budget = pd.read_csv(out / "tables" / "kv_budget.csv")
    assert budget["tolerance"].tolist() == CI["tolerances"]
    assert budget["kv_heads"].is_monotonic_increasing and (budget["kv_heads"] <= n_kv).all()
    kept = CI["sink"] + CI["score_window"]
    per_head = 2 * info["d_head"] * 4 * (CI["kv_context"] - kept)
    assert (budget["saved_bytes"] == budget["kv_heads"] * per_head).all()
    assert (budget["cache_bytes"] == 2 * n_kv * info["d_head"] * 4 * CI["kv_context"]).all()
    assert (budget["search_increase"] <= budget["tolerance"] + 1e-12)[budget["kv_heads"] > 0].all()
    assert summary["headline"]["kv_heads_at_tolerance"] == {f"{t:g}": int(n) for t, n in
                                                            zip(budget["tolerance"], budget["kv_heads"])}
    # the curves: dense and unshifted up to curve_ref_len, the shifted ones over the whole text
    curves = summary["curves"]
    assert curves["dense"]["n_tokens"] == curves["sink + window, no shift"]["n_tokens"] == CI["curve_ref_len"]
    assert curves["sink + window"]["n_tokens"] == curves["window only"]["n_tokens"] == CI["curve_len"]
    assert curves["sink + window"]["pos_shift"] and not curves["dense"]["pos_shift"]
    assert curves["sink + window, no shift"]["evicts"] and not curves["dense"]["evicts"]
    common = summary["common_positions"]  # where every curve has evicted, up to the shortest
    assert common == [CI["sink"] + CI["curve_window"] + 1, CI["curve_ref_len"] - 1]
    binned = pd.read_csv(out / "tables" / "streaming_curves.csv")
    assert set(binned["curve"]) == set(curves)
    dense = binned[binned["curve"] == "dense"]
    assert (dense["loss"] * dense["n"]).sum() / dense["n"].sum() == pytest.approx(curves["dense"]["loss"])
    # the ablation tables: one row per setting, 0 sinks is window attention on the same cache rows
    sinks = pd.read_csv(out / "tables" / "ablation_sinks.csv")
    assert sinks["sink"].tolist() == CI["ablation_sinks"] and (sinks["window"] == CI["ablation_window"]).all()
    assert summary["headline"]["ppl_by_sinks"] == {str(s): round(p, 4) for s, p in zip(sinks["sink"],
                                                                                       sinks["ppl_from"])}
    windows = pd.read_csv(out / "tables" / "ablation_windows.csv")
    assert windows["window"].tolist() == CI["ablation_windows"]
    initial = pd.read_csv(out / "tables" / "ablation_initial_tokens.csv")
    assert initial["initial"].tolist() == ["bos", "newline"]
    assert initial["n_tokens"].tolist() == [CI["ablation_len"], CI["ablation_len"] + 3]
    bos_row = sinks[sinks["sink"] == CI["sink"]]
    if len(bos_row):  # the same setting in two tables: the same number
        assert initial["ppl_from"].iloc[0] == pytest.approx(bos_row["ppl_from"].iloc[0], rel=1e-6) or \
            initial["start"].iloc[0] != bos_row["start"].iloc[0]
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"streaming_loss_vs_position.html", "streaming_score_heatmap.html", "kv_saved_vs_loss.html"} <= figures
    assert findings.streaming_heads(summary)  # its sentences build from the real summary
