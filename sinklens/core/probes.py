"""A probe set of real English text that is available offline.

Source: the documentation topics that ship with CPython in ``pydoc_data.topics`` (the text of
the Python Language Reference used by ``help()``; PSF License). The topics are joined in sorted
key order with blank lines, tokenized once, and cut into consecutive, non-overlapping chunks.
The first half of the token stream feeds the probe split, the second half the held-out split,
so evaluation text never overlaps the prompts used to find heads and dimensions.
"""

from __future__ import annotations

import hashlib
import platform
import warnings
from functools import lru_cache
from pydoc_data.topics import topics
from typing import Literal, get_args

import torch

from .errors import InputError
from .tokens import TokenBatch, pad_rows
from .validate import check_choice, check_int

ProbeSplit = Literal["probe", "held_out"]
SPLITS: tuple[str, ...] = get_args(ProbeSplit)


def _probe_text() -> str:
    """The full source text (deterministic for a given Python version)."""
    return "\n\n".join(topics[key] for key in sorted(topics))


def probe_provenance() -> dict:
    """Where the probe text comes from (source, Python version, length, sha256), to store with results."""
    text = _probe_text()
    return {
        "source": "pydoc_data.topics (CPython documentation topics, PSF License)",
        "python": platform.python_version(),
        "chars": len(text),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "join": "topics in sorted key order, separated by blank lines",
    }


@lru_cache(maxsize=4)
def _stream(tokenizer) -> tuple[int, ...]:
    return tuple(tokenizer(_probe_text(), add_special_tokens=False)["input_ids"])


def probe_tokens(model, n_prompts: int = 128, seq_len: int = 64, *, prepend_bos: bool = True,
                 split: ProbeSplit = "probe") -> TokenBatch:
    """``n_prompts`` prompts of real text, each ``seq_len - 1`` text tokens, BOS prepended if asked.

    The text chunks do not depend on ``prepend_bos``: with BOS a prompt has ``seq_len`` tokens,
    without it the same text has ``seq_len - 1``. That makes with/without-BOS runs comparable.

    Args:
        model: the bridge (its tokenizer cuts the text).
        n_prompts: number of prompts.
        seq_len: tokens per prompt, counting the BOS (>= 2).
        prepend_bos: start each prompt with BOS.
        split: ``"probe"`` (the first half of the text, for finding heads and dims) or ``"held_out"``
            (the second half, for evaluation).
    """
    if split == "heldout":
        warnings.warn('probe_tokens(split="heldout") is deprecated: use split="held_out" (the same prompts).',
                      DeprecationWarning, stacklevel=2)
        split = "held_out"
    check_choice("split", split, SPLITS)
    n_prompts = check_int("n_prompts", n_prompts, minimum=1)
    seq_len = check_int("seq_len", seq_len, minimum=2, meaning="it counts the BOS")
    if not isinstance(prepend_bos, bool):
        raise InputError(f"prepend_bos must be True or False, got {prepend_bos!r}.")
    stream = _stream(model.tokenizer)
    half = len(stream) // 2
    chunk = seq_len - 1
    available = half // chunk
    if n_prompts > available:
        raise InputError(f"The {split} split holds {available} prompts of {seq_len} tokens; asked for {n_prompts}. "
                         "Use fewer or shorter prompts, or pass your own texts to sinklens.tokenize.")
    start = 0 if split == "probe" else half
    rows = [stream[start + i * chunk: start + (i + 1) * chunk] for i in range(n_prompts)]
    if prepend_bos:
        bos = model.tokenizer.bos_token_id
        if bos is None:
            raise InputError("This tokenizer has no BOS token: call with prepend_bos=False.")
        rows = [(bos, *row) for row in rows]
    return pad_rows(model, rows, prepend_bos=prepend_bos)


def probe_stream(model, n_tokens: int, *, split: ProbeSplit = "held_out", prepend_bos: bool = True):
    """One long text of ``n_tokens`` consecutive probe tokens (BOS first if asked) as a 1-D LongTensor, with no
    context check: the text that streams past a model's trained context (:func:`sinklens.streaming_perplexity`).

    It starts where the split starts, so its first tokens are those of ``probe_tokens(model, 1, ..., split=split)``.
    The text is never repeated: a length past what the split holds is refused.

    Args:
        model: the bridge (its tokenizer cuts the text).
        n_tokens: tokens of the text, BOS included (>= 2).
        split: ``"probe"`` or ``"held_out"`` (as :func:`probe_tokens`).
        prepend_bos: start with BOS.
    """
    check_choice("split", split, SPLITS)
    n_tokens = check_int("n_tokens", n_tokens, minimum=2)
    if not isinstance(prepend_bos, bool):
        raise InputError(f"prepend_bos must be True or False, got {prepend_bos!r}.")
    stream = _stream(model.tokenizer)
    half = len(stream) // 2
    wanted = n_tokens - int(prepend_bos)
    if wanted > half:
        raise InputError(f"The {split} split holds {half} tokens of text; asked for {wanted}. The probe text is not "
                         "repeated: use a shorter text, or pass your own ids to streaming_perplexity.")
    start = 0 if split == "probe" else half
    ids = list(stream[start:start + wanted])
    if prepend_bos:
        bos = model.tokenizer.bos_token_id
        if bos is None:
            raise InputError("This tokenizer has no BOS token: call with prepend_bos=False.")
        ids = [bos, *ids]
    return torch.tensor(ids, dtype=torch.long)
