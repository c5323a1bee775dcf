"""Multi-layer QK pruning: which layers can be pruned together at k while keeping accuracy?

Selecting layer l prunes every sink-specialized head of l (found by a census on BOS-prepended
probe prompts) to k kept dims, through :func:`sinklens.prune_qk`: by default its layer's top-k BOS dims
(measured on the same prompts), or any kept-dims variant (``policy``, ``fill``, ``calibration``: a
:class:`~sinklens.prune.spec.PruneSpec`'s fields) fitted on one :class:`~sinklens.prune.calibration.CalibrationSet` (the
probe prompts, or ``calibration_tokens``). Evaluation items are split in two: decisions use the ``calibration``
half, every reported layer set is confirmed on the ``heldout`` half (see sinklens.assess.evaluation).

Strategies (each yields a path of layer sets of growing size, confirmed on held-out items):
- ``single_layer_rank``: rank layers by their own calibration retention, add them in that order;
- ``greedy``: forward selection: add the layer whose addition keeps the calibration retention
  highest (ties: lowest calibration loss);
- ``exhaustive``: every subset of the best ``exhaustive_pool`` single layers up to
  ``exhaustive_size`` layers; the best subset of each size (on calibration) is confirmed;
- ``random``: random orders of the candidate layers (a baseline), ``n_random`` of them.
A path stops after ``patience`` consecutive sets below the target on held-out items, or at
``max_layers``. Whole-head removal of the same heads is evaluated (``removal``) on each strategy's
largest set meeting the target, or its best-retaining set if none does (``"best"``), on every
confirmed set (``"all"``) or not at all (``"none"``).
"""

from __future__ import annotations

import itertools
import random as _random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from ..core.choices import REMOVAL, STRATEGIES, Removal, Strategy
from ..core.errors import InputError
from ..core.loading import model_info
from ..core.probes import probe_tokens
from ..core.progress import progress
from ..core.validate import check_choice, check_fraction, check_int, check_k, check_layers
from ..measure.census import run_census
from ..measure.massive import BASES, Basis, massive_activations
from ..measure.specialization import sink_specialized_heads
from ..prune.calibration import CalibrationSet, calibration_set
from ..prune.spec import (
    CALIBRATIONS,
    DEFAULT_POOL,
    FILLS,
    GQA_POLICIES,
    OBJECTIVES,
    POLICIES,
    Calibration,
    Fill,
    GQAPolicy,
    Objective,
    Policy,
    PruneSpec,
    check_heads,
)
from .evaluation import MEAN_ACC, EvalResult, build_plan, check_suite, load_items, retention, retention_value
from .sweep import Record, Sweep, open_results

EVAL_KWARGS = {"items", "n_lm_prompts", "lm_seq_len", "n_copy", "copy_len", "prepend_bos", "seed", "batch_tokens"}
SPLIT_DECIDE, SPLIT_CONFIRM = "calibration", "heldout"


def selection_loss(result: EvalResult) -> float:
    """Smooth loss of an evaluation, for tie-breaking: mean NLL per LM / copy token plus the mean
    multiple-choice cross-entropy over choices (lower is better).

    Args:
        result: an evaluation (:func:`sinklens.evaluate`).
    """
    items = result.per_item
    loss = 0.0
    for part in ("lm", "copy"):
        rows = items[items["part"] == part]
        if len(rows):
            loss += float(rows["nll"].sum() / rows["n_tokens"].sum())
    mc = items[items["part"] == "mc"]
    if len(mc):
        loss += float(mc["mc_nll"].mean())
    return loss


@dataclass
class LayerSelection:
    """Everything :func:`layer_selection` tried.

    ``table``: one row per (strategy, step, configuration): split, method (``qk`` pruning or
    ``remove`` whole heads), layers, heads, Q/K (or o_proj) parameters zeroed, every metric and
    its retention against the dense model on the same split, with a bootstrap CI for ``metric``.
    ``single_layer``: the single-layer calibration sweep. ``heads``: the sink-specialized heads;
    ``dims``: the kept dims of every candidate head, ``{"layer.head": [dims]}`` (whatever the policy; with
    ``bos_top`` the heads of a layer share their layer's dims). ``settings["spec"]``: the pruning (policy,
    fill, calibration...) of every candidate head.
    """

    table: pd.DataFrame
    single_layer: pd.DataFrame
    heads: list[tuple[int, int]]
    dims: dict[str, list[int]]
    dense: dict[str, dict[str, float]]
    settings: dict
    cost: dict = field(default_factory=dict)

    @property
    def metric(self) -> str:
        return self.settings["metric"]

    @property
    def target(self) -> float:
        return self.settings["target_retention"]

    def dense_table(self) -> pd.DataFrame:
        """Metrics of the dense model on each split, with the chance level of multiple-choice metrics."""
        chance = self.settings.get("chance", {})
        rows = [{"metric": name, SPLIT_DECIDE: self.dense[SPLIT_DECIDE][name], SPLIT_CONFIRM: value,
                 "chance": chance.get(name.replace("acc_norm", "acc"), np.nan)}
                for name, value in self.dense[SPLIT_CONFIRM].items()]
        return pd.DataFrame(rows)

    def confirmed(self, method: Literal["qk", "remove"] = "qk") -> pd.DataFrame:
        """Rows confirmed on held-out items (one per distinct configuration and strategy).

        Args:
            method: ``"qk"`` (QK pruning) or ``"remove"`` (whole-head removal).
        """
        t = self.table
        return t[(t["split"] == SPLIT_CONFIRM) & (t["method"] == method)]

    def frontier(self) -> pd.DataFrame:
        """Pareto frontier of held-out QK configurations: no other has more pruned heads and at
        least the same retention. Sorted by number of heads."""
        rows = self.confirmed().drop_duplicates("key").sort_values(["n_heads", "retention"], ascending=[False, False])
        keep, best = [], -np.inf
        for index, row in rows.iterrows():
            if row["retention"] > best:
                keep.append(index)
                best = row["retention"]
        return rows.loc[keep].sort_values("n_heads").reset_index(drop=True)

    def best(self, target: float | None = None) -> pd.Series | None:
        """The held-out QK configuration with the most pruned heads meeting ``target`` (default:
        the selection's target), ties broken by retention; None if none meets it.

        Args:
            target: the retention to meet (None: the selection's target).
        """
        target = self.target if target is None else check_fraction("target", target, open_low=True)
        rows = self.confirmed()
        rows = rows[rows["retention"] >= target]
        if rows.empty:
            return None
        return rows.sort_values(["n_heads", "retention"], ascending=[False, False]).iloc[0]

    def headline(self) -> dict:
        """The numbers a report leads with: the best configuration meeting the target (held-out),
        and whole-head removal of the same heads."""
        best = self.best()
        out = {"metric": self.metric, "target_retention": self.target, "n_sink_heads": len(self.heads),
               "n_configurations": int(len(self.table))}
        if best is None:
            return out | {"best_layers": None}
        removal = self.confirmed("remove")
        removal = removal[removal["layers"] == best["layers"]]
        return out | {"best_layers": str(best["layers"]), "best_n_heads": int(best["n_heads"]),
                      "best_params_zeroed": int(best["params_zeroed"]), "best_retention": float(best["retention"]),
                      "best_ci_low": float(best["ci_low"]), "best_ci_high": float(best["ci_high"]),
                      "removal_retention_same_heads": float(removal["retention"].iloc[0]) if len(removal) else None}

    def largest_meeting(self, targets: Sequence[float] = (0.91, 0.95)) -> pd.DataFrame:
        """Per strategy and target: the largest confirmed layer set meeting it, with whole-head
        removal of the same heads beside it.

        Args:
            targets: the retentions to meet.
        """
        removal = self.confirmed("remove").drop_duplicates("layers").set_index("layers")
        rows = []
        for strategy, group in self.confirmed().groupby("strategy", sort=False):
            for target in targets:
                ok = group[group["retention"] >= target]
                if ok.empty:
                    rows.append({"strategy": strategy, "target": target, "n_layers": 0})
                    continue
                best = ok.sort_values(["n_layers", "retention"], ascending=[False, False]).iloc[0]
                rows.append({"strategy": strategy, "target": target, "n_layers": int(best["n_layers"]),
                             "layers": best["layers"], "n_heads": int(best["n_heads"]), "heads": best["heads"],
                             "qk_params_zeroed": int(best["params_zeroed"]), "retention": best["retention"],
                             "ci_low": best["ci_low"], "ci_high": best["ci_high"],
                             "removal_retention": (removal.loc[best["layers"], "retention"]
                                                   if best["layers"] in removal.index else np.nan)})
        return pd.DataFrame(rows)

    def removal_comparison(self) -> pd.DataFrame:
        """Held-out retention of QK pruning against whole-head removal of the same heads, per layer set."""
        qk = self.confirmed().drop_duplicates("layers").set_index("layers")
        rm = self.confirmed("remove").drop_duplicates("layers").set_index("layers")
        both = qk.index.intersection(rm.index)
        out = pd.DataFrame({"n_layers": qk.loc[both, "n_layers"], "n_heads": qk.loc[both, "n_heads"],
                            "qk_retention": qk.loc[both, "retention"], "removal_retention": rm.loc[both, "retention"],
                            "qk_params_zeroed": qk.loc[both, "params_zeroed"],
                            "removal_params_zeroed": rm.loc[both, "params_zeroed"]})
        return out.reset_index().sort_values(["n_layers", "layers"], ignore_index=True)


def _check_strategies(strategy) -> list[str]:
    names = [strategy] if isinstance(strategy, str) else list(strategy) if strategy is not None else []
    if not names:
        raise InputError(f"strategy is empty: pass one of {STRATEGIES} (or a list of them).")
    for name in names:
        if name not in STRATEGIES:
            raise InputError(f"Unknown strategy {name!r}: use one of {STRATEGIES} (or a list of them).")
    return list(dict.fromkeys(names))


def _check_metric(metric: str, suite: str, items) -> None:
    parts = check_suite(suite)
    names = []
    if "lm" in parts:
        names += ["lm/ppl", "lm/acc"]
    if "mc" in parts:
        tasks = sorted(load_items(items)["task"].unique())
        names += ["mc/acc", "mc/acc_norm"] + [f"mc/{t}/{m}" for t in tasks for m in ("acc", "acc_norm")]
    if "copy" in parts:
        names += ["copy/acc"]
    names.append(MEAN_ACC)
    if metric not in names:
        raise InputError(f"Unknown metric {metric!r} for suite {suite!r}: use one of {names}.")


def layer_selection(model, k: int = 10, target_retention: float = 0.91,
                    strategy: Strategy | Sequence[Strategy] = "greedy", *,
                    metric: str = MEAN_ACC, layers: Sequence[int] | None = None,
                    heads: Sequence[tuple[int, int]] | None = None, n_prompts: int = 32,
                    seq_len: int = 64, eps: float = 0.3, q: float = 0.9, basis: Basis = "normalized",
                    gqa: GQAPolicy = "exact", policy: Policy = "bos_top", fill: Fill = "zero",
                    calibration: Calibration = "none", pool: int = DEFAULT_POOL, objective: Objective = "frob_rel",
                    calibration_tokens=None, suite: str = "default", limit: int | None = None,
                    eval_kwargs: dict | None = None,
                    max_layers: int | None = None, greedy_pool: int | None = None, exhaustive_pool: int = 6,
                    exhaustive_size: int = 3, n_random: int = 2, patience: int = 2, removal: Removal = "best",
                    n_boot: int = 500, seed: int = 0, results: str | Path | None = None, fresh: bool = False,
                    show_progress: bool = True) -> LayerSelection:
    """Find layer sets whose sink-specialized heads can be QK-pruned at ``k`` keeping ``metric``.

    ``metric`` (default ``"acc/mean"``: the mean of the suite's accuracies, LM next-token, zero-shot
    multiple choice and copying, so that no capability can silently collapse) is the one whose
    retention the target applies to; every metric is reported.

    Returns a :class:`LayerSelection` (every configuration tried, the Pareto frontier of pruned
    heads against held-out retention, the best configuration meeting ``target_retention``).
    ``layers`` restricts the candidate layers (default: every layer holding a sink-specialized
    head); ``n_prompts``/``seq_len``/``eps``/``q`` define the probe census; ``policy``, ``fill``,
    ``calibration`` (with ``pool`` and ``objective`` for ``optimized``) the kept-dims variant of every pruned
    head, fitted on the probe prompts (or ``calibration_tokens``); ``suite``, ``limit``
    and ``eval_kwargs`` (other :func:`sinklens.evaluate` arguments) the evaluation; ``results``
    a SQLite file that makes the sweep resumable (None: in memory).

    Args:
        model: a bridge from :func:`sinklens.load_model`, without active edits.
        k: input dims kept per pruned head.
        target_retention: the retention of ``metric`` to meet (a fraction).
        strategy: one of ``STRATEGIES`` or a list of them (module docstring).
        metric: the selection metric (any metric of :func:`sinklens.evaluate`).
        layers: the candidate layers (None: every layer holding a sink-specialized head).
        heads: the sink-specialized heads, e.g. a run's list from notebook 02 (None: measured here by a census of
            the probe set with ``eps`` and ``q``).
        n_prompts, seq_len: the probe set of the census and of the fitted parts (``split="probe"``).
        eps, q: the sink-specialized definition (alpha_0 > eps on >= q of the prompts).
        basis, gqa: the pruning, as in :func:`sinklens.apply_pruning` (recorded as ``settings["spec"]``).
        policy: how each pruned head's kept dims are chosen: ``"bos_top"`` (default), ``"random"``,
            ``"weight_norm"``, ``"act_weight"`` or ``"optimized"`` (see :class:`~sinklens.prune.spec.PruneSpec`).
        fill: the value of dropped dims, ``"zero"`` (default) or ``"mean"``.
        calibration: ``"none"`` (default) or ``"temperature"``.
        pool, objective: the ``optimized`` search's candidate dims and pattern error.
        calibration_tokens: what the variant is fitted on: a :class:`~sinklens.prune.calibration.CalibrationSet` or
            BOS-prepended ids (None: the probe prompts; a plain ``bos_top``/zero/none variant then reads its
            dims from the probe's BOS vectors, as before the other variants existed).
        suite, limit, eval_kwargs: the evaluation (other :func:`sinklens.evaluate` arguments in ``eval_kwargs``).
        max_layers: the largest layer set tried (None: no limit).
        greedy_pool: greedy chooses among this many best single layers (None: all).
        exhaustive_pool, exhaustive_size: exhaustive enumerates subsets of the best ``exhaustive_pool`` single
            layers up to ``exhaustive_size`` layers.
        n_random: random layer orders (a baseline).
        patience: a path stops after this many consecutive sets below the target (held-out).
        removal: whole-head removal of the same heads: ``"best"``, ``"all"`` or ``"none"`` (module docstring).
        n_boot: bootstrap resamples of the retention CIs.
        seed: the seed of the random orders.
        results: a SQLite file that makes the sweep resumable (None: in memory).
        fresh: delete an existing results file first.
        show_progress: show progress bars.
    """
    info = model_info(model)
    strategies = _check_strategies(strategy)
    k = check_k(k, info.d_model)
    target = check_fraction("target_retention", target_retention, open_low=True)
    eval_kwargs = dict(eval_kwargs or {})
    for reserved in ("split", "suite", "limit"):
        if reserved in eval_kwargs:
            raise InputError(f"eval_kwargs must not set {reserved!r}: pass it as layer_selection's own argument "
                             "(split is chosen by the selection).")
    _check_metric(metric, suite, eval_kwargs.get("items"))
    candidates = check_layers(layers, info.n_layers)
    if heads is not None:  # a run's head list (notebook 02): no census here
        heads = check_heads(heads, info)
    max_layers = check_int("max_layers", max_layers, minimum=1, allow_none=True)
    greedy_pool = check_int("greedy_pool", greedy_pool, minimum=1, allow_none=True)
    exhaustive_pool = check_int("exhaustive_pool", exhaustive_pool, minimum=1, allow_none=True)
    exhaustive_size = check_int("exhaustive_size", exhaustive_size, minimum=1, allow_none=True)
    n_random = check_int("n_random", n_random, minimum=1, allow_none=True)
    patience = check_int("patience", patience, minimum=1, allow_none=True)
    check_choice("removal", removal, REMOVAL)
    n_boot = check_int("n_boot", n_boot, minimum=1, allow_none=True)
    check_choice("basis", basis, BASES)
    check_choice("gqa policy", gqa, GQA_POLICIES)
    check_choice("policy", policy, POLICIES)  # explicit dims are not a policy of a selection
    check_choice("fill", fill, FILLS)
    check_choice("calibration", calibration, CALIBRATIONS)
    check_choice("objective", objective, OBJECTIVES)
    pool = check_int("pool", pool, minimum=1, meaning="candidate dims of the optimized search")
    variant = dict(basis=basis, gqa=gqa, fill=fill, calibration=calibration, objective=objective, pool=pool)
    PruneSpec([(0, 0)], k, policy, **variant)  # k against pool, before any forward
    check_fraction("eps", eps)
    check_fraction("q", q)
    if calibration_tokens is not None:
        calibration_tokens = calibration_set(model, calibration_tokens, argument="calibration_tokens")
    unknown = sorted(set(eval_kwargs) - EVAL_KWARGS)
    if unknown:
        raise InputError(f"Unknown eval_kwargs {unknown}: use any of {sorted(EVAL_KWARGS)}.")
    plans = {split: build_plan(model, suite, limit, split=split, **eval_kwargs)
             for split in (SPLIT_DECIDE, SPLIT_CONFIRM)}
    open_results(model, results, fresh=fresh).close()  # refuse another model's results before any forward

    # measured, never typed in: the sink-specialized heads and the kept dims of each of them
    probe = probe_tokens(model, n_prompts=n_prompts, seq_len=seq_len, prepend_bos=True, split="probe")
    if heads is None:
        census = run_census(model, probe, show_progress=show_progress)
        heads = sink_specialized_heads(census.sink_scores(0), eps=eps, q=q)
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        if layer in candidates:
            by_layer.setdefault(layer, []).append(head)
    if not by_layer:
        raise InputError(f"No sink-specialized head (alpha_0 > {eps} on >= {q:.0%} of {n_prompts} probe prompts) in "
                         f"layers {candidates}: lower eps or q, or widen layers.")
    cand = sorted(by_layer)
    spec = PruneSpec([(l, h) for l in cand for h in by_layer[l]], k, policy, **variant)
    if calibration_tokens is not None:
        tokens = calibration_tokens
    elif spec.policy == "bos_top" and not spec.fits_inputs():
        tokens = massive_activations(model, probe, layers=cand, show_progress=show_progress)
    else:  # one calibration set of the probe prompts (the census's) for every configuration
        tokens = CalibrationSet(model, probe, argument="calibration_tokens")
    sweep = Sweep(model, plans, spec, tokens=tokens, results=results, show_progress=show_progress)
    try:
        run = _Run(sweep, metric, target, n_boot, max_layers, patience, show_progress)
        run.single_layers(cand)
        order = run.rank(cand)
        for name in strategies:
            if name == "single_layer_rank":
                run.path("single_layer_rank", [order[: i + 1] for i in range(len(order))])
            elif name == "greedy":
                run.greedy(order if greedy_pool is None else order[:greedy_pool])
            elif name == "exhaustive":
                run.exhaustive(order[:exhaustive_pool], exhaustive_size)
            else:
                rng = _random.Random(seed)
                for i in range(n_random):
                    shuffled = rng.sample(cand, len(cand))
                    run.path("random", [shuffled[: j + 1] for j in range(len(shuffled))], replicate=i)
        if removal != "none":
            run.removal(every=removal == "all")
        table = pd.DataFrame(run.rows)
        single = table[(table["strategy"] == "single_layer") & (table["method"] == "qk")].drop(columns="strategy")
        dense = {split: sweep.dense(split).metrics for split in (SPLIT_DECIDE, SPLIT_CONFIRM)}
        settings = {"k": k, "target_retention": target, "metric": metric, "strategies": strategies, "suite": suite,
                    "limit": limit, "eval_kwargs": eval_kwargs, "n_prompts": n_prompts, "seq_len": seq_len, "eps": eps,
                    "q": q, "basis": basis, "gqa": gqa, "spec": spec.as_dict(), "candidates": cand, "model": info.name,
                    "results": str(results) if results is not None else None, "seed": seed,
                    "calibration_tokens": sweep.tokens.describe() if isinstance(sweep.tokens, CalibrationSet) else None,
                    "chance": sweep.dense(SPLIT_CONFIRM).result.chance}
        dims = {f"{l}.{h}": d.tolist() for (l, h), d in sorted(sweep.dims.items())}
        return LayerSelection(table=table, single_layer=single.reset_index(drop=True), heads=sorted(heads), dims=dims,
                              dense=dense, settings=settings, cost=sweep.cost())
    finally:
        sweep.close()


class _Run:
    """The bookkeeping of one selection: evaluate through the sweep, add annotated table rows."""

    def __init__(self, sweep: Sweep, metric: str, target: float, n_boot: int, max_layers: int | None, patience: int,
                 show_progress: bool):
        self.sweep, self.metric, self.target = sweep, metric, target
        self.n_boot, self.max_layers, self.patience = n_boot, max_layers, patience
        self.show_progress = show_progress
        self.rows: list[dict] = []
        self.single: dict[int, Record] = {}
        self.confirmed_sets: list[tuple[int, ...]] = []

    def _row(self, record: Record, strategy: str, step: int, replicate: int = 0) -> dict:
        dense = self.sweep.dense(record.split).result
        table = retention(dense, record.result, n_boot=self.n_boot)
        ret = table.set_index("metric")
        params = record.params or {}
        row = {"strategy": strategy, "replicate": replicate, "step": step, "split": record.split,
               "method": record.method, "layers": ",".join(map(str, record.layers)), "n_layers": len(record.layers),
               "heads": " ".join(f"{l}.{h}" for l, h in record.heads), "n_heads": len(record.heads),
               "params_zeroed": int(params.get("total", 0)), "params_share": float(params.get("share", 0.0)),
               "retention": float(ret.loc[self.metric, "retention"]), "ci_low": float(ret.loc[self.metric, "ci_low"]),
               "ci_high": float(ret.loc[self.metric, "ci_high"]), "loss": selection_loss(record.result),
               "key": record.key, "cached": record.cached}
        for name, values in ret.iterrows():
            row[name] = values["pruned"]
            row[f"retention:{name}"] = values["retention"]
        self.rows.append(row)
        return row

    def _score(self, record: Record) -> tuple[float, float]:
        """Sort key, best first: highest retention of the metric, then lowest loss."""
        value = retention_value(self.sweep.dense(record.split).result, record.result, self.metric)
        return (-value if np.isfinite(value) else np.inf, selection_loss(record.result))

    def single_layers(self, layers: list[int]) -> None:
        self.sweep.dense(SPLIT_DECIDE)
        self.sweep.dense(SPLIT_CONFIRM)
        records = self.sweep.run([("qk", (l,), SPLIT_DECIDE) for l in layers], desc="single layers")
        for layer, record in zip(layers, records):
            self.single[layer] = record
            self._row(record, "single_layer", 1)

    def rank(self, layers: list[int]) -> list[int]:
        return sorted(layers, key=lambda l: (self._score(self.single[l]), l))

    def _limit(self, sets: list) -> list:
        return sets if self.max_layers is None else [s for s in sets if len(s) <= self.max_layers]

    def _confirm(self, layers, strategy: str, step: int, replicate: int = 0) -> float:
        record = self.sweep.evaluate("qk", layers, SPLIT_CONFIRM)
        row = self._row(record, strategy, step, replicate)
        if tuple(sorted(layers)) not in self.confirmed_sets:
            self.confirmed_sets.append(tuple(sorted(layers)))
        return row["retention"]

    def path(self, strategy: str, sets: list, replicate: int = 0) -> None:
        misses = 0
        for step, layers in enumerate(self._limit(sets), start=1):
            value = self._confirm(layers, strategy, step, replicate)
            misses = 0 if value >= self.target else misses + 1
            if misses >= self.patience:
                break

    def greedy(self, pool: list[int]) -> None:
        chosen: list[int] = []
        misses, step = 0, 0
        while len(chosen) < len(pool) and (self.max_layers is None or len(chosen) < self.max_layers):
            step += 1
            left = [l for l in pool if l not in chosen]
            if step == 1:
                records = {l: self.single[l] for l in left}
            else:
                if not all(self.sweep.has("qk", chosen + [l], SPLIT_DECIDE) for l in left):
                    self.sweep.evaluate("qk", chosen, SPLIT_DECIDE, keep_prefix=True)  # residuals of the base set
                records = {l: self.sweep.evaluate("qk", chosen + [l], SPLIT_DECIDE)
                           for l in progress(left, desc=f"greedy step {step}", enabled=self.show_progress)}
            for record in records.values():
                self._row(record, "greedy", step)
            best = min(left, key=lambda l: (self._score(records[l]), l))
            chosen.append(best)
            value = self._confirm(chosen, "greedy", step)
            misses = 0 if value >= self.target else misses + 1
            if misses >= self.patience:
                break

    def exhaustive(self, pool: list[int], size: int) -> None:
        for n in range(1, min(size, len(pool)) + 1):
            if self.max_layers is not None and n > self.max_layers:
                break
            subsets = [tuple(sorted(s)) for s in itertools.combinations(pool, n)]
            records = self.sweep.run([("qk", s, SPLIT_DECIDE) for s in subsets], desc=f"exhaustive size {n}")
            for record in records:
                self._row(record, "exhaustive", n)
            best = min(records, key=lambda r: (self._score(r), r.layers))
            self._confirm(best.layers, "exhaustive", n)

    def removal(self, every: bool) -> None:
        """Whole-head removal of the heads of confirmed layer sets: every one, or per strategy the
        largest set meeting the target (the best-retaining set when none meets it)."""
        sets = list(self.confirmed_sets)
        if not every:
            table = pd.DataFrame(self.rows)
            confirmed = table[(table["split"] == SPLIT_CONFIRM) & (table["method"] == "qk")]
            chosen = set()
            for _, group in confirmed.groupby("strategy"):
                ok = group[group["retention"] >= self.target]
                pick = (ok.sort_values(["n_layers", "retention"], ascending=[False, False]) if len(ok)
                        else group.sort_values("retention", ascending=False))
                chosen.add(pick.iloc[0]["layers"])
            sets = [s for s in sets if ",".join(map(str, s)) in chosen]
        configs = [("remove", layers, SPLIT_CONFIRM) for layers in sets]
        for record in self.sweep.run(configs, desc="whole-head removal"):
            self._row(record, "removal", len(record.layers))


__all__ = ["LayerSelection", "STRATEGIES", "layer_selection", "selection_loss"]
