"""Sink census: per-head attention statistics, reduced inside the pattern hooks.

Definitions (RESEARCH.md), with positions counted from the first real token of each prompt:
- sink score alpha_k = 1/(T-k) * sum_{i=k}^{T-1} A[i, k]  (Gu et al. 2024), i.e. the mean of
  key column k over the queries that can see it, diagonal included;
- sink rate Sink^eps = % of all heads with alpha_0 > eps, averaged over prompts;
- head confidence = mean over query positions of the maximum attention weight (Voita et al.);
- non-first sinks: key positions j > 0 whose column mean exceeds 0.1 (ACT).
Two engines give the same :class:`Census`. ``engine="eager"`` (the reference): each pattern hook turns
one layer's [batch, head, query, key] pattern into [batch, head, key] column means and [batch, head]
confidences in float32, so no more than one layer's pattern is alive (but that one is T x T, in
several copies). ``engine="sdpa"`` (:mod:`sinklens.measure.lse_census`): attention runs in a fused kernel and
the scores come from each row's log-sum-exp, never T x T; by default only the first ``first_keys``
keys are measured (``full=True``: every key and the confidences, over blocks of query rows).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.deprecation import keyword_only_after
from ..core.edits import eager_pattern_edits
from ..core.errors import InputError
from ..core.hooks import batches, gather_relative, pattern_hook, relative_index, run_hooked
from ..core.loading import model_info
from ..core.memory import eager_fits, gib
from ..core.tokens import as_batch
from ..core.validate import check_choice, check_fraction, check_int, check_layers
from .lse_census import lse_statistics

ENGINES = ("eager", "sdpa", "auto")


# the three cases of first_token_comparison
CASE_BOS = "BOS at position 0"
CASE_AFTER_BOS = "first text token at position 1 (after BOS)"
CASE_NO_BOS = "first text token at position 0 (no BOS)"


@dataclass
class Census:
    """Attention statistics of every head of ``layers`` on a prompt set.

    ``alpha[b, i, h, r]`` is the sink score of key r (relative to prompt b's first real token)
    in head h of layer ``layers[i]``; NaN where r is past the prompt's end. A census of the first
    keys only (``engine="sdpa"`` without ``full``) holds r < m and NaN confidences.
    """

    alpha: Float[Tensor, "batch layer head key"]
    confidence: Float[Tensor, "batch layer head"]
    tokens: Int[Tensor, "batch key"]  # token id at each relative position, -1 past the end
    lengths: Int[Tensor, " batch"]
    layers: list[int]
    prepend_bos: bool | None
    engine: str = "eager"  # "eager", or "sdpa (<LSE kernel>)"

    @property
    def n_prompts(self) -> int:
        return self.alpha.shape[0]

    @property
    def complete(self) -> bool:
        """Whether every key position (and the confidence) was measured, not only the first keys."""
        return self.alpha.shape[-1] == self.tokens.shape[1]

    def sink_scores(self, key_pos: int = 0) -> Float[Tensor, "batch layer head"]:
        """alpha_{key_pos} of every head on every prompt."""
        key_pos = _check_key_pos(key_pos, int(self.lengths.min()))
        if key_pos >= self.alpha.shape[-1]:
            raise InputError(f"key_pos={key_pos} was not measured: this census holds the first {self.alpha.shape[-1]} "
                             "keys only. Rerun run_census with first_keys > key_pos or full=True.")
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
        if not self.complete:
            raise InputError("Non-first sinks need every key's column mean: this census measured the first "
                             f"{self.alpha.shape[-1]} keys only. Rerun run_census(..., full=True).")
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
        if self.complete:
            others = self.non_first_sinks(threshold, min_queries).groupby(["prompt", "layer", "head"]).size()
            frame["n_other_sinks"] = others.reindex(pd.MultiIndex.from_frame(frame[["prompt", "layer", "head"]]),
                                                    fill_value=0).to_numpy()
        else:  # first keys only: not measured
            frame["n_other_sinks"] = pd.NA
        frame["prepend_bos"] = self.prepend_bos
        return frame


@keyword_only_after("tokens", since="0.2")
def run_census(model, tokens, *, attention_mask: Tensor | None = None, layers: Sequence[int] | None = None,
               batch_size: int = 8, show_progress: bool = True, engine: str = "eager", first_keys: int = 4,
               full: bool = False, block_size: int | None = None) -> Census:
    """Attention statistics of every head in ``layers`` (default all) on ``tokens``.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        tokens: a :class:`TokenBatch` or a [batch, pos] id tensor (left or right padding allowed).
        attention_mask: optional 0/1 mask for an id tensor.
        layers: layer indices (None: all).
        batch_size: prompts per forward.
        show_progress: progress bar over sub-batches.
        engine: ``"eager"`` reduces the bridge's attention patterns in hooks (the reference; every
            key and the confidences; one layer's T x T patterns alive at a time, refused when they would
            not fit in memory); ``"sdpa"`` uses a fused kernel's log-sum-exp and never holds T x T
            (:mod:`sinklens.measure.lse_census`); ``"auto"`` is eager while its patterns fit in memory, else sdpa
            (with a warning saying so and why). Under an attention calibration
            (:func:`sinklens.calibrate_attention`), which edits the eager patterns, ``"sdpa"`` is refused and
            ``"auto"`` is always eager.
        first_keys: m, the key positions the sdpa engine measures without ``full`` (alpha_0..alpha_{m-1}).
        full: sdpa engine: every key's column mean and the confidences, over blocks of query rows.
        block_size: sdpa engine with ``full``: query rows per block (None: about 4% of the width).
    Returns:
        A :class:`Census`; ``census.engine`` says which engine (and LSE kernel) produced it.
    """
    info = model_info(model)
    layers = check_layers(layers, info.n_layers)
    check_choice("engine", engine, ENGINES)
    batch = as_batch(model, tokens, attention_mask)
    short = torch.nonzero(batch.attention_mask.sum(1) < 2).flatten().tolist()
    if short:
        raise InputError(f"Prompts {short[:10]} have fewer than two real tokens: a one-token (e.g. BOS-only) prompt "
                         "can attend only to itself, so alpha_0 = 1 in every head and it would inflate the sink rate. "
                         "Drop them or use longer prompts.")
    batch_size = check_int("batch_size", batch_size, minimum=1, meaning="prompts per forward")
    if not isinstance(full, bool):
        raise InputError(f"full must be True or False, got {full!r}.")
    first_keys = check_int("first_keys", first_keys, minimum=1)
    n, width = batch.tokens.shape
    fits, needed, free = eager_fits(min(batch_size, n), info.n_heads, width, info.device)
    calibrated = eager_pattern_edits(model)
    if calibrated and engine == "sdpa":
        raise InputError(f"engine='sdpa' computes attention in a fused kernel, without the pattern hook where the "
                         f"active {calibrated[0].kind} edits the patterns: its census would describe the uncalibrated "
                         "model. Use engine='eager' (or 'auto', which stays eager under a calibration).")
    if engine == "auto" and calibrated:
        engine = "eager"  # the sdpa engine cannot see the calibrated patterns; too large a batch is refused below
    if engine == "auto":
        engine = "eager" if fits else "sdpa"
        if not fits:
            warnings.warn(f"run_census(engine='auto') uses the sdpa engine: eager patterns of {min(batch_size, n)} x "
                          f"{width} tokens would need about {gib(needed)} per layer, {gib(free)} is free.",
                          UserWarning, stacklevel=2)
    elif engine == "eager" and not fits:
        raise InputError(f"engine='eager' on {min(batch_size, n)} prompts x {width} tokens needs about {gib(needed)} "
                         f"of attention patterns per layer, more than half of the {gib(free)} free on {info.device}. "
                         "Use engine='sdpa' (full=True for every key), or a smaller batch_size.")
    shortest = int(batch.attention_mask.sum(1).min())
    if engine == "sdpa" and not full and first_keys > shortest:
        raise InputError(f"first_keys={first_keys} must be in 1..{shortest}: the shortest prompt has "
                         f"{shortest} tokens (counted from its first real token). Lower first_keys or drop the short "
                         "prompts.")
    absolute, valid, lengths = relative_index(batch.attention_mask.cpu())
    rel_tokens = torch.where(valid, batch.tokens.cpu().gather(1, absolute), torch.full_like(absolute, -1))
    if engine == "sdpa":
        alpha, confidence, kernel = lse_statistics(model, batch, layers, first_keys, full, batch_size, block_size,
                                                   show_progress=show_progress)
        return Census(alpha, confidence, rel_tokens, lengths, layers, batch.prepend_bos, engine=f"sdpa ({kernel})")
    alpha = torch.full((n, len(layers), info.n_heads, width), float("nan"), device="cpu")
    confidence = torch.empty((n, len(layers), info.n_heads), device="cpu")
    for offset, sub in batches(batch, batch_size, desc="sink census", show_progress=show_progress):
        rows = slice(offset, offset + sub.tokens.shape[0])
        reducer = _PatternReducer(sub.attention_mask)
        hooks = [(pattern_hook(layer), reducer.hook(i)) for i, layer in enumerate(layers)]
        run_hooked(model, sub, hooks, layers)
        alpha[rows] = torch.stack(reducer.alpha, 1).cpu()
        confidence[rows] = torch.stack(reducer.confidence, 1).cpu()
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
            self.alpha.append(gather_relative(column_mean, absolute, valid).to(self.query.device))
            top = pattern.amax(-1)  # [b, h, q]
            confidence = (top * query[:, None, :]).sum(-1) / lengths[:, None].float()
            self.confidence.append(confidence.to(self.query.device))
        return reduce


@keyword_only_after("tokens", since="0.2")
def sink_scores(model, tokens, *, key_pos: int = 0, attention_mask: Tensor | None = None,
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


@keyword_only_after("without_bos", since="0.2")
def first_token_comparison(with_bos: Census, without_bos: Census, *, eps: float = 0.3) -> pd.DataFrame:
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
