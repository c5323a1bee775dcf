"""The kept dims of a pruning: which k input (d_model) dims each pruned head keeps, per policy.

- ``"bos_top"``: the k largest |x_d| of the BOS vector at the head's layer (mean over probe prompts), in
  the spec's basis, measured in one forward for all layers involved (:func:`bos_activations`), or read
  from a :class:`~sinklens.measure.massive.MassiveActivations` measured before;
- ``"random"``: a seeded control: one permutation per (seed, layer, head), so a head's draw does not
  depend on the other heads and the dims at k are the first k of it (nested across k);
- ``"weight_norm"``: the k largest column norms of the head's stacked W_Q and W_K rows;
- ``"act_weight"``: the k largest ||x_d||_2 (over the calibration tokens) x (||W_Q^h[:, d]|| + ||W_K^h[:, d]||),
  the Wanda criterion on the attention input (:func:`sinklens.prune.search.act_weight_scores`);
- ``"optimized"``: the first k dims of the head's greedy ranking by pattern error on the calibration tokens
  (:mod:`sinklens.prune.search`);
- ``"explicit"``: the dims the spec holds.

The data-driven policies measure calibration tokens passed beside the spec (a
:class:`~sinklens.prune.calibration.CalibrationSet`, or BOS-prepended ids it is made from).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from ..core.edits import active_edits
from ..core.errors import InputError
from ..core.loading import ModelInfo, model_info
from ..core.qk import head_rows, kv_rows, weights
from ..core.tokens import as_batch, require_bos
from ..measure.massive import Basis, MassiveActivations, massive_activations
from .calibration import CalibrationSet, calibration_set
from .search import act_weight_scores, optimized_dims
from .spec import Calibration, DimsArg, Fill, GQAPolicy, Head, PruneSpec, as_spec


def bos_activations(model, tokens, layers: Sequence[int],
                    attention_mask: Int[Tensor, "batch pos"] | None = None) -> MassiveActivations:
    """The BOS vectors ``bos_top`` dims are chosen from: ``tokens`` measured at ``layers`` (every prompt must
    start with BOS; the model must be unedited), or ``tokens`` itself when it is a MassiveActivations
    measured before (it must cover ``layers`` and have been measured with BOS).

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        tokens: BOS-prepended probe tokens (ids, a TokenBatch, a CalibrationSet), or a MassiveActivations measured
            on them.
        layers: the layers whose BOS vectors are needed.
        attention_mask: 0/1 mask of real tokens for id tensors (None: all real).
    """
    if tokens is None:
        raise InputError('dims="bos_top" needs tokens: pass BOS-prepended probe tokens (sinklens.probe_tokens), or a '
                         "MassiveActivations measured on them, as tokens=.")
    layers = list(layers)
    if isinstance(tokens, CalibrationSet):
        tokens.check_model(model)
        return tokens.massive(layers)
    if isinstance(tokens, MassiveActivations):
        missing = [layer for layer in layers if layer not in tokens.layers]
        if missing:
            raise InputError(f"The MassiveActivations passed as tokens= lacks layers {missing}: measure them with "
                             "sinklens.massive_activations(model, tokens, layers=...).")
        if tokens.prepend_bos is False:
            raise InputError('dims="bos_top" needs BOS vectors, but these activations were measured without BOS: '
                             "measure them on tokens with prepend_bos=True.")
        return tokens
    batch = as_batch(model, tokens, attention_mask)
    require_bos(model, batch, 'dims="bos_top"')
    if active_edits(model):
        raise InputError('dims="bos_top" would measure the BOS vectors on a model with active edits '
                         f"({len(active_edits(model))}): restore them, or measure once on the dense model with "
                         "sinklens.massive_activations and pass the result as tokens=.")
    return massive_activations(model, batch, layers=layers, show_progress=False)


def _random_dims(seed: int, layer: int, head: int, k: int, d_model: int) -> Tensor:
    digest = hashlib.sha256(f"sinklens-random-dims:{seed}:{layer}:{head}".encode()).digest()
    generator = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return torch.randperm(d_model, generator=generator, device="cpu")[:k]


def _weight_norm_dims(model, info: ModelInfo, layer: int, head: int, k: int) -> Tensor:
    w = weights(model, layer)
    rows = torch.cat([w.q[head_rows(info, head)], w.k[kv_rows(info, head)]]).float()
    return rows.norm(dim=0).topk(k).indices


def select_dims(model, heads: Sequence[Head] | PruneSpec, k: int | None = None, dims: DimsArg | None = None, *,
                tokens=None, basis: Basis | None = None, seed: int | None = None,
                gqa: GQAPolicy | None = None, force: bool | None = None, fill: Fill | None = None,
                calibration: Calibration | None = None,
                attention_mask: Int[Tensor, "batch pos"] | None = None) -> dict[Head, Int[Tensor, " k"]]:
    """The kept dims of every head, sorted ascending: ``{(layer, head): LongTensor[k]}`` (on the CPU).

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        heads: ``(layer, head)`` pairs, or a :class:`~sinklens.prune.spec.PruneSpec` (then leave k, dims, basis,
            seed, gqa and force out).
        k: input dims kept per head.
        dims: a policy name (``"bos_top"`` default, ``"random"``, ``"weight_norm"``, ``"act_weight"``,
            ``"optimized"``), one 1-D set of k indices for every head, or a mapping ``{(layer, head): indices}``
            covering exactly ``heads``.
        tokens: the calibration tokens of ``bos_top``, ``act_weight`` and ``optimized``: BOS-prepended probe
            tokens or a :class:`~sinklens.prune.calibration.CalibrationSet` (``bos_top`` also takes a
            MassiveActivations measured on them).
        basis: for ``bos_top``: ``"normalized"`` (attention input, default) or ``"resid"``.
        seed: for ``random`` (default 0).
        gqa, force: checked as in :func:`sinklens.apply_pruning` (``optimized`` searches with dense keys under
            ``gqa="q_only"``).
        fill: the fill of dropped dims ``optimized`` measures its errors with (default ``"zero"``).
        calibration: checked as in :func:`sinklens.apply_pruning` (it does not change the dims).
        attention_mask: 0/1 mask of real tokens when ``tokens`` are ids.
    """
    spec = as_spec(heads, k, dims, basis=basis, gqa=gqa, seed=seed, force=force, fill=fill, calibration=calibration)
    return dims_of(model, spec, tokens, attention_mask=attention_mask)


def dims_of(model, spec: PruneSpec, tokens=None, *,
            attention_mask: Int[Tensor, "batch pos"] | None = None) -> dict[Head, Int[Tensor, " k"]]:
    """The kept dims of ``spec`` on ``model`` (see :func:`select_dims`), sorted ascending, on the CPU.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        spec: the pruning.
        tokens: the calibration tokens (see :func:`select_dims`).
        attention_mask: 0/1 mask of real tokens when ``tokens`` are ids.
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
    if spec.policy in ("act_weight", "optimized"):
        calibration = calibration_set(model, tokens, attention_mask)
        if spec.policy == "act_weight":
            return {(l, h): act_weight_scores(model, info, calibration, l, h).topk(k).indices.sort().values.cpu()
                    for l, h in heads}
        return {(l, h): optimized_dims(model, info, calibration, (l, h), k, fill=spec.fill, gqa=spec.gqa,
                                       objective=spec.objective, pool=spec.pool).sort().values for l, h in heads}
    layers = spec.layers()
    stats = bos_activations(model, tokens, layers, attention_mask)
    top = {layer: stats.top_dims(layer, k, spec.basis).cpu() for layer in layers}
    return {(l, h): top[l].sort().values for l, h in heads}


__all__ = ["bos_activations", "dims_of", "select_dims"]
