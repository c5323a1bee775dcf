"""The notebook summaries (sinklens.report.summaries) against hand-computed values on constructed inputs."""

import math

import pandas as pd
import pytest

import sinklens as sl
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
