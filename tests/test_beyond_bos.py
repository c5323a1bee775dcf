"""Beyond the BOS dims (issue 12): mean fill, act_weight and optimized kept dims, score temperature.

Every number is checked against an independent computation: a separate HF eager model whose weights and biases
are edited by hand from numpy statistics of its own hidden states, checkpoints reloaded with plain transformers,
and a brute-force search through the layer-level reconstruction error.
"""

import numpy as np
import pandas as pd
import pytest
import torch

import sinklens as sl
from sinklens.assess import beyond_bos
from sinklens.report import summaries

from helpers import fake_selection, hf_eager, random_tokens

K = 6


def attention_inputs(hf, tokens, layer):
    """The attention input of ``layer`` computed by the HF model itself (input RMSNorm of the layer input)."""
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states[layer]
        return hf.model.layers[layer].input_layernorm(hidden).double().numpy()


def numpy_mean(x):
    """Mean over every position but the first (BOS) of every prompt (no padding here)."""
    return x[:, 1:].reshape(-1, x.shape[-1]).mean(0)


def edited_copy(folder, edit):
    """A fresh HF eager model of ``folder`` changed by ``edit(model)``."""
    hf = hf_eager(folder)
    with torch.no_grad():
        edit(hf)
    return hf


def set_bias(linear, rows, value):
    if linear.bias is None:
        linear.bias = torch.nn.Parameter(torch.zeros(linear.out_features))
    linear.bias.data[rows] += torch.as_tensor(value, dtype=torch.float32)


def test_mean_fill_equals_hand_edited_hf_model(tiny, tiny_dir, hf_reference):
    info = sl.model_info(tiny)
    dh, gs = info.d_head, info.group_size
    cal, ev = random_tokens(5, 16, seed=3), random_tokens(3, 14, seed=4)
    layer = 1
    heads = [(layer, h) for h in range(gs)]  # one whole KV group: the shared K rows are edited, with a k bias
    dims = [0, 5, 7, 11, 20, 31]
    mu = numpy_mean(attention_inputs(hf_reference, cal, layer))
    drop = np.setdiff1d(np.arange(info.d_model), dims)

    def edit(hf):
        attn = hf.model.layers[layer].self_attn
        for proj, index in [(attn.q_proj, h) for _, h in heads] + [(attn.k_proj, 0)]:
            rows = slice(index * dh, (index + 1) * dh)
            w = proj.weight.data[rows].double().numpy()
            set_bias(proj, rows, w[:, drop] @ mu[drop])
            proj.weight.data[rows, torch.as_tensor(drop)] = 0

    expected = edited_copy(tiny_dir, edit)(ev).logits
    with sl.prune_qk(tiny, heads, K, dims=dims, fill="mean", calibration=cal) as handle:
        got = tiny(ev)
        assert set(handle.plan.k_bias) == {(layer, 0)} and not handle.plan.k_copies
    assert float((got - expected).abs().max()) <= 1e-5
    zero_fill = edited_copy(tiny_dir, lambda hf: None)(ev).logits
    assert float((got - zero_fill).abs().max()) > 1e-4  # the fill changed something


def test_mean_fill_q_only_and_restore(tiny, tiny_dir, hf_reference):
    info = sl.model_info(tiny)
    cal, ev = random_tokens(4, 12, seed=5), random_tokens(2, 12, seed=6)
    layer, head, dims = 2, info.n_heads - 1, [1, 2, 3, 40, 41, 42]
    mu = numpy_mean(attention_inputs(hf_reference, cal, layer))
    drop = np.setdiff1d(np.arange(info.d_model), dims)
    rows = slice(head * info.d_head, (head + 1) * info.d_head)

    def edit(hf):
        q = hf.model.layers[layer].self_attn.q_proj
        set_bias(q, rows, q.weight.data[rows].double().numpy()[:, drop] @ mu[drop])
        q.weight.data[rows, torch.as_tensor(drop)] = 0

    dense = tiny(ev)
    with sl.prune_qk(tiny, [(layer, head)], K, dims=dims, fill="mean", gqa="q_only", calibration=cal):
        assert float((tiny(ev) - edited_copy(tiny_dir, edit)(ev).logits).abs().max()) <= 1e-5
    assert torch.equal(tiny(ev), dense)  # hooks removed, weights restored bitwise


@pytest.mark.parametrize("gqa", ["exact", "shared"])
def test_fill_and_temperature_checkpoint_reloads_exactly(tiny, tmp_path, gqa):
    info = sl.model_info(tiny)
    cal, ev = random_tokens(5, 16, seed=7), random_tokens(3, 16, seed=8)
    heads = [(0, 0), (1, info.n_heads - 1), (2, 1)]  # partial groups under GQA: private K copies (ungrouped)
    with sl.prune_qk(tiny, heads, K, dims="act_weight", fill="mean", temperature=True, gqa=gqa, force=True,
                     calibration=cal) as handle:
        pruned = tiny(ev)
        folder = sl.save_pruned(tiny, tmp_path / "ck")
        record = handle.as_dict()
    ref = hf_eager(folder)
    assert ref.config.attention_bias is True
    assert float((ref(ev).logits - pruned).abs().max()) <= 1e-5
    manifest = sl.read_manifest(folder)
    (edit,) = manifest["edits"]
    assert edit["fill"] == "mean" and edit["temperature"] is True and edit["policy"] == "act_weight"
    assert {(s["layer"], s["head"]) for s in edit["q_scale"]} == set(heads) and record["calibration"]["n_prompts"] == 5
    assert sl.PruneSpec.from_dict(edit) == handle.plan.spec
    # biases elsewhere are zero: v_proj and o_proj everywhere
    state = ref.state_dict()
    assert all(float(state[f"model.layers.{l}.self_attn.{p}_proj.bias"].abs().max()) == 0
               for l in range(info.n_layers) for p in ("v", "o"))
    assert manifest["attention_bias"]


def test_act_weight_dims_are_the_wanda_scores(tiny, hf_reference):
    info = sl.model_info(tiny)
    cal = random_tokens(4, 16, seed=9)
    heads = [(1, 0), (2, info.n_heads - 1)]
    got = sl.select_dims(tiny, heads, K, dims="act_weight", calibration=cal)
    for layer, head in heads:
        x = attention_inputs(hf_reference, cal, layer)
        norm = np.sqrt((x ** 2).reshape(-1, x.shape[-1]).sum(0))  # every real token, BOS included
        attn = hf_reference.model.layers[layer].self_attn
        dh, g = info.d_head, head // info.group_size
        wq = attn.q_proj.weight.data[head * dh:(head + 1) * dh].double().numpy()
        wk = attn.k_proj.weight.data[g * dh:(g + 1) * dh].double().numpy()
        score = norm * (np.linalg.norm(wq, axis=0) + np.linalg.norm(wk, axis=0))
        assert got[(layer, head)].tolist() == sorted(np.argsort(-score)[:K].tolist())


def test_optimized_is_greedy_on_the_calibration_error(tiny):
    """Each greedy step picks, among the pool, the dim whose addition gives the lowest in-sample frob_rel, as the
    layer-level reconstruction error (an independent code path) measures it with explicit dims."""
    cal = random_tokens(4, 12, seed=10)
    head, pool = (1, 1), 12
    calibration = sl.CalibrationSet(tiny, cal)
    spec = sl.PruneSpec([head], 3, "optimized", pool=pool, gqa="q_only")
    ranking = sl.select_dims(tiny, spec, calibration=calibration)[head]
    (key,) = calibration.rankings
    order = list(calibration.rankings[key])
    assert sorted(order) == ranking.tolist()
    candidates = sl.select_dims(tiny, [head], pool, dims="act_weight", calibration=calibration)[head].tolist()
    for step in range(3):
        errors = {}
        for d in candidates:
            if d in order[:step]:
                continue
            frame = sl.reconstruction_error(tiny, cal, [head], step + 1, dims=order[:step] + [d], gqa="q_only",
                                            level="layer", show_progress=False)
            errors[d] = float(frame["frob_rel"].iloc[0])
        assert errors[order[step]] == pytest.approx(min(errors.values()), abs=1e-6)
    # a smaller k reuses the prefix (no new search); a larger one extends it
    cost = dict(calibration.search_cost[key])
    assert sl.select_dims(tiny, spec.replace(k=2), calibration=calibration)[head].tolist() == sorted(order[:2])
    assert calibration.search_cost[key] == cost
    sl.select_dims(tiny, spec.replace(k=4), calibration=calibration)
    assert len(calibration.rankings[key]) == 4 and calibration.rankings[key][:3] == order
    assert calibration.search_cost[key]["candidates"] > cost["candidates"]


def test_temperature_minimises_the_kl(tiny, tiny_dir, hf_reference):
    """The fitted scale beats 0.8x and 1.25x of itself on the calibration KL, computed by HF eager patterns of a
    hand-scaled model."""
    info = sl.model_info(tiny)
    cal = random_tokens(4, 14, seed=11)
    layer, head = 1, 0
    dims = [2, 4, 9, 17, 25, 33]
    plan = sl.plan_pruning(tiny, [(layer, head)], K, dims=dims, gqa="q_only", temperature=True, calibration=cal)
    scale = plan.q_scale[(layer, head)]
    assert scale != 1.0
    rows = slice(head * info.d_head, (head + 1) * info.d_head)
    drop = torch.as_tensor(np.setdiff1d(np.arange(info.d_model), dims))
    with torch.no_grad():
        dense = hf_reference(cal, output_attentions=True).attentions[layer][:, head].double()

    def kl(c):
        def edit(hf):
            q = hf.model.layers[layer].self_attn.q_proj
            q.weight.data[rows, drop] = 0
            q.weight.data[rows] *= c
        with torch.no_grad():
            pruned = edited_copy(tiny_dir, edit)(cal, output_attentions=True).attentions[layer][:, head].double()
        terms = torch.where(dense > 0, dense * (dense.log() - pruned.log()), torch.zeros(()))
        return float(terms.sum(-1).mean())

    best = kl(scale)
    assert best < kl(scale * 0.8) and best < kl(scale * 1.25) and best < kl(1.0)


def test_layer_level_equals_the_pruned_model_for_every_option(tiny):
    cal, ev = random_tokens(4, 14, seed=12), random_tokens(3, 14, seed=13)
    info = sl.model_info(tiny)
    heads = [(1, h) for h in range(info.n_heads)][:3]
    for gqa in ("exact", "shared", "q_only"):
        frame = sl.k_sweep(tiny, ev, heads, ks=[4, 8], policies=["act_weight", "optimized"], fills=["zero", "mean"],
                           temperatures=[False, True], gqa=gqa, force=True, pool=16, calibration=cal,
                           show_progress=False)
        assert len(frame) == 2 * 2 * 2 * 2 * len(heads) and set(frame["fit"]) == {"held_out"}
        model = sl.k_sweep(tiny, ev, heads, ks=[4], policies=["optimized"], fills=["mean"],
                           temperatures=[True], gqa=gqa, force=True, pool=16, calibration=cal, level="model",
                           show_progress=False)
        layer = frame[(frame["k"] == 4) & (frame["policy"] == "optimized") & (frame["fill"] == "mean")
                      & (frame["temperature"] == True)]  # noqa: E712 (a column of bools)
        assert np.allclose(layer["frob_rel"].to_numpy(), model["frob_rel"].to_numpy(), atol=1e-5)


def test_records_say_what_was_fitted_on_what(tiny):
    cal, ev = random_tokens(4, 12, seed=14), random_tokens(2, 12, seed=15)
    heads = [(1, 0)]
    held = sl.reconstruction_error(tiny, ev, heads, K, dims="optimized", fill="mean", calibration=cal, level="layer",
                                   show_progress=False)
    same = sl.reconstruction_error(tiny, ev, heads, K, dims="act_weight", level="layer", show_progress=False)
    control = sl.reconstruction_error(tiny, ev, heads, K, dims="random", level="layer", show_progress=False)
    row = held.iloc[0]
    assert (row["policy"], row["fill"], row["temperature"], row["fit"]) == ("optimized", "mean", False, "held_out")
    assert same["fit"].iloc[0] == "in_sample" and control["fit"].iloc[0] is None
    spec = sl.PruneSpec(heads, K, "optimized", fill="mean", temperature=True, objective="kl", pool=20)
    assert sl.PruneSpec.from_dict(spec.as_dict()) == spec
    assert sl.PruneSpec(heads, K, "act_weight", objective="kl", pool=3).objective is None  # ignored fields normalized


@pytest.mark.parametrize("case", ["mean_no_tokens", "optimized_no_tokens", "no_bos", "massive_for_mean",
                                  "unknown_fill", "unknown_temperature", "unknown_policy", "k_over_pool",
                                  "sweep_k_over_pool"])
def test_bad_input_is_refused_clearly(tiny, case):
    cal = random_tokens(3, 10, seed=16)
    heads = [(1, 0)]
    dense = {k: v.clone() for k, v in tiny.state_dict().items()}
    calls = {
        "mean_no_tokens": (lambda: sl.apply_pruning(tiny, heads, K, dims="random", fill="mean"), "calibration="),
        "optimized_no_tokens": (lambda: sl.apply_pruning(tiny, heads, K, dims="optimized"), "calibration="),
        "no_bos": (lambda: sl.apply_pruning(tiny, heads, K, dims="act_weight",
                                            calibration=random_tokens(3, 10, bos=False)),
                   "BOS"),
        "massive_for_mean": (lambda: sl.reconstruction_error(
            tiny, cal, heads, K, fill="mean", calibration=sl.massive_activations(tiny, cal, show_progress=False)),
            "calibration="),
        "unknown_fill": (lambda: sl.PruneSpec(heads, K, fill="median"), "fill"),
        "unknown_temperature": (lambda: sl.PruneSpec(heads, K, temperature="platt"), "temperature"),
        "unknown_policy": (lambda: sl.select_dims(tiny, heads, K, dims="wanda", calibration=cal), "wanda"),
        "k_over_pool": (lambda: sl.PruneSpec(heads, 30, "optimized", pool=20), "pool"),
        "sweep_k_over_pool": (lambda: sl.k_sweep(tiny, cal, heads, ks=[K, 40], policies=["optimized"], pool=32,
                                                 show_progress=False), "pool"),
    }
    call, needle = calls[case]
    with pytest.raises(sl.InputError, match=needle):
        call()
    assert not sl.active_edits(tiny)
    assert all(torch.equal(v, dense[k]) for k, v in tiny.state_dict().items())


# --- the best variant and the layer selections it is compared in (notebook 07) -------------------------------

def synthetic_sweep() -> pd.DataFrame:
    """A k_sweep-shaped frame: three heads per variant and k with known errors, and whole-head rows (no fill)."""
    medians = {("bos_top", "zero", False): 0.5, ("bos_top", "mean", False): 0.3,
               ("act_weight", "zero", False): 0.3, ("act_weight", "mean", True): 0.2}
    rows = []
    for (policy, fill, temperature), median in medians.items():
        for k in (5, 10):
            shift = 0.4 if (k == 10 and policy == "bos_top" and fill == "mean") else 0.0  # best at 10: another one
            for offset in (-0.1, 0.0, 0.2):
                value = median - shift + offset if k == 10 else median + offset
                rows.append({"policy": policy, "fill": fill, "temperature": temperature, "k": k, "frob_rel": value,
                             "kl": 2 * value})
    rows += [{"policy": "head_removal", "fill": None, "temperature": None, "k": k, "frob_rel": 0.0, "kl": 0.0}
             for k in (5, 10)]
    return pd.DataFrame(rows)


def test_best_variant_is_the_lowest_median_at_k():
    table = beyond_bos.variant_table(synthetic_sweep(), [5, 10])
    assert beyond_bos.best_variant(table, 5) == {"policy": "act_weight", "fill": "mean", "temperature": True}
    assert beyond_bos.best_variant(table, 10) == {"policy": "bos_top", "fill": "mean", "temperature": False}
    label = beyond_bos.variant_label(beyond_bos.best_variant(table, 5))
    assert label == "act_weight/mean/temperature" == summaries.beyond_bos_headline(table, 5)["best_variant"]
    tied = table[~((table["policy"] == "act_weight") & (table["fill"] == "mean"))]  # two variants at 0.3 at k=5
    assert beyond_bos.best_variant(tied, 5) == {"policy": "act_weight", "fill": "zero", "temperature": False}
    assert beyond_bos.variant_label(beyond_bos.best_variant(tied, 5)) == summaries.beyond_bos_headline(tied, 5)[
        "best_variant"]  # ties broken the same way as the headline
    with pytest.raises(sl.InputError, match="no median frob_rel at k=20"):
        beyond_bos.best_variant(table, 20)


def test_selection_comparison_reads_the_best_confirmed_set_per_variant():
    baseline = fake_selection([("single_layer_rank", "held_out", "qk", [1], 2, 0.95),
                               ("single_layer_rank", "held_out", "qk", [1, 3], 4, 0.92),
                               ("single_layer_rank", "held_out", "qk", [1, 3, 5], 6, 0.85),
                               ("single_layer", "search", "qk", [1, 3, 5], 6, 0.99),  # decisions, not confirmed
                               ("head_removal", "held_out", "head_removal", [1, 3, 5], 6, 0.97)])  # not QK
    best = fake_selection([("greedy", "held_out", "qk", [5], 2, 0.90), ("greedy", "held_out", "qk", [3, 5], 4, 0.93),
                           ("greedy", "held_out", "qk", [1, 3, 5], 6, 0.92)], "act_weight", "mean")
    table = beyond_bos.selection_comparison({"bos_top/zero/none": baseline, "act_weight/mean/none": best},
                                            [0.91, 0.99])
    assert len(table) == 4 and list(table["variant"]) == ["bos_top/zero/none"] * 2 + ["act_weight/mean/none"] * 2
    rows = table.set_index(["variant", "target"])
    met = rows.loc[("bos_top/zero/none", 0.91)]
    assert (met["layers"], met["n_heads"], met["params_zeroed"], met["retention"]) == ([1, 3], 4, 400, 0.92)
    assert met["heads"] == [[1, 0], [3, 0]]
    assert met["ci_low"] == pytest.approx(0.87) and met["meets"] and met["policy"] == "bos_top"
    assert rows.loc[("act_weight/mean/none", 0.91), "layers"] == [1, 3, 5]  # most heads meeting it, not best retention
    assert rows.loc[("act_weight/mean/none", 0.91), "fill"] == "mean"
    for variant in ("bos_top/zero/none", "act_weight/mean/none"):
        none = rows.loc[(variant, 0.99)]
        assert none["layers"] is None and none["n_heads"] == 0 and not none["meets"]
    # by hand: 1,3,5 (0.92) has the most heads meeting 0.91; best() on the same constructed tables agrees
    assert rows.loc[("act_weight/mean/none", 0.91), "n_heads"] == 6
    assert [list(baseline.best(0.91)["layers"]), list(best.best(0.91)["layers"])] == [[1, 3], [1, 3, 5]]
    head = summaries.selection_headline(table, "act_weight/mean/none")
    assert head == {"selection_heads_bos_top": 4,
                    "selection_heads_best": 6, "selection_params_bos_top": 400, "selection_params_best": 600}
    with pytest.raises(sl.InputError, match="no rows for variants"):
        summaries.selection_headline(table, "optimized/zero/none")
    with pytest.raises(sl.InputError, match="must be a sinklens.LayerSelection"):
        beyond_bos.selection_comparison({"x": baseline.table}, [0.91])
    with pytest.raises(sl.InputError, match="target"):
        beyond_bos.selection_comparison({"x": baseline}, [1.5])
