"""Pattern errors of a pruned head against the dense one: frob_rel, KL, alpha_0, per prompt (fp32).

Per head and prompt, on the real tokens only (padding-aware), with A the dense pattern and A' the pruned
one (RESEARCH.md): ``frob_rel`` = ||A - A'||_F / ||A||_F; ``kl`` = mean over real query rows i of
KL(A_i || A'_i); ``alpha0`` = the dense BOS sink score (mean of key column 0 over the rows that see it,
positions counted from the first real token); ``d_alpha0`` = alpha_0(A') - alpha_0(A). The reconstruction
error (:mod:`sinklens.assess.reconstruction`), the optimized search (:mod:`sinklens.prune.search`) and the temperature
fit (:mod:`sinklens.prune.temperature`) all measure a pattern with these functions.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.qk import masked_like


def pattern_errors(ref_logp: Float[Tensor, "batch *heads query key"], logp: Float[Tensor, "batch *heads query key"],
                   mask: Tensor, ref_p: Tensor | None = None,
                   p: Tensor | None = None) -> dict[str, Float[Tensor, "batch *heads"]]:
    """frob_rel, kl, alpha0 (dense) and d_alpha0 per prompt and head from log-patterns, real tokens only.

    Any head dims between batch and query broadcast (e.g. [b, 1, n, q, k] dense against [b, C, n, q, k]
    pruned). ``ref_p`` / ``p``: the patterns themselves when the caller has them already.

    Args:
        ref_logp: the dense log-pattern.
        logp: the pruned log-pattern.
        mask: 0/1 mask of real tokens [batch, pos].
        ref_p, p: the patterns (exp of the log-patterns) when already computed, else None.
    """
    real = mask.bool()
    b, length = real.shape
    lead = [1] * (max(ref_logp.dim(), logp.dim()) - 3)
    n_real = real.sum(1).float().view(b, *lead)
    pair = (real[:, :, None] & real[:, None, :]).view(b, *lead, length, length)
    rows = real.view(b, *lead, length)
    a = (ref_logp.exp() if ref_p is None else ref_p) * pair
    a2 = (logp.exp() if p is None else p) * pair
    frob = (a - a2).square().sum((-1, -2)).sqrt() / a.square().sum((-1, -2)).sqrt()
    kl_rows = torch.where(a > 0, a * (ref_logp - logp), torch.zeros((), dtype=a.dtype, device=a.device)).sum(-1)
    kl = (kl_rows * rows).sum(-1) / n_real
    first = mask.argmax(1).view(b, *lead, 1, 1)

    def alpha(pattern: Tensor) -> Tensor:
        column = pattern.gather(-1, first.expand(*pattern.shape[:-1], 1)).squeeze(-1)
        return (column * rows).sum(-1) / n_real

    alpha0 = alpha(a)
    return {"frob_rel": frob, "kl": kl, "alpha0": alpha0, "d_alpha0": alpha(a2) - alpha0}


def softmax_pair(scores: Float[Tensor, "*batch query key"]
                 ) -> tuple[Float[Tensor, "*batch query key"], Float[Tensor, "*batch query key"]]:
    """(log-pattern, pattern) of masked scores in fp32, with a single exp of the full tensor.

    exp() of the masked entries' huge negative values takes a slow underflow path on CPU (several times
    slower): the exponent is clamped at -80 (exp = 2e-35, a normal float) and masked entries set to 0.
    The log-pattern is exact. Rows with no visible key (padding queries) get zeros.

    Args:
        scores: scores with masked entries at the dtype's minimum (as ``hook_attn_scores`` holds them).
    """
    scores = scores.float()
    top = scores.amax(-1, keepdim=True)
    shifted = scores - top
    e = shifted.clamp(min=-80.0).exp_().masked_fill_(masked_like(scores), 0.0)
    total = e.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return shifted - total.log(), e / total


__all__ = ["pattern_errors", "softmax_pair"]
