"""Sink census: per-head attention statistics, reduced inside the pattern hooks.

Definitions (RESEARCH.md), with positions counted from the first real token of each prompt:
- sink score alpha_k = 1/(T-k) * sum_{i=k}^{T-1} A[i, k]  (Gu et al. 2024), i.e. the mean of
  key column k over the queries that can see it, diagonal included;
- sink rate Sink^eps = % of all heads with alpha_0 > eps, averaged over prompts;
- head confidence = mean over query positions of the maximum attention weight (Voita et al.);
- non-first sinks: key positions j > 0 whose column mean exceeds 0.1 (ACT).
Each hook turns one layer's [batch, head, query, key] pattern into [batch, head, key] column
means and [batch, head] confidences in float32, so no more than one layer's pattern is alive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .errors import InputError
from .hooks import batches, pattern_hook, relative_index, run_hooked
from .loading import model_info
from .tokens import as_batch
from .validate import check_fraction, check_int, check_layers


# the three cases of first_token_comparison
CASE_BOS = "BOS at position 0"
CASE_AFTER_BOS = "first text token at position 1 (after BOS)"
CASE_NO_BOS = "first text token at position 0 (no BOS)"


@dataclass
class Census:
    """Attention statistics of every head of ``layers`` on a prompt set.

    ``alpha[b, i, h, r]`` is the sink score of key r (relative to prompt b's first real token)
    in head h of layer ``layers[i]``; NaN where r is past the prompt's end.
    """

    alpha: Float[Tensor, "batch layer head key"]
    confidence: Float[Tensor, "batch layer head"]
    tokens: Int[Tensor, "batch key"]  # token id at each relative position, -1 past the end
    lengths: Int[Tensor, " batch"]
    layers: list[int]
    prepend_bos: bool | None

    @property
    def n_prompts(self) -> int:
        return self.alpha.shape[0]

    def sink_scores(self, key_pos: int = 0) -> Float[Tensor, "batch layer head"]:
        """alpha_{key_pos} of every head on every prompt."""
        key_pos = _check_key_pos(key_pos, int(self.lengths.min()))
        return self.alpha[..., key_pos]

    def sink_rate(self, eps: float = 0.3, key_pos: int = 0) -> float:
        """Sink^eps in %: share of all heads with alpha_{key_pos} > eps, mean over prompts."""
        check_fraction("eps", eps)
        return float((self.sink_scores(key_pos) > eps).float().mean() * 100)

    def sink_rate_by_layer(self, eps: float = 0.3, key_pos: int = 0) -> Float[Tensor, " layer"]:
        """Sink^eps in % per layer (share of that layer's heads), mean over prompts."""
        check_fraction("eps", eps)
        return (self.sink_scores(key_pos) > eps).float().mean(dim=(0, 2)) * 100

    def non_first_sinks(self, threshold: float = 0.1, min_queries: int = 8) -> pd.DataFrame:
        """Key positions r > 0 with alpha_r > ``threshold`` (ACT), one row per (prompt, layer, head, position).

        ``min_queries`` skips keys seen by fewer queries (the last few positions), whose column
        mean is mostly the query's attention to itself.
        """
        check_fraction("threshold", threshold)
        min_queries = check_int("min_queries", min_queries, minimum=1)
        n_queries = self.lengths[:, None] - torch.arange(self.alpha.shape[-1], device=self.lengths.device)[None, :]
        eligible = (n_queries >= min_queries)
        eligible[:, 0] = False
        hit = (self.alpha > threshold) & eligible[:, None, None, :]
        b, li, h, r = torch.nonzero(hit, as_tuple=True)
        return pd.DataFrame({
            "prompt": b.numpy(), "layer": [self.layers[i] for i in li.tolist()], "head": h.numpy(),
            "position": r.numpy(), "token_id": self.tokens[b, r].numpy(), "score": self.alpha[b, li, h, r].numpy(),
        })

    def to_frame(self, eps: float = 0.3, threshold: float = 0.1, min_queries: int = 8) -> pd.DataFrame:
        """Tidy table: one row per (prompt, layer, head) with alpha_0, confidence, sink flag, non-first sinks."""
        alpha0 = self.sink_scores(0)
        b, li, h = torch.meshgrid(*(torch.arange(n, device=alpha0.device) for n in alpha0.shape), indexing="ij")
        frame = pd.DataFrame({
            "prompt": b.flatten().numpy(), "layer": torch.tensor(self.layers, device=li.device)[li.flatten()].numpy(),
            "head": h.flatten().numpy(), "alpha0": alpha0.flatten().numpy(),
            "confidence": self.confidence.flatten().numpy(),
        })
        frame["sink"] = frame["alpha0"] > check_fraction("eps", eps)
        others = self.non_first_sinks(threshold, min_queries).groupby(["prompt", "layer", "head"]).size()
        frame["n_other_sinks"] = others.reindex(pd.MultiIndex.from_frame(frame[["prompt", "layer", "head"]]),
                                                fill_value=0).to_numpy()
        frame["prepend_bos"] = self.prepend_bos
        return frame


def run_census(model, tokens, attention_mask: Tensor | None = None, layers: Sequence[int] | None = None,
               batch_size: int = 8, show_progress: bool = True) -> Census:
    """Attention statistics of every head in ``layers`` (default all) on ``tokens``.

    ``tokens`` is a :class:`TokenBatch` or a [batch, pos] id tensor with an optional 0/1 mask
    (left or right padding). Patterns are reduced in the hooks; nothing [query, key]-sized is kept.
    """
    info = model_info(model)
    layers = check_layers(layers, info.n_layers)
    batch = as_batch(model, tokens, attention_mask)
    short = torch.nonzero(batch.attention_mask.sum(1) < 2).flatten().tolist()
    if short:
        raise InputError(f"Prompts {short[:10]} have fewer than two real tokens: a one-token (e.g. BOS-only) prompt "
                         "can attend only to itself, so alpha_0 = 1 in every head and it would inflate the sink rate. "
                         "Drop them or use longer prompts.")
    batch_size = check_int("batch_size", batch_size, minimum=1, meaning="prompts per forward")
    n, width = batch.tokens.shape
    alpha = torch.full((n, len(layers), info.n_heads, width), float("nan"), device="cpu")
    confidence = torch.empty((n, len(layers), info.n_heads), device="cpu")
    for offset, sub in batches(batch, batch_size, desc="sink census", show_progress=show_progress):
        rows = slice(offset, offset + sub.tokens.shape[0])
        reducer = _PatternReducer(sub.attention_mask)
        hooks = [(pattern_hook(layer), reducer.hook(i)) for i, layer in enumerate(layers)]
        run_hooked(model, sub, hooks, layers)
        alpha[rows] = torch.stack(reducer.alpha, 1).cpu()
        confidence[rows] = torch.stack(reducer.confidence, 1).cpu()
    absolute, valid, lengths = relative_index(batch.attention_mask.cpu())
    rel_tokens = torch.where(valid, batch.tokens.cpu().gather(1, absolute), torch.full_like(absolute, -1))
    return Census(alpha, confidence, rel_tokens, lengths, layers, batch.prepend_bos)


class _PatternReducer:
    """Hooks that reduce each layer's pattern to relative-position column means and confidences."""

    def __init__(self, mask: Tensor):
        self.query = mask.float()  # [b, T] real queries
        self.absolute, self.valid, self.lengths = relative_index(mask)
        # queries that can see key j: real queries at positions >= j
        seen_by = self.query.flip(1).cumsum(1).flip(1)
        self.seen_by = torch.where(mask.bool(), seen_by, torch.full_like(seen_by, float("nan")))
        self.alpha: list[Tensor] = []
        self.confidence: list[Tensor] = []

    def hook(self, slot: int):
        def reduce(pattern: Tensor, hook) -> None:
            assert len(self.alpha) == slot, "pattern hooks fired out of order"
            pattern = pattern.float()
            # under a device_map the layer may sit on another device than the mask: reduce on the layer's
            query, seen_by, absolute, valid, lengths = (t.to(pattern.device) for t in (
                self.query, self.seen_by, self.absolute, self.valid, self.lengths))
            column_sum = torch.einsum("bhqk,bq->bhk", pattern, query)
            column_mean = column_sum / seen_by[:, None, :]
            index = absolute[:, None, :].expand_as(column_mean)
            rel = column_mean.gather(2, index).masked_fill(~valid[:, None, :], float("nan"))
            self.alpha.append(rel.to(self.query.device))
            top = pattern.amax(-1)  # [b, h, q]
            confidence = (top * query[:, None, :]).sum(-1) / lengths[:, None].float()
            self.confidence.append(confidence.to(self.query.device))
        return reduce


def sink_scores(model, tokens, key_pos: int = 0, attention_mask: Tensor | None = None,
                batch_size: int = 8) -> Float[Tensor, "batch layer head"]:
    """alpha_{key_pos} of every head (all layers) on every prompt, padding-aware."""
    batch = as_batch(model, tokens, attention_mask)
    key_pos = _check_key_pos(key_pos, int(batch.attention_mask.sum(1).min()))
    return run_census(model, batch, batch_size=batch_size, show_progress=False).sink_scores(key_pos)


def _check_key_pos(key_pos: int, shortest: int) -> int:
    key_pos = check_int("key_pos", key_pos, meaning="a key position counted from the first real token")
    if not 0 <= key_pos < shortest:
        raise InputError(f"key_pos={key_pos!r} is outside the sequence: the shortest prompt has {shortest} tokens "
                         f"(valid: 0..{shortest - 1}, counted from the first real token).")
    return key_pos


def first_token_comparison(with_bos: Census, without_bos: Census, eps: float = 0.3) -> pd.DataFrame:
    """Is the sink the BOS token or the first position? Per layer, mean alpha and sink rate of:
    BOS (with BOS, position 0), the first text token behind BOS (position 1), and the same
    first text token when no BOS is prepended (position 0)."""
    if with_bos.prepend_bos is not True or without_bos.prepend_bos is not False:
        raise InputError("first_token_comparison needs a census with prepend_bos=True and one with prepend_bos=False.")
    cases = {CASE_BOS: (with_bos, 0), CASE_AFTER_BOS: (with_bos, 1), CASE_NO_BOS: (without_bos, 0)}
    rows = []
    for case, (census, pos) in cases.items():
        scores = census.sink_scores(pos)
        for i, layer in enumerate(census.layers):
            rows.append({"case": case, "layer": layer, "mean_alpha": float(scores[:, i].mean()),
                         "sink_rate": float((scores[:, i] > eps).float().mean() * 100)})
    return pd.DataFrame(rows)
