"""Notebook 08 (attention calibration) runs headless with CI parameters and writes tables that agree with each other
and with its summary: the candidates are the screen's top heads, the kept heads follow the keep rule, the held-out
rows are the kept set and ACT's recipe, the census and the side-by-side are of the heads the summary names."""

import json

import pandas as pd
import pytest

from sinklens.assess.calibration_effects import COMPARED

from helpers import ci_params, execute_notebook

pytestmark = [pytest.mark.notebook, pytest.mark.integration]

CI = ci_params("08_attention_calibration.ipynb")  # the runner's --ci parameters


def pairs(frame: pd.DataFrame) -> list[tuple[int, int]]:
    return sorted(zip(frame["layer"].astype(int), frame["head"].astype(int)))


def test_notebook_08_attention_calibration(tmp_path):
    out = tmp_path / "nb08"
    execute_notebook("08_attention_calibration.ipynb", out, **CI)
    summary = json.loads((out / "attention_calibration.json").read_text())
    head, settings = summary["headline"], summary["settings"]
    tables = out / "tables"

    # the mass screen: the candidates are the n_candidates heads moving the most mass
    mass = pd.read_csv(tables / "calibration_mass_screen.csv")
    assert len(mass) == settings["n_layers"] * settings["n_heads"] and (mass["moved"] >= 0).all()
    top = mass.sort_values(["moved", "layer", "head"], ascending=[False, True, True]).head(CI["n_candidates"])
    assert pairs(mass[mass["candidate"]]) == pairs(top[top["moved"] > 0])
    heads = pd.read_csv(tables / "calibration_heads.csv")
    assert pairs(heads) == pairs(mass[mass["candidate"]]) and head["n_head_candidates"] == len(heads)

    # the keep rule (top_m = 0: the gain's lower bound above 0)
    assert (heads["gain_low"] <= heads["gain_high"]).all()
    kept = pairs(heads[heads["gain_low"] > 0])
    assert [tuple(h) for h in summary["kept"]] == kept == pairs(heads[heads["kept"]])
    assert head["n_kept_heads"] == len(kept)

    # held out: the kept set (when there is one) and ACT's recipe, every head of layers 2..L-2
    held_out = pd.read_csv(tables / "calibration_held_out.csv")
    recipe = held_out[(held_out["configuration"] == "act_recipe")]
    assert set(recipe["split"]) == {"held_out"}
    assert (recipe["n_heads"] == (settings["n_layers"] - 3) * settings["n_heads"]).all()
    assert set(held_out["configuration"]) == ({"kept", "act_recipe"} if kept else {"act_recipe"})
    row = recipe.set_index("metric").loc[summary["metric"]]
    assert head["act_recipe_gain"] == pytest.approx(row["gain"])
    assert row["gain"] == pytest.approx(row["calibrated"] / row["dense"] - 1)
    if not kept:
        assert head["kept_gain"] is None

    # the census of the shown heads (kept, or the best three by search gain), before and after
    census = pd.read_csv(tables / "calibration_census.csv")
    shown = kept or pairs(heads.sort_values(["gain", "layer", "head"], ascending=[False, True, True]).head(3))
    assert pairs(census) == sorted(shown)
    assert census["alpha0_change"].to_numpy() == pytest.approx((census["alpha0_after"]
                                                               - census["alpha0_before"]).to_numpy())
    assert head["alpha0_change"] == pytest.approx(census["alpha0_change"].mean())
    assert head["non_first_sinks_after"] == pytest.approx(census["non_first_after"].mean())

    # the side-by-side: the layer set's heads, four edits, the headline's retentions
    side = pd.read_csv(tables / "calibration_side_by_side.csv").set_index("method")
    assert list(side.index) == list(COMPARED)
    assert (side["n_heads"] == summary["layer_set"]["n_heads"]).all()
    assert side.loc["qk", "params_zeroed"] > 0 and side.loc["calibration", "params_zeroed"] == 0
    for method, key in (("qk", "same_heads_qk_retention"), ("head_removal", "same_heads_removal_retention"),
                        ("qk+calibration", "same_heads_qk_calibration_retention")):
        assert head[key] == pytest.approx(side.loc[method, "retention"])
    assert summary["layer_set"]["source"].startswith("the sink-specialized heads of the layer")  # alone: fallback

    # costs and files
    assert summary["cost"]["stages"]["heads"] > 0 and summary["cost"]["mass_screen_prompts"] == CI["screen_prompts"]
    assert len([v for v in head.values() if not isinstance(v, dict)]) <= 12
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"calibration_mass_screen.html", "calibration_gain_heatmap.html", "calibration_held_out_gains.html",
            "calibration_sinks_before_after.html", "calibration_patterns_before_after.html",
            "calibration_side_by_side.html"} <= figures
    assert (out / "layer_selection.sqlite").exists()
