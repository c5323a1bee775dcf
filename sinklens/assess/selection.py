"""Multi-layer QK pruning: which layers can be pruned together at k while keeping accuracy?

Selecting layer l prunes every sink-specialized head of l (found by a census on BOS-prepended
probe prompts) through :func:`sinklens.prune_qk`, with the pruning of a template
:class:`~sinklens.prune.spec.PruneSpec` (``PruneSpec.template(k=10, policy=..., fill=..., temperature=...)``:
everything but the heads, which each configuration fills in): by default its layer's top-k BOS dims (measured on
the same prompts), or any kept-dims variant, fitted on one :class:`~sinklens.prune.calibration.CalibrationSet` (the
probe prompts, or ``calibration=``). Evaluation items are split in two: decisions use the ``"search"`` half, every
reported layer set is confirmed on the ``"held_out"`` half (see sinklens.assess.evaluation); how they are built is
an :class:`EvalOptions` (or the two built plans).

Strategies (:class:`SearchOptions`; each yields a path of layer sets of growing size, confirmed on held-out items):
- ``single_layer_rank``: rank layers by their own search-split retention, add them in that order;
- ``greedy``: forward selection: add the layer whose addition keeps the search-split retention
  highest (ties: lowest search-split loss);
- ``exhaustive``: every subset of the best ``exhaustive_pool`` single layers up to
  ``exhaustive_size`` layers; the best subset of each size (on the search split) is confirmed;
- ``random``: random orders of the candidate layers (a baseline), ``n_random`` of them.
A path stops after ``patience`` consecutive sets below the target on held-out items, or at
``max_layers``. Whole-head removal of the same heads is evaluated (``head_removal``) on each strategy's
largest set meeting the target, or its best-retaining set if none does (``"best"``), on every
confirmed set (``"all"``) or not at all (``"none"``).

Results: layer sets are lists of ints and heads ``[layer, head]`` lists in :attr:`LayerSelection.table`; tables
written before the vocabulary change (``"1,3"``, ``"1.0 3.2"`` strings, methods ``"remove"``, splits
``"calibration"``/``"heldout"``) are read by :meth:`LayerSelection.read_table`.
"""

from __future__ import annotations

import itertools
import random as _random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from ..core.choices import HEAD_REMOVAL_CHOICES, STRATEGIES, HeadRemoval
from ..core.errors import InputError
from ..core.loading import model_info
from ..core.probes import probe_tokens
from ..core.validate import check_choice, check_choices, check_fraction, check_frame, check_int, check_k, check_layers
from ..measure.census import run_census
from ..measure.massive import massive_activations
from ..measure.specialization import sink_specialized_heads
from ..prune.calibration import CalibrationSet, calibration_argument, calibration_need, resolve_calibration
from ..prune.spec import PruneSpec, check_heads, dims_records, parse_heads, parse_layers
from .evaluation import MEAN_ACC, EvalPlan, EvalResult, build_plan, check_suite, load_items, retention, retention_value
from .executor import Executor, resolve_executor
from .sweep import Record, Sweep, open_results

SPLIT_DECIDE, SPLIT_CONFIRM = "search", "held_out"
OLD_SPLITS = {"calibration": SPLIT_DECIDE, "heldout": SPLIT_CONFIRM}  # split names before the vocabulary change
OLD_METHODS = {"remove": "head_removal"}


@dataclass(frozen=True)
class EvalOptions:
    """How :func:`layer_selection` builds its two evaluation plans (the ``"search"`` and ``"held_out"`` halves of
    every task; :func:`sinklens.assess.evaluation.build_plan`).

    Args:
        suite: ``"default"`` (lm + mc + copy) or one part (``"lm"``, ``"mc"``, ``"copy"``).
        limit: at most this many items per task and split (None: all).
        items: a JSONL item file for the MC part (None: the bundled items).
        n_lm_prompts: held-out text prompts of the LM part per split.
        lm_seq_len: tokens per LM prompt (None: min(128, context)).
        n_copy: random sequences of the copy part per split.
        copy_len: tokens of each copied sequence.
        prepend_bos: start every request with BOS.
        seed: seed of the copy sequences.
        batch_tokens: tokens per forward (rows x padded width; not prompts: see ``batch_size`` elsewhere).
        share_context: MC part: one copy of an item's context for its choices (True), a row per choice (False), or
            None: shared unless an attention calibration is active when the plans are built
            (:func:`~sinklens.assess.evaluation.build_plan`). A search over calibrations builds its plans on the
            dense model, so it needs False (the calibration's sink set is per sequence).
    """

    suite: str = "default"
    limit: int | None = None
    items: str | Path | None = None
    n_lm_prompts: int = 16
    lm_seq_len: int | None = None
    n_copy: int = 16
    copy_len: int = 24
    prepend_bos: bool = True
    seed: int = 0
    batch_tokens: int = 2048
    share_context: bool | None = None

    def __post_init__(self):
        check_suite(self.suite)
        check_int("limit", self.limit, minimum=1, allow_none=True, meaning="items per task")
        check_int("n_lm_prompts", self.n_lm_prompts, minimum=1)
        check_int("lm_seq_len", self.lm_seq_len, minimum=3, allow_none=True)
        check_int("n_copy", self.n_copy, minimum=1)
        check_int("copy_len", self.copy_len, minimum=2)
        check_int("seed", self.seed, minimum=0)
        check_int("batch_tokens", self.batch_tokens, minimum=1, meaning="tokens per forward")
        if not isinstance(self.prepend_bos, bool):
            raise InputError(f"prepend_bos must be True or False, got {self.prepend_bos!r}.")
        if self.share_context is not None and not isinstance(self.share_context, bool):
            raise InputError(f"share_context must be True, False or None, got {self.share_context!r}.")
        if self.items is not None and not isinstance(self.items, (str, Path)):
            raise InputError(f"items must be a path to a JSONL item file (or None), got {type(self.items).__name__}.")

    def plans(self, model) -> dict[str, EvalPlan]:
        """The ``"search"`` and ``"held_out"`` plans on ``model``.

        Args:
            model: a bridge from :func:`sinklens.load_model`.
        """
        options = {name: value for name, value in asdict(self).items() if name not in ("suite", "limit")}
        return {split: build_plan(model, self.suite, limit=self.limit, split=split, **options)
                for split in (SPLIT_DECIDE, SPLIT_CONFIRM)}

    def as_dict(self) -> dict:
        """JSON-ready fields."""
        return {name: (str(value) if isinstance(value, Path) else value) for name, value in asdict(self).items()}


@dataclass(frozen=True)
class SearchOptions:
    """The strategy knobs of :func:`layer_selection` (module docstring).

    Args:
        strategy: one of ``STRATEGIES`` or a list of them (stored as a tuple).
        max_layers: the largest layer set tried (None: no limit).
        greedy_pool: greedy chooses among this many best single layers (None: all).
        exhaustive_pool, exhaustive_size: exhaustive enumerates subsets of the best ``exhaustive_pool`` single
            layers up to ``exhaustive_size`` layers.
        n_random: random layer orders (a baseline).
        patience: a path stops after this many consecutive sets below the target (held-out).
        head_removal: whole-head removal of the same heads: ``"best"``, ``"all"`` or ``"none"``.
        seed: the seed of the random orders.
    """

    strategy: str | tuple[str, ...] = "greedy"
    max_layers: int | None = None
    greedy_pool: int | None = None
    exhaustive_pool: int = 6
    exhaustive_size: int = 3
    n_random: int = 2
    patience: int = 2
    head_removal: HeadRemoval = "best"
    seed: int = 0

    def __post_init__(self):
        strategies = check_choices("strategy", self.strategy, STRATEGIES, single="strategy", drop_duplicates=True)
        object.__setattr__(self, "strategy", tuple(strategies))
        check_int("max_layers", self.max_layers, minimum=1, allow_none=True)
        check_int("greedy_pool", self.greedy_pool, minimum=1, allow_none=True)
        check_int("exhaustive_pool", self.exhaustive_pool, minimum=1)
        check_int("exhaustive_size", self.exhaustive_size, minimum=1)
        check_int("n_random", self.n_random, minimum=1)
        check_int("patience", self.patience, minimum=1)
        check_choice("head_removal", self.head_removal, HEAD_REMOVAL_CHOICES)
        check_int("seed", self.seed, minimum=0)

    def as_dict(self) -> dict:
        """JSON-ready fields (strategies as a list)."""
        return {**asdict(self), "strategy": list(self.strategy)}


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


def _layer_key(values) -> tuple[int, ...]:
    return tuple(parse_layers(values))


@dataclass
class LayerSelection:
    """Everything :func:`layer_selection` tried.

    ``table``: one row per (strategy, step, configuration): split (``"search"`` or ``"held_out"``), method
    (``"qk"`` pruning or ``"head_removal"``), layers (a list of ints), heads (``[layer, head]`` lists), Q/K (or
    o_proj) parameters zeroed, every metric and its retention against the dense model on the same split, with a
    bootstrap CI for ``metric``. ``single_layer``: the single-layer search-split sweep. ``heads``: the
    sink-specialized heads; ``dims``: the kept dims of every candidate head, ``[{"layer", "head", "dims"}]``
    (whatever the policy; with ``bos_top`` the heads of a layer share their layer's dims). ``settings["spec"]``:
    the pruning (policy, fill, temperature...) of every candidate head.
    """

    table: pd.DataFrame
    single_layer: pd.DataFrame
    heads: list[tuple[int, int]]
    dims: list[dict]
    dense: dict[str, dict[str, float]]
    settings: dict
    cost: dict = field(default_factory=dict)

    @classmethod
    def read_table(cls, table: pd.DataFrame) -> pd.DataFrame:
        """A configurations table in the current vocabulary, also when written before it (a saved
        ``configurations.csv``): layers ``"1,3"`` -> ``[1, 3]``, heads ``"1.0 3.2"`` -> ``[[1, 0], [3, 2]]``,
        method ``"remove"`` -> ``"head_removal"``, splits ``"calibration"``/``"heldout"`` ->
        ``"search"``/``"held_out"``, column ``removal_retention`` -> ``head_removal_retention``.

        Args:
            table: a configurations table (:attr:`table`, or one read back from CSV).
        """
        table = check_frame(table, ["layers", "heads", "method", "split"], "table",
                            "LayerSelection.table (a layer-selection configurations table)", allow_empty=True).copy()
        table["layers"] = [parse_layers(v) for v in table["layers"]]
        table["heads"] = [[list(p) for p in parse_heads(v)] for v in table["heads"]]
        table["method"] = table["method"].replace(OLD_METHODS)
        table["split"] = table["split"].replace(OLD_SPLITS)
        return table.rename(columns={"removal_retention": "head_removal_retention"})

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

    def confirmed(self, method: Literal["qk", "head_removal"] = "qk") -> pd.DataFrame:
        """Rows confirmed on held-out items (one per distinct configuration and strategy).

        Args:
            method: ``"qk"`` (QK pruning) or ``"head_removal"`` (whole-head removal; ``"remove"`` is its deprecated
                spelling).
        """
        if method in OLD_METHODS:
            warnings.warn(f'LayerSelection.confirmed("{method}") is deprecated: use "{OLD_METHODS[method]}".',
                          DeprecationWarning, stacklevel=2)
            method = OLD_METHODS[method]
        check_choice("method", method, ("qk", "head_removal"))
        t = self.table
        return t[(t["split"] == SPLIT_CONFIRM) & (t["method"] == method)]

    def by_layer_set(self, method: str) -> pd.DataFrame:
        """Confirmed rows of ``method``, first per layer set, indexed by the layer set as a tuple.

        Args:
            method: ``"qk"`` (QK pruning) or ``"head_removal"``.
        """
        rows = self.confirmed(method)
        keys = rows["layers"].map(_layer_key)
        rows = rows[~keys.duplicated()]
        return rows.set_index(pd.Index(keys[~keys.duplicated()], name="layer_set", tupleize_cols=False))

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

    def largest_meeting(self, targets: Sequence[float] = (0.91, 0.95)) -> pd.DataFrame:
        """Per strategy and target: the largest confirmed layer set meeting it, with whole-head
        removal of the same heads beside it.

        Args:
            targets: the retentions to meet.
        """
        removal = self.by_layer_set("head_removal")
        rows = []
        for strategy, group in self.confirmed().groupby("strategy", sort=False):
            for target in targets:
                ok = group[group["retention"] >= target]
                if ok.empty:
                    rows.append({"strategy": strategy, "target": target, "n_layers": 0})
                    continue
                best = ok.sort_values(["n_layers", "retention"], ascending=[False, False]).iloc[0]
                key = _layer_key(best["layers"])
                rows.append({"strategy": strategy, "target": target, "n_layers": int(best["n_layers"]),
                             "layers": list(key), "n_heads": int(best["n_heads"]), "heads": best["heads"],
                             "qk_params_zeroed": int(best["params_zeroed"]), "retention": best["retention"],
                             "ci_low": best["ci_low"], "ci_high": best["ci_high"],
                             "head_removal_retention": (removal.loc[[key], "retention"].iloc[0]
                                                        if key in removal.index else np.nan)})
        return pd.DataFrame(rows)

    def head_removal_comparison(self) -> pd.DataFrame:
        """Held-out retention of QK pruning against whole-head removal of the same heads, per layer set."""
        qk, rm = self.by_layer_set("qk"), self.by_layer_set("head_removal")
        both = [key for key in qk.index if key in rm.index]
        out = pd.DataFrame({"layers": [list(key) for key in both],
                            "n_layers": [int(qk.loc[[key], "n_layers"].iloc[0]) for key in both],
                            "n_heads": [int(qk.loc[[key], "n_heads"].iloc[0]) for key in both],
                            "qk_retention": [qk.loc[[key], "retention"].iloc[0] for key in both],
                            "head_removal_retention": [rm.loc[[key], "retention"].iloc[0] for key in both],
                            "qk_params_zeroed": [int(qk.loc[[key], "params_zeroed"].iloc[0]) for key in both],
                            "head_removal_params_zeroed": [int(rm.loc[[key], "params_zeroed"].iloc[0])
                                                           for key in both]})
        if out.empty:
            return out
        order = sorted(range(len(both)), key=lambda i: (len(both[i]), both[i]))
        return out.iloc[order].reset_index(drop=True)


def _check_metric(metric: str, parts: Sequence[str], tasks: Sequence[str], where: str) -> None:
    names = []
    if "lm" in parts:
        names += ["lm/ppl", "lm/acc"]
    if "mc" in parts:
        names += ["mc/acc", "mc/acc_norm"] + [f"mc/{t}/{m}" for t in sorted(tasks) for m in ("acc", "acc_norm")]
    if "copy" in parts:
        names += ["copy/acc"]
    names.append(MEAN_ACC)
    if metric not in names:
        raise InputError(f"Unknown metric {metric!r} for {where}: use one of {names}.")


def evaluation_plans(model, evaluation, metric: str) -> tuple[dict[str, EvalPlan], dict]:
    """The two plans of a selection and what its settings record of them, the metric checked against them.

    Args:
        model: the bridge the plans are built for.
        evaluation: an :class:`EvalOptions` (None: its defaults) or the built plans
            ``{"search": ..., "held_out": ...}``.
        metric: the selection metric, checked against the plans' parts and tasks.
    """
    if evaluation is None:
        evaluation = EvalOptions()
    if isinstance(evaluation, EvalOptions):
        parts = check_suite(evaluation.suite)
        tasks = load_items(evaluation.items)["task"].unique() if "mc" in parts else []
        _check_metric(metric, parts, tasks, f"suite {evaluation.suite!r}")
        return evaluation.plans(model), evaluation.as_dict()
    if not isinstance(evaluation, Mapping):
        raise InputError(f"evaluation must be a sinklens.assess.selection.EvalOptions or the built plans "
                         f"{{'{SPLIT_DECIDE}': plan, '{SPLIT_CONFIRM}': plan}}, got {type(evaluation).__name__}.")
    if set(evaluation) != {SPLIT_DECIDE, SPLIT_CONFIRM}:
        raise InputError(f"evaluation plans must be keyed {SPLIT_DECIDE!r} (decisions) and {SPLIT_CONFIRM!r} "
                         f"(confirmation), got {sorted(evaluation)}.")
    for split, plan in evaluation.items():
        if not isinstance(plan, EvalPlan):
            raise InputError(f"evaluation[{split!r}] must be an EvalPlan (sinklens.assess.evaluation.build_plan), got "
                             f"{type(plan).__name__}.")
        units = plan.units
        tasks = units.loc[units["part"] == "mc", "task"].unique() if len(units) else []
        _check_metric(metric, plan.meta["parts"], tasks, f"the {split!r} plan")
    return dict(evaluation), {"plans": {split: dict(plan.meta) for split, plan in evaluation.items()}}


def layer_selection(model, template: PruneSpec | None = None, *, target_retention: float = 0.91,
                    metric: str = MEAN_ACC, layers: Sequence[int] | None = None,
                    heads: Sequence[tuple[int, int]] | None = None, n_prompts: int = 32, seq_len: int = 64,
                    eps: float = 0.3, q: float = 0.9, calibration=None,
                    evaluation: EvalOptions | Mapping[str, EvalPlan] | None = None,
                    search: SearchOptions | None = None, n_boot: int = 500, results: str | Path | None = None,
                    fresh: bool = False, show_progress: bool = True, calibration_tokens=None,
                    executor=None) -> LayerSelection:
    """Find layer sets whose sink-specialized heads can be QK-pruned with ``template`` keeping ``metric``.

    ``metric`` (default ``"acc/mean"``: the mean of the suite's accuracies, LM next-token, zero-shot
    multiple choice and copying, so that no capability can silently collapse) is the one whose
    retention the target applies to; every metric is reported.

    Returns a :class:`LayerSelection` (every configuration tried, the Pareto frontier of pruned
    heads against held-out retention, the best configuration meeting ``target_retention``).

    Args:
        model: a bridge from :func:`sinklens.load_model`, without active edits.
        template: the pruning of every configuration, without heads (``sl.PruneSpec.template(k=10,
            policy="act_weight", fill="mean", temperature=True)``); each configuration fills in the heads of its
            layers. None: ``PruneSpec.template(k=10)`` (bos_top, zero fill, no temperature).
        target_retention: the retention of ``metric`` to meet (a fraction).
        metric: the selection metric (any metric of :func:`sinklens.evaluate`).
        layers: the candidate layers (None: every layer holding a sink-specialized head).
        heads: the sink-specialized heads, e.g. a run's list from notebook 02 (None: measured here by a census of
            the probe set with ``eps`` and ``q``).
        n_prompts, seq_len: the probe set of the census and of the fitted parts (``split="probe"``).
        eps, q: the sink-specialized definition (alpha_0 > eps on >= q of the prompts).
        calibration: what the template is fitted on: a :class:`~sinklens.prune.calibration.CalibrationSet` or
            BOS-prepended ids (None: the probe prompts; a plain ``bos_top`` template then reads its dims from the
            probe's BOS vectors).
        evaluation: an :class:`EvalOptions` (None: its defaults), or the two built plans
            ``{"search": plan, "held_out": plan}`` (:func:`sinklens.assess.evaluation.build_plan`).
        search: a :class:`SearchOptions` (None: its defaults): strategies and their knobs.
        n_boot: bootstrap resamples of the retention CIs.
        results: a SQLite file that makes the sweep resumable (None: in memory).
        fresh: delete an existing results file first.
        show_progress: show progress bars.
        calibration_tokens: deprecated spelling of ``calibration``.
        executor: where each batch of independent configurations (the single-layer ranking, each greedy step's
            candidates, each exhaustive size, the whole-head removals) is evaluated: None or ``"local"`` (here),
            ``"ray"`` or a :class:`~sinklens.assess.executor.RayExecutor` (workers on a Ray cluster; this process
            stays the only writer of ``results``). Its workers are stopped when the selection ends.
    """
    calibration = calibration_argument(calibration, where="layer_selection", calibration_tokens=calibration_tokens)
    executor = resolve_executor(executor)  # before any forward: an unknown executor or a missing Ray is refused
    info = model_info(model)
    template = PruneSpec.template(10) if template is None else template
    if not isinstance(template, PruneSpec):
        raise InputError(f"template must be a sinklens.PruneSpec without heads (sl.PruneSpec.template(k=10, ...)), "
                         f"got {type(template).__name__}.")
    if not template.is_template:
        raise InputError("template holds heads: pass sl.PruneSpec.template(k=..., ...) (each configuration fills in "
                         "the heads of its layers) and the candidate heads as heads=.")
    if template.policy == "explicit":
        raise InputError("Explicit dims are not a policy of a layer selection: pass a policy name.")
    check_k(template.k, info.d_model)  # before any forward (a template has no heads or dims to check)
    search = SearchOptions() if search is None else search
    if not isinstance(search, SearchOptions):
        raise InputError(f"search must be a sinklens.assess.selection.SearchOptions, got {type(search).__name__}.")
    target = check_fraction("target_retention", target_retention, open_low=True)
    candidates = check_layers(layers, info.n_layers)
    if heads is not None:  # a run's head list (notebook 02): no census here
        heads = check_heads(heads, info)
    n_boot = check_int("n_boot", n_boot, minimum=1)
    check_fraction("eps", eps)
    check_fraction("q", q)
    if calibration is not None:
        calibration = resolve_calibration(model, template, calibration)  # a template says what it needs
    plans, evaluation_settings = evaluation_plans(model, evaluation, metric)
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
    spec = template.replace(heads=[(l, h) for l in cand for h in by_layer[l]])
    if calibration is None and calibration_need(spec) == "bos":  # the probe's BOS vectors, as before variants
        calibration = CalibrationSet.from_massive(model, massive_activations(model, probe, layers=cand,
                                                                             show_progress=show_progress))
    elif calibration is None and calibration_need(spec) == "inputs":  # one set of the census's prompts
        calibration = CalibrationSet.from_tokens(model, probe)
    sweep = Sweep(model, plans, spec, calibration=calibration, results=results, show_progress=show_progress)
    try:
        run = _Run(sweep, metric, target, n_boot, search.max_layers, search.patience, show_progress, executor)
        run.single_layers(cand)
        order = run.rank(cand)
        for name in search.strategy:
            if name == "single_layer_rank":
                run.path("single_layer_rank", [order[: i + 1] for i in range(len(order))])
            elif name == "greedy":
                run.greedy(order if search.greedy_pool is None else order[:search.greedy_pool])
            elif name == "exhaustive":
                run.exhaustive(order[:search.exhaustive_pool], search.exhaustive_size)
            else:
                rng = _random.Random(search.seed)
                for i in range(search.n_random):
                    shuffled = rng.sample(cand, len(cand))
                    run.path("random", [shuffled[: j + 1] for j in range(len(shuffled))], replicate=i)
        if search.head_removal != "none":
            run.head_removal(every=search.head_removal == "all")
        table = pd.DataFrame(run.rows)
        single = table[(table["strategy"] == "single_layer") & (table["method"] == "qk")].drop(columns="strategy")
        dense = {split: sweep.dense(split).metrics for split in (SPLIT_DECIDE, SPLIT_CONFIRM)}
        fitted = sweep.calibration
        settings = {"k": spec.k, "target_retention": target, "metric": metric, "search": search.as_dict(),
                    "evaluation": evaluation_settings, "n_prompts": n_prompts, "seq_len": seq_len, "eps": eps,
                    "q": q, "spec": spec.as_dict(), "candidates": cand, "model": info.name,
                    "results": str(results) if results is not None else None,
                    "calibration": None if fitted is None or fitted.bos_only else fitted.as_dict(),
                    "chance": sweep.dense(SPLIT_CONFIRM).result.chance}
        return LayerSelection(table=table, single_layer=single.reset_index(drop=True), heads=sorted(heads),
                              dims=dims_records(sweep.dims), dense=dense, settings=settings, cost=sweep.cost())
    finally:
        executor.close()
        sweep.close()


class _Run:
    """The bookkeeping of one selection: evaluate through the sweep, add annotated table rows."""

    def __init__(self, sweep: Sweep, metric: str, target: float, n_boot: int, max_layers: int | None, patience: int,
                 show_progress: bool, executor: Executor):
        self.sweep, self.metric, self.target, self.executor = sweep, metric, target, executor
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
               "method": record.method, "layers": list(record.layers), "n_layers": len(record.layers),
               "heads": [list(p) for p in record.heads], "n_heads": len(record.heads),
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
        value = retention_value(self.sweep.dense(record.split).result, record.result, metric=self.metric)
        return (-value if np.isfinite(value) else np.inf, selection_loss(record.result))

    def single_layers(self, layers: list[int]) -> None:
        self.sweep.dense(SPLIT_DECIDE)
        self.sweep.dense(SPLIT_CONFIRM)
        records = self.sweep.run([("qk", (l,), SPLIT_DECIDE) for l in layers], desc="single layers",
                                 executor=self.executor)
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
            else:  # one batch; the chosen set's residuals are cached first where they are evaluated
                batch = self.sweep.run([("qk", tuple(chosen + [l]), SPLIT_DECIDE) for l in left],
                                       desc=f"greedy step {step}", executor=self.executor,
                                       prefix=("qk", tuple(chosen), SPLIT_DECIDE))
                records = dict(zip(left, batch))
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
            records = self.sweep.run([("qk", s, SPLIT_DECIDE) for s in subsets], desc=f"exhaustive size {n}",
                                     executor=self.executor)
            for record in records:
                self._row(record, "exhaustive", n)
            best = min(records, key=lambda r: (self._score(r), r.layers))
            self._confirm(best.layers, "exhaustive", n)

    def head_removal(self, every: bool) -> None:
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
                chosen.add(_layer_key(pick.iloc[0]["layers"]))
            sets = [s for s in sets if tuple(s) in chosen]
        configs = [("head_removal", layers, SPLIT_CONFIRM) for layers in sets]
        for record in self.sweep.run(configs, desc="whole-head removal", executor=self.executor):
            self._row(record, "head_removal", len(record.layers))


__all__ = ["EvalOptions", "HEAD_REMOVAL_CHOICES", "LayerSelection", "STRATEGIES", "SearchOptions", "layer_selection",
           "selection_loss"]
