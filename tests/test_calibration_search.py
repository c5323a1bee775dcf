"""The attention-calibration head search and its effects, against independent computations: every gain from the
per-item table by hand, every configuration against the edit applied by its own public call, the keep rule, the
cost in forward-equivalents, resuming, the census and the side-by-side of pruning and calibration."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

import sinklens as sl
from sinklens.assess.calibration_effects import COMPARED, calibration_census, calibration_comparison
from sinklens.assess.calibration_search import act_recipe_heads, calibration_head_search, gain_table, moved_mass
from sinklens.core.hooks import pattern_hook

from helpers import build_tiny_checkpoint, mc_items, write_items

# a low threshold and min_queries so that the tiny random model's heads have sinks to calibrate
OPTIONS = dict(beta=0.4, threshold=0.05, min_queries=2)
N_LAYERS = 5


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 5-layer GQA Llama (ACT's recipe, layers 2..L-2, is not empty) and an item file."""
    folder = tmp_path_factory.mktemp("deep")
    model = sl.load_model(str(build_tiny_checkpoint(folder / "model", 4, 2, n_layers=N_LAYERS)), device="cpu")
    return model, write_items(folder, mc_items(12))


def evaluation(items) -> sl.EvalOptions:
    return sl.EvalOptions(items=str(items), n_lm_prompts=4, lm_seq_len=16, n_copy=4, copy_len=6, share_context=False)


def mean_acc(per_item: pd.DataFrame) -> float:
    """acc/mean by hand: the mean of lm/acc (token-weighted), mc/acc (mean over tasks) and copy/acc."""
    lm, copy, mc = (per_item[per_item["part"] == p] for p in ("lm", "copy", "mc"))
    mc_acc = np.mean([g["acc"].mean() for _, g in mc.groupby("task")])
    return np.mean([lm["n_correct"].sum() / lm["n_tokens"].sum(), mc_acc,
                    copy["n_correct"].sum() / copy["n_tokens"].sum()])


def test_gain_table_against_the_per_item_table(deep):
    model, items = deep
    plan = evaluation(items).plans(model)["held_out"]
    dense = plan.run(model)
    with sl.calibrate_attention(model, [(1, 0), (3, 2)], **OPTIONS):
        calibrated = plan.run(model)
    table = gain_table(dense, calibrated, n_boot=200, ci=0.9).set_index("metric")
    expected = mean_acc(calibrated.per_item) / mean_acc(dense.per_item) - 1
    assert table.loc["acc/mean", "gain"] == pytest.approx(expected)
    assert table.loc["acc/mean", "change"] == pytest.approx(mean_acc(calibrated.per_item) - mean_acc(dense.per_item))
    lm = lambda r: r.per_item[r.per_item["part"] == "lm"]  # noqa: E731
    loss = lambda r: lm(r)["nll"].sum() / lm(r)["n_tokens"].sum()  # noqa: E731
    assert table.loc["lm/loss", "change"] == pytest.approx(loss(calibrated) - loss(dense))
    assert table.loc["lm/loss", "dense"] == pytest.approx(loss(dense))
    assert table.loc["lm/ppl", "gain"] == pytest.approx(math.exp(loss(dense) - loss(calibrated)) - 1)
    finite = table.dropna()
    assert len(finite) and (finite["gain_low"] <= finite["gain_high"]).all()  # the interval is the retention's - 1
    ret = sl.retention(dense, calibrated, n_boot=200, ci=0.9).set_index("metric")
    assert table.loc["acc/mean", "gain_low"] == pytest.approx(ret.loc["acc/mean", "ci_low"] - 1)


@pytest.mark.parametrize("top_m", [None, 2])
def test_search_stages_equal_the_public_edit_and_keep_by_the_stated_rule(deep, tmp_path, top_m):
    model, items = deep
    options = sl.CalibrationOptions(**OPTIONS)
    search = calibration_head_search(model, candidates="layers", options=options, evaluation=evaluation(items),
                                     screen_layers=2,
                                     top_m=top_m, n_boot=200, results=tmp_path / "store.sqlite", show_progress=False)
    plans = evaluation(items).plans(model)
    dense = {split: plan.run(model) for split, plan in plans.items()}
    assert search.dense["search"] == pytest.approx(dense["search"].metrics)
    n_heads = sl.model_info(model).n_heads

    # the screen: each layer's gain is that of calibrating all its heads by the public call
    assert list(search.layers["layer"]) == list(range(N_LAYERS))
    for _, row in search.layers.iterrows():
        with sl.calibrate_attention(model, [(int(row["layer"]), h) for h in range(n_heads)], **OPTIONS):
            value = mean_acc(plans["search"].run(model).per_item)
        assert row["gain"] == pytest.approx(value / mean_acc(dense["search"].per_item) - 1)
    best = search.layers.sort_values(["gain", "loss", "layer"], ascending=[False, True, True])["layer"][:2]
    assert sorted(search.layers.loc[search.layers["candidate"], "layer"]) == sorted(best)

    # the candidates: every head of the chosen layers, each alone
    assert sorted(zip(search.heads["layer"], search.heads["head"])) == [(l, h) for l in sorted(best)
                                                                         for h in range(n_heads)]
    for _, row in search.heads.sample(3, random_state=0).iterrows():
        with sl.calibrate_attention(model, [(int(row["layer"]), int(row["head"]))], **OPTIONS):
            value = mean_acc(plans["search"].run(model).per_item)
        assert row["gain"] == pytest.approx(value / mean_acc(dense["search"].per_item) - 1)

    # the keep rule
    heads = search.heads
    if top_m is None:
        expected = heads[heads["gain_low"] > 0]
    else:
        expected = heads[heads["gain"] > 0].sort_values("gain", ascending=False).head(top_m)
    assert search.kept == sorted((int(l), int(h)) for l, h in zip(expected["layer"], expected["head"]))
    assert list(heads["kept"]) == [(int(l), int(h)) in search.kept for l, h in zip(heads["layer"], heads["head"])]

    # together, held out: the kept heads and ACT's recipe against the public call
    recipe = act_recipe_heads(N_LAYERS, n_heads)
    assert recipe == [(l, h) for l in (2, 3) for h in range(n_heads)]
    for name, chosen in (("kept", search.kept), ("act_recipe", recipe)):
        rows = search.held_out(name)
        if not chosen:
            assert rows.empty
            continue
        with sl.calibrate_attention(model, chosen, **OPTIONS):
            value = mean_acc(plans["held_out"].run(model).per_item)
        row = rows.set_index("metric").loc["acc/mean"]
        assert row["n_heads"] == len(chosen)
        assert row["gain"] == pytest.approx(value / mean_acc(dense["held_out"].per_item) - 1)

    # the cost: every configuration whose first calibrated layer is l runs layers l..L-1
    stages = search.cost["stages"]
    assert stages["dense"] == pytest.approx(2.0)
    assert stages["layer screen"] == pytest.approx(sum((N_LAYERS - l) / N_LAYERS for l in range(N_LAYERS)))
    assert stages["heads"] == pytest.approx(sum(n_heads * (N_LAYERS - l) / N_LAYERS for l in best))
    assert search.cost["per_head_candidate"] == pytest.approx(stages["heads"] / len(heads))
    assert search.cost["total"] == pytest.approx(search.cost["sweep"]["forward_equivalents"])

    # resumed from the results file: nothing is computed again, the same tables come back
    again = calibration_head_search(model, candidates="layers", options=options, evaluation=evaluation(items),
                                    screen_layers=2,
                                    top_m=top_m, n_boot=200, results=tmp_path / "store.sqlite", show_progress=False)
    assert again.cost["total"] == 0 and again.heads["cached"].all() and again.kept == search.kept
    pd.testing.assert_series_equal(again.heads["gain"], search.heads["gain"])


def test_search_of_given_candidates_and_bad_input(deep):
    model, items = deep
    search = calibration_head_search(model, candidates=[(4, 1), (3, 0)], options=sl.CalibrationOptions(**OPTIONS),
                                     evaluation=evaluation(items), act_recipe=False, n_boot=50, show_progress=False)
    assert search.layers.empty and sorted(zip(search.heads["layer"], search.heads["head"])) == [(3, 0), (4, 1)]
    assert search.held_out("act_recipe").empty
    grid = search.gain_grid(N_LAYERS, 4)
    assert np.isfinite(grid).sum() == 2 and grid[3, 0] == search.heads.set_index(["layer", "head"]).loc[(3, 0),
                                                                                                        "gain"]
    top = search.heads.sort_values(["gain", "layer", "head"], ascending=[False, True, True]).iloc[0]
    assert search.shown_heads(1) == (search.kept or [(int(top["layer"]), int(top["head"]))])
    bad = [
        (dict(evaluation=sl.EvalOptions(items=str(items), share_context=True)), "share_context"),
        (dict(candidates="some"), "candidates"),
        (dict(candidates=[]), "candidates is empty"),
        (dict(candidates=[(9, 0)]), "layer"),
        (dict(screen_layers=0), "screen_layers"),
        (dict(top_m=0), "top_m"),
        (dict(options={"beta": 0.4}), "CalibrationOptions"),
        (dict(ci=0), "ci"),
        (dict(metric="acc/best"), "metric"),
        (dict(executor="nowhere"), "executor"),
    ]
    for kwargs, match in bad:
        with pytest.raises(sl.InputError, match=match):
            calibration_head_search(model, **{"evaluation": evaluation(items), **kwargs})


def column_means(model, tokens, heads) -> dict:
    """alpha_0 of each head by hand: the mean over queries of the pattern's first column, per prompt."""
    names = [pattern_hook(l) for l in sorted({l for l, _ in heads})]
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    return {(l, h): cache[pattern_hook(l)][:, h, :, 0].mean(-1).mean().item() for l, h in heads}


def test_census_before_and_after_against_the_patterns(deep):
    model, _ = deep
    tokens = sl.probe_tokens(model, 3, 12, prepend_bos=True)
    heads = [(1, 0), (3, 3)]
    options = sl.CalibrationOptions(**OPTIONS)
    table = calibration_census(model, tokens, heads, options=options, show_progress=False).set_index(["layer",
                                                                                                     "head"])
    assert sorted(table.index) == heads
    before = column_means(model, tokens.tokens, heads)
    with sl.calibrate_attention(model, heads, **OPTIONS) as handle:
        after = column_means(model, tokens.tokens, heads)
        sinks = handle.sink_sets()
    for head in heads:
        assert table.loc[head, "alpha0_before"] == pytest.approx(before[head], abs=1e-5)
        assert table.loc[head, "alpha0_after"] == pytest.approx(after[head], abs=1e-5)
        assert table.loc[head, "alpha0_change"] == pytest.approx(after[head] - before[head], abs=1e-5)
        # before: the census' non-first sinks are the calibration's sink set (same definition, same prompts)
        assert table.loc[head, "non_first_before"] == pytest.approx(sinks[head].sum(-1).float().mean().item())
    assert not sl.active_edits(model)
    with pytest.raises(sl.InputError, match="heads is empty"):
        calibration_census(model, tokens, [], options=options)


def test_side_by_side_equals_each_edit_by_its_public_call(deep):
    model, items = deep
    plan = evaluation(items).plans(model)["held_out"]
    tokens = sl.probe_tokens(model, 4, 12, prepend_bos=True)
    heads = [(2, 0), (2, 1), (3, 2)]
    massive = sl.massive_activations(model, tokens, layers=[2, 3], show_progress=False)
    spec = sl.PruneSpec(heads, 4)
    options = sl.CalibrationOptions(**OPTIONS)
    table = calibration_comparison(model, spec, plan, options=options, calibration=massive, n_boot=50)
    assert list(table["method"]) == list(COMPARED)
    dense = mean_acc(plan.run(model).per_item)
    rows = table.set_index("method")
    with sl.prune_qk(model, spec, calibration=massive) as handle:
        assert rows.loc["qk", "params_zeroed"] == handle.params_zeroed()["total"] > 0
        assert rows.loc["qk", "retention"] == pytest.approx(mean_acc(plan.run(model).per_item) / dense)
    with sl.remove_heads(model, heads):
        assert rows.loc["head_removal", "retention"] == pytest.approx(mean_acc(plan.run(model).per_item) / dense)
    with sl.calibrate_attention(model, heads, **OPTIONS):
        assert rows.loc["calibration", "retention"] == pytest.approx(mean_acc(plan.run(model).per_item) / dense)
        assert rows.loc["calibration", "params_zeroed"] == 0
        with sl.prune_qk(model, spec, calibration=massive):  # the other order: the same pattern (module docstring)
            both = mean_acc(plan.run(model).per_item)
    assert rows.loc["qk+calibration", "retention"] == pytest.approx(both / dense)
    assert not sl.active_edits(model)
    shared = sl.EvalOptions(items=str(items), n_lm_prompts=2, n_copy=2).plans(model)["held_out"]
    with pytest.raises(sl.InputError, match="share_context=False"):
        calibration_comparison(model, spec, shared, options=options, calibration=massive)
    with pytest.raises(sl.InputError, match="PruneSpec with heads"):
        calibration_comparison(model, sl.PruneSpec.template(4), plan, calibration=massive)


def test_moved_mass_against_the_sink_sets_and_patterns(deep):
    model, _ = deep
    tokens = sl.probe_tokens(model, 3, 12, prepend_bos=True)
    options = sl.CalibrationOptions(**OPTIONS)
    table = moved_mass(model, tokens, options=options, show_progress=False).set_index(["layer", "head"])
    info = sl.model_info(model)
    assert len(table) == info.n_layers * info.n_heads
    every = [(l, h) for l in range(info.n_layers) for h in range(info.n_heads)]
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens.tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    sinks = {}
    for layer in range(info.n_layers):  # one layer at a time: the layers below it stay dense, as in the screen
        with sl.calibrate_attention(model, [(layer, h) for h in range(info.n_heads)], **OPTIONS) as handle:
            model(tokens.tokens)
            sinks.update(handle.sink_sets())
    for layer, head in every:
        a = cache[pattern_hook(layer)][:, head].float()  # [prompt, query, key], causal: row i sees keys <= i
        s = sinks[(layer, head)].float()  # [prompt, key]
        by_hand = (1 - OPTIONS["beta"]) * (a * s[:, None, :]).sum(-1).mean(-1).mean().item()
        assert table.loc[(layer, head), "moved"] == pytest.approx(by_hand, abs=1e-6)
        assert table.loc[(layer, head), "n_sinks"] == pytest.approx(s.sum(-1).mean().item())
    assert (table["moved"] > 0).any()


def test_a_mass_screen_where_nothing_moves_searches_no_head(deep):
    model, items = deep
    options = sl.CalibrationOptions(threshold=0.99, min_queries=2)  # no key holds 99 % of its column
    with pytest.warns(UserWarning, match="No head moves any attention mass"):
        search = calibration_head_search(model, options=options, evaluation=evaluation(items), n_boot=50,
                                         screen_tokens=sl.probe_tokens(model, 2, 12), show_progress=False)
    assert search.heads.empty and search.kept == [] and not search.mass["candidate"].any()
    assert (search.mass["moved"] == 0).all() and search.cost["stages"]["heads"] == 0
    recipe = search.held_out("act_recipe").set_index("metric")
    assert recipe.loc["acc/mean", "gain"] == 0  # nothing moves: the recipe is the dense model
    assert search.shown_heads(2) == [(0, 0), (0, 1)]  # the screen's first heads, to show something
