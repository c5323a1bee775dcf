"""The sdpa census engine (fused kernel + LSE) against the eager engine, HF, numpy, and its bad-input checks."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sinklens as sl
import sinklens.core.memory
from sinklens.core.tokens import as_batch
from sinklens.measure.lse_census import attention_with_lse, fused_attention, lse_statistics

from helpers import padded_mask, random_tokens

TOL = 1e-5


def tokens_and_mask(n, width, side, seed=3):
    tokens = random_tokens(n, width, seed=seed)
    mask = torch.ones_like(tokens) if side == "none" else padded_mask(n, width, side, seed=seed + 1)
    if side == "left":  # BOS must be the first real token of every row
        tokens[torch.arange(n), mask.argmax(1)] = 1
    return tokens, mask


def max_diff(a, b):
    assert torch.equal(a.isnan(), b.isnan())
    return float((a - b).abs().nan_to_num(0.0).max())


@pytest.mark.parametrize("width", [17, 40])
@pytest.mark.parametrize("side", ["none", "right", "left"])
def test_sdpa_matches_eager_engine(tiny, side, width):
    tokens, mask = tokens_and_mask(5, width, side)
    eager = sl.run_census(tiny, tokens, attention_mask=mask, batch_size=2, show_progress=False)
    first = sl.run_census(tiny, tokens, attention_mask=mask, batch_size=2, show_progress=False, engine="sdpa")
    full = sl.run_census(tiny, tokens, attention_mask=mask, batch_size=3, show_progress=False, engine="sdpa",
                         full=True, block_size=7)
    assert first.engine == "sdpa (cpu_flash)" and eager.engine == "eager"
    assert first.alpha.shape[-1] == 4 and not first.complete and full.complete
    assert max_diff(first.alpha, eager.alpha[..., :4]) <= TOL
    assert max_diff(full.alpha, eager.alpha) <= TOL
    assert max_diff(full.confidence, eager.confidence) <= TOL
    assert first.confidence.isnan().all()
    assert torch.equal(full.tokens, eager.tokens) and torch.equal(full.lengths, eager.lengths)
    got, want = full.non_first_sinks(), eager.non_first_sinks()
    keys = ["prompt", "layer", "head", "position", "token_id"]
    assert len(want) > 0 and got[keys].equals(want[keys])
    assert np.abs(got["score"].to_numpy() - want["score"].to_numpy()).max() <= TOL


def test_sdpa_matches_numpy_on_one_head(tiny):
    """alpha_0..3 and the confidence of one head from q and k (numpy, float64), without the package's reducers."""
    tokens = random_tokens(2, 30, seed=5)
    layer, head = 1, sl.model_info(tiny).n_heads - 1
    _, cache = tiny.run_with_cache(tokens, names_filter=[f"blocks.{layer}.attn.hook_rot_q",
                                                         f"blocks.{layer}.attn.hook_rot_k"])
    q = cache[f"blocks.{layer}.attn.hook_rot_q"].double().numpy()  # [b, pos, head, d]
    k = cache[f"blocks.{layer}.attn.hook_rot_k"].double().numpy()  # [b, pos, kv_head, d]
    group = q.shape[2] // k.shape[2]
    scores = np.einsum("bid,bjd->bij", q[:, :, head], k[:, :, head // group]) / np.sqrt(q.shape[-1])
    scores[:, ~np.tril(np.ones((30, 30), dtype=bool))] = -np.inf
    pattern = np.exp(scores - scores.max(-1, keepdims=True))
    pattern /= pattern.sum(-1, keepdims=True)
    alpha = np.stack([pattern[:, key:, key].mean(-1) for key in range(4)], -1)
    confidence = pattern.max(-1).mean(-1)
    census = sl.run_census(tiny, tokens, engine="sdpa", show_progress=False)
    full = sl.run_census(tiny, tokens, engine="sdpa", full=True, block_size=4, show_progress=False)
    slot = census.layers.index(layer)
    assert np.abs(census.alpha[:, slot, head].double().numpy() - alpha).max() <= TOL
    assert np.abs(full.alpha[:, slot, head, :4].double().numpy() - alpha).max() <= TOL
    assert np.abs(full.confidence[:, slot, head].double().numpy() - confidence).max() <= TOL


def test_fused_forward_keeps_the_model_output_and_restores_the_bridge(tiny, tiny_dir):
    """Inside fused_attention the bridge's logits equal an HF model with attn_implementation="sdpa"; afterwards the
    bridge is eager again (hook_pattern fires) and unchanged."""
    from transformers import AutoModelForCausalLM

    hf_sdpa = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32,
                                                   attn_implementation="sdpa").eval()
    tokens, mask = tokens_and_mask(3, 20, "left")
    before = tiny(tokens, attention_mask=mask)
    fired = []
    with fused_attention(tiny), torch.inference_mode():
        fused = tiny.run_with_hooks(tokens, attention_mask=mask,
                                    fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: fired.append(x))])
        reference = hf_sdpa(tokens, attention_mask=mask).logits
    real = mask.bool()
    assert not fired
    assert float((fused - reference)[real].abs().max()) <= 1e-4
    assert float((fused - before)[real].abs().max()) <= 1e-4
    after = tiny.run_with_hooks(tokens, attention_mask=mask,
                                fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: fired.append(x))])
    assert len(fired) == 1 and torch.equal(after, before)
    assert tiny.original_model.config._attn_implementation == "eager"


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(item, torch.Tensor):
                self.shapes.append(tuple(item.shape))
        return out


@pytest.mark.parametrize("full", [False, True])
def test_sdpa_census_never_holds_a_t_by_t_tensor(tiny, full):
    width, block = 64, 8
    tokens = random_tokens(2, width)
    with _Shapes() as eager_run:
        sl.run_census(tiny, tokens, show_progress=False)
    with _Shapes() as fused_run:
        sl.run_census(tiny, tokens, engine="sdpa", full=full, block_size=block, show_progress=False)

    def square(shapes):
        return [s for s in shapes if len(s) >= 2 and s[-1] == width and s[-2] == width]
    assert square(eager_run.shapes)  # the eager engine does hold [.., T, T]
    assert not square(fused_run.shapes)
    info = sl.model_info(tiny)
    largest = max(np.prod(s) for s in fused_run.shapes if len(s) == 4)  # q/k/v, or a block of scores
    assert largest <= 2 * info.n_heads * max(block, info.d_head) * width


def test_blocked_lse_backend_matches_the_kernel(tiny):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 33, 8), torch.randn(2, 2, 33, 8), torch.randn(2, 2, 33, 8)
    mask = torch.ones(33, 33, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    mask[1, :, :, :5] = False
    for m in (None, mask):
        out, lse, used = attention_with_lse(q, k, v, m, 0.3)
        out_b, lse_b, used_b = attention_with_lse(q, k, v, m, 0.3, backend="blocked")
        assert (used, used_b) == ("cpu_flash", "blocked")
        rows = slice(None) if m is None else slice(5, None)
        assert float((out - out_b)[..., rows, :].abs().max()) <= TOL
        assert float((lse - lse_b)[..., rows].abs().max()) <= TOL
    tokens, mask = tokens_and_mask(3, 24, "right")
    batch = as_batch(tiny, tokens, mask)
    kernel = lse_statistics(tiny, batch, [0, 2], full=True, show_progress=False)
    blocked = lse_statistics(tiny, batch, [0, 2], full=True, backend="blocked", block_size=5, show_progress=False)
    assert blocked[2] == "blocked" and kernel[2] == "cpu_flash"
    assert max_diff(kernel[0], blocked[0]) <= TOL and max_diff(kernel[1], blocked[1]) <= TOL


def test_sdpa_census_on_a_subset_of_layers(tiny):
    tokens = random_tokens(2, 16, seed=2)
    every = sl.run_census(tiny, tokens, engine="sdpa", full=True, show_progress=False)
    part = sl.run_census(tiny, tokens, engine="sdpa", full=True, layers=[1], show_progress=False)
    assert part.layers == [1] and max_diff(part.alpha[:, 0], every.alpha[:, 1]) == 0.0


def test_first_keys_census_refuses_what_it_did_not_measure(tiny):
    census = sl.run_census(tiny, random_tokens(2, 12), engine="sdpa", first_keys=3, show_progress=False)
    assert census.sink_scores(2).shape == (2, 3, sl.model_info(tiny).n_heads)
    with pytest.raises(sl.InputError, match="first 3 keys"):
        census.sink_scores(3)
    with pytest.raises(sl.InputError, match="full=True"):
        census.non_first_sinks()
    frame = census.to_frame()
    assert frame["n_other_sinks"].isna().all() and len(frame) == 2 * 3 * sl.model_info(tiny).n_heads
    assert census.sink_rate(0.3) == pytest.approx(float((census.sink_scores(0) > 0.3).float().mean() * 100))


def _no_forward(model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a forward ran before the input check")
    monkeypatch.setattr(model, "run_with_hooks", refuse)
    monkeypatch.setattr(type(model), "__call__", refuse)


def test_bad_input_is_refused_before_any_forward(tiny, monkeypatch):
    tokens = random_tokens(2, 20)
    short = torch.ones_like(tokens)
    short[1, 3:] = 0
    _no_forward(tiny, monkeypatch)
    with pytest.raises(sl.InputError, match="context of 96"):
        sl.run_census(tiny, random_tokens(1, 97), engine="sdpa")
    with pytest.raises(sl.InputError, match=r"first_keys=4 must be in 1\.\.3"):
        sl.run_census(tiny, tokens, attention_mask=short, engine="sdpa")
    with pytest.raises(sl.InputError, match="Unknown engine"):
        sl.run_census(tiny, tokens, engine="flash")
    with pytest.raises(sl.InputError, match="block_size"):
        sl.run_census(tiny, tokens, engine="sdpa", full=True, block_size=0)
    monkeypatch.setattr(sinklens.core.memory, "free_bytes", lambda device: 10_000)
    refusal = r"engine='eager' on 2 prompts x 20 tokens needs about .* GiB.*engine='sdpa'"
    with pytest.raises(sl.InputError, match=refusal):
        sl.run_census(tiny, tokens, engine="eager")


def test_auto_engine_says_which_it_chose(tiny, monkeypatch):
    tokens = random_tokens(2, 20)
    assert sl.run_census(tiny, tokens, engine="auto", show_progress=False).engine == "eager"
    monkeypatch.setattr(sinklens.core.memory, "free_bytes", lambda device: 10_000)
    with pytest.warns(UserWarning, match="uses the sdpa engine"):
        census = sl.run_census(tiny, tokens, engine="auto", show_progress=False)
    assert census.engine.startswith("sdpa")


def test_attention_the_engine_cannot_drive(tiny, monkeypatch):
    monkeypatch.setattr(tiny.original_model.config, "attn_logit_softcapping", 30.0, raising=False)
    with pytest.raises(sl.InputError, match="soft-capped.*engine='eager'"):
        sl.run_census(tiny, random_tokens(2, 10), engine="sdpa")
    monkeypatch.undo()
    layer = tiny.blocks[1].original_component
    monkeypatch.setitem(layer._modules, "self_attn", torch.nn.Identity())
    with pytest.raises(sl.InputError, match="layer 1.*engine='eager'"):
        sl.run_census(tiny, random_tokens(2, 10), engine="sdpa")


@pytest.mark.integration
@pytest.mark.parametrize("side, n_prompts, width", [("none", 3, 48), ("left", 3, 48), ("none", 1, 600)])
def test_sdpa_matches_eager_on_the_embedded_model(smollm, side, n_prompts, width):
    probe = sl.probe_tokens(smollm, n_prompts=n_prompts, seq_len=width)
    tokens, mask = probe.tokens.clone(), probe.attention_mask.clone()
    if side == "left":  # shift prompt 1 right by 10 tokens: left padding
        tokens[1, 10:], mask[1, :10] = probe.tokens[1, :-10].clone(), 0
    eager = sl.run_census(smollm, tokens, attention_mask=mask, show_progress=False)
    first = sl.run_census(smollm, tokens, attention_mask=mask, engine="sdpa", show_progress=False)
    full = sl.run_census(smollm, tokens, attention_mask=mask, engine="sdpa", full=True, block_size=16,
                         show_progress=False)
    assert max_diff(first.alpha, eager.alpha[..., :4]) <= TOL
    assert max_diff(full.alpha, eager.alpha) <= TOL
    assert max_diff(full.confidence, eager.confidence) <= TOL
    assert eager.sink_rate() > 10  # the embedded model has sinks: the comparison is not between near-zeros
