"""StreamingLLM's evaluation (Xiao et al., ICLR 2024): next-token loss with a KV cache of the sink tokens and a recent
window, past the trained context.

The rule, read from mit-han-lab/streaming-llm (``examples/eval_long_ppl.py``, ``streaming_llm/kv_cache.py``
``StartRecentKVCache``, ``streaming_llm/pos_shift/modify_llama.py``): tokens go in one at a time; the step of token t
attends to the cache and to itself, its logits give the loss of token t + 1 (before any eviction), then the cache
(its keys and values, token t's included) is cut to its first ``sink`` entries and its last ``window`` entries
(``start_size``, ``recent_size``). So token t sees keys j < sink and t - window <= j <= t: ``window + 1`` keys besides
the sinks once the cache is full. With the position shift, keys are cached before rotary and every step rotates
them at their index in the cache (0 .. len - 1) and the query at the next index, min(t, sink + window): positions
never exceed the cache size, so a text of any length streams. Without it every key keeps its original position
(refused past the trained context).

Two engines give the same numbers (tests: <= 1e-4 on per-token losses):

- ``engine="loop"``: the reference, token by token with an explicit cache and eviction, as StreamingLLM's loop
  (each layer's Hugging Face attention module computes q/k/v; sinklens attends over its cache);
- ``engine="chunked"`` (default): one forward over the whole text, each layer's attention in blocks of query rows
  (:func:`sinklens.core.local_attention.sink_window_attention`) with the same key sets; with the position shift the
  sink part of query t's scores puts the query at min(t, sink + window) and sink key j at j, the window part keeps
  original distances (in the full cache, window key t - d sits d cache slots before the query, as in the text).
  RoPE makes scores depend on positions only through their difference, so this equals the loop. Memory is
  O(T x (block + window)) per layer, never T x T.

Rotary families only for the position shift; for learned absolute positions (GPT-2) only ``pos_shift=False``,
inside the trained context.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..core.edits import active_edits
from ..core.errors import InputError
from ..core.loading import input_device, model_info
from ..core.local_attention import DEFAULT_BLOCK, AttentionPlan, native_attention, rotary_of, sink_window_attention
from ..core.progress import progress
from ..core.tokens import TokenBatch
from ..prune.attention_window import check_sink_window

Engine = Literal["chunked", "loop"]
ENGINES = ("chunked", "loop")
DEFAULT_SINK = 4
DEFAULT_WINDOW = 1020  # cache of 1,024 tokens with 4 sinks
LOGIT_ROWS = 512  # positions per LM-head block (the [rows, vocab] logits alive at once)


@dataclass
class StreamingResult:
    """Per-token losses of a streaming evaluation.

    Attributes:
        losses: float64 [T - 1]: the loss (nats) of token t + 1 predicted at token t.
        sink, window, pos_shift, engine: the settings.
        seconds: wall time of the evaluation.
        meta: the model, text length, context and whether the cache was ever full.
    """

    losses: np.ndarray
    sink: int
    window: int
    pos_shift: bool
    engine: str
    seconds: float
    meta: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return (len(self.losses) + 1) / self.seconds if self.seconds > 0 else float("nan")

    def perplexity(self, start: int = 0) -> float:
        """exp(mean loss) over the predicted tokens from position ``start`` on."""
        return float(np.exp(self.losses[start:].mean()))

    def frame(self) -> pd.DataFrame:
        """One row per predicted token: ``position`` (of the predicting token t) and ``loss``."""
        return pd.DataFrame({"position": np.arange(len(self.losses)), "loss": self.losses})

    def as_dict(self) -> dict:
        return {"sink": self.sink, "window": self.window, "pos_shift": self.pos_shift, "engine": self.engine,
                "seconds": self.seconds, "tokens_per_second": self.tokens_per_second,
                "perplexity": self.perplexity(), **self.meta}


def text_ids(model, ids) -> Tensor:
    """A 1-D LongTensor of the text's ids (a TokenBatch row without padding, a tensor or a list)."""
    if isinstance(ids, TokenBatch):
        if ids.tokens.shape[0] != 1 or not bool(ids.attention_mask.bool().all()):
            raise InputError("streaming_perplexity takes one unpadded text: a TokenBatch of one row without padding.")
        ids = ids.tokens[0]
    if isinstance(ids, str):
        raise InputError("ids must be token ids (e.g. model.to_tokens(text)[0]), not a string.")
    ids = torch.as_tensor(ids)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1 or ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"ids must be a 1-D sequence of token ids, got shape {tuple(ids.shape)} {ids.dtype}.")
    if ids.numel() < 2:
        raise InputError(f"ids holds {ids.numel()} tokens: an empty text (at least 2 tokens: one prediction).")
    return ids.long()


def check_streaming(model, n_tokens: int, sink: int, window: int, pos_shift: bool, engine: str):
    """Check the settings against the model before any forward; returns the family's rotary (None without)."""
    sink, window = check_sink_window(sink, window)
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {ENGINES}, got {engine!r}.")
    if not isinstance(pos_shift, bool):
        raise InputError(f"pos_shift must be True or False, got {pos_shift!r}.")
    info = model_info(model)
    from ..core.qk import layout
    rotary = layout(model).rotary
    if pos_shift and rotary is None:
        raise InputError(f"pos_shift=True rotates cached keys at their cache positions, which needs rotary "
                         f"positions; {info.model_type!r} has learned absolute positions: use pos_shift=False "
                         f"(inside its {info.n_ctx}-token context).")
    if not pos_shift and n_tokens > info.n_ctx:
        raise InputError(f"The text has {n_tokens} tokens, past the model's {info.n_ctx}-token context: without the "
                         "position shift the keys keep their original positions there. Use pos_shift=True "
                         "(StreamingLLM's rule), or a shorter text.")
    if pos_shift and min(sink + window + 1, n_tokens) > info.n_ctx:
        raise InputError(f"sink + window + 1 = {sink + window + 1} cache positions exceed the model's {info.n_ctx}-"
                         "token context: use a smaller window.")
    if sink + window + 1 >= n_tokens:
        warnings.warn(f"streaming_perplexity: sink + window + 1 = {sink + window + 1} >= {n_tokens} tokens: the cache "
                      "never evicts, this is the dense model's loss.", UserWarning, stacklevel=3)
    if active_edits(model):
        raise InputError(f"streaming_perplexity runs the model's attention modules with its own cache: restore the "
                         f"active {active_edits(model)[0].kind} first.")
    return sink, window, (rotary_of(model) if rotary is not None else None)


def _sliding(sliding_window: int | None, window: int, width: int) -> bool:
    """Whether a layer's own sliding window (Gemma 2, Mistral, Qwen2) binds: it then replaces the streaming key set,
    which it lies inside (keys t - sliding_window < j <= t, at their original distances); refused when it is wider
    than the streaming window, where it would hide sink keys only part of the time."""
    if sliding_window is None or sliding_window >= width:
        return False
    if sliding_window > window + 1:
        raise InputError(f"A layer's sliding window of {sliding_window} keys is wider than the streaming window + 1 "
                         f"({window + 1}): use window >= {sliding_window - 1} for this model.")
    return True


class _ChunkedPlan(AttentionPlan):
    def __init__(self, sink, window, rotary, pos_shift, block):
        self.sink, self.window, self.rotary, self.pos_shift, self.block = sink, window, rotary, pos_shift, block

    def attend(self, layer, query, key, value, scaling, softcap, sliding_window):
        if _sliding(sliding_window, self.window, query.shape[2]):  # the layer's own window, original distances
            return sink_window_attention(query, key, value, sink=0, window=sliding_window, scaling=scaling,
                                         softcap=softcap, rotary=self.rotary, block=self.block)
        return sink_window_attention(query, key, value, sink=self.sink, window=self.window + 1, scaling=scaling,
                                     softcap=softcap, rotary=self.rotary, pos_shift=self.pos_shift, block=self.block)


class _LoopPlan(AttentionPlan):
    """StreamingLLM's cache: per layer the raw (unrotated when rotary) keys, values and original positions."""

    def __init__(self, sink, window, rotary, pos_shift):
        self.sink, self.window, self.rotary, self.pos_shift = sink, window, rotary, pos_shift
        self.cache: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self.t = 0

    def attend(self, layer, query, key, value, scaling, softcap, sliding_window):
        if layer in self.cache:
            k_c, v_c, p_c = self.cache[layer]
            keys, values = torch.cat([k_c, key], 2), torch.cat([v_c, value], 2)
            positions = torch.cat([p_c, torch.tensor([self.t])])
        else:
            keys, values, positions = key, value, torch.tensor([self.t])
        n = keys.shape[2]
        q, k, v = query, keys, values
        if _sliding(sliding_window, self.window, self.t + 1):  # the layer's own window at original distances
            near = positions > self.t - sliding_window
            k, v = keys[:, :, near], values[:, :, near]
            if self.rotary is not None:
                base = int(positions[near].min())
                k = self.rotary(k, positions[near] - base)
                q = self.rotary(query, torch.tensor([self.t - base]))
        elif self.rotary is not None:
            if self.pos_shift:  # keys at their cache slots, the query at the next one
                k = self.rotary(keys, torch.arange(n))
                q = self.rotary(query, torch.tensor([n - 1]))
            else:
                k = self.rotary(keys, positions)
                q = self.rotary(query, torch.tensor([self.t]))
        b, n_heads, _, d = q.shape
        n_kv = k.shape[1]
        group = n_heads // n_kv
        scores = torch.matmul(q.float().reshape(b, n_kv, group, d), k.float().transpose(-1, -2)) * scaling
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        out = torch.matmul(scores.softmax(-1), v.float()).reshape(b, n_heads, 1, d).to(query.dtype)
        if n > self.sink + self.window:  # StartRecentKVCache: first sink + last window entries
            keep = torch.cat([torch.arange(self.sink), torch.arange(n - self.window, n)])
            keys, values, positions = keys[:, :, keep], values[:, :, keep], positions[keep]
        self.cache[layer] = (keys, values, positions)
        return out


def _final_logits(model, hidden: Tensor) -> Tensor:
    """float32 logits of final hidden states [n, d] (LM head and the family's final softcap)."""
    hf = model.original_model
    logits = hf.get_output_embeddings()(hidden).float()
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _losses(model, hidden: Tensor, targets: Tensor) -> Tensor:
    out = torch.empty(len(targets), dtype=torch.float64)
    for s in range(0, len(targets), LOGIT_ROWS):
        logits = _final_logits(model, hidden[s:s + LOGIT_ROWS])
        out[s:s + LOGIT_ROWS] = torch.nn.functional.cross_entropy(
            logits, targets[s:s + LOGIT_ROWS].to(logits.device), reduction="none").double().cpu()
    return out


def streaming_perplexity(model, ids, *, sink: int = DEFAULT_SINK, window: int = DEFAULT_WINDOW, pos_shift: bool = True,
                         engine: Engine = "chunked", block: int = DEFAULT_BLOCK,
                         show_progress: bool = False) -> StreamingResult:
    """Per-token losses of ``ids`` streamed through a KV cache of ``sink`` first tokens and ``window`` recent ones.

    Args:
        model: a bridge from :func:`sinklens.load_model` (no active edit).
        ids: one text's token ids (1-D tensor or list, or an unpadded one-row TokenBatch); BOS as you want it.
        sink: first tokens kept in the cache (StreamingLLM: 4; 0 is window attention).
        window: recent tokens kept (StreamingLLM's ``recent_size``); token t attends to the sinks and to tokens
            t - window .. t.
        pos_shift: rotate keys at their cache positions (StreamingLLM), needed past the trained context; rotary
            families only. False keeps the original positions (refused past the context).
        engine: ``"chunked"`` (blocks of queries, default) or ``"loop"`` (token by token, the reference).
        block: query rows per block of the chunked engine.
        show_progress: progress bar of the loop engine.
    """
    ids = text_ids(model, ids)
    sink, window, rotary = check_streaming(model, len(ids), sink, window, pos_shift, engine)
    hf = model.original_model
    base = hf.base_model
    device = input_device(model)
    n = len(ids)
    start = time.perf_counter()
    if engine == "chunked":
        plan = _ChunkedPlan(sink, window, rotary, pos_shift, block)
        positions = torch.zeros(1, n, dtype=torch.long) if rotary is not None else torch.arange(n)[None]
        with native_attention(model, plan), torch.inference_mode():
            hidden = base(input_ids=ids[None].to(device), position_ids=positions.to(device),
                          use_cache=False).last_hidden_state[0, :-1]
            losses = _losses(model, hidden, ids[1:])
    else:
        plan = _LoopPlan(sink, window, rotary, pos_shift)
        losses = torch.empty(n - 1, dtype=torch.float64)
        with native_attention(model, plan), torch.inference_mode():
            for t in progress(range(n - 1), desc="streaming (loop)", total=n - 1, enabled=show_progress):
                plan.t = t
                position = 0 if rotary is not None else t
                hidden = base(input_ids=ids[t:t + 1][None].to(device),
                              position_ids=torch.tensor([[position]], device=device),
                              use_cache=False).last_hidden_state[0]
                losses[t] = _losses(model, hidden, ids[t + 1:t + 2])[0]
    seconds = time.perf_counter() - start
    info = model_info(model)
    meta = {"model": info.name, "n_tokens": n, "n_ctx": info.n_ctx, "past_context": n > info.n_ctx,
            "evicts": n > sink + window + 1}
    return StreamingResult(losses.numpy(), sink, window, pos_shift, engine, seconds, meta)


__all__ = ["DEFAULT_SINK", "DEFAULT_WINDOW", "ENGINES", "StreamingResult", "streaming_perplexity", "text_ids"]
