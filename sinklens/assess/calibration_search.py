"""Which heads gain from attention calibration (ACT), and by how much on held-out items?

ACT (Yu et al., ICML 2024) calibrates hand-picked heads; the step that picked them (calibrate one head at a time on
training items, keep those that help) is not in its repository. This is that step, on the offline suite:

1. candidates (``candidates="screen"``): a **layer screen**. Every layer of ``screen`` is calibrated whole (all its
   heads at once) on the ``"search"`` split; the heads of the ``screen_layers`` layers with the highest gain are
   the candidates. Why a layer screen: a calibration that changes nothing in a layer cannot change anything in one
   of its heads, and a layer costs what one head costs (one configuration), so 30 layers replace 270 heads; what it
   can miss is a helpful head in a layer whose other heads hurt (``candidates="all"`` searches every head).
2. **each candidate head alone** against the dense model on the ``"search"`` split, paired per item: gain =
   retention - 1 of ``metric`` (``retention``: calibrated / dense, dense / calibrated for perplexity, so a gain
   > 0 is better for every metric), with the paired bootstrap interval of
   :func:`sinklens.assess.evaluation.retention` at level ``ci``; a head is **kept** when the interval's lower end
   is above 0 (the default ``ci=0.9``: a one-sided 95 % lower bound), or, with ``top_m``, the ``top_m`` heads of
   highest point gain among those with a gain above 0;
3. the kept heads **calibrated together**, on both splits, and ACT's own recipe on this model as far as it can be
   stated (every head of layers 2 to L-2 with the same beta, threshold and min_queries), every metric's gain with
   its interval against the dense model of the same split. The ``"held_out"`` rows are the answer: the search
   tries many heads, so some pass its bound by chance; only the held-out split says whether the kept set helps.

Every configuration goes through a :class:`~sinklens.assess.sweep.Sweep` (a results file, one row per
configuration committed as it finishes, resumable; configurations whose first calibrated layer is l run layers
l..L-1 from the cached dense residual), in batches of independent configurations (one ``sweep.run`` per stage).
The cost is in forward-equivalents (layers run / n_layers, summed), per stage and per candidate.

Plans: the calibration's sink set is per sequence, which a shared multiple-choice context cannot honour, so the
plans are built with ``share_context=False`` (an :class:`EvalOptions` with ``share_context=True`` is refused).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.choices import CALIBRATION_CANDIDATES, CalibrationCandidates
from ..core.errors import InputError
from ..core.loading import model_info
from ..core.validate import check_choice, check_fraction, check_int, check_layers
from ..prune.attention_calibration import CalibrationOptions
from ..prune.spec import Head, check_heads
from .evaluation import MEAN_ACC, EvalPlan, EvalResult, retention
from .selection import SPLIT_CONFIRM, SPLIT_DECIDE, EvalOptions, evaluation_plans, selection_loss
from .sweep import Record, Sweep

KEPT, ACT_RECIPE = "kept", "act_recipe"  # the configurations calibrated together


def act_recipe_heads(n_layers: int, n_heads: int) -> list[Head]:
    """ACT's fixed choice stated on a model: every head of layers 2 to L-2 (empty below 4 layers).

    Args:
        n_layers: the model's layers (L).
        n_heads: query heads per layer.
    """
    return [(layer, head) for layer in range(2, n_layers - 1) for head in range(n_heads)]


def gain_table(dense: EvalResult, calibrated: EvalResult, *, n_boot: int = 500, ci: float = 0.9,
               seed: int = 0) -> pd.DataFrame:
    """Every metric's gain of ``calibrated`` over ``dense`` on the same items, with a paired bootstrap interval.

    gain = retention - 1 (:func:`sinklens.assess.evaluation.retention`: calibrated / dense, dense / calibrated for
    perplexity), so > 0 is better for every metric; ``change`` = calibrated - dense (in the metric's unit); for
    ``lm/ppl`` a row ``lm/loss`` (mean NLL per token, nats) with ``change`` = log(calibrated / dense perplexity) and
    its interval. Returns: metric, dense, calibrated, change, gain, gain_low, gain_high.

    Args:
        dense: the dense model's evaluation.
        calibrated: the calibrated model's evaluation of the same plan.
        n_boot: bootstrap draws.
        ci: the interval's level (0.9: its lower end is a one-sided 95 % bound).
        seed: seed of the draws.
    """
    table = retention(dense, calibrated, n_boot=n_boot, ci=ci, seed=seed)
    out = pd.DataFrame({"metric": table["metric"], "dense": table["dense"], "calibrated": table["pruned"],
                        "change": table["pruned"] - table["dense"], "gain": table["retention"] - 1,
                        "gain_low": table["ci_low"] - 1, "gain_high": table["ci_high"] - 1})
    ppl = table[table["metric"] == "lm/ppl"]
    if len(ppl):
        row = ppl.iloc[0]
        # retention of ppl = dense / calibrated = exp(-(loss change)): the loss change and its interval follow
        loss = {"metric": "lm/loss", "dense": float(np.log(row["dense"])), "calibrated": float(np.log(row["pruned"])),
                "change": float(-np.log(row["retention"])), "gain": row["retention"] - 1,
                "gain_low": row["ci_low"] - 1, "gain_high": row["ci_high"] - 1}
        out = pd.concat([out, pd.DataFrame([loss])], ignore_index=True)
    return out


@dataclass
class CalibrationSearch:
    """Everything :func:`calibration_head_search` measured (module docstring).

    ``layers``: the layer screen, one row per screened layer (empty when the candidates were given): layer,
    n_heads, the metric dense and calibrated, gain, gain_low, gain_high, loss, ``candidate`` (its heads were
    searched). ``heads``: one row per candidate head (search split): layer, head, the same columns, ``kept``.
    ``kept``: the kept heads. ``combined``: the kept heads and ACT's recipe calibrated together, one row per
    (configuration, split, metric) from :func:`gain_table`, with ``n_heads``. ``dense``: the dense metrics per split.
    ``cost``: forward-equivalents per stage, per candidate, and the sweep's totals. ``dense_results``: the dense
    evaluations per split (not stored; for comparisons on the same plans).
    """

    layers: pd.DataFrame
    heads: pd.DataFrame
    kept: list[Head]
    combined: pd.DataFrame
    dense: dict[str, dict[str, float]]
    settings: dict
    cost: dict = field(default_factory=dict)
    dense_results: dict[str, EvalResult] = field(default_factory=dict, repr=False)  # for further comparisons

    @property
    def metric(self) -> str:
        return self.settings["metric"]

    def held_out(self, configuration: str = KEPT) -> pd.DataFrame:
        """The held-out rows of one configuration calibrated together (``"kept"`` or ``"act_recipe"``), one per
        metric; empty when it was not evaluated (nothing kept, or a model too shallow for ACT's recipe).

        Args:
            configuration: ``"kept"`` or ``"act_recipe"``.
        """
        if configuration not in (KEPT, ACT_RECIPE):
            raise InputError(f"configuration must be {KEPT!r} or {ACT_RECIPE!r}, got {configuration!r}.")
        c = self.combined
        if c.empty:
            return c
        return c[(c["configuration"] == configuration) & (c["split"] == SPLIT_CONFIRM)].reset_index(drop=True)

    def shown_heads(self, n: int = 3) -> list[Head]:
        """The heads a notebook shows the calibration's effect on: the kept heads, or, when none is kept, the ``n``
        candidate heads of highest search gain (so that a search that keeps nothing still shows what calibration
        does to the heads it measured).

        Args:
            n: heads shown when none is kept.
        """
        n = check_int("n", n, minimum=1)
        if self.kept:
            return list(self.kept)
        best = self.heads.sort_values(["gain", "layer", "head"], ascending=[False, True, True]).head(n)
        return sorted((int(l), int(h)) for l, h in zip(best["layer"], best["head"]))

    def gain_grid(self, n_layers: int, n_heads: int) -> np.ndarray:
        """The searched heads' gains as a [layer, head] array (NaN where a head was not searched).

        Args:
            n_layers, n_heads: the model's shape.
        """
        grid = np.full((n_layers, n_heads), np.nan)
        for _, row in self.heads.iterrows():
            grid[int(row["layer"]), int(row["head"])] = row["gain"]
        return grid


def _check_options(options, evaluation, metric: str):
    if options is None:
        options = CalibrationOptions()
    if not isinstance(options, CalibrationOptions):
        raise InputError(f"options must be a sinklens.CalibrationOptions(beta=..., threshold=..., min_queries=...), "
                         f"got {type(options).__name__}.")
    if evaluation is None:
        evaluation = EvalOptions(share_context=False)
    if isinstance(evaluation, EvalOptions):
        if evaluation.share_context:
            raise InputError("evaluation: share_context=True packs an item's choices behind one context, whose sink "
                             "set a calibration cannot compute per sequence: pass share_context=False (or None).")
        evaluation = replace(evaluation, share_context=False)
    return options, evaluation


def shares_context(plan: EvalPlan) -> bool:
    """Whether a plan packs MC choices behind one shared context (which a calibration cannot run).

    Args:
        plan: an evaluation plan.
    """
    return "mc" in plan.meta.get("parts", ()) and plan.meta.get("share_context", True)


class _Stage:
    """Rows of one stage: each record's gain of the metric against the dense model of its split."""

    def __init__(self, sweep: Sweep, metric: str, n_boot: int, ci: float):
        self.sweep, self.metric, self.n_boot, self.ci = sweep, metric, n_boot, ci

    def row(self, record: Record) -> dict:
        dense = self.sweep.dense(record.split).result
        table = gain_table(dense, record.result, n_boot=self.n_boot, ci=self.ci).set_index("metric")
        values = table.loc[self.metric]
        return {"n_heads": len(record.heads), "dense": float(values["dense"]),
                "calibrated": float(values["calibrated"]), "gain": float(values["gain"]),
                "gain_low": float(values["gain_low"]), "gain_high": float(values["gain_high"]),
                "loss": selection_loss(record.result), "key": record.key, "cached": record.cached}

    def combined(self, record: Record, configuration: str) -> pd.DataFrame:
        dense = self.sweep.dense(record.split).result
        table = gain_table(dense, record.result, n_boot=self.n_boot, ci=self.ci)
        table.insert(0, "n_heads", len(record.heads))
        table.insert(0, "split", record.split)
        table.insert(0, "configuration", configuration)
        return table


def _select(heads: pd.DataFrame, top_m: int | None) -> list[Head]:
    if heads.empty:
        return []
    if top_m is None:
        chosen = heads[heads["gain_low"] > 0]
    else:
        helping = heads[heads["gain"] > 0]
        chosen = helping.sort_values(["gain", "gain_low", "layer", "head"], ascending=[False, False, True, True])
        chosen = chosen.head(top_m)
    return sorted((int(l), int(h)) for l, h in zip(chosen["layer"], chosen["head"]))


def calibration_head_search(model, *, candidates: CalibrationCandidates | Sequence[Head] = "screen",
                            options: CalibrationOptions | None = None,
                            evaluation: EvalOptions | Mapping[str, EvalPlan] | None = None, metric: str = MEAN_ACC,
                            screen: Sequence[int] | None = None, screen_layers: int = 2, top_m: int | None = None,
                            act_recipe: bool = True, n_boot: int = 500, ci: float = 0.9,
                            results: str | Path | None = None, fresh: bool = False,
                            show_progress: bool = True) -> CalibrationSearch:
    """Find the heads whose attention calibration (ACT) raises ``metric``, and measure them on held-out items.

    See the module's docstring for the stages and the keep rule. Every argument is checked before any forward.

    Args:
        model: a bridge from :func:`sinklens.load_model`, without active edits.
        candidates: ``"screen"``: the heads of the best layers of a layer screen; ``"all"``: every head; or a list
            of ``(layer, head)`` pairs.
        options: the calibration (:class:`sinklens.CalibrationOptions`; default ACT's beta 0.4, threshold 0.1 and
            sinklens's min_queries).
        evaluation: an :class:`EvalOptions` (None: its defaults; its plans are built with ``share_context=False``)
            or the two built plans ``{"search": plan, "held_out": plan}`` (built with ``share_context=False``).
        metric: the metric whose gain decides (default ``acc/mean``; every metric is reported).
        screen: the layers of the layer screen (None: every layer).
        screen_layers: how many of the screen's best layers give their heads as candidates.
        top_m: None: keep the heads whose gain's lower bound is above 0; m: keep the m heads of highest gain among
            those with a gain above 0.
        act_recipe: also evaluate ACT's recipe (every head of layers 2 to L-2) calibrated together.
        n_boot: bootstrap draws of the intervals.
        ci: level of the intervals (0.9: the lower end is a one-sided 95 % bound).
        results: the SQLite results file (shared with the layer sweeps of a run; None: in memory).
        fresh: delete an existing results file first.
        show_progress: show progress bars.
    """
    info = model_info(model)
    options, evaluation = _check_options(options, evaluation, metric)
    if isinstance(candidates, str):
        candidates = check_choice("candidates", candidates, CALIBRATION_CANDIDATES)
    else:
        candidates = check_heads(candidates, info)
        if not candidates:
            raise InputError("candidates is empty: pass (layer, head) pairs, 'all', or 'screen' for a layer screen.")
    screen = check_layers(screen, info.n_layers)
    screen_layers = check_int("screen_layers", screen_layers, minimum=1, meaning="layers whose heads are searched")
    check_int("top_m", top_m, minimum=1, allow_none=True, meaning="heads kept")
    n_boot = check_int("n_boot", n_boot, minimum=1, meaning="bootstrap draws")
    ci = check_fraction("ci", ci, open_low=True)
    if not isinstance(act_recipe, bool):
        raise InputError(f"act_recipe must be True or False, got {act_recipe!r}.")
    plans, evaluation_settings = evaluation_plans(model, evaluation, metric)
    for split, plan in plans.items():
        if shares_context(plan):
            raise InputError(f"evaluation[{split!r}] was built with a shared MC context: build it with "
                             "build_plan(..., share_context=False) (a calibration's sink set is per sequence).")
    method = options.method
    sweep = Sweep(model, plans, head_edits=(options,), results=results, fresh=fresh, show_progress=show_progress)
    try:
        stage = _Stage(sweep, metric, n_boot, ci)
        spent: dict[str, float] = {}

        def run(name: str, configs: list) -> list[Record]:
            before = sweep.cost()["forward_equivalents"]
            records = sweep.run(configs, desc=name) if configs else []
            spent[name] = spent.get(name, 0.0) + sweep.cost()["forward_equivalents"] - before
            return records

        run("dense", [("dense", (), SPLIT_DECIDE), ("dense", (), SPLIT_CONFIRM)])
        layer_rows = []
        if candidates == "screen":
            configs = [(method, tuple((l, h) for h in range(info.n_heads)), SPLIT_DECIDE) for l in screen]
            for layer, record in zip(screen, run("layer screen", configs)):
                layer_rows.append({"layer": layer, **stage.row(record)})
            layers = pd.DataFrame(layer_rows)
            order = layers.sort_values(["gain", "loss", "layer"], ascending=[False, True, True])["layer"].tolist()
            chosen = sorted(order[:screen_layers])
            layers["candidate"] = layers["layer"].isin(chosen)
            candidates = [(l, h) for l in chosen for h in range(info.n_heads)]
        else:
            layers = pd.DataFrame(columns=["layer", "n_heads", "dense", "calibrated", "gain", "gain_low", "gain_high",
                                           "loss", "key", "cached", "candidate"])
            if candidates == "all":
                candidates = [(l, h) for l in range(info.n_layers) for h in range(info.n_heads)]
        head_records = run("heads", [(method, (head,), SPLIT_DECIDE) for head in candidates])
        heads = pd.DataFrame([{"layer": h[0], "head": h[1], **stage.row(r)} for h, r in zip(candidates, head_records)])
        kept = _select(heads, top_m)
        heads["kept"] = [(int(l), int(h)) in set(kept) for l, h in zip(heads["layer"], heads["head"])]
        together = []
        if kept:
            together += [(KEPT, (method, tuple(kept), split)) for split in (SPLIT_DECIDE, SPLIT_CONFIRM)]
        recipe = act_recipe_heads(info.n_layers, info.n_heads)
        if act_recipe and recipe:
            together.append((ACT_RECIPE, (method, tuple(recipe), SPLIT_CONFIRM)))
        records = run("together", [config for _, config in together])
        combined = [stage.combined(record, name) for (name, _), record in zip(together, records)]
        combined = pd.concat(combined, ignore_index=True) if combined else pd.DataFrame(
            columns=["configuration", "split", "n_heads", "metric", "dense", "calibrated", "change", "gain",
                     "gain_low", "gain_high"])
        dense = {split: sweep.dense(split).metrics for split in (SPLIT_DECIDE, SPLIT_CONFIRM)}
        totals = sweep.cost()
        n_candidates = max(len(candidates), 1)
        cost = {"stages": spent, "total": float(sum(spent.values())),
                "per_head_candidate": spent.get("heads", 0.0) / n_candidates,
                "per_screened_layer": spent.get("layer screen", 0.0) / max(len(layer_rows), 1),
                "n_screened_layers": len(layer_rows), "n_candidates": len(candidates), "sweep": totals}
        settings = {"metric": metric, "options": options.as_dict(), "method": method,
                    "candidates": "screen" if layer_rows else "given", "screen": screen if layer_rows else None,
                    "screen_layers": screen_layers, "top_m": top_m, "keep_rule": "top_m" if top_m else "lower_bound",
                    "n_boot": n_boot, "ci": ci, "evaluation": evaluation_settings, "model": info.name,
                    "n_layers": info.n_layers, "n_heads": info.n_heads,
                    "act_recipe": {"layers": [2, info.n_layers - 2], "n_heads": len(recipe)} if recipe else None,
                    "results": str(results) if results is not None else None,
                    "chance": sweep.dense(SPLIT_CONFIRM).result.chance}
        return CalibrationSearch(layers=layers.reset_index(drop=True), heads=heads, kept=kept, combined=combined,
                                 dense=dense, settings=settings, cost=cost,
                                 dense_results={split: sweep.dense(split).result for split in dense})
    finally:
        sweep.close()


__all__ = ["ACT_RECIPE", "CalibrationSearch", "KEPT", "act_recipe_heads", "calibration_head_search", "gain_table",
           "shares_context"]
