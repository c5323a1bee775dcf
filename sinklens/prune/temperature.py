"""Score calibration: one temperature per pruned head, fitted on calibration prompts to minimise the pattern KL.

Pruning removes part of each query-key product, so the pruned scores s' are often uniformly too small (a
flatter pattern) or too large. A scale c per head, A' = softmax(c s'), fitted to minimise the mean row
KL(A || A') over the calibration prompts, corrects that. KL(c) is convex in c (its derivative,
E_{A'(c)}[s'] - E_A[s'] per row, grows with c: it is a variance's integral), so the fit is a bisection on the
sign of the derivative, in log c over [1/C, C] with C = :data:`MAX_SCALE`. Scaling the queries scales the
scores (rotary is linear), so c is folded into the kept W_Q columns and the q bias: exact in the pruned
model and in saved checkpoints.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .search import HeadProblem

MAX_SCALE = 16.0
STEPS = 40


def fit_temperature(problem: HeadProblem, q_dims: Int[Tensor, " k"], q_offset: Float[Tensor, " d_head"],
                    k_dims: Int[Tensor, " k"] | None, k_offset: Float[Tensor, " d_head"] | None) -> float:
    """The scale c of a pruned head's scores that minimises the mean row KL(A || softmax(c s')) on the
    calibration prompts.

    Args:
        problem: the head on the calibration prompts (its dense pattern and inputs).
        q_dims: the kept dims of its queries.
        q_offset: the pruned queries' constant term (model bias plus fill bias).
        k_dims: the kept dims of its keys, or None for dense keys (``gqa="q_only"``).
        k_offset: the pruned keys' constant term (None with dense keys).
    """
    x = problem.x
    q = problem.rotate(x[..., q_dims.to(x.device)] @ problem.wq[:, q_dims.to(x.device)].T + q_offset)
    if k_dims is None:
        k = problem.dense_k
    else:
        k = problem.rotate(x[..., k_dims.to(x.device)] @ problem.wk[:, k_dims.to(x.device)].T + k_offset)
    raw = (q @ k.transpose(-1, -2))[:, None] * problem.scaling  # [batch, 1, query, key]
    blocked = problem.blocked
    real = problem.mask.bool()
    rows = real[:, None, :].float() / real.sum(1).float()[:, None, None]  # mean over real rows, then prompts
    target = (problem.ref_p * raw.masked_fill(blocked, 0)).sum(-1)

    def slope(c: float) -> float:
        p = torch.softmax((raw * c).masked_fill(blocked, torch.finfo(torch.float32).min), -1)
        return float((((p * raw.masked_fill(blocked, 0)).sum(-1) - target) * rows).sum())

    low, high = -math.log(MAX_SCALE), math.log(MAX_SCALE)
    if slope(math.exp(low)) >= 0:
        return math.exp(low)
    if slope(math.exp(high)) <= 0:
        return math.exp(high)
    for _ in range(STEPS):
        mid = (low + high) / 2
        if slope(math.exp(mid)) > 0:
            high = mid
        else:
            low = mid
    return math.exp((low + high) / 2)


__all__ = ["MAX_SCALE", "fit_temperature"]
