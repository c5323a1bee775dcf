"""Notebook 06 (sinks at long context) runs headless with the runner's --ci parameters and writes real content: its
tables agree with each other, with the headline, and with a direct census."""

import json

import pandas as pd
import pytest

import sinklens as sl

from helpers import ci_params, execute_notebook

pytestmark = [pytest.mark.notebook, pytest.mark.integration]


def test_notebook_06_long_context(tmp_path, smollm):
    out = tmp_path / "nb06"
    ci = ci_params("06_long_context.ipynb")  # the runner's --ci parameters
    shortest, longest = min(ci["lengths"]), max(ci["lengths"])
    execute_notebook("06_long_context.ipynb", out, **ci)
    summary = json.loads((out / "long_context.json").read_text())
    head = summary["headline"]
    sweep = pd.read_csv(out / "tables" / "alpha_by_length.csv")
    info = summary["model"]
    assert sorted(sweep["length"].unique()) == ci["lengths"]
    assert len(sweep) == len(ci["lengths"]) * info["n_layers"] * info["n_heads"]
    assert sweep[[f"alpha_{k}" for k in range(4)]].sum(1).between(0, 1 + 1e-5).all()
    # the sweep's shortest length equals a direct census of the same prompt
    direct = sl.run_census(smollm, sl.probe_tokens(smollm, 1, shortest), engine="sdpa", show_progress=False)
    got = sweep[sweep["length"] == shortest].sort_values(["layer", "head"])["alpha_0"].to_numpy()
    assert abs(got - direct.sink_scores(0).flatten().numpy()).max() <= 1e-5
    rates = pd.read_csv(out / "tables" / "sink_rate_by_length.csv")
    overall = rates[rates["layer"] == -1].set_index("length")["sink_rate"]
    assert head["sink_rate_pct_shortest"] == pytest.approx(overall[shortest], abs=0.01)
    assert head["sink_rate_pct_longest"] == pytest.approx(overall[longest], abs=0.01)
    assert head["n_sink_heads_at_shortest"] > 0 and 0 < head["sink_heads_alpha0_shortest"] <= 1
    non_first = pd.read_csv(out / "tables" / "long_context_non_first_sinks.csv")
    carriers = pd.read_csv(out / "tables" / "massive_tokens.csv")
    details = summary["details"]
    assert head["non_first_sinks"] == details["non_first_sinks"] == len(non_first)
    assert details["massive_pairs"] == len(carriers) > 0 and head["massive_positions"] >= 1
    assert details["detail_length"] == ci["detail_length"] and (carriers["position"] < ci["detail_length"]).all()
    assert len(head) <= 12  # the report shows at most 12 headline numbers
    assert summary["engine"].startswith("sdpa")
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"alpha0_vs_length.html", "sink_rate_by_layer_and_length.html", "sinks_and_massive_vs_position.html",
            "first_keys_view.html"} <= figures
