"""Which heads gain from attention calibration (ACT), and by how much on held-out items?

ACT (Yu et al., ICML 2024) calibrates hand-picked heads; the step that picked them (calibrate one head at a time on
training items, keep those that help) is not in its repository. This is that step, on the offline suite:

1. candidates, from a cheap screen:

   - ``candidates="mass"`` (default): the ``n_candidates`` heads whose calibration moves the most attention mass on
     the screen prompts (:func:`moved_mass`: one forward, no evaluation). Why: a head whose calibration moves no
     mass is not changed by it (its gain is exactly 0), and the mass moved bounds how much a head's output can
     change; what it can miss is a head that moves little mass to good effect.
   - ``candidates="layers"``: a **layer screen**: every layer of ``screen`` calibrated whole (all its heads at once)
     on the ``"search"`` split, the heads of the ``screen_layers`` layers with the highest gain (a layer costs what
     one head costs, so L configurations replace L x H; it misses a helpful head in a layer whose other heads hurt).
   - ``candidates="all"``: every head (the full search), or a list of ``(layer, head)`` pairs.
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

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..core.choices import CALIBRATION_CANDIDATES, CalibrationCandidates
from ..core.errors import InputError
from ..core.hooks import batches, pattern_hook, run_hooked
from ..core.loading import model_info
from ..core.probes import probe_tokens
from ..core.qk import masked_like
from ..core.tokens import as_batch
from ..core.validate import check_choice, check_fraction, check_int, check_layers
from ..prune.attention_calibration import CalibrationOptions, calibrate_pattern, check_calibration_model
from ..prune.spec import Head, check_heads
from .evaluation import MEAN_ACC, EvalPlan, EvalResult, retention
from .executor import resolve_executor
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


def moved_mass(model, tokens, *, options: CalibrationOptions | None = None, batch_size: int = 8,
               show_progress: bool = True) -> pd.DataFrame:
    """How much attention each head's calibration would move, on ``tokens``: one row per (layer, head) of the
    model with ``moved`` (mean over prompts and real query rows of (1 - beta) x the row's weight on the sink set)
    and ``n_sinks`` (the sink set's size, mean over prompts). One forward of ``tokens``, no edit.

    Why a screen: a head that moves no mass is not changed by its calibration, so its gain is exactly 0; the heads
    that move the most are those calibration can change most (for better or worse).

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        tokens: the prompts (BOS-prepended ids or a TokenBatch).
        options: the calibration (None: :class:`sinklens.CalibrationOptions` defaults).
        batch_size: prompts per forward.
        show_progress: show a progress bar.
    """
    options = CalibrationOptions() if options is None else options
    if not isinstance(options, CalibrationOptions):
        raise InputError(f"options must be a sinklens.CalibrationOptions, got {type(options).__name__}.")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    check_calibration_model(model)
    info = model_info(model)
    batch = as_batch(model, tokens)
    moved = torch.zeros(info.n_layers, info.n_heads, dtype=torch.float64)
    n_sinks = torch.zeros(info.n_layers, info.n_heads, dtype=torch.float64)
    visible: dict[int, torch.Tensor] = {}

    def read_scores(layer: int):
        def read(scores, hook):
            visible[layer] = ~masked_like(scores)
        return read

    def read_pattern(layer: int):
        def read(pattern, hook):
            seen = visible.pop(layer)
            edited, sinks = calibrate_pattern(pattern, seen, options.beta, options.threshold, options.min_queries)
            real = seen.diagonal(dim1=-2, dim2=-1)  # [b, h, query]: a token is real when it sees itself
            taken = (pattern.float() - edited).clamp(min=0).sum(-1) * real  # mass taken off the sink set, per row
            moved[layer] += (taken.sum(-1) / real.sum(-1).clamp(min=1)).sum(0).double().cpu()
            n_sinks[layer] += sinks.sum(-1).sum(0).double().cpu()
        return read

    hooks = [hook for layer in range(info.n_layers)
             for hook in ((f"blocks.{layer}.attn.hook_attn_scores", read_scores(layer)),
                          (pattern_hook(layer), read_pattern(layer)))]
    n = 0
    for _, sub in batches(batch, batch_size, "moved mass", show_progress):
        run_hooked(model, sub, hooks, list(range(info.n_layers)))
        n += sub.tokens.shape[0]
    layers, heads = torch.meshgrid(torch.arange(info.n_layers), torch.arange(info.n_heads), indexing="ij")
    return pd.DataFrame({"layer": layers.flatten().numpy(), "head": heads.flatten().numpy(),
                         "moved": (moved / n).flatten().numpy(), "n_sinks": (n_sinks / n).flatten().numpy()})


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

    ``layers``: the layer screen (``candidates="layers"``; else empty), one row per screened layer: layer, n_heads,
    the metric dense and calibrated, gain, gain_low, gain_high, loss, ``candidate`` (its heads were searched).
    ``mass``: the mass screen (``candidates="mass"``; else empty), one row per head of the model: layer, head,
    moved, n_sinks (:func:`moved_mass`), ``candidate``. ``heads``: one row per candidate head (search split): layer,
    head, the layer screen's columns, ``kept``.
    ``kept``: the kept heads. ``combined``: the kept heads and ACT's recipe calibrated together, one row per
    (configuration, split, metric) from :func:`gain_table`, with ``n_heads``. ``dense``: the dense metrics per split.
    ``cost``: forward-equivalents of the evaluation plans per stage (``dense``, ``layer screen``, ``heads``,
    ``together``) and per candidate, the sweep's totals, and for a mass screen its one forward's prompts and tokens
    (not in forward-equivalents: other prompts than the plans').
    """

    layers: pd.DataFrame
    mass: pd.DataFrame
    heads: pd.DataFrame
    kept: list[Head]
    combined: pd.DataFrame
    dense: dict[str, dict[str, float]]
    settings: dict
    cost: dict = field(default_factory=dict)

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
        does to the heads it measured), or, with no candidate, the first ``n`` heads of the mass screen.

        Args:
            n: heads shown when none is kept.
        """
        n = check_int("n", n, minimum=1)
        if self.kept:
            return list(self.kept)
        if len(self.heads):
            best = self.heads.sort_values(["gain", "layer", "head"], ascending=[False, True, True]).head(n)
        else:  # no candidate (a mass screen where nothing moves): the screen's first heads
            best = self.mass.sort_values(["moved", "layer", "head"], ascending=[False, True, True]).head(n)
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


def calibration_head_search(model, *, candidates: CalibrationCandidates | Sequence[Head] = "mass",
                            options: CalibrationOptions | None = None,
                            evaluation: EvalOptions | Mapping[str, EvalPlan] | None = None, metric: str = MEAN_ACC,
                            n_candidates: int = 12, screen_tokens=None, screen: Sequence[int] | None = None,
                            screen_layers: int = 2, top_m: int | None = None,
                            act_recipe: bool = True, n_boot: int = 500, ci: float = 0.9,
                            results: str | Path | None = None, fresh: bool = False, show_progress: bool = True,
                            executor=None) -> CalibrationSearch:
    """Find the heads whose attention calibration (ACT) raises ``metric``, and measure them on held-out items.

    See the module's docstring for the stages and the keep rule. Every argument is checked before any forward.

    Args:
        model: a bridge from :func:`sinklens.load_model`, without active edits.
        candidates: ``"mass"``: the heads moving the most mass; ``"layers"``: the heads of the best layers of a
            layer screen; ``"all"``: every head; or a list of ``(layer, head)`` pairs.
        options: the calibration (:class:`sinklens.CalibrationOptions`; default ACT's beta 0.4, threshold 0.1 and
            sinklens's min_queries).
        evaluation: an :class:`EvalOptions` (None: its defaults; its plans are built with ``share_context=False``)
            or the two built plans ``{"search": plan, "held_out": plan}`` (built with ``share_context=False``).
        metric: the metric whose gain decides (default ``acc/mean``; every metric is reported).
        n_candidates: heads of the ``"mass"`` screen.
        screen_tokens: the prompts of the ``"mass"`` screen (None: 16 probe-split prompts of 64 tokens, BOS first).
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
        executor: where each stage's independent configurations run (:meth:`Sweep.run
            <sinklens.assess.sweep.Sweep.run>`): None or ``"local"`` (here), ``"ray"`` or a
            :class:`~sinklens.assess.executor.RayExecutor`; this process stays the only writer of ``results``.
            ``cost`` counts the forwards of this process.
    """
    info = model_info(model)
    options, evaluation = _check_options(options, evaluation, metric)
    if isinstance(candidates, str):
        candidates = check_choice("candidates", candidates, CALIBRATION_CANDIDATES)
        screen_name = candidates
    else:
        screen_name = "given"
        if candidates is None or not len(candidates):
            raise InputError("candidates is empty: pass (layer, head) pairs, or 'mass', 'layers' or 'all'.")
        candidates = check_heads(candidates, info)
    screen = check_layers(screen, info.n_layers)
    n_candidates = check_int("n_candidates", n_candidates, minimum=1, meaning="heads of the mass screen")
    screen_layers = check_int("screen_layers", screen_layers, minimum=1, meaning="layers whose heads are searched")
    check_int("top_m", top_m, minimum=1, allow_none=True, meaning="heads kept")
    n_boot = check_int("n_boot", n_boot, minimum=1, meaning="bootstrap draws")
    ci = check_fraction("ci", ci, open_low=True)
    if not isinstance(act_recipe, bool):
        raise InputError(f"act_recipe must be True or False, got {act_recipe!r}.")
    plans, evaluation_settings = evaluation_plans(model, evaluation, metric)
    for split, plan in plans.items():
        if plan.shares_context:
            raise InputError(f"evaluation[{split!r}] was built with a shared MC context: build it with "
                             "build_plan(..., share_context=False) (a calibration's sink set is per sequence).")
    method = options.method
    executor = resolve_executor(executor)  # before any forward: an unknown executor or a missing Ray is refused
    try:
        sweep = Sweep(model, plans, head_edits=(options,), results=results, fresh=fresh, show_progress=show_progress)
    except BaseException:
        executor.close()
        raise
    try:
        stage = _Stage(sweep, metric, n_boot, ci)
        spent: dict[str, float] = {}

        def run(name: str, configs: list) -> list[Record]:
            before = sweep.cost()["forward_equivalents"]
            records = sweep.run(configs, desc=name, executor=executor) if configs else []
            spent[name] = spent.get(name, 0.0) + sweep.cost()["forward_equivalents"] - before
            return records

        layer_rows, mass = [], pd.DataFrame(columns=["layer", "head", "moved", "n_sinks", "candidate"])
        screen_cost = {}
        if candidates == "mass":  # first: it refuses a calibration that moves nothing before any evaluation
            tokens = as_batch(model, probe_tokens(model, n_prompts=16, seq_len=64, prepend_bos=True, split="probe")
                              if screen_tokens is None else screen_tokens)
            mass = moved_mass(model, tokens, options=options, show_progress=show_progress)
            screen_cost = {"mass_screen_prompts": int(tokens.tokens.shape[0]),
                           "mass_screen_tokens": int(tokens.attention_mask.sum())}
            order = mass.sort_values(["moved", "layer", "head"], ascending=[False, True, True])
            chosen = order.head(n_candidates)
            chosen = chosen[chosen["moved"] > 0]  # a head that moves nothing has gain 0
            candidates = sorted((int(l), int(h)) for l, h in zip(chosen["layer"], chosen["head"]))
            mass["candidate"] = [(int(l), int(h)) in set(candidates) for l, h in zip(mass["layer"], mass["head"])]
            if not candidates:  # nothing to search: the dense and ACT-recipe rows still say what calibration does
                warnings.warn(f"No head moves any attention mass under {options} on the screen prompts (no non-first "
                              "sinks): no head is searched. Lower threshold or min_queries, or pass candidates.",
                              UserWarning, stacklevel=2)
        run("dense", [("dense", (), SPLIT_DECIDE), ("dense", (), SPLIT_CONFIRM)])
        if candidates == "layers":
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
            if isinstance(candidates, str):  # "all"
                candidates = [(l, h) for l in range(info.n_layers) for h in range(info.n_heads)]
        head_records = run("heads", [(method, (head,), SPLIT_DECIDE) for head in candidates])
        heads = pd.DataFrame([{"layer": h[0], "head": h[1], **stage.row(r)} for h, r in zip(candidates, head_records)],
                             columns=["layer", "head", "n_heads", "dense", "calibrated", "gain", "gain_low",
                                      "gain_high", "loss", "key", "cached"])
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
        cost = {"stages": spent, "total": float(sum(spent.values())),
                "per_head_candidate": spent.get("heads", 0.0) / max(len(candidates), 1),
                "per_screened_layer": spent.get("layer screen", 0.0) / max(len(layer_rows), 1),
                "n_screened_layers": len(layer_rows), "n_candidates": len(candidates), **screen_cost,
                "sweep": totals}
        settings = {"metric": metric, "options": options.as_dict(), "method": method, "candidates": screen_name,
                    "n_candidates": n_candidates if screen_name == "mass" else None,
                    "screen": screen if layer_rows else None,
                    "screen_layers": screen_layers, "top_m": top_m, "keep_rule": "top_m" if top_m else "lower_bound",
                    "n_boot": n_boot, "ci": ci, "evaluation": evaluation_settings, "model": info.name,
                    "n_layers": info.n_layers, "n_heads": info.n_heads,
                    "act_recipe": {"layers": [2, info.n_layers - 2], "n_heads": len(recipe)} if recipe else None,
                    "results": str(results) if results is not None else None,
                    "chance": sweep.dense(SPLIT_CONFIRM).result.chance}
        return CalibrationSearch(layers=layers.reset_index(drop=True), mass=mass, heads=heads, kept=kept,
                                 combined=combined,
                                 dense=dense, settings=settings, cost=cost)
    finally:
        sweep.close()
        executor.close()


__all__ = ["ACT_RECIPE", "CalibrationSearch", "KEPT", "act_recipe_heads", "calibration_head_search", "gain_table",
           "moved_mass"]
