"""Reconstruction error and k sweeps: metrics against numpy on HF eager patterns with the same edits."""

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import sinklens as sl
from sinklens.assess import reconstruction

from helpers import hf_eager, padded_mask, random_tokens

METRICS = ["alpha0", "frob_rel", "kl", "d_alpha0", "out_rel"]



# --- independent reference: HF eager models with the same edits, metrics in numpy --------------


def hf_model(folder, ungroup=False):
    """A fresh HF eager model on the tiny weights; ``ungroup`` repeats k/v rows per query head (exact GQA copies)."""
    model = hf_eager(folder)
    if not ungroup or model.config.num_key_value_heads == model.config.num_attention_heads:
        return model
    config = AutoConfig.from_pretrained(str(folder))
    gs = config.num_attention_heads // config.num_key_value_heads
    config.num_key_value_heads = config.num_attention_heads
    config._attn_implementation = "eager"
    wide = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval().requires_grad_(False)
    state = model.state_dict()
    for key in list(state):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            w = state[key]
            state[key] = w.reshape(-1, config.head_dim, w.shape[1]).repeat_interleave(gs, 0).reshape(-1, w.shape[1])
    wide.load_state_dict(state)
    return wide


def zero_columns(model, plan_dims, d_model, d_head):
    """Zero q_proj and (per query head, ungrouped) k_proj input columns outside each head's kept dims."""
    with torch.no_grad():
        for (layer, head), keep in plan_dims.items():
            drop = torch.ones(d_model, dtype=torch.bool)
            drop[keep] = False
            attn = model.model.layers[layer].self_attn
            attn.q_proj.weight[head * d_head:(head + 1) * d_head, drop] = 0
            attn.k_proj.weight[head * d_head:(head + 1) * d_head, drop] = 0


def run_hf(model, tokens, mask):
    with torch.no_grad():
        out = model(tokens, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    return out


def head_contribution(model, out, layer, head, pattern):
    """A V W_O^h of one head in numpy (float64), V from that model's own layer input."""
    cfg = model.config
    dh = cfg.head_dim
    gs = cfg.num_attention_heads // cfg.num_key_value_heads
    block = model.model.layers[layer]
    x = out.hidden_states[layer].double().numpy()
    gain = block.input_layernorm.weight.double().numpy()
    xn = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps) * gain
    g = head // gs
    v = xn @ block.self_attn.v_proj.weight[g * dh:(g + 1) * dh].double().numpy().T
    wo = block.self_attn.o_proj.weight[:, head * dh:(head + 1) * dh].double().numpy()
    return (pattern @ v) @ wo.T


def numpy_metrics(dense, pruned, dense_model, pruned_model, heads, mask, tokens):
    """Per head: frob_rel, kl, alpha0, d_alpha0, out_rel (mean over prompts, real tokens only), and the model-level
    next_kl, loss and d_loss."""
    real = mask.bool().numpy()
    rows = []
    for layer, head in heads:
        a_all = dense.attentions[layer][:, head].double().numpy()
        b_all = pruned.attentions[layer][:, head].double().numpy()
        c_all = head_contribution(dense_model, dense, layer, head, a_all)
        c2_all = head_contribution(pruned_model, pruned, layer, head, b_all)
        per = []
        for b in range(a_all.shape[0]):
            r = real[b]
            a, a2 = a_all[b][r][:, r], b_all[b][r][:, r]
            frob = np.linalg.norm(a - a2) / np.linalg.norm(a)
            with np.errstate(divide="ignore", invalid="ignore"):
                kl = np.where(a > 0, a * (np.log(a) - np.log(a2)), 0.0).sum(-1).mean()
            c, c2 = c_all[b][r], c2_all[b][r]
            out_rel = np.linalg.norm(c - c2) / np.linalg.norm(c)
            per.append([frob, kl, a[:, 0].mean(), a2[:, 0].mean() - a[:, 0].mean(), out_rel])
        frob, kl, alpha0, d_alpha0, out_rel = np.mean(per, axis=0)
        rows.append({"layer": layer, "head": head, "alpha0": alpha0, "frob_rel": frob, "kl": kl, "d_alpha0": d_alpha0,
                     "out_rel": out_rel})
    lp = torch.log_softmax(dense.logits.double(), -1).numpy()
    lp2 = torch.log_softmax(pruned.logits.double(), -1).numpy()
    kl_pos = (np.exp(lp) * (lp - lp2)).sum(-1)
    has_next = real[:, :-1] & real[:, 1:]
    target = tokens[:, 1:].numpy()
    nll = -np.take_along_axis(lp[:, :-1], target[..., None], -1)[..., 0]
    nll2 = -np.take_along_axis(lp2[:, :-1], target[..., None], -1)[..., 0]
    model_level = {"next_kl": kl_pos[real].mean(), "loss": nll[has_next].mean(),
                   "d_loss": nll2[has_next].mean() - nll[has_next].mean()}
    return pd.DataFrame(rows).assign(**model_level)


def compare(frame, want, columns):
    got = frame.set_index(["layer", "head"]).sort_index()
    want = want.set_index(["layer", "head"]).sort_index()
    for column in columns:
        np.testing.assert_allclose(got[column].to_numpy(float), want[column].to_numpy(float), rtol=1e-4, atol=2e-6,
                                   err_msg=column)


# --- level "model": the pruned model --------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_model_level_metrics_match_numpy(tiny, tiny_dir, hf_reference, side):
    info = sl.model_info(tiny)
    tokens, mask = random_tokens(4, 14, seed=1), padded_mask(4, 14, side, seed=3)
    heads = [(0, 1), (1, 0), (2, info.n_heads - 1)]
    frame = sl.reconstruction_error(tiny, tokens, heads, 5, dims="random", seed=2, attention_mask=mask,
                                    batch_size=3, show_progress=False)
    assert len(frame) == 3 and set(frame["level"]) == {"model"} and set(frame["gqa"]) == {"exact"}
    assert frame["n_prompts"].eq(4).all() and frame.attrs["n_prompts"] == 4
    plan = sl.select_dims(tiny, heads, 5, "random", seed=2)
    pruned_model = hf_model(tiny_dir, ungroup=True)
    zero_columns(pruned_model, plan, info.d_model, info.d_head)
    want = numpy_metrics(run_hf(hf_reference, tokens, mask), run_hf(pruned_model, tokens, mask), hf_reference,
                         pruned_model, heads, mask, tokens)
    compare(frame, want, METRICS + ["next_kl", "loss", "d_loss"])
    assert (frame["frob_rel"] > 0.01).all()  # the pruning did something measurable


def test_model_level_whole_head_removal_matches_numpy(tiny, tiny_dir, hf_reference):
    info = sl.model_info(tiny)
    tokens, mask = random_tokens(3, 12, seed=4), padded_mask(3, 12, "right")
    heads = [(0, 0), (2, 1)]
    frame = sl.k_sweep(tiny, tokens, heads, ks=[3], policies=["head_removal"], level="model", attention_mask=mask,
                       show_progress=False)
    removed = hf_model(tiny_dir)
    with torch.no_grad():
        for layer, head in heads:
            removed.model.layers[layer].self_attn.o_proj.weight[:, head * info.d_head:(head + 1) * info.d_head] = 0
    want = numpy_metrics(run_hf(hf_reference, tokens, mask), run_hf(removed, tokens, mask), hf_reference, removed,
                         heads, mask, tokens)
    compare(frame, want, METRICS + ["next_kl", "loss", "d_loss"])
    np.testing.assert_allclose(frame["out_rel"], 1.0, atol=1e-6)


# --- level "layer": every configuration from one dense pass --------------------------------------


@pytest.mark.parametrize("gqa", ["exact", "q_only", "shared"])
def test_layer_level_equals_the_pruned_model_on_one_layer(tiny, gqa):
    info = sl.model_info(tiny)
    tokens, mask = random_tokens(4, 12, seed=6), padded_mask(4, 12, "right", seed=1)
    heads = [(1, 0), (1, info.n_heads - 1)]
    for dims in ("bos_top", "random", "weight_norm"):
        args = dict(dims=dims, gqa=gqa, force=True, attention_mask=mask, show_progress=False)
        layer = sl.reconstruction_error(tiny, tokens, heads, 4, level="layer", **args)
        model = sl.reconstruction_error(tiny, tokens, heads, 4, level="model", **args)
        compare(layer, model, METRICS)
        assert layer["next_kl"].isna().all() and set(layer["level"]) == {"layer"}


def test_spec_form_equals_keyword_form_and_rows_record_the_spec(tiny):
    tokens = random_tokens(3, 12, seed=9)
    heads = [(1, 0), (2, 1)]
    spec = sl.PruneSpec(heads, 3, "random", seed=4, gqa="q_only")
    by_spec = sl.reconstruction_error(tiny, tokens, spec, level="layer", show_progress=False)
    by_keywords = sl.reconstruction_error(tiny, tokens, heads, 3, "random", seed=4, gqa="q_only", level="layer",
                                          show_progress=False)
    pd.testing.assert_frame_equal(by_spec, by_keywords)
    for row in by_spec.to_dict("records"):
        fields = {name: (None if pd.isna(row[name]) else row[name]) for name in ("k", "policy", "seed", "gqa", "basis")}
        assert sl.PruneSpec.from_dict({"heads": heads, **fields}) == spec
    with pytest.raises(sl.InputError, match="not both"):
        sl.reconstruction_error(tiny, tokens, spec, 3)


def test_layer_level_prunes_each_layer_alone(tiny):
    """A layer-2 head's layer-level error equals the pruned model's error when only layer 2 is pruned."""
    tokens = random_tokens(3, 12, seed=8)
    heads = [(0, 0), (0, 1), (2, 1)]
    layer = sl.reconstruction_error(tiny, tokens, heads, 3, dims="random", level="layer", show_progress=False)
    alone = sl.reconstruction_error(tiny, tokens, [(2, 1)], 3, dims="random", level="model", show_progress=False)
    joint = sl.reconstruction_error(tiny, tokens, heads, 3, dims="random", level="model", show_progress=False)
    compare(layer[layer["layer"] == 2], alone, METRICS)
    assert not np.isclose(joint.loc[joint["layer"] == 2, "frob_rel"].item(), alone["frob_rel"].item(), rtol=1e-3)


def test_k_sweep_frame_and_passes(tiny):
    info = sl.model_info(tiny)
    tokens = random_tokens(5, 10, seed=2)
    heads = [(0, 0), (1, 1), (2, 2)]
    ks = [1, 4, info.d_model]
    forwards = []
    tiny.add_hook("blocks.0.hook_resid_pre", lambda x, hook: forwards.append(x.shape[0]))
    try:
        sweep = sl.k_sweep(tiny, tokens, heads, ks=ks, seeds=[0, 1], batch_size=2, show_progress=False)
        layer_passes = len(forwards)
        forwards.clear()
        model_sweep = sl.k_sweep(tiny, tokens, heads, ks=[4], policies=["random", "head_removal"], seeds=[0, 1],
                                 level="model", batch_size=2, show_progress=False)
        model_passes = len(forwards)
    finally:
        tiny.reset_hooks()
    assert layer_passes == 1 + 3  # one bos_top measurement (massive_activations, batches of 8) + one per batch
    assert model_passes == 3 * (1 + 3)  # per batch: the dense reference and one pass per configuration
    assert list(sweep.columns) == reconstruction.COLUMNS
    counts = sweep.groupby("policy").size()
    assert counts.to_dict() == {"bos_top": 9, "random": 18, "weight_norm": 9, "head_removal": 9}
    assert set(sweep.loc[sweep["policy"] == "random", "seed"]) == {0, 1}
    assert sweep.loc[sweep["policy"] != "random", "seed"].isna().all()
    full = sweep[sweep["k"] == info.d_model]
    assert (full.loc[full["policy"] != "head_removal", ["frob_rel", "kl", "out_rel"]].abs() < 1e-6).all().all()
    whole = sweep[sweep["policy"] == "head_removal"]
    assert whole[["frob_rel", "kl", "d_alpha0"]].isna().all().all() and np.allclose(whole["out_rel"], 1.0)
    assert (sweep.loc[(sweep["k"] == 1) & (sweep["policy"] != "head_removal"), "frob_rel"] > 1e-3).all()
    assert sweep["alpha0"].between(0, 1).all()
    # the dense reference is shared: alpha0 is the same for every configuration of a head
    assert sweep.groupby(["layer", "head"])["alpha0"].nunique().eq(1).all()
    assert len(model_sweep) == 3 * 3 and model_sweep["next_kl"].notna().all()
    # per-k random dims are the first k of one draw: errors at k and a bos_top/weight_norm row agree with
    # single reconstruction_error calls
    one = sl.reconstruction_error(tiny, tokens, heads, 4, dims="weight_norm", level="layer", show_progress=False)
    compare(sweep[(sweep["policy"] == "weight_norm") & (sweep["k"] == 4)], one, METRICS)


def test_plots_from_sweeps(tiny):
    from sinklens.report.plots import pruning as plots

    info = sl.model_info(tiny)
    tokens = random_tokens(3, 10)
    heads = [(1, 0), (1, 1), (2, 0)]
    sweep = sl.k_sweep(tiny, tokens, heads, ks=[1, 5], seeds=[0, 1], show_progress=False)
    by_dims = plots.error_vs_k(sweep, "out_rel")
    medians = {t.name: list(t.y) for t in by_dims.data if t.name.endswith("(median)")}
    assert set(medians) == {f"{p} (median)" for p in ("bos_top", "random", "weight_norm", "head_removal")}
    assert medians["bos_top (median)"] == list(sweep[sweep["policy"] == "bos_top"].groupby("k")["out_rel"].median())
    assert "head_removal (median)" not in {t.name for t in plots.error_vs_k(sweep, "frob_rel").data}
    by_layer = plots.error_vs_k(sweep, "frob_rel", group="layer")
    assert len(by_layer.data) == 3 * 2  # three policies with pattern errors, two layers each
    assert len(plots.error_vs_k(sweep, "frob_rel", group="head", policies="bos_top").data) == 3
    heat = plots.sweep_heatmap(sweep, 5, n_heads=info.n_heads)
    assert heat.data[0].z.shape == (2, info.n_heads)
    one = sl.reconstruction_error(tiny, tokens, heads[:2], 5, show_progress=False)
    bars = plots.alpha0_before_after(one)
    assert list(bars.data[1].y) == list(one["alpha0"] + one["d_alpha0"])
    stats = sl.massive_activations(tiny, tokens, layers=[1], show_progress=False)
    assert plots.kept_dims(stats, 1, [3, 7]).data[0].marker.color.count("#1f77b4") == 2
    dense = torch.rand(2, 4, 4)
    assert len(plots.pattern_pairs(dense, dense, [(1, 0), (1, 1)], ["a", "b", "c", "d"]).data) == 4
    with pytest.raises(sl.InputError, match="one layer"):
        plots.pattern_pairs(dense, dense, [(1, 0), (2, 1)])
    with pytest.raises(sl.InputError):
        plots.error_vs_k(sweep, "frob_rel", group="prompt")


def test_smallest_k():
    rows = []
    for k, errors in {1: [0.9, 0.5, 0.3], 5: [0.3, 0.15, 0.1], 10: [0.12, 0.05, 0.02], 20: [0.01, 0.01, 0.01]}.items():
        rows += [{"policy": "bos_top", "k": k, "frob_rel": e} for e in errors]
        rows += [{"policy": "random", "k": k, "frob_rel": 0.5} for _ in errors]
    table = sl.smallest_k(pd.DataFrame(rows), thresholds=[0.2, 0.1])
    got = {(r.policy, r.threshold): r.k for r in table.itertuples()}
    # medians of bos_top: k=1 -> 0.5, k=5 -> 0.15, k=10 -> 0.05
    assert got[("bos_top", 0.2)] == 5 and got[("bos_top", 0.1)] == 10
    assert pd.isna(got[("random", 0.2)]) and pd.isna(got[("random", 0.1)])
    with pytest.raises(sl.InputError, match="k_sweep"):
        sl.smallest_k(pd.DataFrame({"k": [1]}))


# --- bad input ----------------------------------------------------------------------------------


def test_bad_input(tiny):
    tokens = random_tokens(2, 8)
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    calls = {
        "ks empty": (lambda: sl.k_sweep(tiny, tokens, [(0, 0)], ks=[]), "non-empty"),
        "ks too large": (lambda: sl.k_sweep(tiny, tokens, [(0, 0)], ks=[1, 10_000]), "must lie in"),
        "ks duplicates": (lambda: sl.k_sweep(tiny, tokens, [(0, 0)], ks=[2, 2]), "duplicates"),
        "unknown policy": (lambda: sl.k_sweep(tiny, tokens, [(0, 0)], policies=["top"]), "Unknown policy"),
        "no policy": (lambda: sl.k_sweep(tiny, tokens, [(0, 0)], policies=[]), "empty"),
        "negative seed": (lambda: sl.k_sweep(tiny, tokens, [(0, 0)], seeds=[-1]), "must lie in"),
        "unknown level": (lambda: sl.reconstruction_error(tiny, tokens, [(0, 0)], 2, level="head"), "Unknown level"),
        "batch size": (lambda: sl.reconstruction_error(tiny, tokens, [(0, 0)], 2, batch_size=0), "batch_size"),
        "bad k": (lambda: sl.reconstruction_error(tiny, tokens, [(0, 0)], 0), "k=0"),
        "bad head": (lambda: sl.reconstruction_error(tiny, tokens, [(0, 99)], 2), "head=99"),
        "float tokens": (lambda: sl.reconstruction_error(tiny, tokens.float(), [(0, 0)], 2), "integer ids"),
        "no BOS": (lambda: sl.reconstruction_error(tiny, random_tokens(2, 8, bos=False), [(0, 0)], 2), "BOS"),
    }
    if sl.model_info(tiny).group_size > 1:
        calls["shared partial group"] = (lambda: sl.k_sweep(tiny, tokens, [(0, 0)], gqa="shared"), "whole group")
    for name, (call, match) in calls.items():
        with pytest.raises(sl.InputError, match=match):
            call()
        assert not sl.active_edits(tiny), name
    with sl.remove_heads(tiny, [(1, 1)]):
        with pytest.raises(sl.InputError, match="active pruning"):
            sl.k_sweep(tiny, tokens, [(0, 0)])
    now = tiny.state_dict()
    assert all(torch.equal(now[k], state[k]) for k in state) and not sl.active_edits(tiny)


# --- the embedded model -------------------------------------------------------------------------


@pytest.mark.integration
def test_smollm_layer_level_equals_model_level(smollm):
    info = sl.model_info(smollm)
    tokens = sl.probe_tokens(smollm, 2, 24)
    layer = info.n_layers // 2
    heads = [(layer, 0), (layer, 4), (layer, 5)]  # partial groups under "exact": private K copies
    layer_frame = sl.reconstruction_error(smollm, tokens, heads, 10, level="layer", show_progress=False)
    model_frame = sl.reconstruction_error(smollm, tokens, heads, 10, level="model", show_progress=False)
    compare(layer_frame, model_frame, METRICS)
    assert model_frame["loss"].between(0, 20).all() and (model_frame["next_kl"] >= 0).all()
