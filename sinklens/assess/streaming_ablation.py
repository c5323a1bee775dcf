"""StreamingLLM's model-level ablations (Xiao et al., ICLR 2024, Tables 1-2) as one table: streamed loss of one text
for a grid of sink counts, windows and kept initial tokens.

- sink count: ``sinks=(0, 1, 2, 4, 8)`` at a fixed ``window`` (0 sinks is window attention); with ``cache_size``
  the window is ``cache_size - sink`` instead, StreamingLLM's layout of Table 2 (``0 + 1024``, ``1 + 1023``, ...);
- window sweep: ``windows=(...)`` at a fixed sink count;
- initial tokens (Table 1's ``4 "\\n" + 1020``): ``initial="newline"`` replaces the text's first token (its BOS) by
  ``n_newlines`` (default 4) newline tokens of the model's tokenizer, so the kept first tokens (``sink`` = 4) are
  newlines and the text is otherwise the same; ``"bos"`` streams the text as given (BOS first).

Every row is :func:`sinklens.streaming_perplexity` of its setting; the losses compared are those of the same text
tokens in every row (the text's tokens after its first; under ``"newline"`` they sit ``n_newlines - 1`` positions
later), averaged over all of them (``loss``) and over those predicted at text positions >= ``start`` (``loss_from``;
default the largest ``sink + window + 1`` of the grid, so every row has evicted from its cache there).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from ..core.errors import InputError
from ..core.validate import check_int
from .streaming import DEFAULT_WINDOW, streaming_perplexity, text_ids

INITIAL = ("bos", "newline")
N_NEWLINES = 4


def newline_id(model) -> int:
    """The id of the model tokenizer's token for ``"\\n"``; an InputError when ``"\\n"`` is not one token."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InputError("initial='newline' needs the model's tokenizer (model.tokenizer is None).")
    ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise InputError(f"initial='newline': this tokenizer cuts '\\n' into {len(ids)} tokens {ids}; the ablation "
                         "needs a single newline token.")
    return int(ids[0])


def _ints(name: str, values, minimum: int) -> list[int]:
    if isinstance(values, (int, np.integer)):
        values = [values]
    if not isinstance(values, Sequence) or isinstance(values, str) or not values:
        raise InputError(f"{name} must be a non-empty list of ints >= {minimum}, got {values!r}.")
    return list(dict.fromkeys(check_int(f"each entry of {name}", v, minimum=minimum) for v in values))


def streaming_ablation(model, ids, *, sinks: Sequence[int] = (0, 1, 2, 4, 8),
                       windows: Sequence[int] = (DEFAULT_WINDOW,), cache_size: int | None = None,
                       initial: Sequence[str] = ("bos",), n_newlines: int = N_NEWLINES, pos_shift: bool = True,
                       start: int | None = None, engine: str = "chunked") -> pd.DataFrame:
    """Streamed loss of one text for every (initial tokens, sink count, window) of the grid.

    Args:
        model: a bridge from :func:`sinklens.load_model` (no active edit).
        ids: one text's token ids, BOS first (1-D, or an unpadded one-row TokenBatch).
        sinks: sink counts (>= 0; 0 is window attention).
        windows: recent tokens kept (>= 1, StreamingLLM's ``recent_size``); ignored with ``cache_size``.
        cache_size: when set, each row's window is ``cache_size - sink`` (a fixed cache, as StreamingLLM's Table 2).
        initial: ``"bos"`` (the text as given) and/or ``"newline"`` (its first token replaced by ``n_newlines``
            newline tokens: the kept initial tokens carry no BOS).
        n_newlines: newline tokens of ``"newline"`` (>= 1).
        pos_shift: StreamingLLM's position shift (rotary families; False refuses texts past the context).
        start: first text position whose prediction enters ``loss_from`` (default: the grid's largest
            ``sink + window + 1``).
        engine: ``"chunked"`` or ``"loop"`` (:func:`sinklens.streaming_perplexity`).
    Returns:
        One row per setting: ``initial``, ``sink``, ``window``, ``cache`` (sink + window), ``n_tokens`` (streamed),
        ``loss`` and ``ppl`` over the text's tokens, ``loss_from`` and ``ppl_from`` over those from ``start``,
        ``start``, ``tokens_per_second``.
    """
    ids = text_ids(model, ids)
    sinks = _ints("sinks", sinks, 0)
    if cache_size is not None:
        cache_size = check_int("cache_size", cache_size, minimum=max(sinks) + 1,
                               meaning="sink + window of every row, so at least the largest sink + 1")
        pairs = [(s, cache_size - s) for s in sinks]
    else:
        pairs = list(itertools.product(sinks, _ints("windows", windows, 1)))
    initial = list(dict.fromkeys([initial] if isinstance(initial, str) else initial))
    if not initial or any(i not in INITIAL for i in initial):
        raise InputError(f"initial must be a non-empty list drawn from {INITIAL}, got {initial!r}.")
    n_newlines = check_int("n_newlines", n_newlines, minimum=1)
    n = len(ids)
    if start is None:
        start = min(max(s + w + 1 for s, w in pairs), n - 2)
    start = check_int("start", start, minimum=0)
    if start > n - 2:
        raise InputError(f"start={start} leaves no prediction in a text of {n} tokens: use start <= {n - 2}.")
    texts = {"bos": (ids, 0)}
    if "newline" in initial:
        newline = torch.full((n_newlines,), newline_id(model), dtype=ids.dtype)
        texts["newline"] = (torch.cat([newline, ids[1:]]), n_newlines - 1)  # text token j sits at j + offset
    rows = []
    for kind in initial:
        tokens, offset = texts[kind]
        for sink, window in pairs:
            result = streaming_perplexity(model, tokens, sink=sink, window=window, pos_shift=pos_shift,
                                          engine=engine)
            text_losses = result.losses[offset:]  # predictions of the text's tokens 1 .. n - 1
            rows.append({"initial": kind, "sink": sink, "window": window, "cache": sink + window,
                         "n_tokens": len(tokens), "pos_shift": pos_shift, "loss": float(text_losses.mean()),
                         "ppl": float(np.exp(text_losses.mean())), "start": start,
                         "loss_from": float(text_losses[start:].mean()),
                         "ppl_from": float(np.exp(text_losses[start:].mean())),
                         "tokens_per_second": result.tokens_per_second})
    return pd.DataFrame(rows)


__all__ = ["INITIAL", "N_NEWLINES", "newline_id", "streaming_ablation"]
