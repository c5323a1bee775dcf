"""Massive activations (ELMF) of the first token, in two bases.

- ``"resid"``: the residual stream entering the layer (``blocks.L.hook_resid_pre``);
- ``"normalized"``: the attention input, i.e. what q_proj / k_proj multiply (``blocks.L.attn.k.hook_in``,
  from the family's :class:`~sinklens.core.qk.QKLayout`): the input norm's output with its gain (RMSNorm in
  Llama-likes, x * (1 + w) in Gemma 2, LayerNorm with bias in GPT-2 / GPT-NeoX); in OLMo 2, which
  normalises after attention, it is the residual stream itself. This is the default basis for choosing
  pruning dims.

Sun et al. (2024) call a scalar massive when its magnitude is > 100 and about >= 1000 x the
median magnitude of its hidden state (all real tokens and dims of that prompt at that layer).
Everything is reduced in float32: squares of values in the tens of thousands overflow fp16.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.choices import BASES, Basis
from ..core.deprecation import keyword_only_after
from ..core.errors import InputError
from ..core.hooks import batches, relative_index, resid_pre_hook, run_hooked
from ..core.loading import model_info
from ..core.qk import layout
from ..core.tokens import as_batch, require_bos
from ..core.validate import check_choice, check_index, check_int, check_k, check_layers


@dataclass
class MassiveActivations:
    """First-token statistics per basis, prompt and layer (``layers[i]`` is slot i)."""

    first: Float[Tensor, "basis batch layer d_model"]  # the first real token's vector
    median_abs: Float[Tensor, "basis batch layer"]  # median |x| over the prompt's hidden state
    other_max_abs: Float[Tensor, "basis batch layer"]  # largest |x| over the other tokens
    first_norm: Float[Tensor, "basis batch layer"]
    other_norm: Float[Tensor, "basis batch layer"]  # mean L2 norm of the other tokens
    layers: list[int]
    prepend_bos: bool | None

    def values(self, basis: Basis = "normalized") -> Float[Tensor, "batch layer d_model"]:
        """The first token's vector of every prompt and measured layer.

        Args:
            basis: ``"normalized"`` (attention input) or ``"resid"`` (residual stream entering the layer).
        """
        return self.first[_basis_index(basis)]

    def slot(self, layer: int) -> int:
        """The index of model layer ``layer`` along the layer axis of the tensors (``layers.index(layer)``).

        Args:
            layer: a measured model layer.
        """
        if layer not in self.layers:
            raise InputError(f"Layer {layer} was not measured (measured: {self.layers}).")
        return self.layers.index(layer)

    def layer_values(self, layer: int, basis: Basis = "normalized") -> Float[Tensor, "batch d_model"]:
        """The first token's vector of every prompt at model layer ``layer``.

        Args:
            layer: a measured model layer.
            basis: ``"normalized"`` or ``"resid"``.
        """
        return self.values(basis)[:, self.slot(layer)]

    def top_dims(self, layer: int, k: int, basis: Basis = "normalized") -> Int[Tensor, " k"]:
        """The k dims of largest mean |x| over prompts, largest first.

        Args:
            layer: a measured model layer.
            k: how many dims.
            basis: ``"normalized"`` or ``"resid"``.
        """
        values = self.layer_values(layer, basis)
        k = check_k(k, values.shape[-1])
        return values.abs().mean(0).topk(k).indices

    def norm_share(self, k: int, basis: Basis = "normalized") -> Float[Tensor, " layer"]:
        """Share of the first token's squared norm held by the aggregate top-k dims, mean over prompts.

        Args:
            k: how many dims.
            basis: ``"normalized"`` or ``"resid"``.
        """
        values = self.values(basis)
        k = check_k(k, values.shape[-1])
        squares = values.double().square()
        top = values.abs().mean(0).topk(k, dim=-1).indices  # [layer, k]
        held = squares.gather(2, top.unsqueeze(0).expand(values.shape[0], -1, -1)).sum(-1)
        return (held / squares.sum(-1)).mean(0).float()

    def rank_stability(self, k: int, basis: Basis = "normalized") -> Float[Tensor, " layer"]:
        """Mean Jaccard overlap between each prompt's own top-k dims and the aggregate top-k.

        Args:
            k: how many dims.
            basis: ``"normalized"`` or ``"resid"``.
        """
        values = self.values(basis).abs()
        k = check_k(k, values.shape[-1])
        d = values.shape[-1]
        own = torch.zeros_like(values, dtype=torch.bool).scatter_(2, values.topk(k, dim=-1).indices, True)
        agg = torch.zeros((values.shape[1], d), dtype=torch.bool, device=values.device)
        agg.scatter_(1, values.mean(0).topk(k, -1).indices, True)
        inter = (own & agg).sum(-1).float()
        union = (own | agg).sum(-1).float()
        return (inter / union).mean(0)

    def massive_dims(self, basis: Basis = "resid", *, min_abs: float = 100.0, min_ratio: float = 1000.0,
                     min_fraction: float = 0.5) -> pd.DataFrame:
        """Dims meeting the Sun et al. criterion on at least ``min_fraction`` of prompts, per layer.

        Columns: layer, dim, fraction (of prompts meeting it), mean_value (signed), mean_ratio
        (|x| / median |x|).

        Args:
            basis: ``"resid"`` (Sun et al.'s hidden states) or ``"normalized"``.
            min_abs: the smallest magnitude that counts as massive.
            min_ratio: the smallest ratio to the median magnitude of the hidden state.
            min_fraction: the share of prompts on which a dim must meet both.
        """
        values = self.values(basis)
        median = self.median_abs[_basis_index(basis)]
        ratio = values.abs() / median.unsqueeze(-1)
        meets = (values.abs() > min_abs) & (ratio >= min_ratio)
        fraction = meets.float().mean(0)  # [layer, d]
        rows = []
        for slot, dim in torch.nonzero(fraction >= min_fraction).tolist():
            rows.append({"layer": self.layers[slot], "dim": dim, "fraction": float(fraction[slot, dim]),
                         "mean_value": float(values[:, slot, dim].mean()),
                         "mean_ratio": float(ratio[:, slot, dim].mean())})
        return pd.DataFrame(rows, columns=["layer", "dim", "fraction", "mean_value", "mean_ratio"])

    def top_values(self, n: int = 3, basis: Basis = "resid") -> pd.DataFrame:
        """Per layer: the n largest mean |x| of the first token, the median |x| and the largest
        |x| of the other tokens (a Sun et al. style profile).

        Args:
            n: how many of the largest dims per layer.
            basis: ``"resid"`` or ``"normalized"``.
        """
        i = _basis_index(basis)
        mags = self.first[i].abs().mean(0)  # [layer, d]
        top = mags.topk(n, dim=-1)
        rows = []
        for slot, layer in enumerate(self.layers):
            row = {"layer": layer, "median_abs": float(self.median_abs[i, :, slot].mean()),
                   "other_max_abs": float(self.other_max_abs[i, :, slot].mean())}
            for rank in range(n):
                row[f"top{rank + 1}_dim"] = int(top.indices[slot, rank])
                row[f"top{rank + 1}_abs"] = float(top.values[slot, rank])
            rows.append(row)
        return pd.DataFrame(rows)

    def norms(self, basis: Basis = "resid") -> pd.DataFrame:
        """Per layer: mean L2 norm of the first token and of the other tokens.

        Args:
            basis: ``"resid"`` or ``"normalized"``.
        """
        i = _basis_index(basis)
        return pd.DataFrame({"layer": self.layers, "first_norm": self.first_norm[i].mean(0).numpy(),
                             "other_norm": self.other_norm[i].mean(0).numpy()})


def _basis_index(basis: Basis) -> int:
    return BASES.index(check_choice("basis", basis, BASES))


@keyword_only_after("tokens", since="0.2", formerly=("attention_mask",))
def massive_activations(model, tokens, *, attention_mask: Int[Tensor, "batch pos"] | None = None,
                        layers: Sequence[int] | None = None, batch_size: int = 8,
                        show_progress: bool = True) -> MassiveActivations:
    """Measure the first real token's vectors (both bases) and hidden-state statistics per layer.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        tokens: token ids [batch, pos] or a TokenBatch (sinklens.tokenize for strings).
        attention_mask: 0/1 mask of real tokens (None: every token is real, or the TokenBatch's own).
        layers: the layers to measure (None: all); only layers up to the last are run.
        batch_size: prompts per forward.
        show_progress: show a progress bar.
    """
    info = model_info(model)
    layers = check_layers(layers, info.n_layers)
    batch_size = check_int("batch_size", batch_size, minimum=1, meaning="prompts per forward")
    batch = as_batch(model, tokens, attention_mask)
    n = batch.tokens.shape[0]
    shape = (len(BASES), n, len(layers))
    first = torch.empty(shape + (info.d_model,), device="cpu")
    names = ("median_abs", "other_max_abs", "first_norm", "other_norm")
    stats = {name: torch.empty(shape, device="cpu") for name in names}
    for offset, sub in batches(batch, batch_size, desc="massive activations", show_progress=show_progress):
        rows = slice(offset, offset + sub.tokens.shape[0])
        collected: dict[tuple[int, int], dict[str, Tensor]] = {}
        hooks = []
        for slot, layer in enumerate(layers):
            for b, name in enumerate((resid_pre_hook(layer), layout(model).hooks(layer).input)):
                hooks.append((name, _collector(collected, (b, slot), sub.attention_mask)))
        run_hooked(model, sub, hooks, layers)
        for (b, slot), out in collected.items():
            first[b, rows, slot] = out.pop("first")
            for name, value in out.items():
                stats[name][b, rows, slot] = value
    return MassiveActivations(first=first, layers=layers, prepend_bos=batch.prepend_bos, **stats)


def _collector(store: dict, key: tuple[int, int], mask: Tensor):
    def collect(x: Tensor, hook) -> None:
        x = x.float()
        absolute, valid, lengths = relative_index(mask.to(x.device))  # the layer's device under a device_map
        first = x.gather(1, absolute[:, :1, None].expand(-1, 1, x.shape[-1])).squeeze(1)
        real = mask.to(x.device).bool()
        others = real.clone()
        others.scatter_(1, absolute[:, :1], False)
        magnitude = x.abs()
        median = magnitude.masked_fill(~real[..., None], float("nan")).flatten(1).nanmedian(1).values
        other_max = magnitude.masked_fill(~others[..., None], 0).flatten(1).amax(1)
        norms = x.norm(dim=-1)
        other_norm = (norms * others).sum(1) / others.sum(1).clamp(min=1)
        store[key] = {"first": first.cpu(), "median_abs": median.cpu(), "other_max_abs": other_max.cpu(),
                      "first_norm": first.norm(dim=-1).cpu(), "other_norm": other_norm.cpu()}
    return collect


@keyword_only_after("k", since="0.2", formerly=("basis",))
def bos_top_dims(model, tokens, layer: int, k: int, *, basis: Basis = "normalized",
                 attention_mask: Int[Tensor, "batch pos"] | None = None) -> Int[Tensor, " k"]:
    """The k dims where the first token's vector at ``layer`` is largest (mean |x| over prompts).

    Only layers up to ``layer`` are run. Every prompt must start with BOS (refused otherwise: the first
    token of a prompt without BOS is a text token, whose dims are not BOS dims).

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        tokens: BOS-prepended token ids or a TokenBatch (sinklens.tokenize for strings).
        layer: the layer whose input is measured.
        k: how many dims.
        basis: ``"normalized"`` (attention input) or ``"resid"``.
        attention_mask: 0/1 mask of real tokens (None: all real).
    """
    info = model_info(model)
    layer = check_index("layer", layer, info.n_layers, "layers")
    k = check_k(k, info.d_model)
    _basis_index(basis)
    batch = as_batch(model, tokens, attention_mask)
    require_bos(model, batch, "bos_top_dims")
    stats = massive_activations(model, batch, layers=[layer], show_progress=False)
    return stats.top_dims(layer, k, basis)
