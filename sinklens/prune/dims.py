"""The kept dims of a pruning: which k input (d_model) dims each pruned head keeps, per policy.

- ``"bos_top"``: the k largest |x_d| of the BOS vector at the head's layer (mean over the calibration prompts), in
  the spec's basis, measured in one forward for all layers involved, or read from a
  :class:`~sinklens.measure.massive.MassiveActivations` measured before (``CalibrationSet.from_massive``);
- ``"random"``: a seeded control: one permutation per (seed, layer, head), so a head's draw does not
  depend on the other heads and the dims at k are the first k of it (nested across k);
- ``"weight_norm"``: the k largest column norms of the head's stacked W_Q and W_K rows;
- ``"act_weight"``: the k largest ||x_d||_2 (over the calibration tokens) x (||W_Q^h[:, d]|| + ||W_K^h[:, d]||),
  the Wanda criterion on the attention input (:func:`sinklens.prune.search.act_weight_scores`);
- ``"optimized"``: the first k dims of the head's greedy ranking by pattern error on the calibration tokens
  (:mod:`sinklens.prune.search`);
- ``"explicit"``: the dims the spec holds.

The data-driven policies measure the calibration prompts passed beside the spec as ``calibration=`` (a
:class:`~sinklens.prune.calibration.CalibrationSet`, or what :func:`~sinklens.prune.calibration.resolve_calibration`
makes one from).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from ..core.loading import ModelInfo, model_info
from ..core.qk import head_rows, kv_rows, weights
from ..measure.massive import Basis
from .calibration import CalibrationSet, calibration_argument, resolve_calibration, temperature_argument
from .search import act_weight_scores, optimized_dims
from .spec import DimsArg, Fill, GQAPolicy, Head, Objective, PruneSpec, as_spec


def _random_dims(seed: int, layer: int, head: int, k: int, d_model: int) -> Tensor:
    digest = hashlib.sha256(f"sinklens-random-dims:{seed}:{layer}:{head}".encode()).digest()
    generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randperm(d_model, generator=generator, device="cpu")[:k]


def _weight_norm_dims(model, info: ModelInfo, layer: int, head: int, k: int) -> Tensor:
    w = weights(model, layer)
    rows = torch.cat([w.q[head_rows(info, head)], w.k[kv_rows(info, head)]]).float()
    return rows.norm(dim=0).topk(k).indices


def select_dims(model, heads: Sequence[Head] | PruneSpec, k: int | None = None, dims: DimsArg | None = None, *,
                calibration=None, basis: Basis | None = None, seed: int | None = None,
                gqa: GQAPolicy | None = None, force: bool | None = None, fill: Fill | None = None,
                temperature: bool | None = None, objective: Objective | None = None, pool: int | None = None,
                attention_mask: Int[Tensor, "batch pos"] | None = None, tokens=None) -> dict[Head, Int[Tensor, " k"]]:
    """The kept dims of every head, sorted ascending: ``{(layer, head): LongTensor[k]}`` (on the CPU).

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        heads: ``(layer, head)`` pairs, or a :class:`~sinklens.prune.spec.PruneSpec` (then leave the pruning
            arguments k ... pool out).
        k: input dims kept per head.
        dims: a policy name (``"bos_top"`` default, ``"random"``, ``"weight_norm"``, ``"act_weight"``,
            ``"optimized"``), one 1-D set of k indices for every head, or a mapping ``{(layer, head): indices}``
            covering exactly ``heads``.
        calibration: the calibration prompts of ``bos_top``, ``act_weight`` and ``optimized``: a
            :class:`~sinklens.prune.calibration.CalibrationSet` or BOS-prepended ids (``bos_top`` also takes a
            MassiveActivations measured on them); see :func:`~sinklens.prune.calibration.resolve_calibration`.
        basis: for ``bos_top``: ``"normalized"`` (attention input, default) or ``"resid"``.
        seed: for ``random`` (default 0).
        gqa, force: checked as in :func:`sinklens.apply_pruning` (``optimized`` searches with dense keys under
            ``gqa="q_only"``).
        fill: the fill of dropped dims ``optimized`` measures its errors with (default ``"zero"``).
        temperature: checked as in :func:`sinklens.apply_pruning` (it does not change the dims).
        objective, pool: the ``optimized`` search's pattern error and candidate dims.
        attention_mask: 0/1 mask of real tokens when ``calibration`` is ids.
        tokens: deprecated spelling of ``calibration``.
    """
    calibration, temperature = temperature_argument(calibration, temperature, where="select_dims")
    calibration = calibration_argument(calibration, where="select_dims", tokens=tokens)
    spec = as_spec(heads, k, dims, basis=basis, gqa=gqa, seed=seed, force=force, fill=fill, temperature=temperature,
                   objective=objective, pool=pool)
    spec.check(model_info(model))
    return dims_of(model, spec, resolve_calibration(model, spec, calibration, attention_mask=attention_mask))


def dims_of(model, spec: PruneSpec, calibration: CalibrationSet | None) -> dict[Head, Int[Tensor, " k"]]:
    """The kept dims of ``spec`` on ``model`` (see :func:`select_dims`), sorted ascending, on the CPU.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        spec: the pruning.
        calibration: what :func:`~sinklens.prune.calibration.resolve_calibration` made of the calibration input.
    """
    info = model_info(model)
    spec.check(info)
    k, heads = spec.k, spec.heads
    if spec.policy == "explicit":
        return {pair: torch.tensor(d, dtype=torch.long, device="cpu") for pair, d in zip(heads, spec.dims)}
    if spec.policy == "random":
        return {(l, h): _random_dims(spec.seed, l, h, k, info.d_model).sort().values for l, h in heads}
    if spec.policy == "weight_norm":
        return {(l, h): _weight_norm_dims(model, info, l, h, k).sort().values for l, h in heads}
    calibration = resolve_calibration(model, spec.replace(fill="zero", temperature=False), calibration)
    if spec.policy == "act_weight":
        return {(l, h): act_weight_scores(model, info, calibration, l, h).topk(k).indices.sort().values.cpu()
                for l, h in heads}
    if spec.policy == "optimized":
        return {(l, h): optimized_dims(model, info, calibration, (l, h), k, fill=spec.fill, gqa=spec.gqa,
                                       objective=spec.objective, pool=spec.pool).sort().values for l, h in heads}
    layers = spec.layers()
    stats = calibration.massive(layers)
    top = {layer: stats.top_dims(layer, k, spec.basis).cpu() for layer in layers}
    return {(l, h): top[l].sort().values for l, h in heads}


__all__ = ["dims_of", "select_dims"]
