"""An evaluation plan: a suite's requests tokenized and batched once, run on any edit of the same model.

:func:`evaluate` builds a plan and runs it; the layer-selection sweep builds its plans once
(:func:`build_plan`) and runs them for every pruning configuration (:meth:`EvalPlan.run`), starting
at the first edited layer from the stored dense residual.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ...core.deprecation import keyword_only_after
from ...core.edits import pattern_edits
from ...core.errors import InputError
from ...core.loading import input_device, model_info
from ...core.progress import progress
from ...core.validate import check_int
from .forward import forward_scores
from .items import ITEMS_FILE, bundled_items_path, items_digest, load_items
from .metrics import EvalResult, per_item_table
from .requests import Batch, Row, Split, batch_rows, check_split, copy_rows, lm_rows, mc_rows, split_indices

Suite = Literal["default", "lm", "mc", "copy"]
PARTS = ("lm", "mc", "copy")
SUITES: dict[str, tuple[str, ...]] = {"default": PARTS, "lm": ("lm",), "mc": ("mc",), "copy": ("copy",)}


def check_suite(suite: Suite) -> tuple[str, ...]:
    """The parts of a suite name; an InputError for any other value.

    Args:
        suite: ``"default"`` (lm + mc + copy) or one part (``"lm"``, ``"mc"``, ``"copy"``).
    """
    if not isinstance(suite, str) or suite not in SUITES:
        hint = (" ('pruning-paper' is an lm-evaluation-harness suite: use sinklens.evaluate_lm_eval)"
                if suite == "pruning-paper" else "")
        raise InputError(f"Unknown suite {suite!r}: use one of {sorted(SUITES)}{hint}.")
    return SUITES[suite]


@dataclass
class EvalPlan:
    """Tokenized requests of a suite, ready to run on any edit of the same model.

    Args:
        batches: the padded forwards.
        units: one row per scoring unit: part, task, item id and (for MC) the choice, its length in
            characters, the gold index and the number of choices.
        meta: what the plan evaluates (suite, split, limit, item file and digest, settings).
    """

    batches: list[Batch]
    units: pd.DataFrame
    meta: dict

    @property
    def n_tokens(self) -> int:
        return sum(b.n_tokens for b in self.batches)

    @property
    def shares_context(self) -> bool:
        """Whether the plan packs each MC item's choices behind one shared context: a row then holds several
        sequences, which an edit computed per sequence (an attention calibration) cannot run."""
        return "mc" in self.meta.get("parts", ()) and self.meta.get("share_context", True)

    def run(self, model, *, start_layer: int = 0, resid: Sequence[Float[Tensor, "batch pos d_model"]] | None = None,
            capture: Collection[int] = (), show_progress: bool = False) -> EvalResult:
        """Score the plan on ``model`` as it is now (edits included).

        Args:
            model: the bridge the plan was built for, edited or not.
            start_layer: skip the layers below it (needs ``resid``: the model must be identical below it).
            resid: one tensor per batch: the residual stream entering ``start_layer``, as captured by an
                earlier run.
            capture: layers whose entering residual is stored in ``result.resid[layer]`` (one tensor per
                batch) for later runs.
            show_progress: show a progress bar over batches.
        """
        info = model_info(model)
        calibrated = pattern_edits(model)
        if calibrated and self.shares_context:
            raise InputError(f"This plan packs each MC item's choices behind one shared context, but the active "
                             f"{calibrated[0].kind} computes its sink set per sequence, which a packed row cannot "
                             "honour: build the plan under the calibration (or with share_context=False).")
        start_layer = check_int("start_layer", start_layer, minimum=0)
        if resid is None and start_layer != 0:
            raise InputError(f"start_layer={start_layer} needs resid= (the residual entering that layer).")
        if resid is not None and len(resid) != len(self.batches):
            raise InputError(f"resid holds {len(resid)} tensors but the plan has {len(self.batches)} batches.")
        if start_layer >= info.n_layers:
            raise InputError(f"start_layer={start_layer} is out of range: the model has {info.n_layers} layers.")
        capture = {check_int("capture layer", layer, minimum=0) for layer in capture}
        n_units = len(self.units)
        cpu = torch.device("cpu")
        ll = torch.zeros(n_units, dtype=torch.float64, device=cpu)
        correct = torch.zeros(n_units, dtype=torch.float64, device=cpu)
        count = torch.zeros(n_units, dtype=torch.float64, device=cpu)
        captured: dict[int, list[Tensor]] = {layer: [] for layer in sorted(capture)}
        for i, batch in enumerate(progress(self.batches, desc="evaluate", enabled=show_progress)):
            start = None if resid is None else resid[i]
            logp, top, store = forward_scores(model, batch, start_layer=start_layer, resid=start, capture=capture)
            for layer, tensor in store.items():
                captured[layer].append(tensor)
            units = batch.units.cpu()
            ll.index_add_(0, units, logp.double().cpu())
            correct.index_add_(0, units, top.double().cpu())
            count.index_add_(0, units, torch.ones_like(units, dtype=torch.float64, device=cpu))
        per_item = per_item_table(self.units, ll.numpy(), correct.numpy(), count.numpy())
        layers_run = info.n_layers - start_layer
        return EvalResult(per_item=per_item, meta=dict(self.meta), resid=captured,
                          cost={"tokens": self.n_tokens, "layers_run": layers_run, "n_layers": info.n_layers,
                                "forward_equivalents": layers_run / info.n_layers})


@keyword_only_after("suite", since="0.2", formerly=("limit",))
def build_plan(model, suite: Suite = "default", *, limit: int | None = None, split: Split = "all",
               items: str | Path | None = None, n_lm_prompts: int = 16, lm_seq_len: int | None = None,
               n_copy: int = 16, copy_len: int = 24, prepend_bos: bool = True, seed: int = 0,
               batch_tokens: int = 2048, share_context: bool | None = None, lm_first_target: int = 0) -> EvalPlan:
    """Tokenize a suite into batches, checking every argument and the item file before any tokenizing.

    Args:
        model: the bridge (from :func:`sinklens.load_model`).
        suite: ``"default"`` (lm + mc + copy) or one part (``"lm"``, ``"mc"``, ``"copy"``).
        limit: at most this many items per task (LM prompts, MC items per task type, copy sequences);
            None = all.
        split: ``"all"``, or the even (``"search"``) / odd (``"held_out"``) items of each task, for
            selecting on one and confirming on the other (``"calibration"`` / ``"heldout"``: deprecated names).
        items: a JSONL item file for the MC part (default: the bundled items).
        n_lm_prompts: held-out text prompts of the LM part (per split half when split is not "all").
        lm_seq_len: tokens per LM prompt (default min(128, context)).
        n_copy: random sequences of the copy part (per split half when split is not "all").
        copy_len: tokens of each copied sequence.
        prepend_bos: start every request with BOS (the setting of the sink study).
        seed: seed of the copy sequences.
        batch_tokens: tokens per forward (rows x padded width; a budget of tokens, not of prompts).
        share_context: MC part: pack an item's choices behind one copy of its context (True: the prefix is
            computed once per item), or give each choice its own row (False). None: shared, unless an attention
            calibration is active on ``model`` (its sink set is per sequence, which a packed row cannot honour):
            then unshared, with a warning, and ``meta["share_context"] = False`` records it.
        lm_first_target: LM part: the first position whose next-token loss is scored (0: all; notebook 09 scores
            the positions beyond a sink + window restriction's window on long prompts).
    """
    parts = check_suite(suite)
    share_context = _check_share_context(model, share_context, "mc" in parts)
    limit = check_int("limit", limit, minimum=1, allow_none=True, meaning="items per task")
    split = check_split(split)
    n_lm_prompts = check_int("n_lm_prompts", n_lm_prompts, minimum=1)
    n_copy = check_int("n_copy", n_copy, minimum=1)
    copy_len = check_int("copy_len", copy_len, minimum=2)
    batch_tokens = check_int("batch_tokens", batch_tokens, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    lm_seq_len = check_int("lm_seq_len", lm_seq_len, minimum=3, allow_none=True)
    if not isinstance(prepend_bos, bool):
        raise InputError(f"prepend_bos must be True or False, got {prepend_bos!r}.")
    info = model_info(model)
    if prepend_bos and info.bos_id is None:
        raise InputError(f"{info.name} has no BOS token: call with prepend_bos=False.")
    if lm_seq_len is None:
        lm_seq_len = min(128, info.n_ctx)
    lm_first_target = check_int("lm_first_target", lm_first_target, minimum=0, meaning="first scored LM position")
    if "lm" in parts and lm_first_target >= lm_seq_len - 1:
        raise InputError(f"lm_first_target={lm_first_target} leaves no scored position in LM prompts of {lm_seq_len} "
                         "tokens: use longer prompts (lm_seq_len) or a smaller first target.")
    item_frame = load_items(items) if "mc" in parts else None  # validate the file before any heavy work
    rows: list[Row] = []
    units: list[dict] = []
    meta = {"suite": suite, "parts": list(parts), "limit": limit, "split": split, "prepend_bos": prepend_bos,
            "model": info.name, "seed": seed}
    if "lm" in parts:
        meta.update(n_lm_prompts=n_lm_prompts, lm_seq_len=lm_seq_len)
        if lm_first_target:
            meta.update(lm_first_target=lm_first_target)
        total = 2 * n_lm_prompts if split != "all" else n_lm_prompts
        rows += lm_rows(model, units, split_indices(total, split, limit), lm_seq_len, prepend_bos, lm_first_target)
    if "mc" in parts:
        meta.update(items=str(Path(items)) if items is not None else "bundled:" + ITEMS_FILE,
                    items_sha=items_digest(bundled_items_path() if items is None else items))
        rows += mc_rows(model, units, item_frame, split, limit, prepend_bos, share_context)
        if not share_context:  # recorded only when off, so that the fingerprints of shared plans do not change
            meta["share_context"] = False
    if "copy" in parts:
        meta.update(n_copy=n_copy, copy_len=copy_len)
        total = 2 * n_copy if split != "all" else n_copy
        rows += copy_rows(model, units, split_indices(total, split, limit), copy_len, prepend_bos, seed)
    for row in rows:
        if len(row.tokens) > info.n_ctx:
            raise InputError(f"A {row.part} request has {len(row.tokens)} tokens, longer than the model's context "
                             f"of {info.n_ctx}: use shorter items or lm_seq_len/copy_len.")
    device = input_device(model)
    return EvalPlan(batches=batch_rows(rows, batch_tokens, device), units=pd.DataFrame(units), meta=meta)


@keyword_only_after("suite", since="0.2", formerly=("limit",))
def evaluate(model, suite: Suite = "default", *, limit: int | None = None, split: Split = "all",
             items: str | Path | None = None, n_lm_prompts: int = 16, lm_seq_len: int | None = None,
             n_copy: int = 16, copy_len: int = 24, prepend_bos: bool = True, seed: int = 0,
             batch_tokens: int = 2048, show_progress: bool = True, share_context: bool | None = None) -> EvalResult:
    """Evaluate ``model`` as it is now (pruning edits included) on an offline suite.

    Returns an :class:`~sinklens.assess.evaluation.EvalResult`: a mapping of metric name -> value
    (``result["acc/mean"]``, ``dict(result)``), its per-item table under ``result.per_item``.

    Args:
        model: the bridge (from :func:`sinklens.load_model`), edited or not.
        suite: ``"default"`` (lm + mc + copy) or one part (``"lm"``, ``"mc"``, ``"copy"``).
        limit: at most this many items per task (LM prompts, MC items per task type, copy sequences);
            None = all.
        split: ``"all"``, or the even (``"search"``) / odd (``"held_out"``) items of each task, for
            selecting on one and confirming on the other.
        items: a JSONL item file for the MC part (default: the bundled items).
        n_lm_prompts: held-out text prompts of the LM part (per split half when split is not "all").
        lm_seq_len: tokens per LM prompt (default min(128, context)).
        n_copy: random sequences of the copy part (per split half when split is not "all").
        copy_len: tokens of each copied sequence.
        prepend_bos: start every request with BOS (the setting of the sink study).
        seed: seed of the copy sequences.
        batch_tokens: tokens per forward (rows x padded width).
        show_progress: show a progress bar over batches.
        share_context: as in :func:`build_plan` (None: shared unless an attention calibration is active).
    """
    plan = build_plan(model, suite, limit=limit, split=split, items=items, n_lm_prompts=n_lm_prompts,
                      lm_seq_len=lm_seq_len, n_copy=n_copy, copy_len=copy_len, prepend_bos=prepend_bos, seed=seed,
                      batch_tokens=batch_tokens, share_context=share_context)
    return plan.run(model, show_progress=show_progress)


def _check_share_context(model, share_context: bool | None, has_mc: bool) -> bool:
    """``share_context`` resolved against the model's active edits (see :func:`build_plan`).

    Args:
        model: the bridge.
        share_context: True, False or None (decide from the active edits).
        has_mc: the suite has the MC part (the only one with a shared context).
    """
    if share_context is not None and not isinstance(share_context, bool):
        raise InputError(f"share_context must be True, False or None, got {share_context!r}.")
    calibrated = pattern_edits(model)
    if not calibrated:
        return True if share_context is None else share_context
    if share_context:
        raise InputError(f"share_context=True packs an MC item's choices behind one context, but the active "
                         f"{calibrated[0].kind} computes its sink set per sequence, which a packed row cannot honour: "
                         "leave share_context=None (or False).")
    if share_context is None and has_mc:
        warnings.warn(f"An {calibrated[0].kind} is active: each MC choice is scored in its own row (context + choice, "
                      "no shared context), so that the sink set is each sequence's own; plan.meta['share_context'] "
                      "is False.", UserWarning, stacklevel=4)
    return False


def plan_fingerprint(plan: EvalPlan) -> str:
    """A short hash of what a plan evaluates (suite, split, limit, item file by content, settings).

    Args:
        plan: the plan.
    """
    payload = json.dumps({k: v for k, v in plan.meta.items() if k not in ("model", "items")}, sort_keys=True,
                         default=str)  # the item file by content (items_sha), not by path
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
