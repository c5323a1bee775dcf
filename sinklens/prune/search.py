"""The ``optimized`` kept dims: per head, greedy forward selection minimising its pattern error on calibration prompts.

For head (l, h) and its attention input x on the calibration prompts, the pruned queries and keys with kept
dims S are q_S = x_S W_Q^h[:, S]^T + b_q (and k_S likewise with W_K of its KV head, except under
``gqa="q_only"``, where the keys stay dense); with ``fill="mean"`` every dropped dim holds its mean mu, i.e.
q_S = (x - mu)_S W_Q^h[:, S]^T + (mu W_Q^h^T + b_q). Greedy forward selection adds, one at a time, the dim
whose addition gives the lowest pattern error (``frob_rel`` or ``kl``, mean over prompts, exactly as
:mod:`sinklens.prune.pattern_error` measures it) against the dense pattern. Rotary is linear per position, so a
candidate d changes the rotated queries by rot(x_d W_Q^h[:, d]) and each step costs one batched q.k product
per candidate.

The candidates are the ``pool`` dims with the largest ``act_weight`` score (||x_d||_2 over the calibration
tokens x (||W_Q^h[:, d]|| + ||W_K^h[:, d]||)): a dim outside them moves this head's queries and keys by less
than any dim inside, and the search cost is linear in the pool. The ranking is greedy-nested (the dims at
k are the first k of it), cached per head on the :class:`~sinklens.prune.calibration.CalibrationSet` (a sweep over
k reuses the prefix; a larger k extends it), and its cost (seconds, candidates evaluated) is recorded there.
"""

from __future__ import annotations

import time

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..core.errors import InputError
from ..core.loading import ModelInfo
from ..core.qk import attention_scaling, bias, head_rows, kv_rows, layout, weights
from .calibration import CalibrationSet
from .pattern_error import pattern_errors, softmax_pair
from .spec import Fill, GQAPolicy, Head, Objective

CHUNK_ELEMENTS = 1 << 23  # candidate scores evaluated at once: candidates x prompts x query x key


class HeadProblem:
    """One head's dense pattern on the calibration prompts, and its pruned scores for given queries and keys.

    Args:
        model: a bridge from :func:`sinklens.load_model` (unedited: its weights are the dense reference).
        info: its :class:`~sinklens.core.loading.ModelInfo`.
        calibration: the calibration prompts (their attention inputs at ``layer``).
        layer, head: the head.
    """

    def __init__(self, model, info: ModelInfo, calibration: CalibrationSet, layer: int, head: int):
        self.layer, self.head, self.layout = layer, head, layout(model)
        if self.layout.qk_norm or self.layout.softcap:
            raise InputError(f'dims="optimized" scores candidate dims with the Llama score path (projection, bias, '
                             f"rotary, scaling); {self.layout.name} ({self.layout.describe()}) has another one, so the "
                             'search would rank dims by an approximate pattern. Use dims="bos_top", "act_weight" or '
                             '"random" on this family.')
        inputs = calibration.inputs([layer])[layer]
        self.x, self.cos, self.sin = inputs.x, inputs.cos, inputs.sin
        device = self.x.device
        w = weights(model, layer)
        self.wq = w.q[head_rows(info, head)].detach().float().to(device)  # [d_head, d_model]
        self.wk = w.k[kv_rows(info, head)].detach().float().to(device)
        bq, bk = bias(model, layer, "q"), bias(model, layer, "k")
        zero = torch.zeros(info.d_head, device=device)
        self.bq = zero if bq is None else bq[head_rows(info, head)].detach().float().to(device)
        self.bk = zero if bk is None else bk[kv_rows(info, head)].detach().float().to(device)
        self.scaling = attention_scaling(model, info, layer)
        self.mask = calibration.batch.attention_mask.to(device)
        real = self.mask.bool()
        length = real.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        self.blocked: Bool[Tensor, "batch 1 query key"] = ~(causal[None] & real[:, None, :])[:, None]
        q = self.rotate(self.x @ self.wq.T + self.bq)
        k = self.rotate(self.x @ self.wk.T + self.bk)
        self.dense_k = k
        self.ref_logp, self.ref_p = softmax_pair(self.scores(q[:, None], k[:, None]))  # [batch, 1, query, key]

    def rotate(self, x: Float[Tensor, "*lead batch pos d_head"]) -> Float[Tensor, "*lead batch pos d_head"]:
        """Rotary embedding of pre-rotary queries or keys at the calibration positions (none without rotary).

        Args:
            x: per-position vectors (any leading dims before batch).
        """
        if self.cos is None:  # no rotary (learned positions)
            return x
        lead = x.shape[:-3]
        flat = x.reshape(-1, *x.shape[-3:]).transpose(0, 1)  # [batch, lead, pos, d_head]
        rotated = self.layout.rotate(flat, self.cos, self.sin)
        return rotated.transpose(0, 1).reshape(*lead, *x.shape[-3:])

    def scores(self, q: Float[Tensor, "batch cand query d_head"], k: Float[Tensor, "batch cand key d_head"]
               ) -> Float[Tensor, "batch cand query key"]:
        """Scaled, masked scores of rotated queries and keys (masked entries at the fp32 minimum).

        Args:
            q: rotated queries, per prompt and candidate.
            k: rotated keys (broadcast over candidates when their dim is 1).
        """
        s = (q @ k.transpose(-1, -2)) * self.scaling
        return s.masked_fill(self.blocked, torch.finfo(torch.float32).min)

    def errors(self, scores: Float[Tensor, "batch cand query key"]) -> dict[str, Float[Tensor, " cand"]]:
        """Pattern errors of pruned scores against the dense pattern, mean over prompts, per candidate.

        Args:
            scores: from :meth:`scores`.
        """
        logp, p = softmax_pair(scores)
        values = pattern_errors(self.ref_logp, logp, self.mask, self.ref_p, p)
        return {name: value.mean(0) for name, value in values.items()}

    def centred(self, fill: Fill, mean: Float[Tensor, " d_model"] | None
                ) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, " d_head"], Float[Tensor, " d_head"]]:
        """(input the kept dims read, q offset, k offset): with mean fill, x - mu and mu W^T + b; else x and b.

        Args:
            fill: ``"zero"`` or ``"mean"``.
            mean: the per-dim calibration mean (``fill="mean"``).
        """
        if fill == "zero":
            return self.x, self.bq, self.bk
        return self.x - mean, mean @ self.wq.T + self.bq, mean @ self.wk.T + self.bk


def act_weight_scores(model, info: ModelInfo, calibration: CalibrationSet, layer: int,
                      head: int) -> Float[Tensor, " d_model"]:
    """The ``act_weight`` score of every input dim of a head: ||x_d||_2 over the calibration tokens x
    (||W_Q^h[:, d]||_2 + ||W_K^h[:, d]||_2) (the Wanda criterion on the attention input).

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        info: its :class:`~sinklens.core.loading.ModelInfo`.
        calibration: the calibration prompts.
        layer, head: the head.
    """
    w = weights(model, layer)
    norm = calibration.norm(layer)
    q = w.q[head_rows(info, head)].detach().float().norm(dim=0).to(norm.device)
    k = w.k[kv_rows(info, head)].detach().float().norm(dim=0).to(norm.device)
    return norm * (q + k)


def optimized_dims(model, info: ModelInfo, calibration: CalibrationSet, pair: Head, k: int, *, fill: Fill,
                   gqa: GQAPolicy, objective: Objective, pool: int) -> Int[Tensor, " k"]:
    """The first k dims of the head's greedy ranking (searched, or extended, as needed; cached), in rank order.

    Args:
        model: a bridge from :func:`sinklens.load_model`, unedited.
        info: its :class:`~sinklens.core.loading.ModelInfo`.
        calibration: the calibration prompts (the ranking is cached on it).
        pair: the ``(layer, head)``.
        k: how many dims.
        fill: the fill of dropped dims the errors are measured with.
        gqa: ``"q_only"`` searches with dense keys; ``"exact"`` and ``"shared"`` prune the keys with the same dims.
        objective: ``"frob_rel"`` or ``"kl"``.
        pool: candidate dims (the best act_weight dims), at least k.
    """
    pool = min(pool, info.d_model)
    if k > pool:
        raise InputError(f"k={k} exceeds the optimized search's pool of {pool} candidate dims: pass pool >= k in the "
                         "PruneSpec (or use another policy for such k).")
    mode = "q" if gqa == "q_only" else "qk"
    key = (pair, fill, mode, objective, pool)
    ranking = calibration.rankings.setdefault(key, [])
    if len(ranking) < k:
        start = time.perf_counter()
        evaluated = _extend(model, info, calibration, pair, ranking, k, fill, mode, objective, pool)
        cost = calibration.search_cost.setdefault(key, {"seconds": 0.0, "candidates": 0, "ranked": 0})
        cost["seconds"] += time.perf_counter() - start
        cost["candidates"] += evaluated
        cost["ranked"] = len(ranking)
    return torch.tensor(ranking[:k], dtype=torch.long, device="cpu")


def _extend(model, info, calibration, pair, ranking: list[int], k: int, fill, mode, objective, pool) -> int:
    """Greedy steps until ``ranking`` holds k dims (in place); returns the number of candidate evaluations."""
    layer, head = pair
    problem = HeadProblem(model, info, calibration, layer, head)
    mean = calibration.mean(layer) if fill == "mean" else None
    x, q0, k0 = problem.centred(fill, mean)
    candidates = act_weight_scores(model, info, calibration, layer, head).topk(pool).indices.tolist()
    candidates = [d for d in candidates if d not in ranking]
    chosen = torch.tensor(ranking, dtype=torch.long, device=x.device)
    q = problem.rotate(x[..., chosen] @ problem.wq[:, chosen].T + q0)  # [batch, pos, d_head]
    keys = problem.dense_k if mode == "q" else problem.rotate(x[..., chosen] @ problem.wk[:, chosen].T + k0)
    index = torch.tensor(candidates, dtype=torch.long, device=x.device)
    xs = x[..., index].permute(2, 0, 1)[..., None]  # [cand, batch, pos, 1]
    dq = problem.rotate(xs * problem.wq[:, index].T[:, None, None, :])  # [cand, batch, pos, d_head]
    dk = None if mode == "q" else problem.rotate(xs * problem.wk[:, index].T[:, None, None, :])
    n, length = x.shape[:2]
    chunk = max(1, CHUNK_ELEMENTS // (n * length * length))
    alive = torch.ones(len(candidates), dtype=torch.bool, device="cpu")
    evaluated = 0
    with torch.inference_mode():
        while len(ranking) < k:
            best, best_error = -1, float("inf")
            for start in range(0, len(candidates), chunk):
                part = [i for i in range(start, min(start + chunk, len(candidates))) if alive[i]]
                if not part:
                    continue
                sel = torch.tensor(part, device=x.device)
                cand_q = (q[None] + dq[sel]).transpose(0, 1)  # [batch, cand, pos, d_head]
                cand_k = keys[:, None] if dk is None else (keys[None] + dk[sel]).transpose(0, 1)
                errors = problem.errors(problem.scores(cand_q, cand_k))[objective]
                evaluated += len(part)
                value, where = errors.min(0)
                if float(value) < best_error:
                    best, best_error = part[int(where)], float(value)
            alive[best] = False
            ranking.append(candidates[best])
            q = q + dq[best]
            if dk is not None:
                keys = keys + dk[best]
    return evaluated


__all__ = ["HeadProblem", "act_weight_scores", "optimized_dims"]
