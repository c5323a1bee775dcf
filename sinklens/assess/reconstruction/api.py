"""The public entry points: :func:`reconstruction_error` (one pruning) and :func:`k_sweep` (policies, fills,
temperatures and seeds against k, with whole-head removal as a control); their checks and the calibration
they are fitted on."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import pandas as pd
from jaxtyping import Int
from torch import Tensor

from ...core.choices import BASES, Basis
from ...core.edits import active_edits
from ...core.errors import InputError
from ...core.loading import model_info
from ...core.qk import check_editable
from ...core.tokens import TokenBatch, as_batch
from ...core.validate import check_choice, check_choices, check_int
from ...prune.calibration import (
    calibration_argument,
    calibration_need,
    fingerprint,
    resolve_calibration,
    temperature_argument,
)
from ...prune.pruning import plan_pruning
from ...prune.spec import (
    DEFAULT_POOL,
    FILLS,
    GQA_POLICIES,
    DimsArg,
    Fill,
    GQAPolicy,
    Head,
    Objective,
    PruneSpec,
    as_spec,
    check_heads,
    old_temperature,
)
from .common import DEFAULT_SWEEP_POLICIES, HEAD_REMOVAL, K_GRID, LEVELS, SWEEP_POLICIES, Config, Level, SweepPolicy
from .layer_level import layer_level_errors
from .model_level import model_level_errors


def _check_ints(name: str, values, low: int, high: int | None = None) -> list[int]:
    if isinstance(values, (int, str)) or not hasattr(values, "__iter__"):
        raise InputError(f"{name} must be a list of ints, got {values!r}.")
    values = list(values)
    if not values:
        raise InputError(f"{name} must be a non-empty list of ints, got {values!r}.")
    out = [check_int(f"{name}[{i}]", v) for i, v in enumerate(values)]
    bad = [v for v in out if v < low or (high is not None and v > high)]
    if bad:
        span = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise InputError(f"{name} values must lie in {span}, got {bad}.")
    if len(set(out)) != len(out):
        raise InputError(f"{name} holds duplicates: {values!r}.")
    return sorted(out)


def _prepare(model, tokens, attention_mask, heads):
    check_editable(model)
    info = model_info(model)
    batch = as_batch(model, tokens, attention_mask)
    heads = check_heads(heads, info)
    if active_edits(model):
        raise InputError(f"The model has {len(active_edits(model))} active pruning/removal edits: the dense reference "
                         "must be the unedited model. Restore them (handle.restore()) first.")
    return info, batch, heads


def _calibration_source(model, batch: TokenBatch, calibration, specs: Sequence[PruneSpec]) -> tuple[object, str | None]:
    """What the specs' kept dims, means and temperatures are fitted on, and whether that is the evaluated text.

    ``calibration`` (see :func:`~sinklens.prune.calibration.resolve_calibration`), else ``batch`` itself; measured
    once for every spec. Returns (calibration set, fit): fit is ``"in_sample"`` (fitted on the evaluated prompts),
    ``"held_out"`` (on other prompts), ``"unknown"`` (BOS vectors of unknown prompts), or None when nothing is
    fitted."""
    fitted = [spec for spec in specs if calibration_need(spec) != "nothing"]
    if not fitted:
        return None, None
    source = resolve_calibration(model, fitted, batch if calibration is None else calibration)
    layers = sorted({l for spec in fitted for l, _ in spec.heads})
    if source.bos_only:
        source.massive(layers)
        return source, "unknown"
    if all(calibration_need(spec) == "bos" for spec in fitted):
        source.massive(layers)
    else:
        source.inputs(layers)  # one forward for every layer, before any plan
    return source, "in_sample" if fingerprint(batch) == source.fingerprint else "held_out"


def reconstruction_error(model, tokens, heads: Sequence[Head] | PruneSpec, k: int | None = None,
                         dims: DimsArg | None = None, *, calibration=None, basis: Basis | None = None,
                         gqa: GQAPolicy | None = None, seed: int | None = None, force: bool | None = None,
                         fill: Fill | None = None, temperature: bool | None = None, objective: Objective | None = None,
                         pool: int | None = None, level: Level = "model",
                         attention_mask: Int[Tensor, "batch pos"] | None = None, batch_size: int = 8,
                         show_progress: bool = True, dims_tokens=None) -> pd.DataFrame:
    """Reconstruction error of every head in ``heads`` pruned at ``k`` (one row per head).

    Columns: level, policy, k, seed, gqa, basis, fill, temperature (the spec's fields), fit (what the kept dims,
    means and temperatures were fitted on: ``"held_out"`` other prompts than ``tokens``, ``"in_sample"`` the same
    prompts, ``"unknown"``, or None when nothing is fitted), layer, head, alpha0 (dense), frob_rel, kl, d_alpha0,
    out_rel, next_kl, loss, d_loss (model level only; NaN at level "layer"), n_prompts. See the module docstring
    for the metrics and the levels.

    Args:
        model: a bridge from :func:`sinklens.load_model`, without active edits (it is the dense reference).
        tokens: the prompts the patterns are compared on (ids, a TokenBatch, or strings).
        heads: ``(layer, head)`` pairs, or a :class:`~sinklens.prune.spec.PruneSpec` (then leave the pruning
            arguments k ... pool out).
        k, dims, basis, gqa, seed, force, fill, temperature, objective, pool: the pruning, as in
            :func:`sinklens.apply_pruning`.
        calibration: the calibration prompts the kept dims, fill means and temperatures are fitted on: a
            :class:`~sinklens.prune.calibration.CalibrationSet`, BOS-prepended ids or a TokenBatch (plain
            ``bos_top`` also takes a MassiveActivations); default: ``tokens`` (in-sample). Pass other prompts than
            ``tokens`` (e.g. the probe split, with ``tokens`` from the held-out split) to measure held-out errors.
        level: ``"model"`` (the pruned model runs) or ``"layer"`` (each layer pruned alone on the dense stream).
        attention_mask: 0/1 mask of real tokens of ``tokens``.
        batch_size: prompts per forward.
        show_progress: show a progress bar.
        dims_tokens: deprecated spelling of ``calibration``.
    """
    calibration, temperature = temperature_argument(calibration, temperature, where="reconstruction_error")
    calibration = calibration_argument(calibration, where="reconstruction_error", dims_tokens=dims_tokens)
    spec = as_spec(heads, k, dims, basis=basis, gqa=gqa, seed=seed, force=force, fill=fill, temperature=temperature,
                   objective=objective, pool=pool)
    info, batch, heads = _prepare(model, tokens, attention_mask, spec.heads)
    check_choice("level", level, LEVELS)
    batch_size = check_int("batch_size", batch_size, minimum=1, meaning="prompts per forward")
    source, fit = _calibration_source(model, batch, calibration, [spec])
    plan = plan_pruning(model, spec, calibration=source)
    run = model_level_errors if level == "model" else layer_level_errors
    return run(model, batch, heads, [Config(spec.policy, plan, fit)], spec.gqa, batch_size, show_progress)


def _flags(name: str, values) -> list[bool]:
    values = [values] if isinstance(values, bool) else list(values)
    if not values:
        raise InputError(f"{name} is empty: pass [False], [True] or [False, True].")
    if not all(isinstance(value, bool) for value in values):
        raise InputError(f"{name} must hold True/False values, got {values!r}.")
    if len(set(values)) != len(values):
        raise InputError(f"{name} holds duplicates: {values}.")
    return values


def default_ks(d_model: int) -> list[int]:
    """1, 2, 3, 5, 10, 20, 50, 100, 200, 500, ... below d_model, then d_model itself (no pruning: error 0).

    Args:
        d_model: the model width.
    """
    return [k for k in K_GRID if k < d_model] + [d_model]


def k_sweep(model, tokens, heads: Sequence[Head] | None, *, ks: Sequence[int] | None = None,
            policies: Sequence[SweepPolicy] = DEFAULT_SWEEP_POLICIES, seeds: Sequence[int] = (0, 1, 2),
            basis: Basis = "normalized", gqa: GQAPolicy = "exact", fills: Sequence[Fill] = ("zero",),
            temperatures: Sequence[bool] = (False,), objective: Objective = "frob_rel",
            pool: int = DEFAULT_POOL, level: Level = "layer", force: bool = False,
            attention_mask: Int[Tensor, "batch pos"] | None = None, calibration=None, batch_size: int = 8,
            show_progress: bool = True, dims_tokens=None, calibrations=None) -> pd.DataFrame:
    """Tidy reconstruction errors of ``heads`` for every k in ``ks``, every policy, fill and temperature, with one
    dense reference.

    Every configuration is the :class:`~sinklens.prune.spec.PruneSpec` ``(heads, k, policy, basis, gqa, seed,
    force, fill, temperature)``; its fields are the frame's columns, the same as :func:`reconstruction_error`'s
    (``seed`` is set for random only, ``basis`` for bos_top only). The optimized search runs once per head and
    fill, for the largest k (the smaller ks are its prefixes).

    Args:
        model: a bridge from :func:`sinklens.load_model`, without active edits.
        tokens: the prompts the patterns are compared on.
        heads: ``(layer, head)`` pairs, or None for every head of the model.
        ks: the k grid (None: :func:`default_ks`).
        policies: any of ``"bos_top"``, ``"random"`` (one configuration per seed), ``"weight_norm"``,
            ``"act_weight"``, ``"optimized"`` and ``"head_removal"`` (head output zeroed; it does not depend on k,
            fill or temperature: computed once, its rows repeated for every k; ``"whole_head"`` is its deprecated
            spelling).
        seeds: the seeds of ``random``.
        basis, gqa, force: as in :func:`sinklens.apply_pruning`.
        fills: the fills of dropped dims (``"zero"``, ``"mean"``).
        temperatures: with and/or without a fitted score temperature (``[False]``, ``[False, True]``).
        objective, pool: the ``optimized`` search's (see :class:`~sinklens.prune.spec.PruneSpec`).
        level: ``"layer"`` (default: every configuration from one forward) or ``"model"`` (each configuration
            through the pruned model).
        attention_mask: 0/1 mask of real tokens of ``tokens``.
        calibration: the calibration prompts (see :func:`reconstruction_error`; default: ``tokens``).
        batch_size: prompts per forward.
        show_progress: show a progress bar.
        dims_tokens: deprecated spelling of ``calibration``.
        calibrations: deprecated spelling of ``temperatures`` (``"none"`` / ``"temperature"``).
    """
    calibration = calibration_argument(calibration, where="k_sweep", dims_tokens=dims_tokens)
    if calibrations is not None:
        warnings.warn('k_sweep(calibrations=...) is deprecated: use temperatures=[False, True] (was ["none", '
                      '"temperature"]).', DeprecationWarning, stacklevel=2)
        temperatures = [old_temperature(value, "k_sweep(calibrations=)") for value in
                        ([calibrations] if isinstance(calibrations, str) else calibrations)]
    if isinstance(policies, str):
        policies = [policies]
    if "whole_head" in list(policies):
        warnings.warn('k_sweep(policies=[..., "whole_head"]) is deprecated: use "head_removal".', DeprecationWarning,
                      stacklevel=2)
        policies = [HEAD_REMOVAL if policy == "whole_head" else policy for policy in policies]
    if heads is None:
        info = model_info(model)
        heads = [(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)]
    info, batch, heads = _prepare(model, tokens, attention_mask, heads)
    ks = _check_ints("ks", default_ks(info.d_model) if ks is None else ks, 1, info.d_model)
    policies = list(policies)
    if not policies:
        raise InputError(f"policies is empty: pass some of {SWEEP_POLICIES}.")
    for policy in policies:
        check_choice("policy", policy, SWEEP_POLICIES)
    if len(set(policies)) != len(policies):
        raise InputError(f"policies holds duplicates: {policies}.")
    seeds = _check_ints("seeds", seeds, 0)
    check_choice("level", level, LEVELS)
    check_choice("basis", basis, BASES)
    check_choice("gqa policy", gqa, GQA_POLICIES)
    batch_size = check_int("batch_size", batch_size, minimum=1, meaning="prompts per forward")
    fills = check_choices("fills", fills, FILLS)
    temperatures = _flags("temperatures", temperatures)
    specs = [PruneSpec(heads, k, policy, basis=basis, gqa=gqa, seed=seed, force=force, fill=fill,
                       temperature=temperature, objective=objective, pool=pool)
             for policy in policies if policy != HEAD_REMOVAL for fill in fills for temperature in temperatures
             for k in sorted(ks, reverse=policy == "optimized") for seed in (seeds if policy == "random" else [0])]
    source, fit = _calibration_source(model, batch, calibration, specs)
    fitted = [calibration_need(spec) != "nothing" for spec in specs]
    configs = [Config(spec.policy, plan_pruning(model, spec, calibration=source if f else None), fit if f else None)
               for spec, f in zip(specs, fitted)]
    if HEAD_REMOVAL in policies:
        configs.append(Config(HEAD_REMOVAL, None))
    run = model_level_errors if level == "model" else layer_level_errors
    frame = run(model, batch, heads, configs, gqa, batch_size, show_progress)
    if HEAD_REMOVAL in policies:  # k-independent: repeat its rows at every k of the sweep
        whole = frame[frame["policy"] == HEAD_REMOVAL]
        attrs = dict(frame.attrs)
        frame = pd.concat([frame[frame["policy"] != HEAD_REMOVAL]] + [whole.assign(k=k) for k in ks],
                          ignore_index=True)
        frame["k"] = frame["k"].astype("Int64")
        frame.attrs.update(attrs)
    return frame
