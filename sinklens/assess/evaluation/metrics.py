"""Metrics of an evaluation, the read-only :class:`EvalResult`, and retention of a pruned model.

From the per-item table (one row per item: summed NLL, scored tokens, top-1 hits; for MC items
acc / acc_norm / mc_nll):

- ``lm/ppl`` = exp(sum NLL / n_tokens), ``lm/acc`` = top-1 next-token accuracy over every text token;
- ``mc/<task>/acc``: argmax of the summed continuation log-likelihood is the gold choice;
  ``mc/<task>/acc_norm``: the same with each sum divided by the choice's length in characters (as
  lm-evaluation-harness's ``acc_norm``); ``mc/acc`` and ``mc/acc_norm`` = mean over task types;
- ``copy/acc``: top-1 accuracy on the predictable tokens of the second copy;
- ``acc/mean``: mean of the parts' accuracies (lm/acc, mc/acc, copy/acc) the suite has.

Retention = metric(pruned) / metric(dense) on the same items; for perplexity (lower is better) the
direction-consistent form dense_ppl / pruned_ppl, so 1 means unchanged and < 1 worse for every metric.
Confidence intervals: paired percentile bootstrap over items (per task group).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd

from ...core.deprecation import keyword_only_after
from ...core.errors import InputError
from ...core.validate import check_fraction, check_int

MEAN_ACC = "acc/mean"  # mean of the parts' accuracies (lm/acc, mc/acc, copy/acc) present in the suite
ITEM_COLUMNS = ["part", "task", "item", "nll", "n_tokens", "n_correct", "acc", "acc_norm", "mc_nll", "n_choices"]


def per_item_table(units: pd.DataFrame, ll: np.ndarray, correct: np.ndarray, count: np.ndarray) -> pd.DataFrame:
    """One row per item (columns ``ITEM_COLUMNS``) from the sums accumulated per scoring unit.

    Args:
        units: one row per scoring unit (LM prompt, copy sequence, MC choice): part, task, item, and for
            MC choice_chars, gold, n_choices; the choices of an item are contiguous.
        ll: summed target log-likelihood of each unit.
        correct: number of top-1 hits of each unit.
        count: number of scored tokens of each unit.
    """
    frames = []
    plain = units["part"] != "mc"
    if plain.any():
        sub = units[plain]
        idx = sub.index.to_numpy()
        frames.append(pd.DataFrame({
            "part": sub["part"].to_numpy(), "task": sub["task"].to_numpy(), "item": sub["item"].to_numpy(),
            "nll": -ll[idx], "n_tokens": count[idx], "n_correct": correct[idx], "acc": correct[idx] / count[idx],
            "acc_norm": np.nan, "mc_nll": np.nan, "n_choices": 0}))
    mc = units[~plain]
    if len(mc):
        idx = mc.index.to_numpy()
        item_ids = mc["item"].to_numpy()
        starts = np.flatnonzero(np.r_[True, item_ids[1:] != item_ids[:-1]])  # choices of an item are contiguous
        ends = np.r_[starts[1:], len(idx)]
        lls_all, chars_all = ll[idx], mc["choice_chars"].to_numpy().astype(float)
        gold_all, tasks = mc["gold"].to_numpy().astype(int), mc["task"].to_numpy()
        acc, acc_norm, mc_nll, gold_ll, gold_n, n_choices = [], [], [], [], [], []
        for a, b in zip(starts, ends):
            lls, gold = lls_all[a:b], gold_all[a]
            acc.append(float(np.argmax(lls) == gold))
            acc_norm.append(float(np.argmax(lls / chars_all[a:b]) == gold))
            shifted = lls - lls.max()
            mc_nll.append(float(np.log(np.exp(shifted).sum()) - shifted[gold]))
            gold_ll.append(lls[gold])
            gold_n.append(count[idx[a + gold]])
            n_choices.append(b - a)
        frames.append(pd.DataFrame({
            "part": "mc", "task": tasks[starts], "item": item_ids[starts], "nll": -np.asarray(gold_ll),
            "n_tokens": gold_n, "n_correct": acc, "acc": acc, "acc_norm": acc_norm, "mc_nll": mc_nll,
            "n_choices": n_choices}))
    table = pd.concat(frames, ignore_index=True)
    table["n_choices"] = table["n_choices"].astype(int)
    return table[ITEM_COLUMNS]


@dataclass(eq=False, repr=False)
class EvalResult(Mapping):
    """The metrics of one evaluation, as a read-only mapping of metric name -> float.

    ``result["acc/mean"]``, ``dict(result)``, ``result.items()``, ``len(result)`` and iteration over the
    metric names work as on a dict. Metric names: ``lm/ppl``, ``lm/acc``, ``mc/<task>/acc``,
    ``mc/<task>/acc_norm``, ``mc/acc``, ``mc/acc_norm`` (mean over task types), ``copy/acc``, and
    ``acc/mean`` (the mean of the accuracies lm/acc, mc/acc, copy/acc that the suite has).

    Args:
        per_item: one row per item (columns ``part, task, item, nll, n_tokens, n_correct, acc, acc_norm,
            mc_nll, n_choices``); the metrics are computed from it and :func:`retention` bootstraps over it.
        meta: what was evaluated (suite, split, limit, item file digest, settings).
        resid: residuals captured for later runs ({layer: one tensor per batch}); usually empty.
        cost: tokens and layers run.
    """

    per_item: pd.DataFrame
    meta: dict = field(default_factory=dict)
    resid: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)

    @cached_property
    def _values(self) -> dict[str, float]:
        return compute_metrics(self.per_item)

    @property
    def metrics(self) -> dict[str, float]:
        """The metrics as a plain dict (a copy: ``dict(result)`` gives the same)."""
        return dict(self._values)

    def __getitem__(self, name: str) -> float:
        try:
            return self._values[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a metric of this evaluation; it has {sorted(self._values)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        shown = ", ".join(f"{name!r}: {value:.4g}" for name, value in self._values.items())
        return f"EvalResult({{{shown}}}, n_items={len(self.per_item)}, suite={self.meta.get('suite')!r})"

    @property
    def chance(self) -> dict[str, float]:
        """Chance level of each MC task type (mean of 1 / number of choices) and of ``mc/acc``."""
        mc = self.per_item[self.per_item["part"] == "mc"]
        per_task = {f"mc/{task}/acc": float((1.0 / g["n_choices"]).mean()) for task, g in mc.groupby("task")}
        if per_task:
            per_task["mc/acc"] = float(np.mean(list(per_task.values())))
        return per_task


def _groups(per_item: pd.DataFrame) -> list[tuple[str, str, np.ndarray]]:
    """(part, task, row positions) of every task group, sorted by part and task."""
    parts, tasks = per_item["part"].to_numpy().astype(str), per_item["task"].to_numpy().astype(str)
    pairs = sorted(set(zip(parts, tasks)))
    return [(part, task, np.flatnonzero((parts == part) & (tasks == task))) for part, task in pairs]


def _metric_arrays(per_item: pd.DataFrame, weights: dict[tuple[str, str], np.ndarray]) -> dict[str, np.ndarray]:
    """Every metric for each weighting of the items (weights[(part, task)]: [n_draws, n_items])."""
    cols = {c: per_item[c].to_numpy(dtype=float) for c in ("nll", "n_tokens", "n_correct", "acc", "acc_norm")}
    out: dict[str, np.ndarray] = {}
    mc_acc, mc_norm = [], []
    for part, task, idx in _groups(per_item):
        w = weights[(part, task)]
        col = {c: v[idx] for c, v in cols.items()}
        if part == "lm":
            n = w @ col["n_tokens"]
            out["lm/ppl"] = np.exp((w @ col["nll"]) / n)
            out["lm/acc"] = (w @ col["n_correct"]) / n
        elif part == "copy":
            out["copy/acc"] = (w @ col["n_correct"]) / (w @ col["n_tokens"])
        else:
            total = w.sum(1)
            acc, norm = (w @ col["acc"]) / total, (w @ col["acc_norm"]) / total
            out[f"mc/{task}/acc"], out[f"mc/{task}/acc_norm"] = acc, norm
            mc_acc.append(acc)
            mc_norm.append(norm)
    if mc_acc:
        out["mc/acc"] = np.mean(mc_acc, axis=0)
        out["mc/acc_norm"] = np.mean(mc_norm, axis=0)
    parts = [out[name] for name in ("lm/acc", "mc/acc", "copy/acc") if name in out]
    if parts:
        out[MEAN_ACC] = np.mean(parts, axis=0)
    return out


def compute_metrics(per_item: pd.DataFrame) -> dict[str, float]:
    """The metrics of a per-item table (see :class:`EvalResult`).

    Args:
        per_item: the per-item table of an :class:`EvalResult`.
    """
    weights = {(part, task): np.ones((1, len(idx))) for part, task, idx in _groups(per_item)}
    return {name: float(values[0]) for name, values in _metric_arrays(per_item, weights).items()}


def lower_is_better(metric: str) -> bool:
    """Perplexity-like metrics, whose retention is dense / pruned.

    Args:
        metric: a metric name.
    """
    return metric.endswith("ppl")


def _ratio(dense: np.ndarray, pruned: np.ndarray, metric: str) -> np.ndarray:
    """pruned / dense (dense / pruned for perplexity); exactly 1 where the two are equal (0 / 0
    included), NaN where the denominator is 0 and the numerator is not."""
    num, den = (dense, pruned) if lower_is_better(metric) else (pruned, dense)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return np.where(num == den, 1.0, ratio)


def retention(dense: EvalResult, pruned: EvalResult, *, n_boot: int = 1000, ci: float = 0.95,
              seed: int = 0) -> pd.DataFrame:
    """Retention of every metric, pruned against dense on the same items, with a paired bootstrap CI.

    retention = pruned / dense (dense / pruned for perplexity): 1 = unchanged, < 1 = worse.
    The CI resamples items with replacement within each task group (the same draw for both
    results) and takes percentiles of the recomputed ratio. Equal metrics give exactly 1 (0 / 0
    included); NaN where the dense metric is 0 and the pruned one is not.
    Returns one row per metric: metric, dense, pruned, retention, ci_low, ci_high.

    Args:
        dense: the evaluation of the unpruned model.
        pruned: the evaluation of the pruned model, with the same suite, items, split and limit.
        n_boot: bootstrap draws.
        ci: confidence level of the interval, in (0, 1].
        seed: seed of the bootstrap draws.
    """
    _check_same_items(dense, pruned)
    n_boot = check_int("n_boot", n_boot, minimum=1, meaning="bootstrap draws")
    check_fraction("ci", ci, open_low=True)
    seed = check_int("seed", seed, minimum=0)
    rng = np.random.default_rng(seed)
    weights = {}
    for part, task, idx in _groups(dense.per_item):
        draws = rng.integers(0, len(idx), size=(n_boot, len(idx)))
        counts = np.zeros((n_boot, len(idx)))
        np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
        weights[(part, task)] = counts
    point_d, point_p = dict(dense), dict(pruned)
    boot_d = _metric_arrays(dense.per_item, weights)
    boot_p = _metric_arrays(pruned.per_item, weights)
    tail = (1 - ci) / 2 * 100
    rows = []
    for name in point_d:
        ratio = float(_ratio(np.array([point_d[name]]), np.array([point_p[name]]), name)[0])
        draws = _ratio(boot_d[name], boot_p[name], name)
        low, high = (np.nanpercentile(draws, [tail, 100 - tail]) if np.isfinite(draws).any() else (np.nan, np.nan))
        rows.append({"metric": name, "dense": point_d[name], "pruned": point_p[name], "retention": ratio,
                     "ci_low": float(low), "ci_high": float(high)})
    return pd.DataFrame(rows)


def _check_same_items(dense: EvalResult, pruned: EvalResult) -> None:
    for name, value in (("dense", dense), ("pruned", pruned)):
        if not isinstance(value, EvalResult):
            raise InputError(f"{name} must be an EvalResult from sinklens.evaluate, got {type(value).__name__}.")
    keys = ["part", "task", "item"]
    if not dense.per_item[keys].equals(pruned.per_item[keys]):
        raise InputError("The two results were computed on different items (suite, limit, split or item file differ): "
                         "evaluate both with the same arguments.")


@keyword_only_after("pruned", since="0.2")
def retention_value(dense: EvalResult, pruned: EvalResult, *, metric: str = MEAN_ACC) -> float:
    """Point retention of one metric (no bootstrap): pruned / dense, dense / pruned for perplexity.

    Args:
        dense: the evaluation of the unpruned model.
        pruned: the evaluation of the pruned model on the same items.
        metric: the metric's name (default ``acc/mean``).
    """
    _check_same_items(dense, pruned)
    if metric not in dense:
        raise InputError(f"Unknown metric {metric!r}: this evaluation has {sorted(dense)}.")
    return float(_ratio(np.array([dense[metric]]), np.array([pruned[metric]]), metric)[0])
