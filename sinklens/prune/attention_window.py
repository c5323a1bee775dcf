"""Sink + window attention of chosen heads (StreamingLLM's KV cache, per head) as a reversible edit.

A restricted head attends only to the first ``sink`` keys and the last ``window`` keys up to and including the
query: with a KV cache that is the cache such a head needs (``sink + window`` keys, whatever the text length).
``window`` counts the query's own key, so ``window=1`` is a head that sees the sinks and itself.
:func:`sinklens.streaming_perplexity`'s ``window`` is StreamingLLM's ``recent_size`` (cached keys before the query),
so streaming with ``window=W`` without position shift equals this edit with ``window=W + 1`` on every head.

Units: query heads ``heads=[(layer, head), ...]`` or KV heads ``kv_heads=[(layer, kv_head), ...]`` (every query
head of the group). On GQA the KV head is what a cache stores, so only a whole restricted group saves memory: a
partial group (some of its query heads restricted) changes those heads' attention but the group's keys and values
must still be cached in full for the others. ``handle.kv_heads`` lists the whole groups (the memory saved),
``handle.partial_groups`` the others.

Where it runs:
- every forward through the bridge's attention (plain calls, hooked runs, :func:`sinklens.evaluate`, KV-cached
  steps): a permanent hook on ``blocks.L.attn.hook_attn_scores`` sets the scores of keys outside the sinks and the
  window to the dtype's minimum, as the model's own mask does. Keys are counted among those the model lets the
  query see (the first ``sink`` visible keys and the last ``window``), so padding, packed blocks and a KV cache
  keep the meaning "the sequence's first keys and the query's most recent ones";
- the long-context path without a T x T tensor: :func:`fused_restriction` runs each layer's Hugging Face attention
  module with SDPA for the other heads and blocked sink + window attention for the restricted ones
  (:mod:`sinklens.core.local_attention`); unpadded inputs. The census' sdpa engine refuses to run under it.

Positions are the original ones: a restricted head's query t and key j keep the distance t - j the model was
trained with, so the edit is a faithful model only inside the trained context (StreamingLLM's position shift,
for streaming past it, is :func:`sinklens.streaming_perplexity`'s).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..core.edits import Edit, active_edits, applied, heads_text
from ..core.errors import InputError
from ..core.loading import model_info
from ..core.local_attention import AttentionPlan, dense_attention, native_attention, sink_window_attention
from ..core.qk import LAYOUTS, masked_like
from ..core.validate import check_index, check_int
from .spec import Head, check_heads, head_pairs

DEFAULT_SINK = 4
DEFAULT_WINDOW = 256


def check_sink_window(sink: int, window: int) -> tuple[int, int]:
    """``sink`` >= 0 and ``window`` >= 1 as ints; an InputError naming the bad one otherwise."""
    sink = check_int("sink", sink, minimum=0, meaning="first keys every query keeps")
    window = check_int("window", window, minimum=1, meaning="recent keys, the query's own included")
    return sink, window


def window_keep(visible: Tensor, sink: int, window: int) -> Tensor:
    """Which visible keys a restricted query keeps: the first ``sink`` and the last ``window`` it sees.

    Args:
        visible: bool [..., query, key], True where the model lets the query see the key.
        sink, window: as in :func:`apply_attention_restriction`.
    """
    count = visible.to(torch.int32)
    from_start = count.cumsum(-1)
    from_end = count.flip(-1).cumsum(-1).flip(-1)
    return visible & ((from_start <= sink) | (from_end <= window))


def group_heads(model, groups: Sequence[tuple[int, int]]) -> list[Head]:
    """The query heads of KV groups ``groups`` (``(layer, kv head)`` pairs), sorted: on GQA the unit a KV cache stores.

    Args:
        model: the bridge (its group size).
        groups: ``(layer, kv head)`` pairs.
    """
    g = model_info(model).group_size
    return sorted((l, kv * g + i) for l, kv in groups for i in range(g))


def resolve_heads(model, heads, kv_heads) -> tuple[list[Head], list[Head], list[Head]]:
    """``(query heads, whole KV groups, partial KV groups)`` of a restriction; every head when both are None.

    Args:
        model: the bridge.
        heads: ``(layer, query head)`` pairs, ``"all"`` or None.
        kv_heads: ``(layer, kv head)`` pairs or None (not with ``heads``).
    """
    info = model_info(model)
    g = info.group_size
    if heads is not None and kv_heads is not None:
        raise InputError("Pass heads= (query heads) or kv_heads= (KV groups), not both.")
    if kv_heads is not None:
        pairs = head_pairs(kv_heads)
        for layer, kv in pairs:
            check_index("layer", layer, info.n_layers, "layers")
            check_index("kv_head", kv, info.n_kv_heads, "KV heads per layer")
        query = group_heads(model, pairs)
    elif heads is None or (isinstance(heads, str) and heads == "all"):
        query = [(l, h) for l in range(info.n_layers) for h in range(info.n_heads)]
    else:
        if isinstance(heads, str):
            raise InputError(f"heads must be (layer, head) pairs or 'all', got {heads!r}.")
        query = check_heads(heads, info)
    if not query:
        raise InputError("No heads to restrict: pass (layer, head) pairs, kv_heads, or 'all'.")
    chosen = set(query)
    groups = sorted({(l, h // g) for l, h in query})
    whole = [(l, kv) for l, kv in groups if all((l, kv * g + i) in chosen for i in range(g))]
    partial = [p for p in groups if p not in whole]
    return query, whole, partial


class _LayerWindow:
    """The hook of one layer: scores of the restricted heads outside sinks + window set to the dtype's minimum."""

    def __init__(self, layer: int, heads: list[int], sink: int, window: int):
        self.layer, self.heads, self.sink, self.window = layer, heads, sink, window

    def scores(self, scores: Tensor, hook) -> Tensor:
        if self.sink + self.window >= scores.shape[-1]:
            warnings.warn(f"restrict_attention: sink + window = {self.sink + self.window} >= {scores.shape[-1]} keys: "
                          "nothing is restricted in this forward.", UserWarning, stacklevel=2)
            return scores
        index = torch.tensor(self.heads, device=scores.device)
        chosen = scores.index_select(1, index)
        visible = ~masked_like(chosen)
        drop = visible & ~window_keep(visible, self.sink, self.window)
        out = scores.clone()
        out[:, index] = chosen.masked_fill(drop, torch.finfo(scores.dtype).min)
        return out


class AttentionWindowHandle(Edit):
    """An applied sink + window restriction (see :func:`apply_attention_restriction`). ``restore()`` undoes it."""

    kind = "attention window"
    applied_by = "sinklens.apply_attention_restriction(...)"
    scoped_call = "sinklens.restrict_attention(model, heads)"
    eager_pattern = True  # read by the census: the sdpa engine is refused under it

    def __init__(self, model, heads=None, kv_heads=None, sink: int = DEFAULT_SINK, window: int = DEFAULT_WINDOW):
        sink, window = check_sink_window(sink, window)
        if getattr(model, "original_model", None) is None or not hasattr(model, "blocks"):
            raise InputError(f"model: restrict_attention edits a TransformerBridge from sinklens.load_model, got "
                             f"{type(model).__name__}.")
        info = model_info(model)
        if info.model_type not in LAYOUTS:
            raise InputError(f"model: restrict_attention runs at hook_attn_scores of the families {sorted(LAYOUTS)}; "
                             f"{info.model_type!r} is not one of them.")
        query, whole, partial = resolve_heads(model, heads, kv_heads)
        super().__init__(model, {("pattern", l, h) for l, h in query})
        self.info, self.heads, self.kv_heads, self.partial_groups = info, query, whole, partial
        self.sink, self.window = sink, window
        self.layers: dict[int, _LayerWindow] = {}
        try:
            for layer in sorted({l for l, _ in query}):
                step = _LayerWindow(layer, [h for l, h in query if l == layer], sink, window)
                self.layers[layer] = step
                self.hook(f"blocks.{layer}.attn.hook_attn_scores", step.scores)
        except Exception:
            self.restore()
            raise
        self.register()

    def as_dict(self) -> dict:
        """JSON-ready description: heads, whole and partial KV groups, sink and window."""
        return {"kind": "attention_window", "heads": [list(p) for p in self.heads],
                "kv_heads": [list(p) for p in self.kv_heads], "partial_groups": [list(p) for p in self.partial_groups],
                "sink": self.sink, "window": self.window}

    def __repr__(self) -> str:
        return (f"AttentionWindowHandle({heads_text(self.heads)}, sink={self.sink}, window={self.window}, "
                f"kv_heads={len(self.kv_heads)}, partial_groups={len(self.partial_groups)}, "
                f"{'active' if self.active else 'restored'})")


def window_edits(model) -> list[AttentionWindowHandle]:
    """The active attention-window restrictions of ``model``, oldest first."""
    return [e for e in active_edits(model) if isinstance(e, AttentionWindowHandle)]


def apply_attention_restriction(model, heads=None, *, kv_heads=None, sink: int = DEFAULT_SINK,
                                window: int = DEFAULT_WINDOW) -> AttentionWindowHandle:
    """Restrict ``heads`` to sink + window attention from now on; ``handle.restore()`` undoes it.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        heads: ``(layer, query head)`` pairs, or None / ``"all"`` for every head.
        kv_heads: ``(layer, kv head)`` pairs instead of ``heads``: every query head of each group (on GQA the unit a
            KV cache stores; a partial group saves no cache, see the module's docstring).
        sink: first keys every restricted query keeps (>= 0; StreamingLLM: 4).
        window: recent keys kept, the query's own included (>= 1).
    """
    return AttentionWindowHandle(model, heads, kv_heads, sink, window)


@contextmanager
def restrict_attention(model, heads=None, *, kv_heads=None, sink: int = DEFAULT_SINK,
                       window: int = DEFAULT_WINDOW) -> Iterator[AttentionWindowHandle]:
    """Context manager: inside it ``heads`` attend to sink + window only; restored on exit.

    Args:
        model, heads, kv_heads, sink, window: as in :func:`apply_attention_restriction`.
    """
    with applied(apply_attention_restriction, model, heads, kv_heads=kv_heads, sink=sink, window=window) as handle:
        yield handle


@dataclass(frozen=True)
class WindowOptions:
    """Sink + window restriction as a head edit of a :class:`~sinklens.assess.sweep.Sweep` (configurations
    ``("window", heads, split)``; for a KV head on GQA, ``heads`` are every query head of its group), checked on
    creation.

    Args:
        sink, window: as in :func:`apply_attention_restriction`.
    """

    method: ClassVar[str] = "window"
    sink: int = DEFAULT_SINK
    window: int = DEFAULT_WINDOW

    def __post_init__(self):
        sink, window = check_sink_window(self.sink, self.window)
        object.__setattr__(self, "sink", sink)
        object.__setattr__(self, "window", window)

    def apply(self, model, heads: Sequence[Head]) -> AttentionWindowHandle:
        """Restrict ``heads`` of ``model`` (persistent; ``restore()`` undoes it)."""
        return apply_attention_restriction(model, heads, sink=self.sink, window=self.window)

    def as_dict(self) -> dict:
        """The settings, JSON-ready (part of a sweep configuration's key)."""
        return {"sink": self.sink, "window": self.window}


class RestrictedPlan(AttentionPlan):
    """The fused forward's attention under the active restrictions: SDPA for the other heads, blocked sink + window
    attention for the restricted ones (original positions)."""

    def __init__(self, model):
        self.by_layer: dict[int, list[tuple[Tensor, int, int]]] = {}
        for edit in window_edits(model):
            for layer, step in edit.layers.items():
                self.by_layer.setdefault(layer, []).append((torch.tensor(step.heads), step.sink, step.window))

    def attend(self, layer, query, key, value, scaling, softcap, sliding_window):
        parts = self.by_layer.get(layer, [])
        n_heads, group = query.shape[1], query.shape[1] // key.shape[1]
        restricted = torch.zeros(n_heads, dtype=torch.bool)
        for heads, _, _ in parts:
            restricted[heads] = True
        if not parts:
            return dense_attention(query, key, value, scaling, softcap, sliding_window)
        out = torch.empty_like(query)
        others = (~restricted).nonzero()[:, 0]
        if len(others):
            kv = (others // group).to(key.device)
            out[:, others] = dense_attention(query[:, others], key[:, kv], value[:, kv], scaling, softcap,
                                             sliding_window)
        for heads, sink, window in parts:
            kv = (heads // group).to(key.device)
            if sliding_window is not None and sliding_window < query.shape[2]:
                raise InputError(f"Layer {layer} has a sliding window of {sliding_window} keys: which keys are its "
                                 "first visible ones changes with the query, and the fused restriction does not "
                                 "compute that; run the eager path (a plain forward) for this model.")
            out[:, heads] = sink_window_attention(query[:, heads], key[:, kv], value[:, kv], sink=sink, window=window,
                                                  scaling=scaling, softcap=softcap)
        return out


@contextmanager
def fused_restriction(model) -> Iterator[None]:
    """Inside, forwards of ``model`` (unpadded inputs) run its HF attention modules with the active restrictions
    computed blockwise (no T x T tensor) and SDPA for the other heads; without a restriction, a dense SDPA forward.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
    """
    with native_attention(model, RestrictedPlan(model)):
        yield


__all__ = ["AttentionWindowHandle", "DEFAULT_SINK", "DEFAULT_WINDOW", "RestrictedPlan", "WindowOptions",
           "apply_attention_restriction", "check_sink_window", "fused_restriction", "group_heads", "resolve_heads",
           "restrict_attention", "window_edits", "window_keep"]
