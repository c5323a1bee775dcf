"""The Q/K maths of an attention head, in one place: live weights, projection, rotary, scaling, masks.

Pruning, reconstruction and the checkpoint writer all compute or edit a head's queries and keys; they do
it through this module, so that the maths exists once. What depends on the model family (where the
q/k/o weights live, which hook carries the attention input, how rotary is applied, what the
checkpoint calls a tensor) sits in a :class:`QKLayout`; :func:`layout` picks the model's. A family
with another projection layout (fused qkv, Conv1D, partial rotary, q/k norms) is added by writing its
layout and registering it in ``LAYOUTS``; nothing else changes. docs/families.md describes every family
in RESEARCH.md's terms (attention input, columns zeroed, biases, q/k norms, softcaps) and what was checked.

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


def rotate(x: Float[Tensor, "batch head pos d_head"], cos: Float[Tensor, "batch_or_1 pos d_rot"],
           sin: Float[Tensor, "batch_or_1 pos d_rot"]) -> Float[Tensor, "batch head pos d_head"]:
    """Rotary embedding, rotate-half over the first ``d_rot`` dims of each head (all of them in Llama; a
    fraction in partial-rotary families), the rest passed through, as HF's ``apply_rotary_pos_emb``.

    Args:
        x: queries or keys, one row block per head.
        cos, sin: the model's rotary tables for these positions (``hook_cos`` / ``hook_sin``); their width is the
            number of rotated dims.
    """
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    width = cos.shape[-1]
    part, rest = x[..., :width], x[..., width:]
    half = width // 2
    rotated = torch.cat((-part[..., half:], part[..., :half]), dim=-1)
    out = part * cos + rotated * sin
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


@dataclass(frozen=True)
class QKLayout:
    """Where a model family keeps a layer's Q/K/O weights and how its attention turns the input into scores.

    The bridge gives every family the same view: ``blocks.L.attn.q`` / ``.k`` / ``.o`` hold nn.Linear-style
    weights [out, in] (for fused families, the bridge's split of the fused weight) and ``attn.k.hook_in`` sees
    the attention input. What differs is described by the fields.

    Args:
        name: the family name.
        rotary: the rotary embedding of per-head queries or keys (None: no rotary, e.g. learned positions).
        o_conv1d: the output projection is a Conv1D ([in, out], GPT-2's c_proj): :meth:`weights` returns its
            transpose (a view, so edits reach the model).
        fused_qkv: how the checkpoint stores q/k/v: None (separate q_proj/k_proj/v_proj), ``"stacked"``
            (Phi-3 qkv_proj rows [q; k; v]), ``"conv1d"`` (GPT-2 c_attn [d_model, 3 d_model]) or ``"per_head"``
            (GPT-NeoX query_key_value rows [q_0; k_0; v_0; q_1; ...]).
        split_is_view: the bridge's split q/k/v weights share storage with the fused checkpoint tensor (edits
            reach it); when False, :meth:`checkpoint_tensors` rebuilds the fused tensor from the split ones.
        qk_norm: a norm on q and k after the projection: None, ``"per_head"`` (Qwen3, over d_head) or
            ``"full_width"`` (OLMo 2, over all heads together).
        softcap: the scores are soft-capped (Gemma 2: tanh(s / c) * c); the config's value is read by
            :meth:`score_cap`.
        private_k_copies: ``gqa="exact"`` on part of a KV group (private pruned K copies recomputed in a hook)
            is supported: the hook's maths (projection, bias, rotary, scaling) is the family's whole key path.
    """

    name: str
    rotary: Callable[[Tensor, Tensor, Tensor], Tensor] | None = rotate
    o_conv1d: bool = False
    fused_qkv: Literal["stacked", "conv1d", "per_head"] | None = None
    split_is_view: bool = True
    qk_norm: Literal["per_head", "full_width"] | None = None
    softcap: bool = False
    private_k_copies: bool = True

    def weights(self, model, layer: int) -> LayerWeights:
        """The live q/k/o weights of ``layer`` in the [out, in] layout (edits made on them show up in the next
        forward).

        Args:
            model: a bridge from :func:`sinklens.load_model`.
            layer: the layer index.
        """
        attn = model.blocks[layer].attn
        o = attn.o.original_component.weight
        return LayerWeights(attn.q.original_component.weight, attn.k.original_component.weight,
                            o.T if self.o_conv1d else o)

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
        """The standard HF state-dict name of a projection's weight (or bias) of ``layer`` (separate q/k/v
        projections only: fused families have no per-projection tensor).

        Args:
            layer: the layer index.
            which: the projection.
            part: ``"weight"`` or ``"bias"``.
        """
        if self.fused_qkv is not None:
            raise UnsupportedArchitectureError(f"{self.name} stores q/k/v fused: there is no separate {which} tensor.")
        return f"model.layers.{layer}.self_attn.{which}_proj.{part}"

    def checkpoint_tensors(self, model, layer: int) -> dict[str, Tensor]:
        """Checkpoint tensors of ``layer`` that must be rebuilt from the bridge's live weights (the fused q/k/v
        of a family whose split is a copy); empty when the checkpoint tensors are the live ones.

        Args:
            model: a bridge from :func:`sinklens.load_model`.
            layer: the layer index.
        """
        if self.split_is_view:
            return {}
        if self.fused_qkv != "per_head":
            raise UnsupportedArchitectureError(f"No checkpoint writer for {self.name}'s fused layout.")
        attn = model.blocks[layer].attn
        n_heads = model.cfg.n_heads
        out = {}
        for part in ("weight", "bias"):
            blocks = [getattr(getattr(attn, p).original_component, part, None) for p in ("q", "k", "v")]
            if any(b is None for b in blocks):
                continue
            per_head = [b.detach().reshape(n_heads, -1, *b.shape[1:]) for b in blocks]  # [h, d_head, ...]
            fused = torch.stack(per_head, dim=1).reshape(-1, *blocks[0].shape[1:])  # rows q_h, k_h, v_h per head
            out[f"gpt_neox.layers.{layer}.attention.query_key_value.{part}"] = fused.clone()
        return out

    def rotate(self, x: Float[Tensor, "batch head pos d_head"], cos: Tensor, sin: Tensor
               ) -> Float[Tensor, "batch head pos d_head"]:
        """This family's rotary embedding of per-head queries or keys (see :func:`rotate`).

        Args:
            x: queries or keys, one row block per head.
            cos, sin: the model's rotary tables for these positions.
        """
        if self.rotary is None:
            raise UnsupportedArchitectureError(f"{self.name} has no rotary embedding.")
        return self.rotary(x, cos, sin)

    def check_plan(self, plan) -> None:
        """Refuse a pruning this family's structure does not define exactly (before anything is edited).

        - ``qk_norm="full_width"`` (OLMo 2): q and k are normalised over all heads together, so zeroing one
          head's columns rescales every other head's queries and keys; only whole layers can be pruned.
        - private K copies (``gqa="exact"`` on part of a KV group) where the copy hook cannot reproduce the
          family's key path (q/k norms, softcaps, fused projections without rotated-query hooks).

        Args:
            plan: a :class:`~sinklens.prune.pruning.PruningPlan` about to be returned by ``plan_pruning``.
        """
        if self.qk_norm == "full_width":
            n_heads = plan.info.n_heads
            for layer in plan.spec.layers():
                chosen = sorted(h for l, h in plan.heads if l == layer)
                if len(chosen) != n_heads:
                    raise InputError(
                        f"{self.name} normalises q and k over the full width of all {n_heads} heads of a layer, so "
                        f"zeroing the columns of heads {chosen} of layer {layer} would rescale the queries and keys "
                        "of every other head too: per-head QK column pruning is not defined there. Prune every head "
                        f"of the layer (heads={[(layer, h) for h in range(n_heads)]}).")
        if plan.k_copies and not self.private_k_copies:
            heads = sorted(plan.k_copies)
            raise InputError(
                f'gqa="exact" on part of a KV group gives heads {heads} private pruned K copies, which sinklens '
                f"recomputes with the Llama key path; {self.name} ({self.describe()}) has another one, so the copy "
                'would be approximate. Select whole KV groups with the same dims, or use gqa="shared" or "q_only".')

    def describe(self) -> str:
        """A few words on what sets this family's key path apart."""
        parts = [f"fused qkv ({self.fused_qkv})" if self.fused_qkv else None,
                 f"{self.qk_norm} q/k norm" if self.qk_norm else None, "soft-capped scores" if self.softcap else None,
                 "no rotary" if self.rotary is None else None]
        return ", ".join(p for p in parts if p) or "Llama key path"


LLAMA = QKLayout("llama")
LAYOUTS: dict[str, QKLayout] = {
    "llama": LLAMA,
    "mistral": QKLayout("mistral"),
    "qwen2": QKLayout("qwen2"),  # q/k/v biases: read by bias(), never pruned
    "qwen3": QKLayout("qwen3", qk_norm="per_head", private_k_copies=False),
    "gemma2": QKLayout("gemma2", softcap=True, private_k_copies=False),
    "phi3": QKLayout("phi3", fused_qkv="stacked", private_k_copies=False),
    "olmo2": QKLayout("olmo2", qk_norm="full_width", private_k_copies=False),
    "gpt2": QKLayout("gpt2", rotary=None, o_conv1d=True, fused_qkv="conv1d", private_k_copies=False),
    "gpt_neox": QKLayout("gpt_neox", fused_qkv="per_head", split_is_view=False, private_k_copies=False),
}


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
        info: the model's :class:`~sinklens.core.loading.ModelInfo`.
        index: the head (query head for q, KV head for k and v).
    """
    return slice(index * info.d_head, (index + 1) * info.d_head)


def kv_rows(info: ModelInfo, head: int) -> slice:
    """Rows of the KV head that query head ``head`` reads, in the k (or v) weight.

    Args:
        info: the model's :class:`~sinklens.core.loading.ModelInfo`.
        head: the query head.
    """
    return head_rows(info, head // info.group_size)


def attention_scaling(model, info: ModelInfo, layer: int) -> float:
    """The factor ``layer``'s attention multiplies q . k by (the HF module's ``scaling``, else d_head^-0.5).

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        info: its :class:`~sinklens.core.loading.ModelInfo`.
        layer: the layer index.
    """
    return float(getattr(model.blocks[layer].attn.original_component, "scaling", info.d_head ** -0.5))


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
           "check_editable", "drop_mask", "head_rows", "kv_rows", "layout", "masked_like", "rotate",
           "weights"]
