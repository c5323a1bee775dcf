"""Attention reconstruction error of pruned heads, and sweeps over k with controls.

Per head and prompt, on the real tokens only (padding-aware), with A the dense pattern and A' the
pruned one (RESEARCH.md):
- ``frob_rel`` = ||A - A'||_F / ||A||_F;
- ``kl`` = mean over real query rows i of KL(A_i || A'_i), from log-softmaxed scores (fp32);
- ``d_alpha0`` = alpha_0(A') - alpha_0(A), alpha_0 the BOS sink score (mean of key column 0 over the
  rows that see it, positions counted from the first real token); ``alpha0`` is the dense value;
- ``out_rel`` = ||c - c'||_F / ||c||_F, c = A V W_O^h the head's contribution to the residual stream
  (whole-head removal gives c' = 0, hence 1: it puts QK pruning and head removal on one axis). Removal
  leaves the head's own pattern as it is: at the layer level its pattern metrics are NaN (alpha0 is
  the dense value); at the model level they measure the changes that removed heads upstream cause.
Each is computed per prompt and averaged over prompts. Model level (``level="model"`` only):
``next_kl`` = KL(P || P') of the final next-token distributions, mean over real positions, ``loss``
(dense next-token cross-entropy, mean over real positions with a real next token) and ``d_loss`` =
loss' - loss; these are per configuration, repeated on its rows.

Two levels:
- ``"model"``: the pruned model runs (all ``heads`` pruned together, through :func:`apply_pruning`);
  a head's error includes the effect of pruned heads in earlier layers. One dense pass and one pass per
  configuration, batch by batch, so the dense reference (patterns of the selected heads, final
  log-probs) is held for one batch only and reused by every configuration.
- ``"layer"``: each layer is pruned alone on the dense residual stream. Pruning layer l cannot change
  layer l's inputs, so every configuration's pruned scores are computed during ONE dense forward: after
  the layer's attention ran, the model's own attention module is called again on the same input with
  the configuration's edits of that layer applied (the same plans as :func:`apply_pruning`), so rotary
  variants, q/k norms, softcaps and windows come from the model, never from a copy of its maths. This
  is the thesis' per-head reconstruction error. Tests check it against the pruned model itself.
Patterns are reduced inside the hooks; only the layers involved are hooked.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from ..core.edits import active_edits
from ..core.errors import InputError, SinklensError
from ..core.hooks import batches, run_hooked
from ..core.loading import model_info
from ..core.qk import check_editable, head_rows, layout, masked_like, weights
from ..core.tokens import TokenBatch, as_batch
from ..core.validate import check_choice, check_fraction, check_int
from ..measure.massive import BASES, Basis
from ..prune.calibration import (
    calibration_argument,
    calibration_need,
    fingerprint,
    resolve_calibration,
    temperature_argument,
)
from ..prune.pattern_error import pattern_errors, softmax_pair
from ..prune.pruning import PruningPlan, apply_pruning, plan_pruning
from ..prune.removal import apply_head_removal
from ..prune.spec import (
    DEFAULT_POOL,
    FILLS,
    GQA_POLICIES,
    POLICIES,
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

SweepPolicy = Literal["bos_top", "random", "weight_norm", "act_weight", "optimized", "head_removal"]
SWEEP_POLICIES: tuple[str, ...] = get_args(SweepPolicy)  # the kept-dims policies and whole-head removal
assert SWEEP_POLICIES == POLICIES + ("head_removal",)
HEAD_REMOVAL = "head_removal"
DEFAULT_SWEEP_POLICIES = ("bos_top", "random", "weight_norm", HEAD_REMOVAL)  # k_sweep's default: the thesis' controls
Level = Literal["layer", "model"]
LEVELS: tuple[str, ...] = get_args(Level)
Metric = Literal["frob_rel", "kl", "d_alpha0", "out_rel", "alpha0", "next_kl", "loss", "d_loss"]
METRICS = ("frob_rel", "kl", "d_alpha0", "out_rel")
K_GRID = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
COLUMNS = ["level", "policy", "k", "seed", "gqa", "basis", "fill", "temperature", "fit", "layer", "head", "alpha0",
           "frob_rel", "kl", "d_alpha0", "out_rel", "next_kl", "loss", "d_loss", "n_prompts"]


@dataclass
class _Config:
    """One configuration: a pruning plan, or whole-head removal (plan None)."""

    policy: str
    plan: PruningPlan | None
    fit: str | None = None  # what the pruning was fitted on: "in_sample", "held_out", "unknown" or None

    @property
    def spec(self) -> PruneSpec | None:
        return None if self.plan is None else self.plan.spec


# --- metrics (fp32, per prompt) -----------------------------------------------------------------

def _out_rel(ref: Tensor, new: Tensor, real: Tensor) -> Tensor:
    """||ref - new||_F / ||ref||_F over real positions; ref/new [b, n, pos, d]."""
    rows = real[:, None, :, None].float()
    return ((ref - new) * rows).square().sum((-1, -2)).sqrt() / (ref * rows).square().sum((-1, -2)).sqrt()


def _next_token_stats(ref_logp: Tensor, logp: Tensor, batch: TokenBatch) -> dict[str, Tensor]:
    """Sums over real positions: KL(P || P'), and the next-token losses of both (with their counts)."""
    real = batch.attention_mask.bool().to(ref_logp.device)  # logits sit on the last layer's device
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    has_next = real[:, :-1] & real[:, 1:]
    target = batch.tokens[:, 1:, None].to(ref_logp.device)
    nll_ref = -ref_logp[:, :-1].gather(-1, target).squeeze(-1)
    nll = -logp[:, :-1].gather(-1, target).squeeze(-1)
    return {"kl_sum": (kl * real).sum(), "n_pos": real.sum(), "loss_ref_sum": (nll_ref * has_next).sum(),
            "loss_sum": (nll * has_next).sum(), "n_next": has_next.sum()}


class _Accumulator:
    """Sums of per-prompt metrics for [config, head], and model-level sums per config."""

    def __init__(self, n_configs: int, n_heads: int):
        self.sums = {name: torch.zeros(n_configs, n_heads, dtype=torch.float64, device="cpu")
                     for name in METRICS + ("alpha0",)}
        self.next = [dict() for _ in range(n_configs)]
        self.n_prompts = 0

    def add(self, config: int, slots: list[int], values: dict[str, Tensor]) -> None:
        for name, value in values.items():
            self.sums[name][config, slots] += value.double().sum(0).cpu()

    def add_next(self, config: int, stats: dict[str, Tensor]) -> None:
        for name, value in stats.items():
            self.next[config][name] = self.next[config].get(name, 0.0) + float(value)


# --- validation ---------------------------------------------------------------------------------

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


# --- public API ---------------------------------------------------------------------------------

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
    run = _model_level if level == "model" else _layer_level
    return run(model, batch, heads, [_Config(spec.policy, plan, fit)], spec.gqa, batch_size, show_progress)


def _choices(name: str, values, choices: Sequence[str]) -> list[str]:
    values = [values] if isinstance(values, str) else list(values)
    if not values:
        raise InputError(f"{name} is empty: pass some of {tuple(choices)}.")
    for value in values:
        check_choice(name[:-1], value, choices)
    if len(set(values)) != len(values):
        raise InputError(f"{name} holds duplicates: {values}.")
    return values


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
    fills = _choices("fills", fills, FILLS)
    temperatures = _flags("temperatures", temperatures)
    specs = [PruneSpec(heads, k, policy, basis=basis, gqa=gqa, seed=seed, force=force, fill=fill,
                       temperature=temperature, objective=objective, pool=pool)
             for policy in policies if policy != HEAD_REMOVAL for fill in fills for temperature in temperatures
             for k in sorted(ks, reverse=policy == "optimized") for seed in (seeds if policy == "random" else [0])]
    source, fit = _calibration_source(model, batch, calibration, specs)
    fitted = [calibration_need(spec) != "nothing" for spec in specs]
    configs = [_Config(spec.policy, plan_pruning(model, spec, calibration=source if f else None), fit if f else None)
               for spec, f in zip(specs, fitted)]
    if HEAD_REMOVAL in policies:
        configs.append(_Config(HEAD_REMOVAL, None))
    run = _model_level if level == "model" else _layer_level
    frame = run(model, batch, heads, configs, gqa, batch_size, show_progress)
    if HEAD_REMOVAL in policies:  # k-independent: repeat its rows at every k of the sweep
        whole = frame[frame["policy"] == HEAD_REMOVAL]
        attrs = dict(frame.attrs)
        frame = pd.concat([frame[frame["policy"] != HEAD_REMOVAL]] + [whole.assign(k=k) for k in ks],
                          ignore_index=True)
        frame["k"] = frame["k"].astype("Int64")
        frame.attrs.update(attrs)
    return frame


def error_quantiles(sweep: pd.DataFrame, k: int | None = None, *, metric: Metric = "frob_rel",
                    quantiles: Sequence[float] = (0.1, 0.5, 0.9)) -> pd.DataFrame:
    """Quantiles of ``metric`` over heads (and seeds) per policy and k, with the row count.

    Args:
        sweep: a :func:`k_sweep` (or :func:`reconstruction_error`) frame.
        k: only this k (None: every k of the sweep).
        metric: the column summarised.
        quantiles: the quantiles, as fractions (columns ``q10``, ``q50``, ...).
    """
    if not isinstance(sweep, pd.DataFrame) or sweep.empty or not {"k", "policy", metric} <= set(sweep.columns):
        raise InputError(f"sweep must be a non-empty DataFrame from sinklens.k_sweep with columns k, policy, {metric}.")
    quantiles = [check_fraction("quantile", q) for q in quantiles]
    part = sweep if k is None else sweep[sweep["k"] == k]
    if part.empty:
        raise InputError(f"The sweep has no rows at k={k} (its ks: {sorted(sweep['k'].dropna().unique().tolist())}).")
    table = part.groupby(["policy", "k"])[metric].quantile(quantiles).unstack()
    table.columns = [f"q{round(q * 100):02d}" for q in quantiles]
    table["n_rows"] = part.groupby(["policy", "k"]).size()
    return table.reset_index().assign(metric=metric)


def smallest_k(sweep: pd.DataFrame, thresholds: Sequence[float] = (0.2, 0.1), *, metric: Metric = "frob_rel",
               by: Sequence[str] = ("policy",)) -> pd.DataFrame:
    """Smallest k whose median ``metric`` (over heads, and seeds for random) is below each threshold.

    One row per group of ``by`` and threshold, with the median at that k; k is missing (<NA>) when no
    k of the sweep reaches the threshold.

    Args:
        sweep: a :func:`k_sweep` frame.
        thresholds: the error levels (fractions, except for ``kl``).
        metric: the column compared.
        by: the columns that define a group (default: the policy).
    """
    if not isinstance(sweep, pd.DataFrame) or sweep.empty or not {"k", metric, *by} <= set(sweep.columns):
        raise InputError(f"sweep must be a non-empty DataFrame from sinklens.k_sweep with columns k, {metric}, "
                         f"{list(by)}.")
    thresholds = [check_fraction("threshold", t, open_low=True) if metric != "kl" else float(t) for t in thresholds]
    rows = []
    by = list(by)
    medians = sweep.groupby(by + ["k"])[metric].median().reset_index()
    for key, part in medians.groupby(by):
        key = key if isinstance(key, tuple) else (key,)
        part = part.sort_values("k")
        for threshold in thresholds:
            below = part[part[metric] < threshold]
            hit = below.iloc[0] if not below.empty else None
            rows.append({**dict(zip(by, key)), "threshold": threshold,
                         "k": pd.NA if hit is None else int(hit["k"]),
                         f"median_{metric}": float("nan") if hit is None else float(hit[metric])})
    frame = pd.DataFrame(rows)
    frame["k"] = frame["k"].astype("Int64")
    return frame


def reconstruction_headline(errors: pd.DataFrame, n_sink_heads: int) -> dict:
    """The numbers a report leads with for one pruning: heads pruned (of ``n_sink_heads``), k, median
    frob_rel, mean alpha_0 dense and pruned, next-token KL, d_loss.

    Args:
        errors: a model-level :func:`reconstruction_error` frame.
        n_sink_heads: the number of sink-specialized heads the pruned ones were taken from.
    """
    errors = _check_errors(errors, ["k", "frob_rel", "alpha0", "d_alpha0", "next_kl", "d_loss"])
    return {"n_heads_pruned": len(errors), "n_sink_heads": n_sink_heads, "k": errors["k"].iloc[0],
            "frob_rel_median": errors["frob_rel"].median(), "alpha0_dense_mean": errors["alpha0"].mean(),
            "alpha0_pruned_mean": (errors["alpha0"] + errors["d_alpha0"]).mean(),
            "next_kl": errors["next_kl"].iloc[0], "d_loss": errors["d_loss"].iloc[0]}


def k_sweep_headline(quantiles: pd.DataFrame, smallest: pd.DataFrame, model_level: pd.DataFrame, k: int,
                     threshold: float) -> dict:
    """The numbers a report leads with for a k sweep: per policy the median error at ``k``, the smallest k
    whose median is below ``threshold`` (policies without a pattern error left out) and the mean d_loss of
    the model-level sweep at k.

    Args:
        quantiles: from :func:`error_quantiles`.
        smallest: from :func:`smallest_k`.
        model_level: a ``level="model"`` :func:`k_sweep` frame at ``k``.
        k: the k the headline is at.
        threshold: one of the thresholds ``smallest`` was computed for.
    """
    quantiles = _check_errors(quantiles, ["policy", "k", "q50"])
    at_k = quantiles[quantiles["k"] == k].set_index("policy")["q50"].dropna()
    smallest = _check_errors(smallest, ["policy", "threshold", "k"])
    first_below = smallest[smallest["threshold"] == threshold].set_index("policy")["k"].reindex(at_k.index)
    model_level = _check_errors(model_level, ["policy", "d_loss"])
    return {"frob_rel_median_at_k": at_k.to_dict(), f"smallest_k_median_below_{threshold}": first_below.to_dict(),
            "d_loss_at_k": model_level.groupby("policy")["d_loss"].mean().to_dict()}


def _check_errors(frame, columns: Sequence[str]) -> pd.DataFrame:
    if not isinstance(frame, pd.DataFrame) or frame.empty or not set(columns) <= set(frame.columns):
        raise InputError("Expected a non-empty DataFrame from sinklens (reconstruction_error, k_sweep, "
                         f"error_quantiles or smallest_k) with columns {list(columns)}.")
    return frame


# --- level "model": the pruned model runs -------------------------------------------------------

def _by_layer(heads: list[Head]):
    """Per layer: (slots in ``heads``, head indices)."""
    by_layer: dict[int, tuple[list[int], list[int]]] = {}
    for slot, (layer, head) in enumerate(heads):
        slots, hs = by_layer.setdefault(layer, ([], []))
        slots.append(slot)
        hs.append(head)
    return by_layer


def _o_columns(model, info, layer: int, hs: list[int]) -> Tensor:
    """W_O^h of the listed heads as [n, d_model, d_head] (a copy of the live weights)."""
    wo = weights(model, layer).o
    return torch.stack([wo[:, head_rows(info, h)] for h in hs]).float().clone()


def _model_level(model, batch, heads, configs, gqa, batch_size, show_progress) -> pd.DataFrame:
    info = model_info(model)
    by_layer = _by_layer(heads)
    acc = _Accumulator(len(configs), len(heads))
    dense_wo = {layer: _o_columns(model, info, layer, hs) for layer, (_, hs) in by_layer.items()}
    for _, sub in batches(batch, batch_size, desc="reconstruction error", show_progress=show_progress):
        ref: dict[tuple[str, int], Tensor] = {}
        logits = _run_full(model, sub, _capture_hooks(model, by_layer, ref, dense_wo))
        ref_logp = torch.log_softmax(logits.float(), -1)
        acc.n_prompts += sub.tokens.shape[0]
        for c, config in enumerate(configs):
            edit = apply_head_removal(model, heads) if config.plan is None else apply_pruning(model, config.plan)
            try:
                hooks = _compare_hooks(model, info, by_layer, ref, dense_wo, sub.attention_mask, acc, c)
                logp = torch.log_softmax(_run_full(model, sub, hooks).float(), -1)
            finally:
                edit.restore()
            acc.add_next(c, _next_token_stats(ref_logp, logp, sub))
    return _frame(acc, heads, configs, gqa, "model", batch)


def _run_full(model, batch: TokenBatch, hooks) -> Tensor:
    with torch.inference_mode():
        return model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=hooks)


def _capture_hooks(model, by_layer, ref: dict, dense_wo: dict):
    hooks = []
    for layer, (_, hs) in by_layer.items():
        names = layout(model).hooks(layer)
        index = torch.tensor(hs, device="cpu")

        def scores_hook(scores, hook, layer=layer, index=index):
            ref[("logp", layer)] = torch.log_softmax(scores[:, index.to(scores.device)].float(), -1)

        def z_hook(z, hook, layer=layer, index=index):
            ref[("z", layer)] = z[:, :, index.to(z.device)].float().transpose(1, 2)  # [b, n, pos, dh]

        hooks += [(names.scores, scores_hook), (f"blocks.{layer}.attn.hook_z", z_hook)]
    return hooks


def _compare_hooks(model, info, by_layer, ref, dense_wo, mask, acc: _Accumulator, config: int):
    hooks = []
    for layer, (slots, hs) in by_layer.items():
        index = torch.tensor(hs, device="cpu")
        names = layout(model).hooks(layer)

        def scores_hook(scores, hook, layer=layer, index=index, slots=slots):
            logp = torch.log_softmax(scores[:, index.to(scores.device)].float(), -1)
            values = pattern_errors(ref[("logp", layer)], logp, mask.to(scores.device))
            acc.add(config, slots, values)

        def z_hook(z, hook, layer=layer, index=index, slots=slots, hs=hs):
            z = z[:, :, index.to(z.device)].float().transpose(1, 2)
            wo = _o_columns(model, info, layer, hs).to(z.device)  # live: zero for removed heads
            c = torch.einsum("bnpe,nde->bnpd", z, wo)
            c_ref = torch.einsum("bnpe,nde->bnpd", ref[("z", layer)], dense_wo[layer].to(z.device))
            acc.add(config, slots, {"out_rel": _out_rel(c_ref, c, mask.to(z.device).bool())})

        hooks += [(names.scores, scores_hook), (f"blocks.{layer}.attn.hook_z", z_hook)]
    return hooks


# --- level "layer": every configuration on one dense forward, through the model's own attention -----

def _changes_layer(plan: PruningPlan, layer: int) -> bool:
    return any(l == layer for l, _ in list(plan.q_edits) + list(plan.k_edits) + list(plan.k_copies))


def _layer_plan(plan: PruningPlan, layer: int) -> PruningPlan:
    """The part of ``plan`` that edits ``layer`` (the same dims and edits, other layers left out)."""
    edits = ("q_edits", "k_edits", "k_copies", "q_bias", "k_bias", "k_copy_bias", "q_scale")
    return dataclasses.replace(plan, **{name: {p: v for p, v in getattr(plan, name).items() if p[0] == layer}
                                        for name in edits})


class _ScoresCaptured(Exception):
    """Raised by the scores hook of a rerun once it holds the pruned scores: the rest of the attention module
    (softmax, pattern x values, output projection) is not needed."""


class _AttentionRerun:
    """Pruned scores of one layer computed by the model's own attention module on the dense input.

    A forward hook on ``blocks[layer].attn`` keeps the arguments of the dense call; :meth:`scores` applies a
    plan's edits of this layer (:func:`apply_pruning`: weights and private-K hooks), calls the module again on
    those arguments (without a KV cache) and returns what its ``hook_attn_scores`` held, then restores the
    edits. Rotary variants, q/k norms, softcaps, sliding windows and fused projections all come from the model.
    The rerun stops at the scores hook (:class:`_ScoresCaptured`): nothing after the scores is computed.
    """

    _CACHE_ARGS = ("past_key_values", "past_key_value", "layer_past")

    def __init__(self, model, layer: int):
        self.model, self.layer = model, layer
        self.module = model.blocks[layer].attn
        self.args = self.kwargs = None
        self.rerunning = False
        self.captured: Tensor | None = None

    def record(self, module, args, kwargs) -> None:
        """Forward pre-hook: keep the dense call's arguments (not during a rerun)."""
        if not self.rerunning:
            self.args = args
            self.kwargs = {name: (None if name in self._CACHE_ARGS else value) for name, value in kwargs.items()}

    def scores(self, plan: PruningPlan) -> Tensor:
        """The scores [b, n_heads, q, k] of this layer with ``plan``'s edits of it applied."""
        edit = apply_pruning(self.model, _layer_plan(plan, self.layer))
        self.rerunning, self.captured = True, None
        try:
            self.module(*self.args, **self.kwargs)
        except _ScoresCaptured:
            pass
        finally:
            self.rerunning = False
            edit.restore()
        if self.captured is None:
            raise SinklensError(f"Layer {self.layer}: rerunning the attention module did not reach its scores hook, so "
                                "the pruned pattern is unknown (is this family's attention supported? see "
                                "docs/families.md).")
        return self.captured


def _layer_level(model, batch, heads, configs, gqa, batch_size, show_progress) -> pd.DataFrame:
    info = model_info(model)
    by_layer = _by_layer(heads)
    layers = sorted(by_layer)
    gs = info.group_size
    changed = {layer: [c for c, config in enumerate(configs)
                       if config.plan is not None and _changes_layer(config.plan, layer)] for layer in layers}
    whole = [c for c, config in enumerate(configs) if config.plan is None]
    gram = {}
    for layer in layers:  # W_O^h.T W_O^h: ||z W_O^T||^2 = sum_rows z G z^T, without forming c
        wo = _o_columns(model, info, layer, by_layer[layer][1])
        gram[layer] = wo.transpose(1, 2) @ wo
    reruns = {layer: _AttentionRerun(model, layer) for layer in layers}
    acc = _Accumulator(len(configs), len(heads))
    nan = float("nan")
    for _, sub in batches(batch, batch_size, desc="k sweep", show_progress=show_progress):
        acc.n_prompts += sub.tokens.shape[0]
        mask = sub.attention_mask
        real = mask.bool()
        hooks = []
        for layer in layers:
            slots, hs = by_layer[layer]
            seen: dict[str, Tensor] = {}
            index = torch.tensor(hs, device="cpu")
            kv = torch.tensor([h // gs for h in hs], device="cpu")
            rerun = reruns[layer]

            def keep_v(tensor, hook, seen=seen, rerun=rerun):
                if not rerun.rerunning:
                    seen["v"] = tensor

            def scores_hook(scores, hook, layer=layer, slots=slots, seen=seen, index=index, kv=kv, mask=mask,
                            real=real, rerun=rerun):
                if rerun.rerunning:  # a pruned configuration's scores, computed by the module itself
                    rerun.captured = scores[:, index.to(scores.device)].clone()
                    raise _ScoresCaptured
                device = scores.device
                mask, real = mask.to(device), real.to(device)  # the layer's device under a device_map
                dense = scores[:, index.to(device)]
                masked = masked_like(dense)
                ref, ref_p = softmax_pair(dense)
                v = seen["v"][:, :, kv.to(device)].float().transpose(1, 2)  # [b, n, pos, dh]
                z = ref_p @ v
                g = gram[layer].to(device)
                norm = _gram_norm(z, g, real)
                same = pattern_errors(ref, ref, mask, ref_p, ref_p)
                pruned_here = set(changed[layer])
                for c, config in enumerate(configs):  # nothing pruned in this layer: the dense pattern
                    if config.plan is not None and c not in pruned_here:
                        acc.add(c, slots, {**same, "out_rel": torch.zeros_like(norm)})
                for c in whole:  # head removed: pattern untouched (no pattern error to speak of), output gone
                    acc.add(c, slots, {"alpha0": same["alpha0"], "frob_rel": torch.full_like(norm, nan),
                                       "kl": torch.full_like(norm, nan), "d_alpha0": torch.full_like(norm, nan),
                                       "out_rel": norm / norm})
                seen["dense"] = (ref, ref_p, masked, v, z, g, norm)

            def after_attention(module, args, kwargs, output, layer=layer, slots=slots, seen=seen, mask=mask,
                                real=real, rerun=rerun):
                if rerun.rerunning:
                    return
                ref, ref_p, masked, v, z, g, norm = seen.pop("dense")
                for c in changed[layer]:
                    pruned = rerun.scores(configs[c].plan).masked_fill(masked, torch.finfo(ref.dtype).min)
                    logp, p = softmax_pair(pruned)
                    values = pattern_errors(ref, logp, mask, ref_p, p)
                    values["out_rel"] = _gram_norm(z - p @ v, g, real) / norm
                    acc.add(c, slots, values)
                seen.clear()

            names = layout(model).hooks(layer)
            hooks += [(names.v, keep_v), (names.scores, scores_hook)]
            rerun.handles = [rerun.module.register_forward_pre_hook(rerun.record, with_kwargs=True),
                             rerun.module.register_forward_hook(after_attention, with_kwargs=True)]
        try:
            run_hooked(model, sub, hooks, layers)
        finally:
            for rerun in reruns.values():
                for handle in rerun.handles:
                    handle.remove()
    return _frame(acc, heads, configs, gqa, "layer", batch)


def _gram_norm(z: Tensor, gram: Tensor, real: Tensor) -> Tensor:
    """sqrt(sum over real rows of z G z^T) per [b, *heads]: the Frobenius norm of z W_O^T (z [b, *heads, pos, dh])."""
    quad = ((z @ gram) * z).sum(-1)  # [b, *heads, pos]
    rows = real.view(real.shape[0], *[1] * (quad.dim() - 2), real.shape[1])
    return (quad * rows).sum(-1).clamp(min=0).sqrt()


# --- the frame ----------------------------------------------------------------------------------

def _frame(acc: _Accumulator, heads, configs, gqa, level: str, batch: TokenBatch) -> pd.DataFrame:
    rows = []
    n = acc.n_prompts
    for c, config in enumerate(configs):
        nxt = acc.next[c]
        if nxt:
            n_next = nxt["n_next"] or float("nan")  # prompts of one token have no next token
            model_level = {"next_kl": nxt["kl_sum"] / nxt["n_pos"], "loss": nxt["loss_ref_sum"] / n_next,
                           "d_loss": (nxt["loss_sum"] - nxt["loss_ref_sum"]) / n_next}
        else:
            model_level = {"next_kl": float("nan"), "loss": float("nan"), "d_loss": float("nan")}
        spec = config.spec
        fields = ({"k": None, "seed": None, "gqa": gqa, "basis": None, "fill": None, "temperature": None}
                  if spec is None else {"k": spec.k, "seed": spec.seed, "gqa": spec.gqa, "basis": spec.basis,
                                        "fill": spec.fill, "temperature": spec.temperature})
        fields["fit"] = config.fit
        for slot, (layer, head) in enumerate(heads):
            rows.append({"level": level, "policy": config.policy, **fields, "layer": layer, "head": head,
                         **{name: float(acc.sums[name][c, slot] / n) for name in ("alpha0",) + METRICS},
                         **model_level, "n_prompts": n})
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["k"] = frame["k"].astype("Int64")
    frame["seed"] = frame["seed"].astype("Int64")
    frame.attrs.update({"level": level, "prepend_bos": batch.prepend_bos, "n_prompts": n,
                        "seq_len": int(batch.tokens.shape[1]), "metrics": list(METRICS)})
    return frame
