"""QK column pruning and head removal: semantics against independent computations, restore, call styles, bad input."""

import json

import numpy as np
import pytest
import torch

import sinklens as sl
from sinklens.core.hooks import pattern_hook

from helpers import hf_eager, padded_mask, random_tokens

# --- an independent implementation (numpy, float64, from the HF weights) ------------------------


def hf_weights(model, layer):
    """q/k/v/o weights, the input RMSNorm gain and eps of ``layer`` of an HF model, as float64 numpy."""
    block = model.model.layers[layer]
    attn = block.self_attn
    get = lambda t: t.detach().double().numpy()  # noqa: E731
    return {"q": get(attn.q_proj.weight), "k": get(attn.k_proj.weight), "v": get(attn.v_proj.weight),
            "o": get(attn.o_proj.weight), "gain": get(block.input_layernorm.weight),
            "eps": model.config.rms_norm_eps}


def rope_tables(config, length):
    dh = config.head_dim
    theta = config.rope_parameters["rope_theta"]
    inv = 1.0 / theta ** (np.arange(0, dh, 2) / dh)
    angles = np.arange(length)[:, None] * inv[None, :]
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles), np.sin(angles)


def rope(v, cos, sin):
    half = v.shape[-1] // 2
    return v * cos + np.concatenate([-v[..., half:], v[..., :half]], axis=-1) * sin


def independent_pattern(config, w, hidden, head, q_dims=None, k_dims=None):
    """[batch, T, T] pattern of ``head``: q and k from the RMS-normalized layer input restricted to the kept
    dims (None: all), rotary, causal softmax. ``hidden`` is the residual stream entering the layer."""
    dh = config.head_dim
    group = head // (config.num_attention_heads // config.num_key_value_heads)
    x = hidden.detach().double().numpy()
    xn = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + w["eps"]) * w["gain"]
    d_model = x.shape[-1]
    q_dims = np.arange(d_model) if q_dims is None else np.asarray(q_dims)
    k_dims = np.arange(d_model) if k_dims is None else np.asarray(k_dims)
    wq = w["q"][head * dh:(head + 1) * dh]
    wk = w["k"][group * dh:(group + 1) * dh]
    q = xn[..., q_dims] @ wq[:, q_dims].T
    k = xn[..., k_dims] @ wk[:, k_dims].T
    cos, sin = rope_tables(config, x.shape[1])
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(dh)
    length = x.shape[1]
    scores = np.where(np.tril(np.ones((length, length), dtype=bool)), scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(-1, keepdims=True)


def state_copy(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, saved):
    now = model.state_dict()
    assert now.keys() == saved.keys()
    assert all(torch.equal(now[k], saved[k]) for k in saved)


def hook_count(model):
    return sum(len(point.fwd_hooks) for point in model.hook_points())


def patterns(model, tokens, layer, mask=None):
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=pattern_hook(layer))
    return cache[pattern_hook(layer)]


def group_size(model):
    return sl.model_info(model).group_size


# --- semantics --------------------------------------------------------------------------------


def test_full_k_changes_no_logit(tiny):
    info = sl.model_info(tiny)
    tokens = random_tokens(3, 12)
    dense = tiny(tokens)
    heads = [(0, 0), (1, 1), (2, info.n_heads - 1)]
    for gqa in ("exact", "shared", "q_only"):
        for dims in ("random", "weight_norm", "bos_top"):
            with sl.prune_qk(tiny, heads, info.d_model, dims=dims, calibration=tokens, gqa=gqa, force=True):
                assert torch.equal(tiny(tokens), dense)


def test_exit_restores_bitwise_and_removes_hooks(tiny):
    info = sl.model_info(tiny)
    saved, hooks = state_copy(tiny), hook_count(tiny)
    tokens = random_tokens(2, 10)
    dense = tiny(tokens)
    with sl.prune_qk(tiny, [(1, 0), (2, 1)], 3, dims="random", gqa="exact") as handle:
        assert not torch.allclose(tiny(tokens), dense)
        assert handle.active and sl.active_edits(tiny) == [handle]
        with sl.remove_heads(tiny, [(0, 1)]):
            tiny(tokens)
    assert_state_equal(tiny, saved)
    assert hook_count(tiny) == hooks and not sl.active_edits(tiny) and not handle.active
    assert torch.equal(tiny(tokens), dense)
    # persistent form, restored later (and a second restore is harmless)
    handle = sl.apply_pruning(tiny, [(0, h) for h in range(info.n_heads)], 2, dims="weight_norm", gqa="shared")
    assert not torch.allclose(tiny(tokens), dense)
    handle.restore()
    handle.restore()
    assert_state_equal(tiny, saved)
    assert hook_count(tiny) == hooks


def test_restore_after_apply_inside_inference_mode(tiny):
    saved = state_copy(tiny)
    with torch.inference_mode():
        handle = sl.apply_pruning(tiny, [(1, 0)], 4, dims="random")
        tiny(random_tokens(1, 6))
    handle.restore()
    assert_state_equal(tiny, saved)


@pytest.mark.parametrize("mask_side", [None, "right"])
def test_pruned_pattern_matches_independent_computation(tiny, hf_reference, mask_side):
    """Partial groups under gqa="exact" (GQA: hook path) and plain weight edits (MHA), against numpy."""
    info = sl.model_info(tiny)
    tokens = random_tokens(3, 14, seed=2)
    mask = None if mask_side is None else padded_mask(3, 14, mask_side)
    layer, heads = 1, [0, info.n_heads - 1]
    hidden = hf_reference(tokens, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
    w = hf_weights(hf_reference, layer)
    with sl.prune_qk(tiny, [(layer, h) for h in heads], 5, dims="random", seed=3, gqa="exact") as handle:
        got = patterns(tiny, tokens, layer, mask).double().numpy()
    if info.group_size > 1:
        assert handle.plan.k_copies and handle.layout == "ungrouped"
    for h in heads:
        dims = handle.dims[(layer, h)].numpy()
        want = independent_pattern(hf_reference.config, w, hidden, h, dims, dims)
        real = np.ones((3, 14), bool) if mask is None else mask.bool().numpy()
        for b in range(3):  # right padding: compare real rows (their causal rows see only real keys)
            rows = real[b]
            np.testing.assert_allclose(got[b, h][rows][:, rows], want[b][rows][:, rows], atol=2e-6)


def test_exact_leaves_siblings_untouched(tiny):
    info = sl.model_info(tiny)
    if info.group_size == 1:
        pytest.skip("MHA: no sibling heads")
    tokens = random_tokens(2, 12)
    dense = patterns(tiny, tokens, 1)
    with sl.prune_qk(tiny, [(1, 0)], 3, dims="random", gqa="exact"):
        pruned = patterns(tiny, tokens, 1)
    siblings = list(range(1, info.n_heads))
    assert torch.equal(pruned[:, siblings], dense[:, siblings])
    assert not torch.allclose(pruned[:, 0], dense[:, 0])


def test_exact_whole_group_is_a_weight_edit_and_equals_the_hook_path(tiny):
    """A whole group with the same dims is edited in the shared k_proj rows; splitting the group over two
    prunings forces the private-copy hooks; both must give the same model."""
    info = sl.model_info(tiny)
    gs = info.group_size
    dims = torch.tensor([1, 5, 7, 20, 33])
    group = [(1, h) for h in range(gs)]
    tokens = random_tokens(2, 12)
    with sl.prune_qk(tiny, group, 5, dims=dims) as handle:
        assert handle.plan.k_edits and not handle.plan.k_copies and handle.layout == "grouped"
        edited = tiny(tokens)
    if gs == 1:
        # MHA: "exact" is the weight edit; compare with the same edit made on a separate HF model
        return
    with sl.prune_qk(tiny, group[:1], 5, dims=dims) as first, sl.prune_qk(tiny, group[1:], 5, dims=dims) as rest:
        assert first.plan.k_copies and rest.plan.k_copies
        hooked = tiny(tokens)
    torch.testing.assert_close(hooked, edited, atol=1e-5, rtol=0)


def test_mha_weight_edit_equals_exact(tiny, tiny_dir):
    """On MHA, gqa="exact" is a plain weight edit: identical to zeroing the columns on a separate HF model."""
    info = sl.model_info(tiny)
    if info.group_size != 1:
        pytest.skip("MHA only")
    ref = hf_eager(tiny_dir)
    tokens = random_tokens(2, 12)
    heads = [(0, 1), (2, 3)]
    dh = info.d_head
    with sl.prune_qk(tiny, heads, 6, dims="random", seed=1, gqa="exact") as handle:
        pruned = tiny(tokens)
        assert not handle.plan.k_copies
        with torch.no_grad():
            for (layer, head), keep in handle.dims.items():
                drop = torch.ones(info.d_model, dtype=torch.bool)
                drop[keep] = False
                attn = ref.model.layers[layer].self_attn
                attn.q_proj.weight[head * dh:(head + 1) * dh, drop] = 0
                attn.k_proj.weight[head * dh:(head + 1) * dh, drop] = 0
        with sl.prune_qk(tiny, [(1, 0)], 6, dims="random", gqa="shared"):
            pass  # another policy on other heads, applied and restored, changes nothing
        torch.testing.assert_close(pruned, ref(tokens).logits, atol=1e-5, rtol=0)


def test_shared_refuses_partial_group_unless_forced(tiny):
    info = sl.model_info(tiny)
    tokens = random_tokens(2, 12)
    if info.group_size == 1:
        with sl.prune_qk(tiny, [(1, 0)], 3, dims="random", gqa="shared") as handle:
            assert handle.plan.k_edits  # a group of one is always whole
        return
    saved = state_copy(tiny)
    with pytest.raises(sl.InputError, match="whole group"):
        sl.apply_pruning(tiny, [(1, 0)], 3, dims="random", gqa="shared")
    assert_state_equal(tiny, saved)
    dense = patterns(tiny, tokens, 1)
    with sl.prune_qk(tiny, [(1, 0)], 3, dims="random", gqa="shared", force=True):
        forced = patterns(tiny, tokens, 1)
    assert not torch.allclose(forced[:, 1], dense[:, 1])  # the sibling changes: that is what force means
    whole = [(1, h) for h in range(info.group_size)]
    with sl.prune_qk(tiny, whole, 3, dims="random", gqa="shared") as handle:
        union = torch.unique(torch.cat([handle.dims[p] for p in whole]))
        assert torch.equal(handle.plan.k_edits[(1, 0)], union.sort().values)


def test_q_only_leaves_k_alone(tiny, hf_reference):
    tokens = random_tokens(2, 12)
    layer = 2
    k_before = tiny.blocks[layer].attn.k.original_component.weight.clone()
    q_before = tiny.blocks[layer].attn.q.original_component.weight.clone()
    hidden = hf_reference(tokens, output_hidden_states=True).hidden_states[layer]
    with sl.prune_qk(tiny, [(layer, 1)], 4, dims="random", gqa="q_only") as handle:
        assert torch.equal(tiny.blocks[layer].attn.k.original_component.weight, k_before)
        assert not torch.equal(tiny.blocks[layer].attn.q.original_component.weight, q_before)
        got = patterns(tiny, tokens, layer)[:, 1].double().numpy()
        assert handle.as_dict()["gqa"] == "q_only" and handle.params_zeroed()["k"] == 0
    want = independent_pattern(hf_reference.config, hf_weights(hf_reference, layer), hidden, 1,
                               handle.dims[(layer, 1)].numpy(), None)
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_remove_heads_zeroes_head_output(tiny, tiny_dir):
    info = sl.model_info(tiny)
    ref = hf_eager(tiny_dir)
    tokens = random_tokens(2, 10)
    saved = state_copy(tiny)
    dh = info.d_head
    heads = [(0, 1), (2, 0)]
    with sl.remove_heads(tiny, heads) as handle:
        removed = tiny(tokens)
        assert handle.params_zeroed()["total"] == len(heads) * dh * info.d_model
    with torch.no_grad():
        for layer, head in heads:
            ref.model.layers[layer].self_attn.o_proj.weight[:, head * dh:(head + 1) * dh] = 0
    torch.testing.assert_close(removed, ref(tokens).logits, atol=1e-5, rtol=0)
    assert_state_equal(tiny, saved)


# --- dims policies ------------------------------------------------------------------------------


def test_bos_top_dims_are_the_largest_normalized_bos_dims(tiny, hf_reference):
    tokens = random_tokens(4, 10, seed=5)
    heads = [(0, 0), (2, 1)]
    dims = sl.select_dims(tiny, heads, 6, "bos_top", calibration=tokens)
    for layer, head in heads:
        hidden = hf_reference(tokens, output_hidden_states=True).hidden_states[layer].double()
        w = hf_weights(hf_reference, layer)
        x = hidden[:, 0].numpy()
        xn = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + w["eps"]) * w["gain"]
        want = np.sort(np.argsort(-np.abs(xn).mean(0))[:6])
        assert dims[(layer, head)].tolist() == want.tolist()
    resid = sl.select_dims(tiny, heads, 6, "bos_top", calibration=tokens, basis="resid")
    x = hf_reference(tokens, output_hidden_states=True).hidden_states[2][:, 0].double().numpy()
    assert resid[(2, 1)].tolist() == np.sort(np.argsort(-np.abs(x).mean(0))[:6]).tolist()
    # a MassiveActivations measured once gives the same dims without another forward
    stats = sl.massive_activations(tiny, tokens, layers=[0, 2], show_progress=False)
    assert all(torch.equal(sl.select_dims(tiny, heads, 6, "bos_top", calibration=stats)[p], dims[p]) for p in heads)


def test_weight_norm_dims(tiny, hf_reference):
    info = sl.model_info(tiny)
    dims = sl.select_dims(tiny, [(1, info.n_heads - 1)], 7, "weight_norm")[(1, info.n_heads - 1)]
    w = hf_weights(hf_reference, 1)
    dh, h = info.d_head, info.n_heads - 1
    g = h // info.group_size
    norms = np.sqrt((w["q"][h * dh:(h + 1) * dh] ** 2).sum(0) + (w["k"][g * dh:(g + 1) * dh] ** 2).sum(0))
    assert dims.tolist() == np.sort(np.argsort(-norms)[:7]).tolist()


def test_random_dims_are_seeded_and_nested(tiny):
    heads = [(0, 0), (1, 1)]
    a = sl.select_dims(tiny, heads, 5, "random", seed=0)
    assert all(torch.equal(a[p], sl.select_dims(tiny, heads, 5, "random", seed=0)[p]) for p in heads)
    assert not torch.equal(a[(0, 0)], sl.select_dims(tiny, heads, 5, "random", seed=1)[(0, 0)])
    assert not torch.equal(a[(0, 0)], a[(1, 1)])
    alone = sl.select_dims(tiny, [(1, 1)], 5, "random", seed=0)[(1, 1)]
    assert torch.equal(alone, a[(1, 1)])  # a head's draw does not depend on the other heads
    bigger = sl.select_dims(tiny, heads, 12, "random", seed=0)
    assert set(a[(0, 0)].tolist()) <= set(bigger[(0, 0)].tolist())


def test_explicit_dims_forms(tiny):
    one = sl.select_dims(tiny, [(0, 0), (1, 0)], 3, [9, 2, 4])
    assert one[(0, 0)].tolist() == [2, 4, 9] == one[(1, 0)].tolist()
    per_head = sl.select_dims(tiny, [(0, 0), (1, 0)], 2, {(0, 0): [1, 2], (1, 0): torch.tensor([3, 4])})
    assert per_head[(1, 0)].tolist() == [3, 4]
    with sl.prune_qk(tiny, [(0, 0)], 3, dims=torch.tensor([9, 2, 4])) as handle:
        assert handle.as_dict()["policy"] == "explicit"


def test_params_zeroed_counts(tiny, hf_reference):
    info = sl.model_info(tiny)
    total = sum(p.numel() for p in hf_reference.parameters())
    dh, d, gs = info.d_head, info.d_model, info.group_size
    with sl.prune_qk(tiny, [(1, 0)], 4, dims="random", gqa="exact") as handle:
        counts = handle.params_zeroed()
        weight = tiny.blocks[1].attn.q.original_component.weight[:dh]
        assert int((weight == 0).sum()) == counts["q"] == dh * (d - 4)
    assert counts["k"] == dh * (d - 4) and counts["model_params"] == total
    assert counts["share"] == pytest.approx(2 * dh * (d - 4) / total)
    assert counts["layout"] == ("ungrouped" if gs > 1 else "grouped")
    with sl.prune_qk(tiny, [(1, 0)], 4, dims="random", gqa="q_only") as handle:
        assert handle.params_zeroed()["k"] == 0 and handle.params_zeroed()["q"] == dh * (d - 4)


# --- call styles --------------------------------------------------------------------------------


def test_every_call_style_sees_the_pruning(tiny, hf_reference):
    tokens = random_tokens(2, 12, seed=4)
    layer = 1
    hidden = hf_reference(tokens, output_hidden_states=True).hidden_states[layer]
    w = hf_weights(hf_reference, layer)
    dense = tiny(tokens)
    with sl.prune_qk(tiny, [(layer, 0)], 4, dims="random", gqa="exact") as handle:
        want = independent_pattern(hf_reference.config, w, hidden, 0, *[handle.dims[(layer, 0)].numpy()] * 2)
        plain = tiny(tokens)
        assert not torch.allclose(plain, dense)
        logits, cache = tiny.run_with_cache(tokens, names_filter=pattern_hook(layer))
        np.testing.assert_allclose(cache[pattern_hook(layer)][:, 0].double().numpy(), want, atol=2e-6)
        seen = {}
        keep = lambda p, hook: seen.update(p=p.clone())  # noqa: E731
        hooked = tiny.run_with_hooks(tokens, fwd_hooks=[(pattern_hook(layer), keep)])
        np.testing.assert_allclose(seen["p"][:, 0].double().numpy(), want, atol=2e-6)
        with tiny.hooks(fwd_hooks=[]):
            in_hooks_ctx = tiny(tokens)
        tiny.reset_hooks()  # removes temporary hooks only: the pruning stays
        after_reset = tiny(tokens)
        for out in (logits, hooked, in_hooks_ctx, after_reset):
            assert torch.equal(out, plain)
        prompt = random_tokens(1, 6, seed=9)
        cached = tiny.generate(prompt, max_new_tokens=4, do_sample=False, verbose=False)
        uncached = tiny.generate(prompt, max_new_tokens=4, do_sample=False, verbose=False, use_past_kv_cache=False)
        assert torch.equal(cached, uncached)
        # greedy decoding by hand with full forwards of the pruned model agrees
        seq = prompt.clone()
        for _ in range(4):
            seq = torch.cat([seq, tiny(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(cached, seq)
        # the HF model under the bridge generates with the same (hooked) blocks and its own KV cache
        hf_out = tiny.original_model.generate(prompt, max_new_tokens=4, do_sample=False)
        assert torch.equal(hf_out, seq)
    dense_seq = tiny.generate(prompt, max_new_tokens=4, do_sample=False, verbose=False)
    assert not torch.equal(dense_seq, seq)  # the pruning changed what is generated


# --- one description of a pruning: PruneSpec, plans ---------------------------------------------


SPEC_CASES = {  # keyword arguments of prune_qk -> the same pruning as a PruneSpec
    "bos_top resid": (dict(dims="bos_top", basis="resid"), lambda heads: sl.PruneSpec(heads, 4, basis="resid")),
    "random exact": (dict(dims="random", seed=5), lambda heads: sl.PruneSpec(heads, 4, "random", seed=5)),
    "weight_norm q_only": (dict(dims="weight_norm", gqa="q_only"),
                           lambda heads: sl.PruneSpec(heads, 4, "weight_norm", gqa="q_only")),
    "explicit": (dict(dims=[1, 4, 9, 20]), lambda heads: sl.PruneSpec.of(heads, 4, [20, 9, 4, 1])),
}


@pytest.mark.parametrize("case", sorted(SPEC_CASES))
def test_spec_and_keyword_calls_prune_bitwise_identically(tiny, case):
    kwargs, make_spec = SPEC_CASES[case]
    info = sl.model_info(tiny)
    tokens = random_tokens(3, 12, seed=7)
    heads = [(1, 0), (2, info.n_heads - 1)]  # partial KV groups under GQA: the private-copy hooks

    def run():
        _, cache = tiny.run_with_cache(tokens, names_filter=[pattern_hook(1), pattern_hook(2)])
        return tiny(tokens), cache[pattern_hook(1)], cache[pattern_hook(2)]

    dense = run()
    with sl.prune_qk(tiny, heads, 4, calibration=tokens, **kwargs) as by_keywords:
        want = run()
        record = by_keywords.as_dict()
    spec = make_spec(heads)
    plan = sl.plan_pruning(tiny, spec, calibration=tokens)
    for apply in (lambda: sl.prune_qk(tiny, spec, calibration=tokens), lambda: sl.prune_qk(tiny, plan)):
        with apply() as handle:
            got = run()
            assert handle.as_dict() == record
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    handle = sl.apply_pruning(tiny, spec, calibration=tokens)
    assert all(torch.equal(g, w) for g, w in zip(run(), want))
    handle.restore()
    assert all(torch.equal(g, d) for g, d in zip(run(), dense))
    assert not torch.equal(want[1], dense[1])  # the pruning changed the patterns
    # the record reads back into the spec, also through JSON
    assert sl.PruneSpec.from_dict(record) == spec == sl.PruneSpec.from_dict(json.loads(json.dumps(spec.as_dict())))
    assert torch.equal(sl.select_dims(tiny, spec, calibration=tokens)[heads[0]], plan.dims[heads[0]])


def test_spec_fields_are_normalized_and_checked():
    heads = [(2, 1), (0, 3)]
    spec = sl.PruneSpec(heads, 5, "random", basis="resid", seed=2)
    assert spec.heads == ((0, 3), (2, 1)) and spec.basis is None and spec.seed == 2
    assert spec == sl.PruneSpec([(0, 3), (2, 1)], 5, "random", seed=2)  # basis does not matter to random
    assert sl.PruneSpec(heads, 5).seed is None and hash(spec) == hash(spec.replace())
    assert spec.replace(k=7).k == 7 and spec.layers() == [0, 2]
    with pytest.raises(sl.InputError, match="only given with policy"):
        sl.PruneSpec(heads, 2, "random", dims=((1, 2), (3, 4)))
    with pytest.raises(sl.InputError, match="needs dims"):
        sl.PruneSpec(heads, 2, "explicit")
    with pytest.raises(sl.InputError, match="Not a pruning record"):
        sl.PruneSpec.from_dict({"kind": "head_removal", "heads": [[0, 1]]})


def test_plan_changes_nothing_until_applied(tiny):
    saved, hooks = state_copy(tiny), hook_count(tiny)
    info = sl.model_info(tiny)
    plan = sl.plan_pruning(tiny, [(1, 0), (1, info.n_heads - 1)], 3, "random")
    assert plan.params_zeroed()["q"] == 2 * info.d_head * (info.d_model - 3)
    assert_state_equal(tiny, saved)
    assert hook_count(tiny) == hooks and not sl.active_edits(tiny)


SPEC_MISUSE = {
    "spec and k": (lambda m, spec: sl.apply_pruning(m, spec, 3), "not both"),
    "spec and gqa": (lambda m, spec: sl.apply_pruning(m, spec, gqa="q_only"), r"not both.*gqa"),
    "plan and tokens": (lambda m, spec: sl.apply_pruning(m, sl.plan_pruning(m, spec), calibration=random_tokens(1, 4)),
                        "complete"),
    "no k": (lambda m, spec: sl.apply_pruning(m, [(0, 1)]), "k is missing"),
}


@pytest.mark.parametrize("case", sorted(SPEC_MISUSE))
def test_spec_misuse_is_refused(tiny, case):
    call, match = SPEC_MISUSE[case]
    with pytest.raises(sl.InputError, match=match):
        call(tiny, sl.PruneSpec([(0, 1)], 3, "random"))
    assert not sl.active_edits(tiny)


# --- bad input ----------------------------------------------------------------------------------


BAD_CALLS = {
    "k zero": (dict(k=0), "k=0"),
    "k above d_model": (dict(k=10_000), "d_model"),
    "k bool": (dict(k=True), "k must be an int"),
    "layer out of range": (dict(heads=[(99, 0)]), "layer=99"),
    "head out of range": (dict(heads=[(0, 99)]), "head=99"),
    "duplicate heads": (dict(heads=[(0, 1), (0, 1)]), "Duplicate heads"),
    "empty heads": (dict(heads=[]), "heads is empty"),
    "single pair": (dict(heads=(0, 1)), "single pair"),
    "not pairs": (dict(heads=[0, 1, 2]), "pair"),
    "bos_top without tokens": (dict(dims="bos_top", calibration=None), "calibration="),
    "bos_top without BOS": (dict(dims="bos_top", calibration=random_tokens(2, 8, bos=False)), "start with BOS"),
    "dims out of range": (dict(dims=[0, 1, 999]), r"\[0, "),
    "dims wrong length": (dict(dims=[0, 1]), "got 2 dims but k=3"),
    "dims duplicates": (dict(dims=[0, 1, 1]), "duplicates"),
    "dims float": (dict(dims=torch.tensor([0.0, 1.0, 2.0])), "integer"),
    "dims mapping misses a head": (dict(heads=[(0, 1), (1, 1)], dims={(0, 1): [0, 1, 2]}), "missing"),
    "unknown policy": (dict(dims="largest"), "Unknown dims policy"),
    "unknown gqa": (dict(gqa="grouped"), "Unknown gqa policy"),
    "unknown basis": (dict(basis="raw"), "Unknown basis"),
    "negative seed": (dict(dims="random", seed=-1), "seed"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_is_refused_and_the_model_left_unchanged(tiny, case):
    kwargs, match = BAD_CALLS[case]
    args = dict(heads=[(0, 1)], k=3, dims="random", calibration=None) | kwargs
    saved, hooks = state_copy(tiny), hook_count(tiny)
    with pytest.raises(sl.InputError, match=match):
        with sl.prune_qk(tiny, **args):
            pass
    with pytest.raises(sl.InputError, match=match):
        sl.apply_pruning(tiny, **args)
    assert_state_equal(tiny, saved)
    assert hook_count(tiny) == hooks and not sl.active_edits(tiny)


def test_nested_or_overlapping_edits_are_refused(tiny):
    info = sl.model_info(tiny)
    saved = state_copy(tiny)
    with sl.prune_qk(tiny, [(1, 0), (2, 0)], 3, dims="random") as outer:
        inside = state_copy(tiny)
        with pytest.raises(sl.InputError, match="overlaps an active QK pruning"):
            sl.apply_pruning(tiny, [(2, 0)], 5, dims="random")
        with pytest.raises(sl.InputError, match="overlaps"):
            with sl.prune_qk(tiny, [(1, 0)], 3, dims="weight_norm"):
                pass
        assert_state_equal(tiny, inside)
        assert sl.active_edits(tiny) == [outer]
        # other heads, and removal of the same head (a different weight), are allowed
        with sl.prune_qk(tiny, [(1, 1)], 3, dims="random"), sl.remove_heads(tiny, [(1, 0)]):
            assert len(sl.active_edits(tiny)) == 3
        with sl.remove_heads(tiny, [(0, 0)]):
            with pytest.raises(sl.InputError, match="overlaps an active head removal"):
                sl.apply_head_removal(tiny, [(0, 0)])
    assert_state_equal(tiny, saved)
    if info.group_size > 1:  # a shared K edit and a private K copy of the same KV head cannot coexist
        whole = [(1, h) for h in range(info.group_size)]
        with sl.prune_qk(tiny, [(1, info.n_heads - 1)], 3, dims="random"):
            pass
        with sl.prune_qk(tiny, whole[:1], 3, dims="random", gqa="exact"):
            with pytest.raises(sl.InputError, match="overlaps"):
                sl.apply_pruning(tiny, whole[1:], 3, dims="random", gqa="shared", force=True)
        assert_state_equal(tiny, saved)


def test_bos_top_refused_on_an_edited_model(tiny):
    tokens = random_tokens(2, 8)
    with sl.remove_heads(tiny, [(0, 0)]):
        with pytest.raises(sl.InputError, match="active edits"):
            sl.apply_pruning(tiny, [(1, 0)], 3, dims="bos_top", calibration=tokens)


def test_layer_heads():
    heads = [(3, 0), (5, 1), (5, 2), (3, 4), (1, 0)]
    assert sl.layer_heads(heads) == (3, [(3, 0), (3, 4)])  # ties: the lowest layer
    assert sl.layer_heads(heads, layer=5) == (5, [(5, 1), (5, 2)])
    with pytest.raises(sl.InputError, match="holds none"):
        sl.layer_heads(heads, layer=2)
    with pytest.raises(sl.InputError, match="No heads"):
        sl.layer_heads([])
    with pytest.raises(sl.InputError, match="-1"):
        sl.layer_heads(heads, layer=-2)


# --- the embedded model -------------------------------------------------------------------------


@pytest.mark.integration
def test_smollm_exact_partial_group_pattern_and_full_k(smollm):
    info = sl.model_info(smollm)
    tokens = sl.probe_tokens(smollm, 2, 16)
    layer = info.n_layers // 2
    name = f"blocks.{layer}.hook_resid_pre"
    dense_logits, cache = smollm.run_with_cache(tokens.tokens, names_filter=[name, pattern_hook(layer)])
    with sl.prune_qk(smollm, [(layer, 0), (layer, 1)], info.d_model, dims="bos_top", calibration=tokens):
        assert torch.equal(smollm(tokens.tokens), dense_logits)
    with sl.prune_qk(smollm, [(layer, 1)], 10, dims="bos_top", calibration=tokens, gqa="exact") as handle:
        got = patterns(smollm, tokens.tokens, layer)
        assert handle.plan.k_copies and handle.layout == "ungrouped"
    config = smollm.original_model.config
    w = {"q": smollm.blocks[layer].attn.q.original_component.weight.double().numpy(),
         "k": smollm.blocks[layer].attn.k.original_component.weight.double().numpy(),
         "gain": smollm.blocks[layer].ln1.original_component.weight.double().numpy(), "eps": config.rms_norm_eps}
    dims = handle.dims[(layer, 1)].numpy()
    want = independent_pattern(config, w, cache[name], 1, dims, dims)
    np.testing.assert_allclose(got[:, 1].double().numpy(), want, atol=1e-5)
    siblings = [h for h in range(info.n_heads) if h != 1]
    assert torch.equal(got[:, siblings], cache[pattern_hook(layer)][:, siblings])
