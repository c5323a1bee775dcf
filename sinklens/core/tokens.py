"""Tokenization with explicit control of the first token.

The bridge prepends BOS to strings by default while SmolLM2's own tokenizer does not, so
sinklens never relies on either default: every batch records whether a BOS was prepended.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Int
from torch import Tensor

from .errors import InputError
from .loading import input_device, model_info
from .validate import check_int


class TokenBatch(NamedTuple):
    """Token ids, attention mask (1 = real token) and whether a BOS was prepended."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    prepend_bos: bool | None  # None: unknown (tokens passed in by the user)


def tokenize(model, texts: str | Sequence[str], prepend_bos: bool = True, seq_len: int | None = None,
             padding_side: str = "right") -> TokenBatch:
    """Tokenize ``texts`` without the tokenizer's own special tokens, prepending BOS if asked.

    ``seq_len`` truncates every prompt to at most that many tokens (BOS included); shorter
    prompts are padded on ``padding_side`` and masked out.
    """
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, (Tensor, TokenBatch)) or not hasattr(texts, "__iter__"):
        raise InputError(f"texts must be a string or a list of strings, got {type(texts).__name__}: token ids need "
                         "no tokenize, pass them (a [batch, pos] tensor or a TokenBatch) to the measuring function.")
    texts = list(texts)
    if not texts:
        raise InputError("The prompt set is empty: pass at least one text.")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"texts[{i}] is a {type(text).__name__}, not a string: tokenize takes text. Token ids "
                             "need no tokenize: pass them as a tensor, torch.tensor(ids), to the measuring function "
                             "(padded rows with an attention_mask=, or "
                             "sinklens.core.tokens.pad_rows(model, rows, ...)).")
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    seq_len = check_int("seq_len", seq_len, minimum=1, allow_none=True, meaning="tokens per prompt, BOS included")
    info = model_info(model)
    if prepend_bos and info.bos_id is None:
        raise InputError(f"{info.name} has no BOS token: call with prepend_bos=False.")
    prefix = [info.bos_id] if prepend_bos else []
    rows = [prefix + model.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    if seq_len is not None:
        rows = [row[:seq_len] for row in rows]
    return pad_rows(model, rows, prepend_bos=prepend_bos, padding_side=padding_side)


def pad_rows(model, rows: Sequence[Sequence[int]], prepend_bos: bool | None, padding_side: str = "right") -> TokenBatch:
    """Stack token id lists into a padded batch, checking lengths against the context."""
    info = model_info(model)
    for i, row in enumerate(rows):
        if len(row) == 0:
            raise InputError(f"Prompt {i} has no tokens: drop empty texts or use prepend_bos=True.")
        if len(row) > info.n_ctx:
            raise InputError(f"Prompt {i} has {len(row)} tokens, longer than the model's context of {info.n_ctx}: "
                             "shorten it or pass seq_len= to truncate.")
    width = max(len(row) for row in rows)
    pad_id = getattr(model.tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        tokens[i, span] = torch.tensor(list(row), dtype=torch.long, device="cpu")
        mask[i, span] = 1
    return TokenBatch(tokens, mask, prepend_bos)


def require_bos(model, batch: TokenBatch, purpose: str) -> None:
    """Refuse prompts that do not all start with the model's BOS token: BOS vectors and BOS dims are measured on
    the first real token, which is only the BOS when one was prepended (the check ``apply_pruning`` makes).

    Args:
        model: the bridge.
        batch: the checked tokens (from :func:`as_batch`).
        purpose: what needs BOS, for the message (e.g. ``'dims="bos_top"'``).
    """
    info = model_info(model)
    first = batch.tokens.gather(1, batch.attention_mask.argmax(1, keepdim=True)).flatten()
    if info.bos_id is None or bool((first != info.bos_id).any()):
        raise InputError(f"{purpose} needs every prompt to start with BOS (id {info.bos_id}); found first tokens "
                         f"{sorted(set(first.tolist()))[:5]}. Use sinklens.probe_tokens(model, ..., prepend_bos=True) "
                         "or tokenize(..., prepend_bos=True).")


def as_batch(model, tokens, attention_mask: Tensor | None = None) -> TokenBatch:
    """Validate user tokens (a TokenBatch, or ids with an optional mask) and return a TokenBatch.

    Checks: integer ids inside the vocabulary, at most the model's context, a 0/1 mask of the
    same shape whose real tokens form one contiguous, non-empty block per row.
    """
    prepend_bos = None
    if isinstance(tokens, TokenBatch):
        if attention_mask is None:
            attention_mask = tokens.attention_mask
        tokens, prepend_bos = tokens.tokens, tokens.prepend_bos
    if not isinstance(tokens, Tensor):
        hint = "use sinklens.tokenize(model, texts) for strings"
        if not isinstance(tokens, (str, bytes)) and isinstance(tokens, Sequence) and tokens:
            hint = ("token ids go in as a tensor: torch.tensor(ids) for one prompt or equal-length rows, "
                    "sinklens.core.tokens.pad_rows(model, rows, prepend_bos=...) for rows of different lengths; "
                    "use sinklens.tokenize(model, texts) for strings")
        raise InputError(f"tokens must be a torch.Tensor of token ids or a TokenBatch, got {type(tokens).__name__}: "
                         f"{hint}.")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise InputError(f"tokens must hold integer ids, got dtype {tokens.dtype}: use sinklens.tokenize or .long().")
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise InputError(f"tokens must be a non-empty [batch, pos] tensor, got shape {tuple(tokens.shape)}.")
    info = model_info(model)
    if tokens.shape[1] > info.n_ctx:
        raise InputError(f"Prompts have {tokens.shape[1]} tokens, longer than the model's context of {info.n_ctx}: "
                         "truncate them (tokenize(..., seq_len=N)).")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= info.d_vocab:
        raise InputError(f"Token ids must lie in [0, {info.d_vocab}), found {low}..{high}: were they made by another "
                         "tokenizer?")
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens)
    if attention_mask.shape != tokens.shape:
        raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} differs from tokens "
                         f"{tuple(tokens.shape)}.")
    mask = attention_mask.long()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError("attention_mask must hold only 0 and 1.")
    lengths = mask.sum(1)
    if bool((lengths == 0).any()):
        raise InputError(f"Rows {torch.nonzero(lengths == 0).flatten().tolist()} have no real token: drop them.")
    starts = mask.argmax(1)
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    contiguous = ((positions >= starts[:, None]) & (positions < (starts + lengths)[:, None])).long()
    if not torch.equal(contiguous, mask):
        raise InputError("Each row's real tokens must be one contiguous block (left or right padding only).")
    device = input_device(model)  # a TokenBatch on another device is moved, not refused
    return TokenBatch(tokens.to(device), mask.to(device), prepend_bos)


def token_strings(model, ids: Int[Tensor, " pos"] | Sequence[int]) -> list[str]:
    """One display string per token id, decoded one id at a time by the model's tokenizer.

    Args:
        model: a bridge (its tokenizer decodes).
        ids: token ids of one prompt.
    """
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    return [model.tokenizer.decode([int(i)]) for i in ids]
