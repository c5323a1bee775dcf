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
  layer l's inputs, so every configuration's pruned patterns are computed in the hooks of ONE dense
  forward from that layer's attention input (the model's own rotary cos/sin and mask), with the same
  plans as :func:`apply_pruning`. This is the thesis' per-head reconstruction error, and cheap enough to
  sweep k. Tests check it against the pruned model itself.
Patterns are reduced inside the hooks; only the layers involved are hooked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .errors import InputError
from .hooks import batches, run_hooked
from .loading import model_info
from .massive import BASES, MassiveActivations
from .pruning import (
    DIMS_POLICIES, GQA_POLICIES, PruneHandle, PruningPlan, _bias, _bos_stats, _check_editable, _weights, active_edits,
    apply_head_removal, attention_scaling, check_heads, masked_like, plan_pruning, project, rotate,
)
from .tokens import TokenBatch, as_batch
from .validate import as_int, check_choice, check_fraction

POLICIES = DIMS_POLICIES + ("whole_head",)
LEVELS = ("layer", "model")
METRICS = ("frob_rel", "kl", "d_alpha0", "out_rel")
K_GRID = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
COLUMNS = ["level", "dims", "k", "seed", "gqa", "basis", "layer", "head", "alpha0", "frob_rel", "kl", "d_alpha0",
           "out_rel", "next_kl", "loss", "d_loss", "n_prompts"]


@dataclass
class _Config:
    """One configuration: a pruning plan, or whole-head removal (plan None)."""

    dims: str
    k: int | None
    seed: int | None
    plan: PruningPlan | None


# --- metrics (fp32, per prompt) -----------------------------------------------------------------

def pattern_errors(ref_logp: Float[Tensor, "batch *heads query key"], logp: Float[Tensor, "batch *heads query key"],
                   mask: Tensor, ref_p: Tensor | None = None,
                   p: Tensor | None = None) -> dict[str, Float[Tensor, "batch *heads"]]:
    """frob_rel, kl, alpha0 (dense) and d_alpha0 per prompt and head from log-patterns, real tokens only.

    Any head dims between batch and query broadcast (e.g. [b, 1, n, q, k] dense against [b, C, n, q, k]
    pruned). ``ref_p`` / ``p``: the patterns themselves when the caller has them already.
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


def _softmax_pair(scores: Tensor) -> tuple[Tensor, Tensor]:
    """(log-pattern, pattern) of masked scores in fp32, with a single exp of the full tensor.

    exp() of the masked entries' huge negative values takes a slow underflow path on CPU (several times
    slower): the exponent is clamped at -80 (exp = 2e-35, a normal float) and masked entries set to 0.
    The log-pattern is exact. Rows with no visible key (padding queries) get zeros.
    """
    masked = masked_like(scores)  # in the model's dtype: fp16's minimum is not masked_like in fp32
    scores = scores.float()
    top = scores.amax(-1, keepdim=True)
    shifted = scores - top
    e = shifted.clamp(min=-80.0).exp_().masked_fill_(masked, 0.0)
    total = e.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return shifted - total.log(), e / total


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
    out = [as_int(v) for v in values]
    if not out or any(v is None for v in out):
        raise InputError(f"{name} must be a non-empty list of ints, got {values!r}.")
    bad = [v for v in out if v < low or (high is not None and v > high)]
    if bad:
        span = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise InputError(f"{name} values must lie in {span}, got {bad}.")
    if len(set(out)) != len(out):
        raise InputError(f"{name} holds duplicates: {values!r}.")
    return sorted(out)


def _check_batch_size(batch_size) -> int:
    if as_int(batch_size) is None or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}.")
    return int(batch_size)


def _prepare(model, tokens, attention_mask, heads):
    _check_editable(model)
    info = model_info(model)
    batch = as_batch(model, tokens, attention_mask)
    heads = check_heads(heads, info)
    if active_edits(model):
        raise InputError(f"The model has {len(active_edits(model))} active pruning/removal edits: the dense reference "
                         "must be the unedited model. Restore them (handle.restore()) first.")
    return info, batch, heads


def _bos_source(model, batch: TokenBatch, dims_tokens, heads) -> MassiveActivations:
    """What bos_top dims are measured on: ``dims_tokens`` (ids, a TokenBatch or a MassiveActivations already
    measured), else ``batch``; measured once, through the same checks as :func:`apply_pruning`."""
    if isinstance(dims_tokens, MassiveActivations):
        return dims_tokens
    source = batch if dims_tokens is None else as_batch(model, dims_tokens)
    return _bos_stats(model, model_info(model), source, sorted({l for l, _ in heads}), None)


# --- public API ---------------------------------------------------------------------------------

def reconstruction_error(model, tokens, heads, k: int, dims="bos_top", basis: str = "normalized", gqa: str = "exact",
                         seed: int = 0, force: bool = False, level: str = "model",
                         attention_mask: Int[Tensor, "batch pos"] | None = None, dims_tokens=None, batch_size: int = 8,
                         show_progress: bool = True) -> pd.DataFrame:
    """Reconstruction error of every head in ``heads`` pruned at ``k`` (one row per head).

    Columns: level, dims (policy), k, seed, gqa, basis, layer, head, alpha0 (dense), frob_rel, kl,
    d_alpha0, out_rel, next_kl, loss, d_loss (model level only; NaN at level "layer"), n_prompts.
    ``dims``/``basis``/``gqa``/``seed``/``force`` as in :func:`apply_pruning`; bos_top dims are measured on
    ``dims_tokens`` (default: ``tokens``). See the module docstring for the metrics and the levels.
    """
    info, batch, heads = _prepare(model, tokens, attention_mask, heads)
    check_choice("level", level, LEVELS)
    batch_size = _check_batch_size(batch_size)
    source = _bos_source(model, batch, dims_tokens, heads) if isinstance(dims, str) and dims == "bos_top" else None
    plan = plan_pruning(model, heads, k, dims, source, basis, gqa, seed, force)
    config = _Config(plan.dims_policy, plan.k, plan.seed, plan)
    run = _model_level if level == "model" else _layer_level
    return run(model, batch, heads, [config], gqa, basis, batch_size, show_progress)


def default_ks(d_model: int) -> list[int]:
    """1, 2, 3, 5, 10, 20, 50, 100, 200, 500, ... below d_model, then d_model itself (no pruning: error 0)."""
    return [k for k in K_GRID if k < d_model] + [d_model]


def k_sweep(model, tokens, heads, ks: Sequence[int] | None = None, policies: Sequence[str] = POLICIES,
            seeds: Sequence[int] = (0, 1, 2), basis: str = "normalized", gqa: str = "exact", level: str = "layer",
            force: bool = False, attention_mask: Int[Tensor, "batch pos"] | None = None, dims_tokens=None,
            batch_size: int = 8, show_progress: bool = True) -> pd.DataFrame:
    """Tidy reconstruction errors of ``heads`` (None: every head) for every k in ``ks`` and every policy,
    with one dense reference.

    ``policies``: any of "bos_top", "random" (one configuration per seed in ``seeds``), "weight_norm" and
    "whole_head" (head output zeroed; it does not depend on k: computed once, its rows repeated for
    every k). ``ks=None`` sweeps :func:`default_ks`. Same columns as :func:`reconstruction_error` (``seed`` is
    set for random only).
    ``level="layer"`` (default) computes every configuration in one forward; ``"model"`` runs each
    configuration through the pruned model.
    """
    if heads is None:
        info = model_info(model)
        heads = [(layer, head) for layer in range(info.n_layers) for head in range(info.n_heads)]
    info, batch, heads = _prepare(model, tokens, attention_mask, heads)
    ks = _check_ints("ks", default_ks(info.d_model) if ks is None else ks, 1, info.d_model)
    if isinstance(policies, str):
        policies = [policies]
    policies = list(policies)
    if not policies:
        raise InputError(f"policies is empty: pass some of {POLICIES}.")
    for policy in policies:
        check_choice("policy", policy, POLICIES)
    if len(set(policies)) != len(policies):
        raise InputError(f"policies holds duplicates: {policies}.")
    seeds = _check_ints("seeds", seeds, 0)
    check_choice("level", level, LEVELS)
    check_choice("basis", basis, BASES)
    check_choice("gqa policy", gqa, GQA_POLICIES)
    batch_size = _check_batch_size(batch_size)
    source = _bos_source(model, batch, dims_tokens, heads) if "bos_top" in policies else None
    configs = []
    for policy in policies:
        if policy == "whole_head":
            configs.append(_Config("whole_head", None, None, None))
            continue
        for k in ks:
            for seed in (seeds if policy == "random" else [0]):
                plan = plan_pruning(model, heads, k, policy, source, basis, gqa, seed, force)
                configs.append(_Config(policy, k, plan.seed, plan))
    run = _model_level if level == "model" else _layer_level
    frame = run(model, batch, heads, configs, gqa, basis, batch_size, show_progress)
    if "whole_head" in policies:  # k-independent: repeat its rows at every k of the sweep
        whole = frame[frame["dims"] == "whole_head"]
        attrs = dict(frame.attrs)
        frame = pd.concat([frame[frame["dims"] != "whole_head"]] + [whole.assign(k=k) for k in ks], ignore_index=True)
        frame["k"] = frame["k"].astype("Int64")
        frame.attrs.update(attrs)
    return frame


def error_quantiles(sweep: pd.DataFrame, k: int | None = None, metric: str = "frob_rel",
                    quantiles: Sequence[float] = (0.1, 0.5, 0.9)) -> pd.DataFrame:
    """Quantiles of ``metric`` over heads (and seeds) per policy and k (only ``k`` if given), with the head count."""
    if not isinstance(sweep, pd.DataFrame) or sweep.empty or not {"k", "dims", metric} <= set(sweep.columns):
        raise InputError(f"sweep must be a non-empty DataFrame from sinklens.k_sweep with columns k, dims, {metric}.")
    quantiles = [check_fraction("quantile", q) for q in quantiles]
    part = sweep if k is None else sweep[sweep["k"] == k]
    if part.empty:
        raise InputError(f"The sweep has no rows at k={k} (its ks: {sorted(sweep['k'].dropna().unique().tolist())}).")
    table = part.groupby(["dims", "k"])[metric].quantile(quantiles).unstack()
    table.columns = [f"q{round(q * 100):02d}" for q in quantiles]
    table["n_rows"] = part.groupby(["dims", "k"]).size()
    return table.reset_index().assign(metric=metric)


def smallest_k(sweep: pd.DataFrame, thresholds: Sequence[float] = (0.2, 0.1), metric: str = "frob_rel",
               by: Sequence[str] = ("dims",)) -> pd.DataFrame:
    """Smallest k whose median ``metric`` (over heads, and seeds for random) is below each threshold.

    One row per group of ``by`` and threshold, with the median at that k; k is missing (<NA>) when no
    k of the sweep reaches the threshold.
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
    """The numbers a report leads with for one pruning (a :func:`reconstruction_error` frame): heads
    pruned (of ``n_sink_heads``), k, median frob_rel, mean alpha_0 dense and pruned, next-token KL, d_loss."""
    errors = _check_errors(errors, ["k", "frob_rel", "alpha0", "d_alpha0", "next_kl", "d_loss"])
    return {"n_heads_pruned": len(errors), "n_sink_heads": n_sink_heads, "k": errors["k"].iloc[0],
            "frob_rel_median": errors["frob_rel"].median(), "alpha0_dense_mean": errors["alpha0"].mean(),
            "alpha0_pruned_mean": (errors["alpha0"] + errors["d_alpha0"]).mean(),
            "next_kl": errors["next_kl"].iloc[0], "d_loss": errors["d_loss"].iloc[0]}


def k_sweep_headline(quantiles: pd.DataFrame, smallest: pd.DataFrame, model_level: pd.DataFrame, k: int,
                     threshold: float) -> dict:
    """The numbers a report leads with for a k sweep: per policy the median error at ``k`` (from
    :func:`error_quantiles`), the smallest k whose median is below ``threshold`` (from
    :func:`smallest_k`; policies without a pattern error left out) and the mean d_loss of the
    model-level sweep at k."""
    quantiles = _check_errors(quantiles, ["dims", "k", "q50"])
    at_k = quantiles[quantiles["k"] == k].set_index("dims")["q50"].dropna()
    smallest = _check_errors(smallest, ["dims", "threshold", "k"])
    first_below = smallest[smallest["threshold"] == threshold].set_index("dims")["k"].reindex(at_k.index)
    model_level = _check_errors(model_level, ["dims", "d_loss"])
    return {"frob_rel_median_at_k": at_k.to_dict(), f"smallest_k_median_below_{threshold}": first_below.to_dict(),
            "d_loss_at_k": model_level.groupby("dims")["d_loss"].mean().to_dict()}


def _check_errors(frame, columns: Sequence[str]) -> pd.DataFrame:
    if not isinstance(frame, pd.DataFrame) or frame.empty or not set(columns) <= set(frame.columns):
        raise InputError(f"Expected a non-empty DataFrame from sinklens (reconstruction_error, k_sweep, error_quantiles "
                         f"or smallest_k) with columns {list(columns)}.")
    return frame


# --- level "model": the pruned model runs -------------------------------------------------------

def _layout(heads: list[tuple[int, int]]):
    """Per layer: (slots in ``heads``, head indices)."""
    by_layer: dict[int, tuple[list[int], list[int]]] = {}
    for slot, (layer, head) in enumerate(heads):
        slots, hs = by_layer.setdefault(layer, ([], []))
        slots.append(slot)
        hs.append(head)
    return by_layer


def _o_columns(model, info, layer: int, hs: list[int]) -> Tensor:
    """W_O^h of the listed heads as [n, d_model, d_head] (a copy of the live weights)."""
    _, _, wo = _weights(model, layer)
    dh = info.d_head
    return torch.stack([wo[:, h * dh:(h + 1) * dh] for h in hs]).float().clone()


def _model_level(model, batch, heads, configs, gqa, basis, batch_size, show_progress) -> pd.DataFrame:
    info = model_info(model)
    by_layer = _layout(heads)
    acc = _Accumulator(len(configs), len(heads))
    dense_wo = {layer: _o_columns(model, info, layer, hs) for layer, (_, hs) in by_layer.items()}
    for _, sub in batches(batch, batch_size, desc="reconstruction error", show_progress=show_progress):
        ref: dict[tuple[str, int], Tensor] = {}
        logits = _run_full(model, sub, _capture_hooks(by_layer, ref, dense_wo))
        ref_logp = torch.log_softmax(logits.float(), -1)
        acc.n_prompts += sub.tokens.shape[0]
        for c, config in enumerate(configs):
            edit = (apply_head_removal(model, heads) if config.plan is None else PruneHandle(model, config.plan))
            try:
                hooks = _compare_hooks(model, info, by_layer, ref, dense_wo, sub.attention_mask, acc, c)
                logp = torch.log_softmax(_run_full(model, sub, hooks).float(), -1)
            finally:
                edit.restore()
            acc.add_next(c, _next_token_stats(ref_logp, logp, sub))
    return _frame(acc, heads, configs, gqa, basis, "model", batch)


def _run_full(model, batch: TokenBatch, hooks) -> Tensor:
    with torch.inference_mode():
        return model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=hooks)


def _capture_hooks(by_layer, ref: dict, dense_wo: dict):
    hooks = []
    for layer, (_, hs) in by_layer.items():
        index = torch.tensor(hs, device="cpu")

        def scores_hook(scores, hook, layer=layer, index=index):
            ref[("logp", layer)] = torch.log_softmax(scores[:, index.to(scores.device)].float(), -1)

        def z_hook(z, hook, layer=layer, index=index):
            ref[("z", layer)] = z[:, :, index.to(z.device)].float().transpose(1, 2)  # [b, n, pos, dh]

        hooks += [(f"blocks.{layer}.attn.hook_attn_scores", scores_hook), (f"blocks.{layer}.attn.hook_z", z_hook)]
    return hooks


def _compare_hooks(model, info, by_layer, ref, dense_wo, mask, acc: _Accumulator, config: int):
    hooks = []
    for layer, (slots, hs) in by_layer.items():
        index = torch.tensor(hs, device="cpu")

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

        hooks += [(f"blocks.{layer}.attn.hook_attn_scores", scores_hook), (f"blocks.{layer}.attn.hook_z", z_hook)]
    return hooks


# --- level "layer": every configuration from one dense forward ----------------------------------

class _LayerGroup:
    """The configurations of one layer that keep the same number of Q dims, stacked along the head axis
    (config-major) so one batched computation gives all their pruned patterns."""

    def __init__(self, model, info, layer: int, hs: list[int], configs: list[_Config], members: list[int]):
        self.members = members
        dh, gs, full = info.d_head, info.group_size, info.d_model
        wq, wk, _ = _weights(model, layer)
        everything = torch.arange(full, device="cpu")
        plans = [configs[c].plan for c in members]
        q_sets = [p.dims[(layer, h)] for p in plans for h in hs]
        gqa = plans[0].gqa
        if gqa == "q_only":
            k_sets = None
        elif gqa == "shared":
            k_sets = [p.k_edits.get((layer, h // gs), everything) for p in plans for h in hs]
        else:
            k_sets = q_sets
        q_rows = [slice(h * dh, (h + 1) * dh) for _ in plans for h in hs]
        k_rows = [slice((h // gs) * dh, (h // gs + 1) * dh) for _ in plans for h in hs]
        self.q = _gathered(wq, q_rows, q_sets, _bias(model, layer, "q"))
        self.k = None if k_sets is None else _gathered(wk, k_rows, k_sets, _bias(model, layer, "k"))

    def scores(self, x, cos, sin, rot_k, scaling, dtype) -> Tensor:
        """Pruned scores [b, configs, n, q, k], before the mask."""
        repeat = len(self.members)
        q = rotate(project(x, *self.q), cos, sin) * scaling
        k = rot_k.repeat(1, repeat, 1, 1) if self.k is None else rotate(project(x, *self.k), cos, sin)
        scores = (q @ k.transpose(-1, -2)).to(dtype)
        return scores.view(scores.shape[0], repeat, -1, *scores.shape[2:])


def _layer_groups(model, info, layer: int, hs: list[int],
                  configs: list[_Config]) -> tuple[list[_LayerGroup], list[int]]:
    """Groups of configurations pruning something in ``layer``, and those leaving it dense (k = d_model)."""
    by_k: dict[int, list[int]] = {}
    untouched = []
    for c, config in enumerate(configs):
        if config.plan is None:
            continue
        plan = config.plan
        changed = any((layer, h) in plan.q_edits for h in hs) or any(l == layer for l, _ in plan.k_edits) or any(
            (layer, h) in plan.k_copies for h in hs)
        if changed:
            by_k.setdefault(plan.k, []).append(c)
        else:
            untouched.append(c)
    return [_LayerGroup(model, info, layer, hs, configs, members) for members in by_k.values()], untouched


def _gathered(weight: Tensor, rows: list[slice], sets: list[Tensor], bias: Tensor | None):
    """(weight [n, d_head, width], index [n, width], bias) for :func:`project`; padded entries weigh zero."""
    width = max(s.numel() for s in sets)
    index = torch.stack([torch.cat([s, s.new_zeros(width - s.numel())]) for s in sets]).to(weight.device)
    valid = torch.stack([torch.arange(width, device="cpu") < s.numel() for s in sets]).to(weight.device)
    stacked = torch.stack([weight[r] for r in rows])
    gathered = stacked.gather(2, index[:, None, :].expand(-1, stacked.shape[1], -1))
    gathered = gathered * valid[:, None, :].to(weight.dtype)
    b = None if bias is None else torch.stack([bias[r] for r in rows])
    return gathered, index, b


def _layer_level(model, batch, heads, configs, gqa, basis, batch_size, show_progress) -> pd.DataFrame:
    info = model_info(model)
    by_layer = _layout(heads)
    layers = sorted(by_layer)
    gs = info.group_size
    groups = {layer: _layer_groups(model, info, layer, by_layer[layer][1], configs) for layer in layers}
    whole = [c for c, config in enumerate(configs) if config.plan is None]
    gram = {}
    for layer in layers:  # W_O^h.T W_O^h: ||z W_O^T||^2 = sum_rows z G z^T, without forming c
        wo = _o_columns(model, info, layer, by_layer[layer][1])
        gram[layer] = wo.transpose(1, 2) @ wo
    scaling = {layer: attention_scaling(model, info, layer) for layer in layers}
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

            def keep(name, seen=seen):
                def capture(tensor, hook):
                    seen[name] = tensor
                return capture

            def scores_hook(scores, hook, layer=layer, slots=slots, seen=seen, index=index, kv=kv, mask=mask,
                            real=real):
                device = scores.device
                mask, real = mask.to(device), real.to(device)  # the layer's device under a device_map
                dense = scores[:, index.to(device)]
                masked = masked_like(dense)[:, None]  # [b, 1, n, q, k]
                ref, ref_p = _softmax_pair(dense)
                v = seen["v"][:, :, kv.to(device)].float().transpose(1, 2)  # [b, n, pos, dh]
                rot_k = seen["rot_k"][:, :, kv.to(device)].transpose(1, 2)
                z = ref_p @ v
                g = gram[layer].to(device)
                norm = _gram_norm(z, g, real)
                same = pattern_errors(ref, ref, mask, ref_p, ref_p)
                for c in groups[layer][1]:  # nothing pruned in this layer: the dense pattern
                    acc.add(c, slots, {**same, "out_rel": torch.zeros_like(norm)})
                for c in whole:  # head removed: pattern untouched (no pattern error to speak of), output gone
                    acc.add(c, slots, {"alpha0": same["alpha0"], "frob_rel": torch.full_like(norm, nan),
                                       "kl": torch.full_like(norm, nan), "d_alpha0": torch.full_like(norm, nan),
                                       "out_rel": norm / norm})
                for group in groups[layer][0]:
                    pruned = group.scores(seen["x"], seen["cos"], seen["sin"], rot_k, scaling[layer], dense.dtype)
                    logp, p = _softmax_pair(pruned.masked_fill_(masked, torch.finfo(dense.dtype).min))
                    values = pattern_errors(ref[:, None], logp, mask, ref_p[:, None], p)
                    values["out_rel"] = _gram_norm(z[:, None] - p @ v[:, None], g, real) / norm[:, None]
                    shape = pruned.shape[:3]  # alpha0 is the dense value: [b, 1, n] broadcasts over configs
                    for i, c in enumerate(group.members):
                        acc.add(c, slots, {name: value.expand(shape)[:, i] for name, value in values.items()})
                seen.clear()

            p = f"blocks.{layer}.attn."
            hooks += [(p + "k.hook_in", keep("x")), (p + "hook_cos", keep("cos")), (p + "hook_sin", keep("sin")),
                      (p + "hook_rot_k", keep("rot_k")), (p + "hook_v", keep("v")),
                      (p + "hook_attn_scores", scores_hook)]
        run_hooked(model, sub, hooks, layers)
    return _frame(acc, heads, configs, gqa, basis, "layer", batch)


def _gram_norm(z: Tensor, gram: Tensor, real: Tensor) -> Tensor:
    """sqrt(sum over real rows of z G z^T) per [b, *heads]: the Frobenius norm of z W_O^T (z [b, *heads, pos, dh])."""
    quad = ((z @ gram) * z).sum(-1)  # [b, *heads, pos]
    rows = real.view(real.shape[0], *[1] * (quad.dim() - 2), real.shape[1])
    return (quad * rows).sum(-1).clamp(min=0).sqrt()


# --- the frame ----------------------------------------------------------------------------------

def _frame(acc: _Accumulator, heads, configs, gqa, basis, level: str, batch: TokenBatch) -> pd.DataFrame:
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
        plan = config.plan
        for slot, (layer, head) in enumerate(heads):
            rows.append({"level": level, "dims": config.dims, "k": config.k, "seed": config.seed,
                         "gqa": plan.gqa if plan is not None else gqa,
                         "basis": plan.basis if plan is not None else None, "layer": layer, "head": head,
                         **{name: float(acc.sums[name][c, slot] / n) for name in ("alpha0",) + METRICS},
                         **model_level, "n_prompts": n})
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["k"] = frame["k"].astype("Int64")
    frame["seed"] = frame["seed"].astype("Int64")
    frame.attrs.update({"level": level, "prepend_bos": batch.prepend_bos, "n_prompts": n,
                        "seq_len": int(batch.tokens.shape[1]), "metrics": list(METRICS)})
    return frame
