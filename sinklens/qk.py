"""The Q/K maths of an attention head, in one place: live weights, projection, rotary, scaling, masks.

Pruning, reconstruction and the checkpoint writer all compute or edit a head's queries and keys; they do
it through this module, so that the maths exists once. What depends on the model family (where the
q/k/o weights live, which hook carries the attention input, how rotary is applied, what the
checkpoint calls a tensor) sits in a :class:`QKLayout`; :func:`layout` picks the model's. A family
with another projection layout (fused qkv, Conv1D, partial rotary, q/k norms) is added by writing its
layout and registering it in ``LAYOUTS``; nothing else changes.

The Llama layout (``llama``, ``mistral``), in the HF convention:
- query head h reads rows ``h*d_head:(h+1)*d_head`` of ``q_proj.weight`` [n_heads*d_head, d_model];
  KV head g = h // group_size rows ``g*d_head:(g+1)*d_head`` of ``k_proj.weight``; head h writes
  columns ``h*d_head:(h+1)*d_head`` of ``o_proj.weight``;
- the attention input (what q_proj/k_proj multiply) is the input RMSNorm's output, seen at
  ``blocks.L.attn.k.hook_in``;
- rotary is rotate-half over the whole head width, with the model's own cos/sin (``hook_cos``/``hook_sin``);
- scores are ``q . k * scaling`` (the HF module's ``scaling``, else d_head^-0.5); masked entries of
  ``hook_attn_scores`` hold the dtype's minimum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .errors import InputError, UnsupportedArchitectureError
from .loading import ModelInfo, model_info

Projection = Literal["q", "k", "v", "o"]


class LayerWeights(NamedTuple):
    """The live (not copied) Q, K and O weights of one layer, in the HF layout [out, in]."""

    q: Float[Tensor, "q_rows d_model"]
    k: Float[Tensor, "k_rows d_model"]
    o: Float[Tensor, "d_model o_cols"]


class AttentionHooks(NamedTuple):
    """Hook names of one layer's attention that the Q/K maths reads or rewrites."""

    input: str  # the attention input, what the q/k projections multiply [batch, pos, d_model]
    cos: str  # rotary tables [batch or 1, pos, d_head]
    sin: str
    rot_q: str  # rotated queries [batch, pos, n_heads, d_head]
    rot_k: str  # rotated keys [batch, pos, n_kv_heads, d_head]
    v: str  # values [batch, pos, n_kv_heads, d_head]
    scores: str  # scaled, masked scores [batch, n_heads, query, key]
    q_out: str | None = None  # the q projection's output (a mean-fill bias is added here)
    k_out: str | None = None  # the k projection's output [batch, pos, n_kv_heads * d_head]


def rotate(x: Float[Tensor, "batch head pos d_head"], cos: Float[Tensor, "batch_or_1 pos d_head"],
           sin: Float[Tensor, "batch_or_1 pos d_head"]) -> Float[Tensor, "batch head pos d_head"]:
    """Llama rotary embedding (rotate-half over the whole head width).

    Args:
        x: queries or keys, one row block per head.
        cos, sin: the model's rotary tables for these positions (``hook_cos`` / ``hook_sin``).
    """
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass(frozen=True)
class QKLayout:
    """Where a model family keeps a layer's Q/K/O weights and how its attention turns the input into scores.

    The default methods describe the Llama layout; a family with another layout subclasses this and
    overrides what differs (e.g. a fused qkv weight answers :meth:`weights` with views of its blocks).
    """

    name: str
    rotary: Callable[[Tensor, Tensor, Tensor], Tensor] = rotate

    def weights(self, model, layer: int) -> LayerWeights:
        """The live q/k/o weights of ``layer`` (edits made on them show up in the next forward).

        Args:
            model: a bridge from :func:`sinklens.load_model`.
            layer: the layer index.
        """
        attn = model.blocks[layer].attn
        return LayerWeights(attn.q.original_component.weight, attn.k.original_component.weight,
                            attn.o.original_component.weight)

    def bias(self, model, layer: int, which: Projection) -> Tensor | None:
        """The live bias of projection ``which`` of ``layer``, or None when it has none.

        Args:
            model: a bridge from :func:`sinklens.load_model`.
            layer: the layer index.
            which: the projection.
        """
        return getattr(getattr(model.blocks[layer].attn, which).original_component, "bias", None)

    def hooks(self, layer: int) -> AttentionHooks:
        """The hook names of ``layer``'s attention (see :class:`AttentionHooks`).

        Args:
            layer: the layer index.
        """
        p = f"blocks.{layer}.attn."
        return AttentionHooks(input=p + "k.hook_in", cos=p + "hook_cos", sin=p + "hook_sin", rot_q=p + "hook_rot_q",
                              rot_k=p + "hook_rot_k", v=p + "hook_v", scores=p + "hook_attn_scores",
                              q_out=p + "q.hook_out", k_out=p + "k.hook_out")

    def checkpoint_key(self, layer: int, which: Projection, part: Literal["weight", "bias"] = "weight") -> str:
        """The standard HF state-dict name of a projection's weight (or bias) of ``layer``.

        Args:
            layer: the layer index.
            which: the projection.
            part: ``"weight"`` or ``"bias"``.
        """
        return f"model.layers.{layer}.self_attn.{which}_proj.{part}"

    def rotate(self, x: Float[Tensor, "batch head pos d_head"], cos: Tensor, sin: Tensor
               ) -> Float[Tensor, "batch head pos d_head"]:
        """This family's rotary embedding of per-head queries or keys (see :func:`rotate`).

        Args:
            x: queries or keys, one row block per head.
            cos, sin: the model's rotary tables for these positions.
        """
        return self.rotary(x, cos, sin)


LLAMA = QKLayout("llama")
LAYOUTS: dict[str, QKLayout] = {"llama": LLAMA, "mistral": LLAMA}


def layout(model) -> QKLayout:
    """The :class:`QKLayout` of ``model``'s family (by its HF ``model_type``).

    Args:
        model: a bridge from :func:`sinklens.load_model`.
    """
    model_type = model_info(model).model_type
    if model_type not in LAYOUTS:
        raise UnsupportedArchitectureError(f"No Q/K layout for model_type {model_type!r}: the Q/K maths supports "
                                           f"{sorted(LAYOUTS)}.")
    return LAYOUTS[model_type]


def check_editable(model) -> None:
    """Refuse a model whose weights are not the raw HF ones QK column pruning is defined on.

    Args:
        model: the model about to be edited or measured against an edit.
    """
    if getattr(model, "compatibility_mode", False):
        raise InputError("The model is in compatibility mode (RMSNorm gains folded into W_Q/W_K): QK column pruning "
                         "is defined on the raw HF weights. Load it with sinklens.load_model and do not call "
                         "enable_compatibility_mode().")
    if getattr(model, "original_model", None) is None or not hasattr(model, "blocks"):
        raise InputError(f"Expected a TransformerBridge from sinklens.load_model, got {type(model).__name__}.")
    layout(model)


def weights(model, layer: int) -> LayerWeights:
    """The live q/k/o weights of ``layer`` in the model's layout (see :meth:`QKLayout.weights`).

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        layer: the layer index.
    """
    return layout(model).weights(model, layer)


def bias(model, layer: int, which: Projection) -> Tensor | None:
    """The live bias of projection ``which`` (``"q"``, ``"k"``, ``"v"`` or ``"o"``) of ``layer``, or None.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        layer: the layer index.
        which: the projection.
    """
    return layout(model).bias(model, layer, which)


def head_rows(info: ModelInfo, index: int) -> slice:
    """Rows of head ``index`` in a per-head stacked weight: query head ``index`` in q, KV head ``index`` in k or v.

    Args:
        info: the model's :class:`~sinklens.loading.ModelInfo`.
        index: the head (query head for q, KV head for k and v).
    """
    return slice(index * info.d_head, (index + 1) * info.d_head)


def kv_rows(info: ModelInfo, head: int) -> slice:
    """Rows of the KV head that query head ``head`` reads, in the k (or v) weight.

    Args:
        info: the model's :class:`~sinklens.loading.ModelInfo`.
        head: the query head.
    """
    return head_rows(info, head // info.group_size)


def attention_scaling(model, info: ModelInfo, layer: int) -> float:
    """The factor ``layer``'s attention multiplies q . k by (the HF module's ``scaling``, else d_head^-0.5).

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        info: its :class:`~sinklens.loading.ModelInfo`.
        layer: the layer index.
    """
    return float(getattr(model.blocks[layer].attn.original_component, "scaling", info.d_head ** -0.5))


def project(x: Float[Tensor, "batch pos d_model"], weight: Float[Tensor, "head d_head d_kept"],
            index: Int[Tensor, "head d_kept"], bias: Float[Tensor, "head d_head"] | None = None
            ) -> Float[Tensor, "batch head pos d_head"]:
    """Per-head projections of the attention input reading only the kept input dims:
    ``x[..., S_h] @ W_h[:, S_h].T (+ b_h)``.

    Args:
        x: the attention input.
        weight: per head, the weight columns of its kept dims.
        index: per head, the kept dims (entries past a head's own count must weigh zero in ``weight``).
        bias: per-head bias rows, or None.
    """
    out = torch.einsum("bpnk,nek->bnpe", x[:, :, index], weight)
    return out if bias is None else out + bias[None, :, None, :]


def masked_like(scores: Float[Tensor, "*batch query key"]) -> Bool[Tensor, "*batch query key"]:
    """Entries the model masked (set to the dtype's minimum, or -inf) in ``hook_attn_scores``.

    Args:
        scores: scores as the model's ``hook_attn_scores`` holds them (any leading dims).
    """
    return scores <= torch.finfo(scores.dtype).min / 2


def drop_mask(keep: Int[Tensor, " k"], d_model: int, device: torch.device | str) -> Bool[Tensor, " d_model"]:
    """The input dims a pruning zeroes: True everywhere but on ``keep`` (broadcasts over a head's rows).

    Args:
        keep: the kept input dims.
        d_model: the width of the attention input.
        device: where the mask is made (the weight's device).
    """
    mask = torch.ones(d_model, dtype=torch.bool, device=device)
    mask[keep.to(device)] = False
    return mask


__all__ = ["AttentionHooks", "LAYOUTS", "LLAMA", "LayerWeights", "Projection", "QKLayout", "attention_scaling", "bias",
           "check_editable", "drop_mask", "head_rows", "kv_rows", "layout", "masked_like", "project", "rotate",
           "weights"]
