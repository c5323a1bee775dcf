"""Sink + window attention (restrict_attention) and StreamingLLM's evaluation (streaming_perplexity), every family.

References are independent of sinklens' code paths: a plain HF eager model given a per-head 4-D additive mask,
its dense per-token losses, and a numpy computation of one head's streamed attention with keys rotated at their
cache positions.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import sinklens as sl
from sinklens.core.errors import InputError
from sinklens.prune.attention_window import fused_restriction

from helpers import FAMILIES, build_family_checkpoint, hf_eager, random_tokens

TOL = 1e-5
LOSS_TOL = 1e-4
ROTARY = sorted(f for f in FAMILIES if f != "gpt2")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    folder = build_family_checkpoint(tmp_path_factory.mktemp(f"stream-{request.param}"), request.param,
                                     max_positions=128)
    return request.param, folder


def _per_head_mask(n_heads, length, heads, sink, window, sliding=None):
    """Additive [1, H, T, T] mask: causal for every head, sink + window for ``heads`` (query head indices)."""
    t = torch.arange(length)
    causal = t[None, :] <= t[:, None]
    if sliding is not None:
        causal &= t[:, None] - t[None, :] < sliding
    allowed = causal[None].repeat(n_heads, 1, 1)
    for h in heads:
        rank_start = causal.int().cumsum(-1)
        rank_end = causal.int().flip(-1).cumsum(-1).flip(-1)
        allowed[h] = causal & ((rank_start <= sink) | (rank_end <= window))
    return torch.zeros(1, n_heads, length, length).masked_fill(~allowed[None], torch.finfo(torch.float32).min)


def _hf_losses(logits, tokens):
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), tokens[1:], reduction="none").double().numpy()


def test_restrict_attention_equals_hf_with_a_per_head_mask(family):
    name, folder = family
    model = sl.load_model(str(folder), device="cpu")
    reference = hf_eager(folder)
    tokens = random_tokens(1, 40, seed=3)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    chosen = {0: [1], 1: [0, n_heads - 1]} if n_layers > 1 else {0: [1]}
    heads = [(l, h) for l, hs in chosen.items() for h in hs]
    masks = {}
    hooks = []
    config = reference.config
    for layer, module in enumerate(m for n, m in reference.named_modules() if n.endswith(("self_attn", "attn",
                                                                                           "attention"))
                                   and hasattr(m, "layer_idx")):
        sliding = getattr(module, "sliding_window", None)
        masks[layer] = _per_head_mask(n_heads, 40, chosen.get(layer, []), 3, 7, sliding)

        def pre(mod, args, kwargs, layer=layer):
            kwargs["attention_mask"] = masks[layer]
            return args, kwargs
        hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            expected = reference(tokens).logits
    finally:
        for h in hooks:
            h.remove()
    assert config._attn_implementation == "eager"
    with sl.restrict_attention(model, heads, sink=3, window=7) as handle, torch.no_grad():
        got = model(tokens)
        if name != "gemma2":  # sliding-window layers: the fused restriction refuses (see its docstring)
            with fused_restriction(model):
                fused = model(tokens)
            assert (fused - expected).abs().max().item() <= 10 * TOL
    assert (got - expected).abs().max().item() <= TOL
    assert not handle.active and not sl.active_edits(model)


def test_kv_groups_and_partial_groups(tmp_path):
    folder = build_family_checkpoint(tmp_path, "llama3")  # 6 query heads, 2 KV heads
    model = sl.load_model(str(folder), device="cpu")
    with sl.restrict_attention(model, kv_heads=[(0, 1)], sink=2, window=4) as handle:
        assert handle.heads == [(0, 3), (0, 4), (0, 5)] and handle.kv_heads == [(0, 1)]
        assert handle.partial_groups == []
    handle = sl.apply_attention_restriction(model, [(1, 0), (1, 1)], sink=2, window=4)
    assert handle.kv_heads == [] and handle.partial_groups == [(1, 0)]
    handle.restore()
    with pytest.raises(InputError, match="kv_head"):
        sl.apply_attention_restriction(model, kv_heads=[(0, 2)])


def test_bad_input(tmp_path):
    folder = build_family_checkpoint(tmp_path / "l", "llama")
    model = sl.load_model(str(folder), device="cpu")
    tokens = random_tokens(1, 30, seed=1)[0]
    with pytest.raises(InputError, match="sink"):
        sl.apply_attention_restriction(model, sink=-1)
    with pytest.raises(InputError, match="window"):
        sl.apply_attention_restriction(model, window=0)
    with pytest.raises(InputError, match="window"):
        sl.streaming_perplexity(model, tokens, window=0)
    with sl.restrict_attention(model, sink=4, window=40), pytest.warns(UserWarning, match="nothing is restricted"):
        model(tokens[None])
    with pytest.warns(UserWarning, match="never evicts"):
        sl.streaming_perplexity(model, tokens, sink=4, window=40)
    long = random_tokens(1, 100, seed=2)[0]
    with pytest.raises(InputError, match="pos_shift=True"):
        sl.streaming_perplexity(model, long, sink=2, window=10, pos_shift=False)  # 100 > context 96
    with pytest.raises(InputError, match="empty text"):
        sl.streaming_perplexity(model, torch.tensor([], dtype=torch.long))
    gpt2 = sl.load_model(str(build_family_checkpoint(tmp_path / "g", "gpt2")), device="cpu")
    with pytest.raises(InputError, match="'gpt2'"):
        sl.streaming_perplexity(gpt2, tokens, sink=2, window=10, pos_shift=True)
    with sl.restrict_attention(model, [(0, 0)]), pytest.raises(InputError, match="restore"):
        sl.streaming_perplexity(model, tokens, sink=2, window=10)
    with sl.restrict_attention(model, [(0, 0)]), pytest.raises(InputError, match="sdpa"):
        sl.run_census(model, _batch(model), engine="sdpa")


def _batch(model):
    from sinklens.core.tokens import TokenBatch
    tokens = random_tokens(1, 20, seed=4)
    return TokenBatch(tokens, torch.ones_like(tokens), True)


def test_streaming_equals_dense_when_the_window_covers_the_text(family):
    name, folder = family
    model = sl.load_model(str(folder), device="cpu")
    tokens = random_tokens(1, 60, seed=5)[0]
    with torch.no_grad():
        expected = _hf_losses(hf_eager(folder)(tokens[None]).logits, tokens)
    for engine in ("chunked", "loop"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = sl.streaming_perplexity(model, tokens, sink=4, window=60, pos_shift=name != "gpt2", engine=engine)
        assert np.abs(got.losses - expected).max() <= LOSS_TOL, engine


def test_chunked_equals_loop_and_restriction(family):
    name, folder = family
    model = sl.load_model(str(folder), device="cpu")
    tokens = random_tokens(1, 90, seed=6)[0]
    for pos_shift in ([False] if name == "gpt2" else [False, True]):
        loop = sl.streaming_perplexity(model, tokens, sink=3, window=16, pos_shift=pos_shift, engine="loop")
        chunked = sl.streaming_perplexity(model, tokens, sink=3, window=16, pos_shift=pos_shift, block=20)
        assert np.abs(loop.losses - chunked.losses).max() <= LOSS_TOL
        if not pos_shift:
            with sl.restrict_attention(model, sink=3, window=17), torch.no_grad():
                restricted = _hf_losses(model(tokens[None]), tokens)
            assert np.abs(restricted - loop.losses).max() <= LOSS_TOL
        else:
            assert np.abs(loop.losses - sl.streaming_perplexity(model, tokens, sink=3, window=16,
                                                                 pos_shift=False).losses).max() > 1e-3


def test_position_shift_rotation_in_numpy(tmp_path):
    """One head of layer 0 at the last step, by hand: q at cache slot min(t, S + W), cached keys rotated at their
    cache slots 0..n-1 (StreamingLLM), against the loop engine's output of that head."""
    from sinklens.assess import streaming
    from sinklens.core.local_attention import native_attention

    folder = build_family_checkpoint(tmp_path, "llama")
    model = sl.load_model(str(folder), device="cpu")
    tokens = random_tokens(1, 30, seed=7)[0]
    sink, window = 2, 5
    hf = model.original_model
    attn = hf.model.layers[0].self_attn if hasattr(hf.model.layers[0], "self_attn") else None
    captured = {}
    plan = streaming._LoopPlan(sink, window, streaming.rotary_of(model), True)
    original = plan.attend

    def spy(layer, query, key, value, scaling, softcap, sliding_window):
        out = original(layer, query, key, value, scaling, softcap, sliding_window)
        if layer == 0:
            captured.update(q=query.clone(), k=key.clone(), v=value.clone(), out=out.clone(), scaling=scaling)
            captured.setdefault("raw_k", []).append(key[0, 0, 0].double().numpy())
            captured.setdefault("raw_v", []).append(value[0, 0, 0].double().numpy())
        return out
    plan.attend = spy
    with native_attention(model, plan), torch.inference_mode():
        for t in range(len(tokens)):
            plan.t = t
            hf.base_model(input_ids=tokens[t:t + 1][None], position_ids=torch.tensor([[0]]), use_cache=False)
    del attn
    t = len(tokens) - 1
    kept = list(range(sink)) + list(range(t - window, t + 1))
    keys = np.stack([captured["raw_k"][j] for j in kept])
    values = np.stack([captured["raw_v"][j] for j in kept])
    d = keys.shape[1]
    theta = model.original_model.config.rope_parameters["rope_theta"] if hasattr(
        model.original_model.config, "rope_parameters") else model.original_model.config.rope_theta
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)

    def rot(x, pos):
        ang = np.concatenate([pos * inv, pos * inv])
        half = np.concatenate([-x[d // 2:], x[:d // 2]])
        return x * np.cos(ang) + half * np.sin(ang)
    q = rot(captured["q"][0, 0, 0].double().numpy(), sink + window)
    k = np.stack([rot(keys[i], i) for i in range(len(kept))])
    s = k @ q * captured["scaling"]
    w = np.exp(s - s.max())
    w /= w.sum()
    assert np.abs(w @ values - captured["out"][0, 0, 0].double().numpy()).max() <= TOL


def test_streaming_head_scores_and_budget(tmp_path):
    """Per-KV-head scores are sweep configurations (stored, resumable), scored beyond the window only."""
    from sinklens.assess import streaming_heads as sh

    folder = build_family_checkpoint(tmp_path / "m", "llama3")  # GQA: 2 KV heads of 3 query heads
    model = sl.load_model(str(folder), device="cpu")
    results = tmp_path / "scores.sqlite"
    sweep = sh.streaming_sweep(model, sink=2, window=8, seq_len=48, n_texts=1, results=results)
    plan = sweep.plans["search"]
    assert plan.meta["lm_first_target"] == 10 and plan.n_tokens > 0
    scores = sh.streaming_head_scores(sweep)
    assert len(scores) == 3 * 2 and np.isfinite(scores["score"]).all()
    budget = sh.kv_budget(sweep, scores, tolerances=(0.0, 10.0), steps=3)
    assert budget["kv_heads"].tolist()[-1] == 6 and budget["saved_bytes"].iloc[-1] > 0
    sweep.close()
    again = sh.streaming_sweep(model, sink=2, window=8, seq_len=48, n_texts=1, results=results)
    assert np.allclose(sh.streaming_head_scores(again)["score"], scores["score"])
    assert again.n_evaluated == 0  # read back from the results file


def test_compare_with_sinks_against_scipy():
    """A hand-built table: 2 layers x 2 KV heads of 2 query heads; scipy's Spearman and counted overlaps."""
    import pandas as pd
    from scipy.stats import spearmanr

    from sinklens.assess.streaming_heads import compare_with_sinks

    scores = pd.DataFrame({"layer": [0, 0, 1, 1], "kv_head": [0, 1, 0, 1], "score": [0.30, 0.01, 0.02, 0.50]})
    rows = []  # two prompts; per (layer, head) alpha0 and non-first sink counts
    alpha = {(0, 0): (0.1, 0.3), (0, 1): (0.2, 0.2), (0, 2): (0.9, 0.7), (0, 3): (0.8, 0.8),
             (1, 0): (0.6, 0.6), (1, 1): (0.5, 0.7), (1, 2): (0.0, 0.1), (1, 3): (0.1, 0.1)}
    others = {(0, 0): 3, (0, 1): 1, (0, 2): 0, (0, 3): 0, (1, 0): 2, (1, 1): 0, (1, 2): 5, (1, 3): 5}
    for (layer, head), values in alpha.items():
        for prompt, a in enumerate(values):
            rows.append({"prompt": prompt, "layer": layer, "head": head, "alpha0": a,
                         "n_other_sinks": others[(layer, head)] + prompt})
    table = pd.DataFrame(rows)
    got = compare_with_sinks(scores, table, [(0, 2), (1, 3)], group_size=2, cheap_share=0.5)
    # group means by hand: alpha0 (0,0) 0.2, (0,1) 0.8, (1,0) 0.6, (1,1) 0.075; others 2.5, 0.5, 1.5, 5.5
    expected_alpha = spearmanr([0.30, 0.01, 0.02, 0.50], [0.2, 0.8, 0.6, 0.075]).statistic
    expected_other = spearmanr([0.30, 0.01, 0.02, 0.50], [2.5, 0.5, 1.5, 5.5]).statistic
    assert abs(got["spearman_alpha0"] - expected_alpha) < 1e-12 and abs(got["spearman_alpha0"] + 1.0) < 1e-12
    assert abs(got["spearman_non_first"] - expected_other) < 1e-12
    # cheapest half: (0,1) and (1,0); sink groups (0,1) and (1,1): overlap 1, union 3
    assert got["n_cheap"] == 2 and got["n_sink_groups"] == 2 and got["overlap"] == 1
    assert abs(got["jaccard"] - 1 / 3) < 1e-12
    assert abs(got["sink_groups_mean_score"] - (0.01 + 0.50) / 2) < 1e-12
    assert abs(got["other_groups_mean_score"] - (0.30 + 0.02) / 2) < 1e-12
    flat = compare_with_sinks(scores, table.assign(n_other_sinks=0), [], group_size=2)
    assert flat["spearman_non_first"] is None and flat["overlap"] == 0 and flat["sink_groups_mean_score"] is None
    with pytest.raises(InputError, match="alpha0"):
        compare_with_sinks(scores, table.drop(columns="alpha0"), [], group_size=2)


def test_streaming_ablation_rows_are_streaming_runs(tmp_path):
    """Each row is streaming_perplexity of its setting; sink 0 is window attention; the newline rows stream the text
    with its BOS replaced by four newline tokens and score the same text tokens."""
    folder = build_family_checkpoint(tmp_path, "llama3")
    model = sl.load_model(str(folder), device="cpu")
    tokens = random_tokens(1, 80, seed=8)[0]
    table = sl.streaming_ablation(model, tokens, sinks=[0, 2, 4], windows=[8, 16], initial=["bos", "newline"])
    assert len(table) == 2 * 3 * 2 and (table["start"] == 4 + 16 + 1).all()
    newline = model.tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    for row in table.itertuples():
        text = tokens if row.initial == "bos" else torch.cat([torch.full((4,), newline), tokens[1:]])
        offset = 0 if row.initial == "bos" else 3
        losses = sl.streaming_perplexity(model, text, sink=row.sink, window=row.window).losses[offset:]
        assert len(losses) == len(tokens) - 1
        assert abs(row.loss - losses.mean()) < 1e-9 and abs(row.loss_from - losses[row.start:].mean()) < 1e-9
    # sink 0 = a plain sliding window (the restriction with sink 0 on every head, at original positions)
    window_only = sl.streaming_ablation(model, tokens, sinks=[0], windows=[8], pos_shift=False, start=0)
    with sl.restrict_attention(model, sink=0, window=9), torch.no_grad():
        dense_window = _hf_losses(model(tokens[None]), tokens)
    assert abs(window_only["loss"].iloc[0] - dense_window.mean()) < LOSS_TOL
    fixed = sl.streaming_ablation(model, tokens, sinks=[0, 1, 4], cache_size=12)
    assert fixed["window"].tolist() == [12, 11, 8] and (fixed["cache"] == 12).all()
    with pytest.raises(InputError, match="initial"):
        sl.streaming_ablation(model, tokens, initial=["zero"])
    with pytest.raises(InputError, match="sinks"):
        sl.streaming_ablation(model, tokens, sinks=[-1])
    with pytest.raises(InputError, match="cache_size"):
        sl.streaming_ablation(model, tokens, sinks=[0, 8], cache_size=8)


def test_probe_stream_is_the_probe_text_past_the_context(tmp_path):
    model = sl.load_model(str(build_family_checkpoint(tmp_path, "llama")), device="cpu")  # context 96
    ids = sl.probe_stream(model, 300)
    first = sl.probe_tokens(model, 1, 90, split="held_out").tokens[0]
    assert len(ids) == 300 and ids[0] == model.tokenizer.bos_token_id and torch.equal(ids[:90], first)
    assert torch.equal(sl.probe_stream(model, 50, split="probe", prepend_bos=False),
                       sl.probe_tokens(model, 1, 51, split="probe", prepend_bos=False).tokens[0])
    with pytest.raises(InputError, match="not repeated"):
        sl.probe_stream(model, 10 ** 9)
