"""Sink + window attention without a T x T tensor, and the bridge run through its Hugging Face attention modules with
an attention function of sinklens' (the engine of :mod:`sinklens.prune.attention_window` and
:mod:`sinklens.assess.streaming`).

Sink + window attention (StreamingLLM, Xiao et al. 2024): query t sees the keys j < ``sink`` and the keys
t - ``window`` < j <= t (``window`` keys, the query's own included), nothing else. :func:`sink_window_attention`
computes it over blocks of query rows: a block [s, e) reads the ``sink`` first keys and keys s - window + 1 .. e - 1,
so at most [batch, head, block, sink + block + window] scores are alive. Rotary may be applied inside, at positions
the caller chooses per part (``rotary=``): the window part at positions relative to the block (RoPE scores depend on
q and k positions only through their difference, so the result equals rotation at the original positions, without
the float32 rounding of angles at positions of tens of thousands), the sink part with the query at its StreamingLLM
cache position (``pos_shift``, see :func:`sinklens.assess.streaming.streaming_perplexity`).

:func:`native_attention` runs every decoder layer's Hugging Face attention module (projections, q/k norms, rotary:
the family's code) with :func:`_dispatch` as ``config._attn_implementation``: the active :class:`AttentionPlan` gets
each layer's q, k, v. The bridge's own step-by-step attention (hook_attn_scores, hook_pattern) does not run inside
(no [T, T] tensor); residual-stream hooks still fire. Inputs must be unpadded (causality is the plan's).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .errors import InputError, UnsupportedArchitectureError

ATTENTION_NAME = "sinklens_native"
DEFAULT_BLOCK = 256

Rotary = Callable[[Tensor, Tensor], Tensor]  # (x [b, h, n, d] unrotated, positions [n]) -> x rotated there


def sink_window_attention(query: Float[Tensor, "batch head q d"], key: Float[Tensor, "batch kv_head k d"],
                          value: Float[Tensor, "batch kv_head k d"], *, sink: int, window: int, scaling: float,
                          softcap: float | None = None, rotary: Rotary | None = None, pos_shift: bool = False,
                          block: int = DEFAULT_BLOCK) -> Float[Tensor, "batch head q d"]:
    """Causal attention where query t sees keys j < ``sink`` and t - ``window`` < j <= t (query t is key t).

    Args:
        query, key, value: one unpadded sequence block per batch row (as many queries as keys); GQA keys/values
            not expanded (query head h reads KV head h // group).
        sink: first keys every query sees (0: a plain sliding window).
        window: keys up to and including the query's own (>= 1).
        scaling: the score scale.
        softcap: soft-cap the scores (tanh(s / c) * c), as Gemma 2.
        rotary: None when q and k are already rotated; else the family's rotary, applied here: window part at
            positions relative to the block's first key, sink part with sink key j at j and query t at t (or at
            min(t, sink + window - 1) with ``pos_shift``).
        pos_shift: StreamingLLM's position shift of the sink part (needs ``rotary``).
        block: query rows per block.
    Returns:
        The attention output [batch, head, q, d] (query's dtype); scores and softmax in float32.
    """
    b, n_heads, width, d = query.shape
    n_kv = key.shape[1]
    group = n_heads // n_kv
    if pos_shift and rotary is None:
        raise InputError("pos_shift needs the rotary to apply (rotary=).")
    out = torch.empty_like(query)
    dev = query.device
    n_sink = min(sink, width)
    for s in range(0, width, block):
        e = min(width, s + block)
        lo = max(0, s - window + 1)
        rows = torch.arange(s, e, device=dev)
        q = query[:, :, s:e]
        k_w, v_w = key[:, :, lo:e], value[:, :, lo:e]
        cols = torch.arange(lo, e, device=dev)
        if rotary is not None:
            q_w, k_w = rotary(q, rows - lo), rotary(k_w, cols - lo)
        else:
            q_w = q
        allowed_w = (cols[None, :] <= rows[:, None]) & (cols[None, :] > rows[:, None] - window)
        parts = [(q_w, k_w, v_w, allowed_w & (cols[None, :] >= n_sink))]
        if n_sink:
            sink_cols = torch.arange(n_sink, device=dev)
            k_s, v_s = key[:, :, :n_sink], value[:, :, :n_sink]
            if rotary is not None:
                q_pos = rows.clamp(max=sink + window - 1) if pos_shift else rows
                q_s, k_s = rotary(q, q_pos), rotary(k_s, sink_cols)
            else:
                q_s = q
            parts.insert(0, (q_s, k_s, v_s, sink_cols[None, :] <= rows[:, None]))
        scores, values, allowed = [], [], []
        for q_p, k_p, v_p, a_p in parts:
            qg = q_p.float().reshape(b, n_kv, group * (e - s), d)
            sc = torch.matmul(qg, k_p.float().transpose(-1, -2)).mul_(scaling).view(b, n_kv, group, e - s, -1)
            if softcap:
                sc = torch.tanh(sc / softcap) * softcap
            scores.append(sc)
            values.append(v_p)
            allowed.append(a_p)
        sc = torch.cat(scores, -1).masked_fill_(~torch.cat(allowed, -1), float("-inf"))
        weights = sc.softmax(-1)
        v_all = torch.cat(values, 2).float()  # [b, n_kv, keys, d]
        o = torch.matmul(weights.view(b, n_kv, group * (e - s), -1), v_all)
        out[:, :, s:e] = o.view(b, n_heads, e - s, d).to(out.dtype)
    return out


def dense_attention(query: Tensor, key: Tensor, value: Tensor, scaling: float, softcap: float | None,
                    sliding_window: int | None) -> Tensor:
    """Plain causal attention of an unpadded sequence (SDPA; the blocked kernel under a softcap or sliding window)."""
    if softcap or (sliding_window is not None and sliding_window < query.shape[2]):
        window = sliding_window if sliding_window is not None else query.shape[2]
        return sink_window_attention(query, key, value, sink=0, window=window, scaling=scaling, softcap=softcap)
    group = query.shape[1] // key.shape[1]
    if group > 1:
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)


class AttentionPlan:
    """What the attention of each layer does inside :func:`native_attention` (subclasses: the restriction's fused
    forward, the streaming engines). ``attend`` returns [batch, head, q, d]."""

    def attend(self, layer: int, query: Tensor, key: Tensor, value: Tensor, scaling: float,
               softcap: float | None, sliding_window: int | None) -> Tensor:
        raise NotImplementedError


_PLAN: contextvars.ContextVar[AttentionPlan | None] = contextvars.ContextVar("sinklens_native_plan", default=None)


def _dispatch(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, dropout: float = 0.0,
              scaling: float | None = None, softcap: float | None = None, sliding_window: int | None = None,
              **kwargs):
    """The attention function registered as ``ATTENTION_NAME`` (HF AttentionInterface signature)."""
    plan = _PLAN.get()
    if plan is None:
        raise InputError(f"{ATTENTION_NAME} attention ran outside sinklens.core.local_attention.native_attention.")
    if dropout:
        raise InputError("sinklens' native attention runs in eval mode: call model.eval() first.")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = plan.attend(module.layer_idx, query, key, value, scaling, softcap, sliding_window)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    """The mask function of ``ATTENTION_NAME``: none (the plan applies causality; inputs are unpadded)."""
    return None


AttentionInterface.register(ATTENTION_NAME, _dispatch)
AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


def _attention_slots(model) -> list[tuple[torch.nn.Module, str, torch.nn.Module, torch.nn.Module]]:
    """For each layer: (HF decoder layer, attribute name of its attention, the bridge's attention, the HF module)."""
    slots = []
    config = model.original_model.config
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        native = getattr(attn, "original_component", None)
        layer = getattr(block, "original_component", None)
        name = next((n for n, m in (layer._modules.items() if layer is not None else []) if m is attn), None)
        if native is None or name is None:
            raise UnsupportedArchitectureError(f"Layer {i}'s attention is not a bridge over a Hugging Face attention "
                                               "module: sinklens cannot run it with its own attention function.")
        if getattr(native, "layer_idx", None) != i or getattr(native, "config", config) is not config:
            raise UnsupportedArchitectureError(f"Layer {i}'s attention ({type(native).__name__}) does not dispatch "
                                               "through config._attn_implementation with a layer_idx.")
        slots.append((layer, name, attn, native))
    return slots


@contextlib.contextmanager
def native_attention(model, plan: AttentionPlan) -> Iterator[None]:
    """Inside, every forward of the bridge runs each layer's HF attention module with ``plan``; restored on exit.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        plan: what each layer's attention computes.
    """
    config = model.original_model.config
    if getattr(config, "attn_logit_softcapping", None) and not hasattr(model.blocks[0].attn.original_component,
                                                                      "attn_logit_softcapping"):
        raise UnsupportedArchitectureError("Soft-capped scores that the attention module does not pass on.")
    slots = _attention_slots(model)
    previous = config._attn_implementation
    token = _PLAN.set(plan)
    try:
        for layer, name, _, native in slots:
            layer._modules[name] = native
        config._attn_implementation = ATTENTION_NAME
        yield
    finally:
        config._attn_implementation = previous
        for layer, name, attn, _ in slots:
            layer._modules[name] = attn
        _PLAN.reset(token)


def rotary_of(model) -> Rotary | None:
    """The family's rotary as a function of (unrotated x [b, h, n, d], positions [n]), or None without rotary.

    Built from the model's own rotary embedding module (its cos/sin, frequency scaling included) and the family's
    rotate (partial rotary included); a rotary whose position 0 is not the identity (an attention scaling) is
    refused, since the streaming engines feed the model position 0 and rotate inside.
    """
    from .qk import layout

    hf = model.original_model
    fam = layout(model)
    if fam.rotary is None:
        return None
    emb = getattr(hf.base_model, "rotary_emb", None)
    if emb is None:
        raise UnsupportedArchitectureError(f"{fam.name}: no rotary_emb module on the base model.")
    probe = torch.zeros(1, 1, 1, dtype=torch.float32, device=next(hf.parameters()).device)
    cos0, sin0 = emb(probe, torch.zeros(1, 1, dtype=torch.long, device=probe.device))
    if not (bool((cos0 == 1).all()) and bool((sin0 == 0).all())):
        raise UnsupportedArchitectureError(f"{fam.name}: the rotary at position 0 is not the identity (attention "
                                           "scaling of the rope type); the streaming engines cannot re-rotate it.")

    def rotate(x: Tensor, positions: Tensor) -> Tensor:
        cos, sin = emb(x, positions[None].to(x.device))
        return fam.rotate(x, cos, sin)

    return rotate


__all__ = ["ATTENTION_NAME", "AttentionPlan", "DEFAULT_BLOCK", "dense_attention", "native_attention", "rotary_of",
           "sink_window_attention"]
