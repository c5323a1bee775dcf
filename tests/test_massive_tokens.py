"""Massive activations on every token against a plain numpy implementation of Sun et al.'s definition."""

import numpy as np
import pytest
import torch

import sinklens as sl
from sinklens.measure.lse_census import first_key_weights
from sinklens.measure.massive_tokens import carrier_summary, token_kind

from helpers import padded_mask, random_tokens


def numpy_hits(resid, mask, min_abs, min_ratio):
    """Every (prompt, relative position, dim) with |x| > min_abs and |x| >= min_ratio x the (lower) median |x|
    over the prompt's real tokens and dims."""
    hits = set()
    for b in range(resid.shape[0]):
        real = np.nonzero(mask[b])[0]
        x = np.abs(resid[b, real])
        median = np.percentile(x, 50, method="lower")
        for pos, dim in zip(*np.nonzero((x > min_abs) & (x >= min_ratio * median))):
            hits.add((b, int(pos), int(dim)))
    return hits


@pytest.mark.parametrize("side", ["none", "left"])
def test_massive_tokens_match_numpy_on_a_tiny_model(tiny, side):
    tokens = random_tokens(3, 24, seed=8)
    mask = torch.ones_like(tokens) if side == "none" else padded_mask(3, 24, side, seed=9)
    layer = 2
    _, cache = tiny.run_with_cache(tokens, attention_mask=mask, names_filter=f"blocks.{layer}.hook_resid_pre")
    resid = cache[f"blocks.{layer}.hook_resid_pre"].double().numpy()
    # thresholds that a random model meets at a few dozen (position, dim) pairs
    min_abs = float(np.quantile(np.abs(resid), 0.97))
    found = sl.massive_tokens(tiny, tokens, attention_mask=mask, layers=[layer], top_n=48, show_progress=False)
    expected = numpy_hits(resid, mask.numpy(), min_abs, 2.0)
    hits = found.hits(min_abs, 2.0)
    assert len(expected) > 5 and set(zip(hits.prompt, hits.position, hits.dim)) == expected
    assert found.saturated(min_abs, 2.0) == 0
    small = sl.massive_tokens(tiny, tokens, attention_mask=mask, layers=[layer], top_n=1, show_progress=False)
    got = small.hits(min_abs, 2.0)
    assert set(zip(got.prompt, got.position, got.dim)) <= expected  # a subset; positions with more are flagged
    assert small.saturated(min_abs, 2.0) == len(set(zip(got.prompt, got.position)))


def test_token_kinds():
    assert token_kind("<s>", 1, 0, bos_id=1) == "BOS"
    assert token_kind("The", 9, 0, bos_id=1) == "first position"
    assert token_kind(".\n", 5, 7, bos_id=1) == "newline"
    assert token_kind(" .", 5, 7, bos_id=1) == "period"
    assert token_kind("cat", 5, 7, bos_id=1) == "other"
    with pytest.raises(sl.InputError, match="carrier_summary"):
        carrier_summary(None)


def test_first_key_weights_match_the_eager_pattern(tiny):
    tokens = random_tokens(2, 30, seed=4)
    batch = sl.TokenBatch(tokens, torch.ones_like(tokens), True)
    _, cache = tiny.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
    weights = first_key_weights(tiny, batch, layer=1, head=2, first_keys=5)
    with pytest.warns(DeprecationWarning, match="first_keys="):
        assert torch.equal(first_key_weights(tiny, batch, layer=1, head=2, n_keys=5), weights)
    assert weights.shape == (2, 30, 5)
    assert float((weights - cache["blocks.1.attn.hook_pattern"][:, 2, :, :5]).abs().max()) <= 1e-5
    with pytest.raises(sl.InputError, match="first_keys"):
        first_key_weights(tiny, batch, layer=1, head=2, first_keys=31)
    with pytest.raises(sl.InputError, match="out of range"):
        first_key_weights(tiny, batch, layer=3, head=0)


def test_bad_top_n(tiny):
    with pytest.raises(sl.InputError, match="top_n"):
        sl.massive_tokens(tiny, random_tokens(1, 8), top_n=0)


@pytest.mark.integration
def test_massive_tokens_match_numpy_on_the_embedded_model(smollm):
    probe = sl.probe_tokens(smollm, n_prompts=2, seq_len=96)
    layers = [3, 15]
    found = sl.massive_tokens(smollm, probe, layers=layers, show_progress=False)
    names = [f"blocks.{layer}.hook_resid_pre" for layer in layers]
    _, cache = smollm.run_with_cache(probe.tokens, names_filter=names)
    carriers = found.carriers(smollm)
    for slot, layer in enumerate(layers):
        expected = numpy_hits(cache[names[slot]].double().numpy(), probe.attention_mask.numpy(), 100.0, 1000.0)
        part = carriers[carriers.layer == layer]
        assert set(zip(part.prompt, part.position, part.dim)) == expected
    assert len(carriers) > 0 and found.saturated() == 0
    assert "BOS" in set(carriers["kind"])  # measured, not assumed: BOS carries them on this model
    summary = carrier_summary(carriers)
    assert summary["n_pairs"].sum() == len(carriers)
