"""Massive activations on every token, not only the first (Sun et al. 2024 over the whole sequence).

Sun et al. call a scalar of a hidden state massive when |x| > 100 and |x| >= 1000 x the median |x| of
that hidden state (all real tokens and dims of the prompt at that layer; the lower median, as in
:mod:`sinklens.measure.massive`). Here the hidden state is the residual stream entering each layer
(``blocks.L.hook_resid_pre``, the "resid" basis of :mod:`sinklens.measure.massive`), and every real position
is examined: each layer's hook keeps, per prompt, the median |x| and, per position, the ``top_n``
dims of largest |x| with their signed values, so what is kept is O(T x top_n) per layer. A
(position, dim) pair passes when it meets both thresholds; it can only be missed when a position has
more than ``top_n`` passing dims, and such positions are counted (``saturated``: raise ``top_n``).
The forward runs with fused attention (:func:`sinklens.measure.lse_census.fused_attention`), so long prompts
never build T x T patterns.

Which tokens carry them (:meth:`MassiveTokens.carriers`): "BOS" (the BOS id at relative position 0),
"first position" (another token at position 0), "newline" (a token containing "\\n"), "period"
(a token that is "." after stripping spaces) and "other".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.deprecation import keyword_only_after
from ..core.errors import InputError
from ..core.hooks import batches, relative_index, resid_pre_hook, run_hooked
from ..core.loading import model_info
from ..core.tokens import as_batch, token_strings
from ..core.validate import as_int, check_frame, check_layers
from .lse_census import fused_attention

KINDS = ("BOS", "first position", "newline", "period", "other")


@dataclass
class MassiveTokens:
    """Largest-|x| dims of every real position of every prompt, per layer (``layers[i]`` is slot i).

    Positions are relative to each prompt's first real token; NaN values and -1 dims past the end.
    """

    values: Float[Tensor, "batch layer pos top"]  # signed values of the top_n |x| dims, largest |x| first
    dims: Int[Tensor, "batch layer pos top"]
    median_abs: Float[Tensor, "batch layer"]
    tokens: Int[Tensor, "batch pos"]  # token id at each relative position, -1 past the end
    lengths: Int[Tensor, " batch"]
    layers: list[int]
    prepend_bos: bool | None

    def passing(self, min_abs: float = 100.0, min_ratio: float = 1000.0) -> Tensor:
        """Boolean [batch, layer, pos, top]: the kept values meeting the Sun et al. criterion."""
        if isinstance(min_abs, bool) or not isinstance(min_abs, (int, float)) or min_abs < 0:
            raise InputError(f"min_abs must be a number >= 0, got {min_abs!r}.")
        if isinstance(min_ratio, bool) or not isinstance(min_ratio, (int, float)) or min_ratio < 0:
            raise InputError(f"min_ratio must be a number >= 0, got {min_ratio!r}.")
        magnitude = self.values.abs().nan_to_num(0.0)
        return (magnitude > min_abs) & (magnitude >= min_ratio * self.median_abs[:, :, None, None])

    def hits(self, min_abs: float = 100.0, min_ratio: float = 1000.0) -> pd.DataFrame:
        """One row per passing (prompt, layer, position, dim): value, ratio to the median, token id."""
        passing = self.passing(min_abs, min_ratio)
        b, li, pos, top = torch.nonzero(passing, as_tuple=True)
        values = self.values[b, li, pos, top]
        return pd.DataFrame({
            "prompt": b.numpy(), "layer": [self.layers[i] for i in li.tolist()], "position": pos.numpy(),
            "dim": self.dims[b, li, pos, top].numpy(), "value": values.numpy(),
            "ratio": (values.abs() / self.median_abs[b, li]).numpy(), "token_id": self.tokens[b, pos].numpy(),
        })

    def saturated(self, min_abs: float = 100.0, min_ratio: float = 1000.0) -> int:
        """Number of (prompt, layer, position) whose ``top_n`` kept dims all pass: more may exist there."""
        return int(self.passing(min_abs, min_ratio).all(-1).sum())

    def carriers(self, model, min_abs: float = 100.0, min_ratio: float = 1000.0) -> pd.DataFrame:
        """:meth:`hits` with the token string and its kind (one of ``KINDS``)."""
        hits = self.hits(min_abs, min_ratio)
        ids = sorted(set(hits["token_id"].tolist()))
        strings = dict(zip(ids, token_strings(model, ids)))
        bos = model_info(model).bos_id
        hits["token"] = [strings[i] for i in hits["token_id"]]
        hits["kind"] = [token_kind(strings[i], i, p, bos) for i, p in zip(hits["token_id"], hits["position"])]
        return hits


def token_kind(string: str, token_id: int, position: int, bos_id: int | None) -> str:
    """The kind of a carrier token: BOS, first position, newline, period or other."""
    if position == 0:
        return "BOS" if bos_id is not None and token_id == bos_id else "first position"
    if "\n" in string:
        return "newline"
    if string.strip() == ".":
        return "period"
    return "other"


def carrier_summary(carriers: pd.DataFrame) -> pd.DataFrame:
    """Per layer and token kind: passing (position, dim) pairs, distinct positions and prompts, the dims,
    the largest |value| and the first and last position (from :meth:`MassiveTokens.carriers`)."""
    check_frame(carriers, ["layer", "kind", "prompt", "position", "dim", "value"], "carrier_summary's carriers",
                "sinklens.MassiveTokens.carriers", allow_empty=True)
    columns = ["layer", "kind", "n_pairs", "n_positions", "n_prompts", "dims", "max_abs", "first_pos", "last_pos"]
    if carriers.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for (layer, kind), part in carriers.groupby(["layer", "kind"]):
        rows.append({"layer": int(layer), "kind": kind, "n_pairs": len(part),
                     "n_positions": len(part.groupby(["prompt", "position"])), "n_prompts": part["prompt"].nunique(),
                     "dims": " ".join(map(str, sorted(set(part["dim"].tolist())))),
                     "max_abs": float(part["value"].abs().max()), "first_pos": int(part["position"].min()),
                     "last_pos": int(part["position"].max())})
    return pd.DataFrame(rows, columns=columns)


@keyword_only_after("tokens", since="0.2")
def massive_tokens(model, tokens, *, attention_mask: Tensor | None = None, layers: Sequence[int] | None = None,
                   top_n: int = 8, batch_size: int = 1, show_progress: bool = True) -> MassiveTokens:
    """The ``top_n`` largest-|x| dims of every real position and the median |x|, per layer and prompt.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        tokens: a :class:`TokenBatch` or a [batch, pos] id tensor (left or right padding allowed).
        attention_mask: optional 0/1 mask for an id tensor.
        layers: layer indices (None: all).
        top_n: dims kept per position (1..d_model); a position with more passing dims is counted by
            :meth:`MassiveTokens.saturated`.
        batch_size: prompts per forward (long prompts: 1).
        show_progress: progress bar over sub-batches.
    """
    info = model_info(model)
    layers = check_layers(layers, info.n_layers)
    if as_int(top_n) is None or not 1 <= top_n <= info.d_model:
        raise InputError(f"top_n must be an int in 1..{info.d_model} (d_model), got {top_n!r}.")
    if as_int(batch_size) is None or batch_size < 1:
        raise InputError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    batch = as_batch(model, tokens, attention_mask)
    n, width = batch.tokens.shape
    values = torch.full((n, len(layers), width, top_n), float("nan"))
    dims = torch.full((n, len(layers), width, top_n), -1, dtype=torch.long)
    median = torch.empty((n, len(layers)))
    for offset, sub in batches(batch, batch_size, desc="massive tokens", show_progress=show_progress):
        rows = slice(offset, offset + sub.tokens.shape[0])
        found: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        hooks = [(resid_pre_hook(layer), _reducer(found, slot, sub.attention_mask, top_n))
                 for slot, layer in enumerate(layers)]
        with fused_attention(model):
            run_hooked(model, sub, hooks, layers)
        for slot, (top_values, top_dims, med) in found.items():
            values[rows, slot], dims[rows, slot], median[rows, slot] = top_values, top_dims, med
    absolute, valid, lengths = relative_index(batch.attention_mask.cpu())
    rel_tokens = torch.where(valid, batch.tokens.cpu().gather(1, absolute), torch.full_like(absolute, -1))
    return MassiveTokens(values, dims, median, rel_tokens, lengths, layers, batch.prepend_bos)


def _reducer(store: dict, slot: int, mask: Tensor, top_n: int):
    """A resid_pre hook keeping the median |x| and each relative position's top_n dims (float32)."""
    absolute, valid, _ = relative_index(mask)
    real = mask.bool()

    def reduce(resid: Tensor, hook) -> None:
        x = resid.float()
        magnitude = x.abs()
        med = magnitude.masked_fill(~real[..., None], float("nan")).flatten(1).nanmedian(1).values
        top = magnitude.topk(top_n, dim=-1).indices  # [b, T, top]
        top_values = x.gather(2, top)
        index = absolute[:, :, None].expand(-1, -1, top_n)
        rel_values = top_values.gather(1, index).masked_fill(~valid[..., None], float("nan"))
        rel_dims = top.gather(1, index).masked_fill(~valid[..., None], -1)
        store[slot] = (rel_values.cpu(), rel_dims.cpu(), med.cpu())
    return reduce
