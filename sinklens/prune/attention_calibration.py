"""Attention calibration (ACT, Yu et al., ICML 2024) as a reversible edit of chosen heads' attention patterns.

ACT (code: GATECH-EIC/ACT, ``models/llama_modelling_aug.py``, ``atten_process_eval``) edits one head's post-softmax
pattern A (N x N, causal) of one sequence before A @ V:

- column score s_j = sum_i A[i, j] / n_j, n_j the number of the sequence's queries that see key j (N - j in a
  causal sequence of N real tokens): the mean attention key j receives; s_0 is alpha_0;
- sink set S = {j : s_j > threshold, n_j >= min_queries, j not the first token}. ACT drops the first flagged index,
  which is token 0 whenever token 0 qualifies; sinklens excludes the first real token explicitly. ``min_queries=1``
  is ACT's code; the default 8 (the census' ``Census.non_first_sinks`` default) keeps the last 7 keys out, whose
  score is averaged over a handful of queries and is mostly a query's attention to itself. Measured on the embedded
  SmolLM2-135M, every head calibrated, 8 probe prompts of 128 tokens (``bench/attention_calibration.py --sinks``):
  ``min_queries=1`` flags 2.21 keys per (prompt, head), 1.18 of them among the last 7 positions (54%);
  ``min_queries=8`` flags 1.02, none there;
- every real query row i: A[i, j] <- beta * A[i, j] for j in S, and the freed mass (1 - beta) * sum_{j in S} A[i, j]
  goes to the row's other visible keys (token 0 included) in proportion to their weights, so the row still sums to
  1. A row with no visible key outside S (or whose keys outside S carry no weight) is left unchanged.

Where it runs: a permanent hook on ``blocks.{l}.attn.hook_pattern`` (the eager pattern every supported family's
bridge computes and multiplies with V), so plain calls, hooked runs and the evaluation forward all see it. Which keys
a query sees is read from the same layer's ``hook_attn_scores`` (masked entries hold the dtype's minimum): padding
(left or right), block masks and sliding windows are honoured, a token is real when it sees itself, padded keys and
queries take no part, and N is each sequence's own length. The sink set is per sequence (per batch row) and per
head, over that sequence's own queries, as ACT computes it: the evaluation's shared MC context (several choices
packed in one row) cannot honour it, so :func:`sinklens.evaluate` builds unpacked rows while a calibration is
active (and says so, see :mod:`sinklens.assess.evaluation.plan`).

Composition with QK pruning of the same heads: pruning edits weights (and ``hook_attn_scores``), which changes the
scores; calibration edits the pattern computed from them, so the calibrated pattern is that of the pruned head,
whichever was applied first. The two are different units of the :class:`~sinklens.core.edits.Edit` registry
(``("pattern", layer, head)``), so they may overlap; two calibrations of the same head are refused.

ACT is a prefill-time edit: a KV-cached decoding step (fewer queries than keys) is refused, and ``generate`` (the
bridge's and the HF model's) raises while a calibration is active. The sdpa census engine computes attention in a
fused kernel without the pattern hook: :func:`sinklens.run_census` refuses ``engine="sdpa"`` and keeps
``engine="auto"`` on the eager engine under a calibration.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..core.edits import Edit, applied, heads_text, pattern_edits
from ..core.errors import InputError
from ..core.hooks import pattern_hook
from ..core.loading import model_info
from ..core.qk import LAYOUTS, masked_like
from ..core.validate import check_fraction, check_int
from .spec import Head, check_heads

DEFAULT_BETA = 0.4
DEFAULT_THRESHOLD = 0.1
DEFAULT_MIN_QUERIES = 8


def calibrate_pattern(pattern: Float[Tensor, "batch head query key"], visible: Bool[Tensor, "batch head query key"],
                      beta: float = DEFAULT_BETA, threshold: float = DEFAULT_THRESHOLD,
                      min_queries: int = DEFAULT_MIN_QUERIES
                      ) -> tuple[Float[Tensor, "batch head query key"], Bool[Tensor, "batch head key"]]:
    """ACT on a batch of patterns: the calibrated patterns (float32) and each (row, head)'s sink set.

    Args:
        pattern: post-softmax attention patterns (any float dtype; reduced in float32).
        visible: which keys each query may see (False where the model masked). A token is real when it sees
            itself; rows of padded queries are returned unchanged, padded keys are never in a sink set.
        beta: factor of the sink keys' weights.
        threshold: a key is a sink when its column score exceeds it.
        min_queries: a key counts only when at least this many real queries see it.
    """
    a = pattern.float()
    vis = visible.to(device=a.device)
    real = vis.diagonal(dim1=-2, dim2=-1)  # [b, h, T]: token t sees itself
    seen = vis & real[..., :, None]  # visibility from real queries only
    a_seen = torch.where(seen, a, torch.zeros((), dtype=a.dtype, device=a.device))
    column = a_seen.sum(-2)  # [b, h, key]
    n_queries = seen.sum(-2)  # [b, h, key]
    first = real.to(torch.int8).argmax(-1)  # first real token of each row
    position = torch.arange(a.shape[-1], device=a.device)
    eligible = real & (n_queries >= min_queries) & (position != first[..., None])
    score = column / n_queries.clamp(min=1).to(a.dtype)
    sinks = eligible & (score > threshold)
    in_s = seen & sinks[..., None, :]
    other = seen & ~in_s
    mass_s = torch.where(in_s, a, torch.zeros((), dtype=a.dtype, device=a.device)).sum(-1, keepdim=True)
    mass_o = torch.where(other, a, torch.zeros((), dtype=a.dtype, device=a.device)).sum(-1, keepdim=True)
    ok = mass_o > 0
    factor = 1 + (1 - beta) * mass_s / torch.where(ok, mass_o, torch.ones((), dtype=a.dtype, device=a.device))
    edited = torch.where(in_s, a * beta, torch.where(other, a * factor, a))
    return torch.where(ok, edited, a), sinks


def check_threshold(threshold: float) -> float:
    """ACT's sink threshold: a column score in (0, 1), as a float; an InputError naming ``threshold`` otherwise.

    Args:
        threshold: the value to check.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise InputError(f"threshold must lie in (0, 1) (a column score), got {threshold!r}.")
    return float(threshold)


def check_min_queries(min_queries: int) -> int:
    """How many real queries must see a key for it to be a sink candidate: an int >= 1.

    Args:
        min_queries: the value to check.
    """
    return check_int("min_queries", min_queries, minimum=1,
                     meaning="queries that must see a key for it to count as a sink")


def check_calibration_model(model) -> None:
    """Refuse a model whose attention pattern sinklens cannot edit eagerly (named, with the families that work).

    Args:
        model: the model about to be calibrated.
    """
    if getattr(model, "original_model", None) is None or not hasattr(model, "blocks"):
        raise InputError(f"model: attention calibration edits the eager pattern hook of a TransformerBridge from "
                         f"sinklens.load_model, got {type(model).__name__}.")
    model_type = model_info(model).model_type
    if model_type not in LAYOUTS:
        raise InputError(f"model: attention calibration runs at the eager pattern hook (blocks.L.attn.hook_pattern), "
                         f"which sinklens runs for the families {sorted(LAYOUTS)}; {model_type!r} is not one of them.")


class _LayerCalibration:
    """The two hooks of one layer: the scores' mask is read, then the selected heads' patterns are calibrated."""

    def __init__(self, layer: int, heads: list[int], beta: float, threshold: float, min_queries: int):
        self.layer, self.heads = layer, heads
        self.beta, self.threshold, self.min_queries = beta, threshold, min_queries
        self.visible: Tensor | None = None
        self.last_sinks: Tensor | None = None  # [b, n_selected, key] of the latest forward

    def scores(self, scores: Tensor, hook) -> None:
        q_len, k_len = scores.shape[-2:]
        if q_len != k_len:
            raise InputError(f"Attention calibration (ACT) is a prefill-time edit: layer {self.layer} got a KV-cached "
                             f"step ({q_len} queries, {k_len} keys). Restore the calibration before generating, or "
                             "run full forwards without a cache (use_cache=False).")
        self.visible = ~masked_like(scores[:, self.heads])

    def pattern(self, pattern: Tensor, hook) -> Tensor:
        visible, self.visible = self.visible, None
        if visible is None or visible.shape[-1] != pattern.shape[-1] or visible.shape[0] != pattern.shape[0]:
            raise InputError(f"Attention calibration of layer {self.layer} did not see this forward's scores "
                             "(hook_attn_scores): was the attention called outside the bridge, with a KV cache, or "
                             "a hook removed?")
        index = torch.tensor(self.heads, device=pattern.device)
        edited, sinks = calibrate_pattern(pattern.index_select(1, index), visible, self.beta, self.threshold,
                                          self.min_queries)
        self.last_sinks = sinks
        out = pattern.clone()
        out[:, index] = edited.to(pattern.dtype)
        return out


def _refuse_generate(*args, **kwargs):
    raise InputError("generate() is refused while an attention calibration is active: ACT edits prefill patterns "
                     "only (a KV-cached step would use another sink set). Call the handle's restore() first.")


class AttentionCalibrationHandle(Edit):
    """An applied attention calibration (see :func:`apply_attention_calibration`). ``restore()`` undoes it."""

    kind = "attention calibration"
    applied_by = "sinklens.apply_attention_calibration(...)"
    scoped_call = "sinklens.calibrate_attention(model, heads)"
    per_sequence_pattern = True  # read by the census (sdpa refused) and the evaluation (no shared MC context)

    def __init__(self, model, heads: Sequence[Head], beta: float = DEFAULT_BETA, threshold: float = DEFAULT_THRESHOLD,
                 min_queries: int = DEFAULT_MIN_QUERIES):
        beta = check_fraction("beta", beta)
        threshold = check_threshold(threshold)
        min_queries = check_min_queries(min_queries)
        check_calibration_model(model)
        info = model_info(model)
        heads = check_heads(heads, info)
        super().__init__(model, {("pattern", l, h) for l, h in heads})
        self.info, self.heads = info, heads
        self.beta, self.threshold, self.min_queries = beta, float(threshold), min_queries
        self.layers: dict[int, _LayerCalibration] = {}
        try:
            for layer in sorted({l for l, _ in heads}):
                step = _LayerCalibration(layer, [h for l, h in heads if l == layer], beta, float(threshold),
                                         min_queries)
                self.layers[layer] = step
                self.hook(f"blocks.{layer}.attn.hook_attn_scores", step.scores)
                self.hook(pattern_hook(layer), step.pattern)
            for owner in (model, model.original_model):
                owner.__dict__["generate"] = _refuse_generate
        except Exception:
            self.restore()
            raise
        self.register()

    def restore(self) -> None:
        """Undo the calibration: remove its hooks (and, with the last calibration, the generate refusal)."""
        super().restore()
        if not pattern_edits(self.model):
            for owner in (self.model, self.model.original_model):
                if owner.__dict__.get("generate") is _refuse_generate:
                    del owner.__dict__["generate"]

    def sink_sets(self) -> dict[Head, Tensor]:
        """Each calibrated head's sink set in the latest forward: (layer, head) -> bool [batch, key] (absolute
        positions of that forward)."""
        out = {}
        for layer, step in self.layers.items():
            if step.last_sinks is not None:
                for i, head in enumerate(step.heads):
                    out[(layer, head)] = step.last_sinks[:, i].cpu()
        return out

    def as_dict(self) -> dict:
        """JSON-ready description (heads as ``[layer, head]`` pairs, the settings)."""
        return {"kind": "attention_calibration", "heads": [list(p) for p in self.heads], "beta": self.beta,
                "threshold": self.threshold, "min_queries": self.min_queries}

    def __repr__(self) -> str:
        return (f"AttentionCalibrationHandle({heads_text(self.heads)}, beta={self.beta}, threshold={self.threshold}, "
                f"min_queries={self.min_queries}, {'active' if self.active else 'restored'})")


@dataclass(frozen=True)
class CalibrationOptions:
    """ACT's settings as a head edit of a :class:`~sinklens.assess.sweep.Sweep` (configurations
    ``("calibration", heads, split)``), checked on creation.

    Args:
        beta, threshold, min_queries: as in :func:`apply_attention_calibration`.
    """

    method: ClassVar[str] = "calibration"
    per_sequence_pattern: ClassVar[bool] = True  # the sweep's plans may not pack MC choices behind one context
    beta: float = DEFAULT_BETA
    threshold: float = DEFAULT_THRESHOLD
    min_queries: int = DEFAULT_MIN_QUERIES

    def __post_init__(self):
        object.__setattr__(self, "beta", check_fraction("beta", self.beta))
        object.__setattr__(self, "threshold", check_threshold(self.threshold))
        object.__setattr__(self, "min_queries", check_min_queries(self.min_queries))

    def apply(self, model, heads: Sequence[Head]) -> AttentionCalibrationHandle:
        """Calibrate ``heads`` of ``model`` with these settings (persistent; ``restore()`` undoes it).

        Args:
            model: a bridge from :func:`sinklens.load_model`.
            heads: the ``(layer, head)`` pairs to calibrate.
        """
        return apply_attention_calibration(model, heads, beta=self.beta, threshold=self.threshold,
                                           min_queries=self.min_queries)

    def as_dict(self) -> dict:
        """The settings, JSON-ready (part of a sweep configuration's key)."""
        return {"beta": self.beta, "threshold": self.threshold, "min_queries": self.min_queries}


def apply_attention_calibration(model, heads: Sequence[Head], *, beta: float = DEFAULT_BETA,
                                threshold: float = DEFAULT_THRESHOLD,
                                min_queries: int = DEFAULT_MIN_QUERIES) -> AttentionCalibrationHandle:
    """Calibrate the attention of ``heads`` (ACT) from now on; ``handle.restore()`` undoes it.

    Every argument is checked before the model is touched.

    Args:
        model: a bridge from :func:`sinklens.load_model` (any family sinklens supports; all run eager patterns).
        heads: the ``(layer, head)`` pairs whose patterns are calibrated.
        beta: factor in [0, 1] of the sink keys' weights (ACT: 0.4); 1 leaves the patterns as they are.
        threshold: column score in (0, 1) above which a key is a sink (ACT: 0.1).
        min_queries: a key is a sink candidate only when at least this many real queries see it (1: ACT's code;
            default 8, see the module's docstring).
    """
    return AttentionCalibrationHandle(model, heads, beta, threshold, min_queries)


@contextmanager
def calibrate_attention(model, heads: Sequence[Head], *, beta: float = DEFAULT_BETA,
                        threshold: float = DEFAULT_THRESHOLD,
                        min_queries: int = DEFAULT_MIN_QUERIES) -> Iterator[AttentionCalibrationHandle]:
    """Context manager: inside it every forward calibrates the attention of ``heads`` (ACT); restored on exit.

    Args:
        model, heads, beta, threshold, min_queries: as in :func:`apply_attention_calibration`.
    """
    with applied(apply_attention_calibration, model, heads, beta=beta, threshold=threshold,
                 min_queries=min_queries) as handle:
        yield handle


__all__ = ["AttentionCalibrationHandle", "CalibrationOptions", "DEFAULT_BETA", "DEFAULT_MIN_QUERIES",
           "DEFAULT_THRESHOLD", "apply_attention_calibration", "calibrate_attention", "calibrate_pattern",
           "check_calibration_model", "check_min_queries", "check_threshold"]
