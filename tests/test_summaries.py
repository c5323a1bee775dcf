"""The notebook summaries (sinklens.report.summaries) against hand-computed values on constructed inputs."""

import math

import pandas as pd
import pytest

import sinklens as sl
from sinklens.assess.calibration_search import CalibrationSearch
from sinklens.report import summaries

from helpers import fake_selection


def test_reconstruction_headline_on_a_constructed_errors_frame():
    errors = pd.DataFrame({"k": [4, 4, 4], "frob_rel": [0.1, 0.5, 0.3], "alpha0": [0.8, 0.6, 0.4],
                           "d_alpha0": [-0.2, 0.0, 0.1], "next_kl": [0.02] * 3, "d_loss": [0.01] * 3})
    head = summaries.reconstruction_headline(errors, n_sink_heads=7)
    assert head["n_heads_pruned"] == 3 and head["n_sink_heads"] == 7 and head["k"] == 4
    assert head["frob_rel_median"] == pytest.approx(0.3)
    assert head["alpha0_dense_mean"] == pytest.approx(0.6)
    assert head["alpha0_pruned_mean"] == pytest.approx((0.6 + 0.6 + 0.5) / 3)
    assert (head["next_kl"], head["d_loss"]) == (0.02, 0.01)
    with pytest.raises(sl.InputError, match=r"lacks columns \['d_loss'\].*reconstruction_error"):
        summaries.reconstruction_headline(errors.drop(columns="d_loss"), 7)


def test_k_sweep_headline_reads_the_median_at_k_and_the_first_k_below_the_threshold():
    quantiles = pd.DataFrame({"policy": ["bos_top", "bos_top", "random", "random", "head_removal"],
                              "k": [5, 10, 5, 10, 10], "q50": [0.4, 0.15, 0.9, 0.8, float("nan")]})
    smallest = pd.DataFrame({"policy": ["bos_top", "random"], "threshold": [0.2, 0.2], "k": [10, pd.NA]})
    model_level = pd.DataFrame({"policy": ["bos_top", "bos_top", "random"], "d_loss": [0.1, 0.3, 1.0]})
    head = summaries.k_sweep_headline(quantiles, smallest, model_level, 10, 0.2)
    assert head["frob_rel_median_at_k"] == {"bos_top": 0.15, "random": 0.8}  # no pattern error: left out
    below = head["smallest_k_median_below_0.2"]
    assert below["bos_top"] == 10 and pd.isna(below["random"])
    assert head["d_loss_at_k"] == {"bos_top": pytest.approx(0.2), "random": 1.0}


def test_layer_selection_headline_and_summary_on_a_constructed_selection():
    selection = fake_selection([("greedy", "held_out", "qk", [5], 2, 0.95),
                                ("greedy", "held_out", "qk", [3, 5], 4, 0.93),
                                ("greedy", "held_out", "qk", [1, 3, 5], 6, 0.80),
                                ("head_removal", "held_out", "head_removal", [3, 5], 4, 0.70)])
    head = summaries.layer_selection_headline(selection)
    # by hand: [3, 5] has the most heads among the sets meeting 0.91
    assert head["best_layers"] == "3,5" and head["best_n_heads"] == 4 and head["best_retention"] == 0.93
    assert head["best_params_zeroed"] == 400 and math.isclose(head["best_ci_low"], 0.88)
    assert head["head_removal_retention_same_heads"] == 0.70
    assert head["n_sink_heads"] == 3 and head["n_configurations"] == 4 and head["target_retention"] == 0.91
    summary = summaries.layer_selection_summary(selection, targets=[0.91], heads_from="measured", parameters={"k": 4})
    assert summary["headline"] == head and summary["best"]["layers"] == [3, 5]
    assert summary["heads_from"] == "measured" and summary["parameters"] == {"k": 4}
    none = fake_selection([("greedy", "held_out", "qk", [1, 3, 5], 6, 0.80)])
    assert summaries.layer_selection_headline(none)["best_layers"] is None
    with pytest.raises(sl.InputError, match="selection must be a LayerSelection"):
        summaries.layer_selection_headline({"best": None})


def constructed_search(kept, held_out_gain, recipe_gain):
    """A CalibrationSearch from rows (no model): two candidate heads, held-out rows of the kept set (if any) and of
    ACT's recipe."""
    heads = pd.DataFrame({"layer": [3, 4], "head": [1, 0], "gain": [0.02, -0.01], "gain_low": [0.005, -0.03],
                          "gain_high": [0.04, 0.01], "kept": [(3, 1) in kept, False]})
    rows = []
    for name, gain, n in (("kept", held_out_gain, len(kept)), ("act_recipe", recipe_gain, 243)):
        if gain is None:
            continue
        rows += [{"configuration": name, "split": "held_out", "n_heads": n, "metric": "acc/mean", "dense": 0.5,
                  "calibrated": 0.5 * (1 + gain), "change": 0.5 * gain, "gain": gain, "gain_low": gain - 0.01,
                  "gain_high": gain + 0.01},
                 {"configuration": name, "split": "held_out", "n_heads": n, "metric": "lm/acc", "dense": 0.4,
                  "calibrated": 0.4, "change": 0.0, "gain": 0.0, "gain_low": -0.01, "gain_high": 0.01}]
    return CalibrationSearch(layers=pd.DataFrame(), mass=pd.DataFrame(), heads=heads, kept=kept,
                             combined=pd.DataFrame(rows), dense={}, settings={"metric": "acc/mean"},
                             cost={"n_candidates": 2, "n_screened_layers": 0, "total": 3.5})


CENSUS = pd.DataFrame({"layer": [3], "head": [1], "alpha0_before": [0.5], "alpha0_after": [0.62],
                       "alpha0_change": [0.12], "non_first_before": [1.5], "non_first_after": [0.25]})
SIDE = pd.DataFrame({"method": ["qk", "head_removal", "calibration", "qk+calibration"], "n_heads": [4] * 4,
                     "params_zeroed": [10, 20, 0, 10], "retention": [0.95, 0.7, 1.01, 0.96],
                     "ci_low": [0.9, 0.6, 0.99, 0.9], "ci_high": [1.0, 0.8, 1.03, 1.0]})


@pytest.mark.parametrize("kept, gain", [([(3, 1)], 0.012), ([], None)])
def test_attention_calibration_headline_reads_the_tables(kept, gain):
    search = constructed_search(kept, gain, -0.004)
    head = summaries.attention_calibration_headline(search, CENSUS, SIDE)
    assert head["n_head_candidates"] == 2 and head["n_kept_heads"] == len(kept)
    assert head["kept_gain"] == (None if gain is None else pytest.approx(gain))
    assert head["kept_gain_low"] == (None if gain is None else pytest.approx(gain - 0.01))
    assert head["act_recipe_gain"] == pytest.approx(-0.004) and head["act_recipe_gain_low"] == pytest.approx(-0.014)
    assert head["alpha0_change"] == pytest.approx(0.12) and head["non_first_sinks_after"] == pytest.approx(0.25)
    assert (head["same_heads_qk_retention"], head["same_heads_removal_retention"],
            head["same_heads_qk_calibration_retention"]) == (0.95, 0.7, 0.96)
    assert len(head) <= 12
    summary = summaries.attention_calibration_summary(search, census=CENSUS, comparison=SIDE,
                                                      layer_set={"n_heads": 4}, heads_from="measured", n_sink_heads=9)
    assert summary["headline"] == head and summary["kept"] == [list(h) for h in kept]
    assert len(summary["held_out"]) == 2 * (2 if kept else 1) and summary["n_sink_heads"] == 9
def test_streaming_heads_summary_on_constructed_results(tmp_path):
    """Notebook 09's summary from hand-made curves and tables: past-context and common-position losses by hand."""
    import numpy as np

    from sinklens.assess.streaming import StreamingResult

    from helpers import build_family_checkpoint

    model = sl.load_model(str(build_family_checkpoint(tmp_path, "llama")), device="cpu")  # context 96
    n_ctx = sl.model_info(model).n_ctx
    long = np.linspace(1.0, 3.0, 199)  # 200 tokens: 199 predictions, 103 of them past the context
    short = np.full(95, 2.0)

    def result(losses, sink, window, shift):
        return StreamingResult(losses, sink, window, shift, "chunked", 1.0,
                               {"n_tokens": len(losses) + 1, "evicts": len(losses) + 1 > sink + window + 1})
    curves = {"dense": result(short, 0, 96, False), "sink + window, no shift": result(short, 4, 20, False),
              "window only": result(long * 2, 0, 24, True), "sink + window": result(long, 4, 20, True)}
    scores = pd.DataFrame({"layer": [0, 0, 1], "kv_head": [0, 1, 0], "score": [0.1, 0.0, 0.3],
                           "dense_loss": [2.0] * 3})
    comparison = {"spearman_alpha0": -0.5, "spearman_non_first": None, "overlap": 1, "n_sink_groups": 2,
                  "n_cheap": 1, "n_kv_heads": 3}
    budget = pd.DataFrame({"tolerance": [0.02, 0.1], "kv_heads": [1, 2], "search_increase": [0.0, 0.08],
                           "held_out_increase": [0.01, 0.12], "saved_bytes": [2 ** 20, 2 ** 21],
                           "cache_bytes": [2 ** 22] * 2, "llama2_7b_saved_bytes": [2 ** 30, 2 ** 31],
                           "llama2_7b_cache_bytes": [2 ** 32] * 2, "context": [8192] * 2})
    table = pd.DataFrame({"initial": ["bos", "bos"], "sink": [0, 4], "window": [16, 16], "ppl_from": [9.0, 5.0]})
    initial = pd.DataFrame({"initial": ["bos", "newline"], "sink": [4, 4], "window": [16, 16], "ppl_from": [5.0, 5.5]})
    summary = summaries.streaming_heads_summary(model, curves=curves, scores=scores, comparison=comparison,
                                                budget=budget, sink_table=table, window_table=table,
                                                initial_table=initial, settings={"sink": 4, "curve_window": 20})
    head = summary["headline"]
    assert head["curve_tokens"] == 200
    assert head["ppl_past_context_sink_window"] == pytest.approx(math.exp(long[n_ctx:].mean()), abs=1e-4)
    assert head["ppl_past_context_window_only"] == pytest.approx(math.exp(2 * long[n_ctx:].mean()), abs=1e-4)
    assert summary["curves"]["dense"]["loss_past_context"] is None
    assert summary["common_positions"] == [25, 95]  # the latest first eviction (4 + 20 + 1) to the shortest curve
    assert summary["curves"]["sink + window"]["loss_common"] == pytest.approx(long[25:95].mean())
    assert head["kv_heads_at_tolerance"] == {"0.02": 1, "0.1": 2}
    assert head["held_out_increase_at_tolerance"] == {"0.02": 0.01, "0.1": 0.12}
    assert head["ppl_by_sinks"] == {"0": 9.0, "4": 5.0} and head["ppl_by_initial"] == {"bos": 5.0, "newline": 5.5}
    assert summary["kv_budget"][0]["saved_mib"] == 1 and summary["kv_budget"][1]["llama2_7b_saved_gib"] == 2
    assert summary["scores"]["cheapest"] == [0, 1] and summary["scores"]["dearest"] == [1, 0]
