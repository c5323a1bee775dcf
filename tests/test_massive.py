"""Massive activations: planted synthetic features, and both bases against HF hidden states."""

import numpy as np
import pytest
import torch

import sinklens as sl

from helpers import padded_mask, random_tokens


def plant(model, dim: int, value: float, token: int = 1):
    """Give ``token``'s embedding a massive component in ``dim`` (the way BOS carries one)."""
    embed = model.original_model.get_input_embeddings().weight
    embed[token, dim] = value


def reference_bases(hf_model, tokens, mask):
    """First-real-token vectors per layer: residual entering the layer, and RMSNorm(x) * gain."""
    out = hf_model(tokens, attention_mask=mask, output_hidden_states=True)
    first = mask.argmax(1)
    resid, normed = [], []
    for layer, block in enumerate(hf_model.model.layers):
        h = out.hidden_states[layer].double()
        resid.append(h[torch.arange(len(tokens)), first])
        n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + block.input_layernorm.variance_epsilon)
        normed.append((n * block.input_layernorm.weight.double())[torch.arange(len(tokens)), first])
    return torch.stack(resid, 1), torch.stack(normed, 1), out.hidden_states


@pytest.mark.parametrize("side", ["right", "left"])
def test_both_bases_match_hf_hidden_states(tiny, hf_reference, side):
    tokens = random_tokens(4, 16, seed=2)
    mask = padded_mask(4, 16, side, seed=5)
    tokens[torch.arange(4), mask.argmax(1)] = 1
    stats = sl.massive_activations(tiny, tokens, attention_mask=mask, batch_size=3, show_progress=False)
    resid, normed, hidden = reference_bases(hf_reference, tokens, mask)
    assert torch.allclose(stats.values("resid").double(), resid, atol=1e-5)
    assert torch.allclose(stats.values("normalized").double(), normed, atol=1e-4, rtol=1e-5)
    # median |x| over the real tokens of each prompt's hidden state, layer 1
    for b in range(4):
        real = hidden[1][b][mask[b].bool()].abs().flatten().double()
        assert stats.median_abs[0, b, 1].item() == pytest.approx(float(real.median()), rel=1e-5)
        first = int(mask[b].argmax())
        others = [i for i in range(16) if mask[b, i] and i != first]
        norms = hidden[1][b][others].double().norm(dim=-1)
        assert stats.other_norm[0, b, 1].item() == pytest.approx(float(norms.mean()), rel=1e-5)


def test_planted_massive_dim_is_found(tiny):
    d_model = sl.model_info(tiny).d_model
    dim = int(torch.randint(0, d_model, (1,), generator=torch.Generator().manual_seed(11)))
    plant(tiny, dim, 800.0)
    tokens = random_tokens(6, 12, seed=9)
    stats = sl.massive_activations(tiny, tokens, show_progress=False)
    found = stats.massive_dims("resid")
    assert set(found[found.layer == 0].dim) == {dim}
    assert found[found.layer == 0].mean_value.item() == pytest.approx(800.0, rel=1e-6)
    assert int(stats.top_dims(0, 1, "resid")) == dim
    assert int(sl.bos_top_dims(tiny, tokens, layer=0, k=1, basis="normalized")) == dim
    # a threshold above the planted value finds nothing: the criterion is applied, not assumed
    assert stats.massive_dims("resid", min_abs=900).query("layer == 0").empty


def test_norm_share_and_rank_stability_against_numpy(tiny):
    tokens = random_tokens(5, 10, seed=4)
    stats = sl.massive_activations(tiny, tokens, show_progress=False)
    values = stats.values("normalized").double().numpy()  # [b, layer, d]
    k = 3
    top = np.argsort(-np.abs(values).mean(0), axis=-1)[:, :k]  # aggregate top-k per layer
    share = np.stack([(values[:, l, top[l]] ** 2).sum(-1) / (values[:, l] ** 2).sum(-1)
                      for l in range(values.shape[1])], 1).mean(0)
    assert np.allclose(stats.norm_share(k).numpy(), share, atol=1e-5)
    jacc = np.zeros(values.shape[1])
    for l in range(values.shape[1]):
        agg = set(top[l])
        jacc[l] = np.mean([len(agg & set(np.argsort(-np.abs(v))[:k])) / len(agg | set(np.argsort(-np.abs(v))[:k]))
                           for v in values[:, l]])
    assert np.allclose(stats.rank_stability(k).numpy(), jacc, atol=1e-6)


def test_huge_first_token_values_stay_finite(tiny):
    """A planted value of 60,000 (its square overflows fp16) gives finite norms and a share of ~1."""
    plant(tiny, 0, 60000.0)
    stats = sl.massive_activations(tiny, random_tokens(2, 8), layers=[0], show_progress=False)
    assert torch.isfinite(stats.first_norm).all()
    assert stats.norm_share(1, "resid")[0].item() == pytest.approx(1.0, abs=1e-3)


def test_bad_input(tiny):
    tokens = random_tokens(2, 8)
    with pytest.raises(sl.InputError, match="k=0"):
        sl.bos_top_dims(tiny, tokens, layer=0, k=0)
    with pytest.raises(sl.InputError, match="d_model"):
        sl.bos_top_dims(tiny, tokens, layer=0, k=10_000)
    with pytest.raises(sl.InputError, match="layer=7 is out of range"):
        sl.bos_top_dims(tiny, tokens, layer=7, k=2)
    with pytest.raises(sl.InputError, match="basis"):
        sl.bos_top_dims(tiny, tokens, layer=0, k=2, basis="raw")
