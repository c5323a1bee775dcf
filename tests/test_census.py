"""Census metrics against an independent computation from HF eager ``output_attentions=True``."""

import numpy as np
import pytest
import torch

import sinklens as sl

from helpers import padded_mask, random_tokens

TOL = 1e-5


def reference_metrics(hf_model, tokens, mask):
    """alpha for every (relative) key and head confidence, by explicit loops over HF eager patterns."""
    out = hf_model(tokens, attention_mask=mask, output_attentions=True)
    patterns = np.stack([a.double().numpy() for a in out.attentions], 1)  # [b, layer, head, q, k]
    n, n_layers, n_heads, width, _ = patterns.shape
    alpha = np.full((n, n_layers, n_heads, width), np.nan)
    conf = np.zeros((n, n_layers, n_heads))
    for b in range(n):
        real = np.nonzero(mask[b].numpy())[0]
        for r, key in enumerate(real):
            queries = real[r:]
            alpha[b, :, :, r] = patterns[b][:, :, queries, key].mean(-1)
        conf[b] = patterns[b][:, :, real, :].max(-1).mean(-1)
    return alpha, conf


@pytest.mark.parametrize("side", ["none", "right", "left"])
def test_census_matches_hf_eager(tiny, hf_reference, side):
    tokens = random_tokens(5, 24, seed=3)
    mask = torch.ones_like(tokens) if side == "none" else padded_mask(5, 24, side, seed=4)
    if side == "left":  # BOS must be the first real token of every row
        tokens[torch.arange(5), mask.argmax(1)] = 1
    census = sl.run_census(tiny, tokens, attention_mask=mask, batch_size=2, show_progress=False)
    alpha_ref, conf_ref = reference_metrics(hf_reference, tokens, mask)
    got = census.alpha.double().numpy()
    assert np.array_equal(np.isnan(got), np.isnan(alpha_ref))
    assert np.nanmax(np.abs(got - alpha_ref)) <= TOL
    assert np.abs(census.confidence.double().numpy() - conf_ref).max() <= TOL
    scores = sl.sink_scores(tiny, tokens, attention_mask=mask)
    assert np.abs(scores.double().numpy() - alpha_ref[..., 0]).max() <= TOL
    assert census.sink_scores(2).shape == (5, 3, sl.model_info(tiny).n_heads)


def test_rates_and_non_first_sinks_match_reference(tiny, hf_reference):
    tokens = random_tokens(4, 20, seed=7)
    mask = torch.ones_like(tokens)
    census = sl.run_census(tiny, tokens, show_progress=False)
    alpha_ref, _ = reference_metrics(hf_reference, tokens, mask)
    eps = float(np.median(alpha_ref[..., 0]))  # a threshold that splits the heads
    assert census.sink_rate(eps) == pytest.approx((alpha_ref[..., 0] > eps).mean() * 100, abs=1e-4)
    by_layer = census.sink_rate_by_layer(eps).numpy()
    assert np.allclose(by_layer, (alpha_ref[..., 0] > eps).mean(axis=(0, 2)) * 100, atol=1e-4)

    threshold, min_queries = 0.1, 4
    expected = set()
    for b, layer, head, r in zip(*np.nonzero(alpha_ref > threshold)):
        if r > 0 and 20 - r >= min_queries:
            expected.add((b, layer, head, r))
    table = census.non_first_sinks(threshold, min_queries)
    got = set(zip(table["prompt"], table["layer"], table["head"], table["position"]))
    assert got == expected and len(expected) > 0
    assert (table.token_id.to_numpy() == tokens.numpy()[table.prompt, table.position]).all()

    frame = census.to_frame(eps=eps, threshold=threshold, min_queries=min_queries)
    assert len(frame) == 4 * 3 * sl.model_info(tiny).n_heads
    assert frame["sink"].mean() * 100 == pytest.approx(census.sink_rate(eps), abs=1e-4)
    assert frame["n_other_sinks"].sum() == len(table)


def test_census_on_a_subset_of_layers_matches_full(tiny):
    tokens = random_tokens(3, 16, seed=1)
    full = sl.run_census(tiny, tokens, show_progress=False)
    part = sl.run_census(tiny, tokens, layers=[1], show_progress=False)
    assert part.layers == [1]
    assert torch.equal(part.alpha[:, 0], full.alpha[:, 1])


def test_first_token_comparison_needs_both_cases(tiny):
    tokens = random_tokens(2, 12)
    census = sl.run_census(tiny, sl.TokenBatch(tokens, torch.ones_like(tokens), True), show_progress=False)
    no_bos = sl.run_census(tiny, sl.TokenBatch(tokens[:, 1:], torch.ones_like(tokens[:, 1:]), False),
                           show_progress=False)
    table = sl.first_token_comparison(census, no_bos)
    assert set(table.case.str.split(" ").str[0]) == {"BOS", "first"}
    assert len(table) == 3 * 3
    expected = float(census.sink_scores(1)[:, 2].mean())
    got = table[(table.layer == 2) & table.case.str.contains("position 1")].mean_alpha.item()
    assert got == pytest.approx(expected)
    with pytest.raises(sl.InputError, match="prepend_bos"):
        sl.first_token_comparison(no_bos, census)


@pytest.mark.parametrize("bad, message", [
    (dict(key_pos=30), "outside the sequence"),
    (dict(key_pos=-1), "outside the sequence"),
])
def test_bad_key_pos(tiny, bad, message):
    with pytest.raises(sl.InputError, match=message):
        sl.sink_scores(tiny, random_tokens(2, 10), **bad)


def test_bad_eps_and_layers(tiny):
    census = sl.run_census(tiny, random_tokens(2, 10), show_progress=False)
    with pytest.raises(sl.InputError, match=r"\[0, 1\]"):
        census.sink_rate(30)
    with pytest.raises(sl.InputError, match="out of range"):
        sl.run_census(tiny, random_tokens(2, 10), layers=[3])
    with pytest.raises(sl.InputError, match="empty"):
        sl.run_census(tiny, random_tokens(2, 10), layers=[])
