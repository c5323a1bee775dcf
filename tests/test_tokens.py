"""Tokenization with explicit first-token control, the probe set, and token validation."""

import pytest
import torch

import sinklens as sl
from sinklens.core.tokens import as_batch


def test_prepend_bos_is_explicit(tiny):
    with_bos = sl.tokenize(tiny, ["w5 w6 w7", "w8"], prepend_bos=True)
    without = sl.tokenize(tiny, ["w5 w6 w7", "w8"], prepend_bos=False)
    assert with_bos.prepend_bos is True and without.prepend_bos is False
    assert with_bos.tokens[:, 0].tolist() == [1, 1]
    assert with_bos.tokens[0].tolist() == [1, 5, 6, 7]
    assert without.tokens[0].tolist() == [5, 6, 7]
    assert with_bos.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_seq_len_and_padding_side(tiny):
    batch = sl.tokenize(tiny, ["w5 w6 w7 w8 w9", "w10"], seq_len=3, padding_side="left")
    assert batch.tokens.tolist()[0] == [1, 5, 6]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch.tokens[1, 1:].tolist() == [1, 10]


def test_prompt_longer_than_context(tiny):
    n_ctx = sl.model_info(tiny).n_ctx
    text = " ".join(["w5"] * (n_ctx + 1))
    with pytest.raises(sl.InputError, match=f"longer than the model's context of {n_ctx}"):
        sl.tokenize(tiny, [text])
    with pytest.raises(sl.InputError, match="longer than the model's context"):
        as_batch(tiny, torch.ones((1, n_ctx + 1), dtype=torch.long))
    assert sl.tokenize(tiny, [text], seq_len=n_ctx).tokens.shape == (1, n_ctx)


@pytest.mark.parametrize("tokens, mask, message", [
    (torch.ones((2, 4)), None, "integer ids"),
    (torch.full((2, 4), 999), None, r"must lie in \[0, 128\)"),
    (torch.ones((2, 4), dtype=torch.long), torch.ones((2, 3)), "shape"),
    (torch.ones((1, 4), dtype=torch.long), torch.tensor([[1, 0, 1, 1]]), "contiguous"),
    (torch.ones((1, 4), dtype=torch.long), torch.tensor([[0, 0, 0, 0]]), "no real token"),
    (torch.ones((0, 4), dtype=torch.long), None, "non-empty"),
    ([[1, 2]], None, "torch.Tensor"),
])
def test_bad_tokens(tiny, tokens, mask, message):
    with pytest.raises(sl.InputError, match=message):
        sl.run_census(tiny, tokens, attention_mask=mask)


def test_empty_prompt_set(tiny):
    with pytest.raises(sl.InputError, match="empty"):
        sl.tokenize(tiny, [])
    with pytest.raises(sl.InputError, match="no tokens"):
        sl.tokenize(tiny, [""], prepend_bos=False)


def test_probe_set_is_deterministic_and_splits_are_disjoint(smollm):
    a = sl.probe_tokens(smollm, n_prompts=16, seq_len=32)
    b = sl.probe_tokens(smollm, n_prompts=16, seq_len=32)
    assert torch.equal(a.tokens, b.tokens) and a.tokens.shape == (16, 32)
    bos = sl.model_info(smollm).bos_id
    assert (a.tokens[:, 0] == bos).all() and a.prepend_bos
    no_bos = sl.probe_tokens(smollm, n_prompts=16, seq_len=32, prepend_bos=False)
    assert torch.equal(no_bos.tokens, a.tokens[:, 1:])  # the same text, one token shorter
    held = sl.probe_tokens(smollm, n_prompts=16, seq_len=32, split="held_out")
    probe_rows = {tuple(r) for r in a.tokens[:, 1:].tolist()}
    assert not probe_rows & {tuple(r) for r in held.tokens[:, 1:].tolist()}
    text = smollm.tokenizer.decode(a.tokens[0, 1:])
    assert text.strip() and text.isascii()  # real English documentation text
    assert sl.probe_provenance()["source"].startswith("pydoc_data.topics")
    with pytest.raises(sl.InputError, match="split holds"):
        sl.probe_tokens(smollm, n_prompts=100_000, seq_len=64)
    with pytest.raises(sl.InputError, match="Unknown split"):
        sl.probe_tokens(smollm, split="test")
