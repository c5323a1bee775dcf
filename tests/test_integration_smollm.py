"""The embedded SmolLM2-135M, through one session-scoped fixture: loading, census and massive
activations checked against a separate HF eager model loaded from the same cached checkpoint."""

import numpy as np
import pytest
import torch

import sinklens as sl
from sinklens.core.embedded import embedded_checkpoint

from helpers import hf_eager

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm_eager():
    return hf_eager(embedded_checkpoint("smollm2-135m"))


@pytest.fixture(scope="module")
def probe(smollm):
    return sl.probe_tokens(smollm, n_prompts=6, seq_len=48)


def test_model_facts_are_read_from_the_model(smollm, smollm_eager):
    info = sl.model_info(smollm)
    config = smollm_eager.config
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_model) == (
        config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.hidden_size)
    assert info.bos_id == smollm.tokenizer.bos_token_id is not None


def test_greedy_generation_is_sane(smollm):
    """Dequantization check: the instruct model completes a well-known fact."""
    batch = sl.tokenize(smollm, "The capital of France is", prepend_bos=True)
    out = smollm.original_model.generate(batch.tokens, attention_mask=batch.attention_mask, max_new_tokens=2,
                                         do_sample=False)
    assert smollm.tokenizer.decode(out[0, batch.tokens.shape[1]:]).startswith(" Paris")


def test_census_matches_hf_eager(smollm, smollm_eager, probe):
    census = sl.run_census(smollm, probe, batch_size=3, show_progress=False)
    out = smollm_eager(probe.tokens, output_attentions=True)
    patterns = torch.stack(out.attentions, 1).double()  # [b, layer, head, q, k]
    T = probe.tokens.shape[1]
    alpha_ref = torch.stack([patterns[..., k:, k].mean(-1) for k in range(T)], -1)
    assert (census.alpha.double() - alpha_ref).abs().max() <= 1e-5
    conf_ref = patterns.amax(-1).mean(-1)
    assert (census.confidence.double() - conf_ref).abs().max() <= 1e-5


def test_massive_dims_match_hf_hidden_states(smollm, smollm_eager, probe):
    stats = sl.massive_activations(smollm, probe, show_progress=False)
    hidden = smollm_eager(probe.tokens, output_hidden_states=True).hidden_states
    for layer in range(sl.model_info(smollm).n_layers):
        first = hidden[layer][:, 0].double()
        assert torch.allclose(stats.values("resid")[:, layer].double(), first, rtol=1e-5, atol=1e-3)
        expected = int(first.abs().mean(0).argmax())
        assert int(stats.top_dims(layer, 1, "resid")) == expected
    table = stats.massive_dims("resid")
    for row in table.itertuples():  # every reported dim meets the criterion on the reference too
        h = hidden[row.layer].double()
        medians = h.abs().flatten(1).median(1).values
        first_abs = h[:, 0, row.dim].abs()
        assert ((first_abs > 100) & (first_abs / medians >= 1000)).float().mean() >= 0.5


def test_sink_heads_and_top_dims_against_hf_eager(smollm, smollm_eager, probe):
    """The sink-specialized heads and BOS top dims, each recomputed from HF eager outputs in numpy."""
    heads = sl.sink_specialized_heads(sl.sink_scores(smollm, probe), eps=0.3, q=0.9)
    assert heads, "the embedded model is known to have sink heads; none found means a broken census"
    attentions = smollm_eager(probe.tokens, output_attentions=True).attentions
    patterns = np.stack([a.double().numpy() for a in attentions], 1)  # [b, layer, head, q, k]
    alpha0 = patterns[..., :, 0].mean(-1)  # column 0 over every row (all rows see the first key)
    expected = [(int(l), int(h)) for l, h in zip(*np.nonzero((alpha0 > 0.3).mean(0) >= 0.9))]
    assert sorted(heads) == sorted(expected)
    layer = max({l for l, _ in heads}, key=lambda l: sum(1 for x, _ in heads if x == l))
    dims = sl.bos_top_dims(smollm, probe, layer=layer, k=2)
    # independently: RMSNorm(x) * gain of BOS's residual from HF hidden states
    h = smollm_eager(probe.tokens, output_hidden_states=True).hidden_states[layer][:, 0].double()
    norm = smollm_eager.model.layers[layer].input_layernorm
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.double()
    assert dims.tolist() == normed.abs().mean(0).topk(2).indices.tolist()


def test_context_length_is_checked_before_the_forward(smollm):
    n_ctx = sl.model_info(smollm).n_ctx
    with pytest.raises(sl.InputError, match="context"):
        sl.sink_scores(smollm, torch.ones((1, n_ctx + 1), dtype=torch.long))
