"""What an attention calibration (ACT) does besides its gain: the sinks it leaves, and how it compares with pruning.

- :func:`calibration_census`: a census of the calibrated heads with and without the calibration, on the same
  prompts: ACT scales a non-first sink's column down and hands the freed mass to the row's other keys in proportion
  to their weights, so most of it flows back to the first token when that token is the head's main sink; the table
  says how far alpha_0 rises and how many non-first sinks (the census' definition, with the calibration's
  threshold and min_queries) remain.
- :func:`calibration_comparison`: on the same heads and held-out items, QK pruning at k, whole-head removal,
  calibration alone and QK pruning plus calibration (the pruning edits the weights, the calibration the pattern
  computed from them: the calibrated pattern is the pruned head's), each against the dense model with a paired
  bootstrap interval. Pruning and removal are what sinklens removes; calibration is what ACT adds: one table puts
  the cost of the first next to the gain of the second.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import numpy as np
import pandas as pd

from ..core.edits import active_edits
from ..core.errors import InputError
from ..core.loading import model_info
from ..core.validate import check_int
from ..measure.census import run_census
from ..prune.attention_calibration import CalibrationOptions, calibrate_attention
from ..prune.pruning import prune_qk
from ..prune.removal import remove_heads
from ..prune.spec import Head, PruneSpec, check_heads
from .evaluation import MEAN_ACC, EvalPlan, retention

COMPARED = ("qk", "head_removal", "calibration", "qk+calibration")  # the rows of calibration_comparison


def _options(options) -> CalibrationOptions:
    if options is None:
        return CalibrationOptions()
    if not isinstance(options, CalibrationOptions):
        raise InputError(f"options must be a sinklens.CalibrationOptions, got {type(options).__name__}.")
    return options


def calibration_census(model, tokens, heads: Sequence[Head], *, options: CalibrationOptions | None = None,
                       batch_size: int = 8, show_progress: bool = True) -> pd.DataFrame:
    """alpha_0 and the non-first sinks of ``heads`` without and with their calibration, on the same prompts.

    One row per head: layer, head, ``alpha0_before`` / ``alpha0_after`` (mean over prompts), their difference
    ``alpha0_change``, ``non_first_before`` / ``non_first_after`` (non-first sinks per prompt, mean: keys other than
    the first with a column score above the calibration's threshold, seen by at least its min_queries queries).

    Args:
        model: a bridge from :func:`sinklens.load_model`, without active edits.
        tokens: the prompts (BOS-prepended ids or a TokenBatch, as :func:`sinklens.run_census`).
        heads: the calibrated ``(layer, head)`` pairs.
        options: the calibration (None: :class:`sinklens.CalibrationOptions` defaults).
        batch_size: prompts per forward.
        show_progress: show progress bars.
    """
    options = _options(options)
    heads = check_heads(heads, model_info(model))
    if not heads:
        raise InputError("heads is empty: pass the calibrated (layer, head) pairs.")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    if active_edits(model):
        raise InputError("The model has active edits: measure the calibration's census on the dense model.")
    layers = sorted({l for l, _ in heads})
    before = run_census(model, tokens, layers=layers, batch_size=batch_size, show_progress=show_progress)
    with calibrate_attention(model, heads, beta=options.beta, threshold=options.threshold,
                             min_queries=options.min_queries):
        after = run_census(model, tokens, layers=layers, batch_size=batch_size, show_progress=show_progress)
    rows = []
    for name, census in (("before", before), ("after", after)):
        frame = census.to_frame(threshold=options.threshold, min_queries=options.min_queries)
        means = frame.groupby(["layer", "head"])[["alpha0", "n_other_sinks"]].mean()
        rows.append(means.rename(columns={"alpha0": f"alpha0_{name}", "n_other_sinks": f"non_first_{name}"}))
    table = pd.concat(rows, axis=1).reset_index()
    table = table[[(int(l), int(h)) in set(heads) for l, h in zip(table["layer"], table["head"])]]
    table["alpha0_change"] = table["alpha0_after"] - table["alpha0_before"]
    columns = ["layer", "head", "alpha0_before", "alpha0_after", "alpha0_change", "non_first_before",
               "non_first_after"]
    return table[columns].astype({"non_first_before": float, "non_first_after": float}).reset_index(drop=True)


def calibration_comparison(model, spec: PruneSpec, plan: EvalPlan, *, options: CalibrationOptions | None = None,
                           calibration=None, metric: str = MEAN_ACC, n_boot: int = 500,
                           ci: float = 0.95) -> pd.DataFrame:
    """QK pruning, whole-head removal, calibration, and pruning plus calibration of the same heads, side by side.

    One row per method of ``COMPARED``: method, n_heads, params_zeroed (Q/K weights for pruning, o_proj weights for
    removal, none for calibration alone), the retention of ``metric`` with its paired bootstrap interval, and the
    retention of every metric (``retention:<metric>`` columns). The layers below the first edited one are run once:
    the dense run keeps the residual entering that layer and every edit starts there (as the sweep's prefix cache),
    ``1 + 4 (L - l) / L`` forward-equivalents for a first edited layer l.

    Args:
        model: a bridge from :func:`sinklens.load_model`, without active edits.
        spec: the QK pruning of the heads (a :class:`sinklens.PruneSpec` with heads and k); its heads are the ones
            removed and calibrated.
        plan: the evaluation plan (held-out items), built with ``share_context=False``.
        options: the calibration (None: :class:`sinklens.CalibrationOptions` defaults).
        calibration: what the pruning's fitted parts are measured on (as :func:`sinklens.prune_qk`).
        metric: the metric whose interval is reported.
        n_boot: bootstrap draws.
        ci: level of the intervals.
    """
    options = _options(options)
    if not isinstance(spec, PruneSpec) or spec.is_template:
        raise InputError("spec must be a sinklens.PruneSpec with heads (sl.PruneSpec(heads, k, ...)).")
    if not isinstance(plan, EvalPlan):
        raise InputError(f"plan must be an EvalPlan (sinklens.assess.evaluation.build_plan), got "
                         f"{type(plan).__name__}.")
    if plan.shares_context:
        raise InputError("plan shares MC contexts, which a calibration cannot run: build it with "
                         "share_context=False.")
    heads = list(spec.check(model_info(model)).heads)
    if active_edits(model):
        raise InputError("The model has active edits: compare on the dense model.")
    start = min(layer for layer, _ in heads)
    dense = plan.run(model, capture=[start])
    resid, dense.resid = dense.resid[start], {}
    if metric not in dense:
        raise InputError(f"Unknown metric {metric!r}: this evaluation has {sorted(dense)}.")
    rows = []
    for method in COMPARED:
        with ExitStack() as stack:
            params = {}
            if method in ("qk", "qk+calibration"):
                params = stack.enter_context(prune_qk(model, spec, calibration=calibration)).params_zeroed()
            if method == "head_removal":
                params = stack.enter_context(remove_heads(model, heads)).params_zeroed()
            if method in ("calibration", "qk+calibration"):
                stack.enter_context(calibrate_attention(model, heads, beta=options.beta, threshold=options.threshold,
                                                    min_queries=options.min_queries))
            result = plan.run(model, start_layer=start, resid=resid)
        table = retention(dense, result, n_boot=n_boot, ci=ci).set_index("metric")
        row = {"method": method, "n_heads": len(heads), "params_zeroed": int(params.get("total", 0)),
               "retention": float(table.loc[metric, "retention"]), "ci_low": float(table.loc[metric, "ci_low"]),
               "ci_high": float(table.loc[metric, "ci_high"])}
        row.update({f"retention:{name}": float(value) for name, value in table["retention"].items()})
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs["metric"] = metric
    return out.replace({np.inf: np.nan})


__all__ = ["COMPARED", "calibration_census", "calibration_comparison"]
