"""Sink-specialized heads: heads whose BOS sink score exceeds eps on at least a fraction q of prompts."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..core.errors import InputError
from ..core.validate import check_fraction


def _check_scores(scores: Tensor) -> Tensor:
    if not isinstance(scores, Tensor) or scores.dim() != 3 or scores.shape[0] == 0:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise InputError(f"scores must be a non-empty [batch, layer, head] tensor (from sink_scores), got {shape}.")
    return scores.float()


def sink_specialized_heads(scores: Float[Tensor, "batch layer head"], eps: float = 0.3, q: float = 0.9,
                           *, layers: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """``(layer, head)`` pairs whose score exceeds ``eps`` on at least a fraction ``q`` of prompts.

    ``layers`` maps the layer axis to model layers when ``scores`` covers a subset.

    Args:
        scores: BOS sink scores per prompt, layer and head (``Census.sink_scores(0)``).
        eps: the sink threshold on alpha_0.
        q: the fraction of prompts on which a head must exceed ``eps``.
        layers: the model layers of the layer axis (None: 0, 1, ...).
    """
    scores = _check_scores(scores)
    check_fraction("eps", eps)
    check_fraction("q", q)
    layers = list(range(scores.shape[1])) if layers is None else list(layers)
    frac = (scores > eps).float().mean(0)
    return [(layers[li], h) for li, h in torch.nonzero(frac >= q).tolist()]


def specialization_table(scores: Float[Tensor, "batch layer head"], eps: float = 0.3, q: float = 0.9,
                         *, n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                         layers: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per head: mean score with a percentile-bootstrap CI over prompts, the fraction of
    prompts above ``eps`` and whether the head is sink-specialized. Sorted by mean score.

    Args:
        scores: BOS sink scores per prompt, layer and head.
        eps, q: as in :func:`sink_specialized_heads`.
        n_boot: bootstrap resamples.
        ci: the confidence level of the interval.
        seed: the seed of the resampling.
        layers: the model layers of the layer axis (None: 0, 1, ...).
    """
    scores = _check_scores(scores)
    check_fraction("eps", eps)
    check_fraction("q", q)
    check_fraction("ci", ci, open_low=True)
    if n_boot < 1:
        raise InputError(f"n_boot must be >= 1, got {n_boot}.")
    n, n_layers, n_heads = scores.shape
    layers = list(range(n_layers)) if layers is None else list(layers)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    draws = torch.randint(0, n, (n_boot, n), generator=generator, device="cpu").to(scores.device)
    boot_means = scores[draws].mean(1)  # [n_boot, layer, head]
    tail = (1 - ci) / 2
    tails = torch.tensor([tail, 1 - tail], device=boot_means.device)
    low, high = torch.quantile(boot_means.flatten(1), tails, dim=0).view(2, n_layers, n_heads)
    frac = (scores > eps).float().mean(0)
    li, h = torch.meshgrid(torch.arange(n_layers, device="cpu"), torch.arange(n_heads, device="cpu"), indexing="ij")
    table = pd.DataFrame({
        "layer": torch.tensor(layers, device="cpu")[li.flatten()].numpy(), "head": h.flatten().numpy(),
        "mean": scores.mean(0).flatten().numpy(), "ci_low": low.flatten().numpy(), "ci_high": high.flatten().numpy(),
        "frac_above_eps": frac.flatten().numpy(),
    })
    table["specialized"] = table["frac_above_eps"] >= q
    return table.sort_values("mean", ascending=False, ignore_index=True)
