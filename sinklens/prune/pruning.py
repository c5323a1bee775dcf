"""Top-k QK column pruning of attention heads, as a reversible edit.

QK column pruning of head (l, h) with kept dims S (RESEARCH.md): W_Q^h[:, d] = 0 and W_K^h[:, d] = 0 for
every input (d_model) dim d not in S, in the HF convention ``q_proj.weight[h*d_head:(h+1)*d_head, d]``.
What is pruned is a :class:`~sinklens.prune.spec.PruneSpec` (heads, k, kept-dims policy, GQA handling); how the
kept dims are chosen is :mod:`sinklens.prune.dims`; the weight layout and the maths are :mod:`sinklens.core.qk`.

GQA (several query heads read one KV head), ``gqa=``:
- ``"exact"``: every selected query head gets its own pruned Q and a pruned private copy of its KV
  head's K (the thesis semantics); sibling heads are untouched. When every head of a group is selected
  with the same dims this is a plain edit of the shared k_proj rows. Otherwise the selected heads'
  scores are recomputed in a hook on ``hook_attn_scores`` from the layer's attention input with the
  pruned K copy and the model's own rotary cos/sin, keeping its mask (generation with a KV cache works:
  the pruned keys of earlier positions are kept by the hook).
- ``"shared"``: the shared k_proj rows keep the union of the group's selected heads' dims; refused
  unless every head of the group is selected (``force=True`` overrides: siblings then change too).
- ``"q_only"``: only W_Q is pruned.

Fill and temperature (fitted on the calibration prompts passed as ``calibration=``, see
:mod:`sinklens.prune.calibration`):
- ``fill="mean"``: a dropped input dim holds its mean mu_d over the calibration tokens (BOS excluded)
  instead of 0, i.e. the head's q gains the constant bias W_Q^h[:, dropped] mu_dropped (and its K, pruned
  like its W_K, the same with W_K). The bias is added where the projection happens (the output of
  q_proj / k_proj, or inside the private K copy), and ``save_pruned`` writes it as q/k_proj biases.
- ``temperature=True``: the pruned head's queries are scaled by c (its kept W_Q columns, its q
  bias and fill bias), fitted per head to minimise the pattern KL (:mod:`sinklens.prune.temperature`).

Three steps, each usable alone: :func:`plan_pruning` checks everything, measures the kept dims and
decides the edits without touching the model (a :class:`PruningPlan` already knows its record and the
parameters it zeroes); :func:`apply_pruning` applies a plan (or plans and applies) persistently, undone
by ``handle.restore()``; :func:`prune_qk` applies it for the body of a ``with`` block. The two forms
pair with :func:`sinklens.apply_head_removal` and :func:`sinklens.remove_heads`. Edits are described in
:mod:`sinklens.core.edits` (in-place weights plus permanent hooks, bitwise restore, overlaps refused).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.edits import Edit, applied, count_parameters, heads_text
from ..core.errors import InputError, SinklensError
from ..core.loading import ModelInfo, model_info
from ..core.qk import (
    attention_scaling,
    bias,
    check_editable,
    drop_mask,
    head_rows,
    kv_rows,
    layout,
    masked_like,
    weights,
)
from ..measure.massive import Basis
from .calibration import (
    CalibrationSet,
    calibration_argument,
    calibration_need,
    resolve_calibration,
    temperature_argument,
)
from .dims import dims_of
from .search import HeadProblem
from .spec import DimsArg, Fill, GQAPolicy, Head, Objective, PruneSpec, as_spec, dims_records
from .temperature import fit_temperature

# --- the plan of one pruning --------------------------------------------------------------------


@dataclass
class PruningPlan:
    """What a pruning changes, decided before anything is edited (see :func:`plan_pruning`).

    ``dims``: the kept dims of each head's Q (and of its K under ``"exact"``); ``q_edits``: query heads
    whose q rows are edited; ``k_edits``: ``(layer, kv head)`` whose shared k rows are edited;
    ``k_copies``: query heads given a pruned private K copy (hook). With ``fill="mean"``: ``q_bias`` (per
    query head in ``q_edits``, scaled by its ``q_scale``), ``k_bias`` (per ``k_edits`` entry) and
    ``k_copy_bias`` (per ``k_copies`` entry): the fill biases added to those projections. With
    ``temperature=True``: ``q_scale``, the factor of each pruned head's queries. ``calibration``:
    the calibration prompts' provenance (:meth:`CalibrationSet.as_dict`; None when nothing was fitted on data).
    """

    spec: PruneSpec
    info: ModelInfo
    model_params: int
    dims: dict[Head, Tensor]
    prepend_bos: bool | None  # fitted on BOS-first prompts (checked), or as a MassiveActivations says
    q_edits: dict[Head, Tensor] = field(default_factory=dict)
    k_edits: dict[Head, Tensor] = field(default_factory=dict)
    k_copies: dict[Head, Tensor] = field(default_factory=dict)
    q_bias: dict[Head, Tensor] = field(default_factory=dict)
    k_bias: dict[Head, Tensor] = field(default_factory=dict)
    k_copy_bias: dict[Head, Tensor] = field(default_factory=dict)
    q_scale: dict[Head, float] = field(default_factory=dict)
    calibration: dict | None = None

    @property
    def heads(self) -> list[Head]:
        return list(self.spec.heads)

    @property
    def k(self) -> int:
        return self.spec.k

    @property
    def gqa(self) -> str:
        return self.spec.gqa

    @property
    def layout(self) -> str:
        """``"grouped"`` when every K change is a shared-row edit, ``"ungrouped"`` when a standalone
        checkpoint needs one K copy per query head (gqa="exact" with partial or mixed groups)."""
        return "ungrouped" if self.k_copies else "grouped"

    def params_zeroed(self) -> dict:
        """Q/K weights this pruning sets to zero, and their share of the model's parameters.

        Counted in the layout a standalone checkpoint of this pruning has (:attr:`layout`): with
        ``"ungrouped"`` every selected head has its own K copy, so its zeroed K columns count per head.
        """
        dh, full = self.info.d_head, self.info.d_model
        q = sum(dh * (full - d.numel()) for d in self.q_edits.values())
        if self.layout == "ungrouped":  # only gqa="exact" makes private copies
            k = sum(dh * (full - self.dims[p].numel()) for p in self.heads)
        else:
            k = sum(dh * (full - d.numel()) for d in self.k_edits.values())
        total = self.model_params
        return {"q": int(q), "k": int(k), "total": int(q + k), "model_params": total, "share": (q + k) / total,
                "layout": self.layout}

    def as_dict(self) -> dict:
        """JSON-ready description: the spec's fields (``PruneSpec.from_dict`` reads them back), the kept
        ``dims`` per head (``[{"layer", "head", "dims"}]``), the GQA edits, :meth:`params_zeroed`, the fitted
        temperatures (``q_scale``), the norms of the fill biases and the calibration prompts' provenance
        (``calibration``). Heads are ``[layer, head]`` pairs; shared K edits name ``[layer, kv_head]``."""
        def norms(biases: dict) -> list[dict]:
            return [{"layer": a, "head": b, "norm": float(v.norm())} for (a, b), v in sorted(biases.items())]

        return {"kind": "qk_pruning", **self.spec.as_dict(), "prepend_bos": self.prepend_bos,
                "dims": dims_records({p: self.dims[p].tolist() for p in self.heads}),
                "k_shared_edits": [{"layer": l, "kv_head": g, "dims": d.tolist()}
                                   for (l, g), d in sorted(self.k_edits.items())],
                "k_private_copies": [[l, h] for l, h in sorted(self.k_copies)],
                "params_zeroed": self.params_zeroed(),
                "q_scale": [{"layer": l, "head": h, "scale": c} for (l, h), c in sorted(self.q_scale.items())],
                "fill_bias_norm": {"q": norms(self.q_bias), "k_shared": norms(self.k_bias),
                                   "k_private": norms(self.k_copy_bias)},
                "calibration": self.calibration}

    def dims_frame(self) -> pd.DataFrame:
        """One row per (layer, head, kept dim)."""
        rows = [{"layer": l, "head": h, "dim": int(d)} for (l, h) in self.heads for d in self.dims[(l, h)]]
        return pd.DataFrame(rows, columns=["layer", "head", "dim"])


def plan_pruning(model, heads: Sequence[Head] | PruneSpec, k: int | None = None, dims: DimsArg | None = None, *,
                 calibration=None, basis: Basis | None = None, gqa: GQAPolicy | None = None, seed: int | None = None,
                 force: bool | None = None, fill: Fill | None = None, temperature: bool | None = None,
                 objective: Objective | None = None, pool: int | None = None,
                 attention_mask: Int[Tensor, "batch pos"] | None = None, tokens=None) -> PruningPlan:
    """Check every argument, choose the kept dims and decide the edits; changes nothing.

    Args:
        model: a bridge from :func:`sinklens.load_model` (raw mode).
        heads: ``(layer, head)`` pairs, or a :class:`~sinklens.prune.spec.PruneSpec` (then leave k, dims, basis,
            gqa, seed, force, fill, temperature, objective and pool out).
        k: input dims kept per head.
        dims: ``"bos_top"`` (default), ``"random"``, ``"weight_norm"``, ``"act_weight"``, ``"optimized"``, one
            1-D set of k dims for every head, or a mapping ``{(layer, head): dims}`` (see :mod:`sinklens.prune.dims`).
        calibration: the calibration prompts of the data-driven policies, of ``fill="mean"`` and of the
            temperature: a :class:`~sinklens.prune.calibration.CalibrationSet` or BOS-prepended probe prompts (ids, a
            TokenBatch); ``bos_top`` with zero fill and no temperature also takes a MassiveActivations measured on
            them (:func:`~sinklens.prune.calibration.resolve_calibration`).
        basis: for ``bos_top``: ``"normalized"`` (default) or ``"resid"``.
        gqa: ``"exact"`` (default), ``"shared"`` or ``"q_only"`` (module docstring).
        seed: for ``random`` (default 0).
        force: let ``gqa="shared"`` prune a partial KV group (default False).
        fill: ``"zero"`` (default) or ``"mean"`` (module docstring).
        temperature: fit a score temperature per head (default False; module docstring).
        objective, pool: the ``optimized`` search's pattern error and candidate dims (defaults ``"frob_rel"``, 64).
        attention_mask: 0/1 mask of real tokens when ``calibration`` is ids.
        tokens: deprecated spelling of ``calibration``.
    """
    check_editable(model)
    calibration, temperature = temperature_argument(calibration, temperature, where="plan_pruning")
    calibration = calibration_argument(calibration, where="plan_pruning", tokens=tokens)
    spec = as_spec(heads, k, dims, basis=basis, gqa=gqa, seed=seed, force=force, fill=fill, temperature=temperature,
                   objective=objective, pool=pool)
    info = model_info(model)
    spec.check(info)
    gs = info.group_size
    if spec.gqa == "shared" and gs == 1:
        warnings.warn(f'gqa="shared" changes nothing on {info.model_type!r} {info.name!r}: it has one query head per '
                      'KV head (no GQA), so it prunes exactly as gqa="exact".', UserWarning, stacklevel=3)
    if spec.gqa == "shared" and not spec.force:
        for layer, group in sorted({(l, h // gs) for l, h in spec.heads}):
            members = set(range(group * gs, (group + 1) * gs))
            chosen = {h for l, h in spec.heads if l == layer and h in members}
            if chosen != members:
                raise InputError(
                    f'gqa="shared" zeroes K columns that KV head {group} of layer {layer} shares with query heads '
                    f"{sorted(members)}, but only {sorted(chosen)} are selected. Select the whole group, use "
                    'gqa="exact" (private K copies) or "q_only", or pass force=True to change the siblings too.')
    source = resolve_calibration(model, spec, calibration, attention_mask=attention_mask)
    fitted = calibration_need(spec) == "inputs"
    kept = dims_of(model, spec, source)
    prepend_bos = None if source is None else source.prepend_bos
    plan = PruningPlan(spec=spec, info=info, model_params=count_parameters(model), dims=kept, prepend_bos=prepend_bos)
    full = info.d_model
    plan.q_edits = {pair: d for pair, d in kept.items() if d.numel() < full}
    for layer, group in sorted({(l, h // gs) for l, h in spec.heads}):
        members = list(range(group * gs, (group + 1) * gs))
        chosen = [h for h in members if (layer, h) in kept]
        sets = [kept[(layer, h)] for h in chosen]
        if spec.gqa == "q_only":
            continue
        if spec.gqa == "shared":
            keep = torch.unique(torch.cat(sets)).sort().values
            if keep.numel() < full:
                plan.k_edits[(layer, group)] = keep
            continue
        if len(chosen) == len(members) and all(torch.equal(s, sets[0]) for s in sets):
            if sets[0].numel() < full:
                plan.k_edits[(layer, group)] = sets[0]
        else:
            plan.k_copies.update({(layer, h): s for h, s in zip(chosen, sets) if s.numel() < full})
    layout(model).check_plan(plan)
    if fitted:
        _fit(model, plan, source)
    return plan


def fill_bias(rows: Float[Tensor, "d_head d_model"], keep: Int[Tensor, " k"],
              mean: Float[Tensor, " d_model"]) -> Float[Tensor, " d_head"]:
    """The constant a projection gains when its dropped input dims hold their means: rows[:, dropped] @ mean[dropped]
    (fp32, on ``mean``'s device).

    Args:
        rows: the head's rows of the projection weight (full width).
        keep: the kept input dims.
        mean: the per-dim calibration mean.
    """
    drop = drop_mask(keep, rows.shape[1], mean.device)
    return rows.detach().float().to(mean.device)[:, drop] @ mean[drop]


def _fit(model, plan: PruningPlan, calibration: CalibrationSet) -> None:
    """The fill biases and temperatures of ``plan``, measured on the calibration set (in place)."""
    spec, info = plan.spec, plan.info
    plan.calibration = calibration.as_dict()
    if spec.policy == "optimized":
        plan.calibration["search_cost"] = [
            {"layer": l, "head": h, **(calibration.search_cost.get(
                ((l, h), spec.fill, "q" if spec.gqa == "q_only" else "qk", spec.objective,
                 min(spec.pool, info.d_model))) or {})}
            for l, h in spec.heads]
    if spec.fill == "mean":
        for (layer, head), keep in plan.q_edits.items():
            plan.q_bias[(layer, head)] = fill_bias(weights(model, layer).q[head_rows(info, head)], keep,
                                                   calibration.mean(layer))
        for (layer, group), keep in plan.k_edits.items():
            plan.k_bias[(layer, group)] = fill_bias(weights(model, layer).k[head_rows(info, group)], keep,
                                                    calibration.mean(layer))
        for (layer, head), keep in plan.k_copies.items():
            plan.k_copy_bias[(layer, head)] = fill_bias(weights(model, layer).k[kv_rows(info, head)], keep,
                                                        calibration.mean(layer))
    if not spec.temperature:
        return
    for (layer, head), keep in plan.q_edits.items():
        problem = HeadProblem(model, info, calibration, layer, head)
        fill_q = plan.q_bias.get((layer, head))
        q_offset = problem.bq if fill_q is None else problem.bq + fill_q.to(problem.bq.device)
        group = (layer, head // info.group_size)
        k_dims = k_offset = None
        if group in plan.k_edits:
            k_dims, k_fill = plan.k_edits[group], plan.k_bias.get(group)
        elif (layer, head) in plan.k_copies:
            k_dims, k_fill = plan.k_copies[(layer, head)], plan.k_copy_bias.get((layer, head))
        if k_dims is not None:
            k_offset = problem.bk if k_fill is None else problem.bk + k_fill.to(problem.bk.device)
        scale = fit_temperature(problem, keep, q_offset, k_dims, k_offset)
        plan.q_scale[(layer, head)] = scale
        if fill_q is not None:
            plan.q_bias[(layer, head)] = fill_q * scale


# --- private K copies (gqa="exact" on part of a group) -----------------------------------------

class _KCopyHooks:
    """Hooks of one layer that give selected query heads a pruned private copy of their KV head's K.

    At ``hook_attn_scores`` the selected heads' rows are replaced by rot_q_h . rot_k'_h * scaling,
    where rot_q is the model's own (already pruned) rotated query and k'_h = x W_K^g[S_h-columns only]^T
    is rotated with the model's cos/sin; masked entries are kept. Keys of earlier positions are kept
    between calls so a KV-cached decoding step (fewer queries than keys) sees the whole pruned K.
    """

    def __init__(self, model, info: ModelInfo, layer: int, copies: dict[int, Tensor], fills: dict[int, Tensor]):
        self.layer, self.info, self.layout = layer, info, layout(model)
        self.heads = sorted(copies)
        wk = weights(model, layer).k
        # full-width rows with the dropped columns zeroed, one block per selected head: the same linear an
        # ungrouped checkpoint computes (so the two agree to the last bits, not just to rounding)
        rows = torch.cat([wk[kv_rows(info, h)] for h in self.heads])  # [n*dh, d_model]
        drop = torch.cat([drop_mask(copies[h], info.d_model, wk.device)[None].expand(info.d_head, -1)
                          for h in self.heads])
        self.weight = rows.masked_fill(drop, 0).clone()
        k_bias = bias(model, layer, "k")
        self.bias = None if k_bias is None else torch.cat([k_bias[kv_rows(info, h)] for h in self.heads]).clone()
        if fills:  # mean fill: each copy's bias gains its dropped columns times their means
            zero = torch.zeros(info.d_head, dtype=torch.float32, device=wk.device)
            extra = torch.cat([fills.get(h, zero).to(wk.device) for h in self.heads])
            self.bias = extra.to(wk.dtype) if self.bias is None else (self.bias.float() + extra).to(wk.dtype)
        self.scaling = attention_scaling(model, info, layer)
        self.head_index = torch.tensor(self.heads, device=wk.device)
        self.x = self.cos = self.sin = self.rot_q = self.keys = None

    def hooks(self) -> list[tuple[str, object, bool]]:
        names = self.layout.hooks(self.layer)
        return [(names.input, self._set("x"), False), (names.cos, self._set("cos"), False),
                (names.sin, self._set("sin"), False), (names.rot_q, self._set("rot_q"), False),
                (names.scores, self._scores, True)]

    def _set(self, slot: str):
        def capture(tensor: Tensor, hook) -> None:
            setattr(self, slot, tensor)
        return capture

    def _scores(self, scores: Tensor, hook) -> Tensor:
        if self.x is None or self.cos is None or self.rot_q is None:
            raise SinklensError(f"Pruning hooks of layer {self.layer} did not see the attention inputs: was the "
                                "attention module called outside the bridge, or a hook removed by "
                                "reset_hooks(including_permanent=True)?")
        q_len, kv_len = scores.shape[-2:]
        rot_q = self.rot_q[:, :, self.heads].transpose(1, 2)  # [b, n, q, dh]
        b, length = self.x.shape[:2]
        k = torch.nn.functional.linear(self.x, self.weight, self.bias).view(b, length, len(self.heads), -1)
        new = self.layout.rotate(k.transpose(1, 2), self.cos, self.sin).to(rot_q.dtype)
        if kv_len == q_len:
            keys = new
        elif self.keys is not None and self.keys.shape[0] == new.shape[0] and self.keys.shape[2] + q_len == kv_len:
            keys = torch.cat([self.keys, new], dim=2)
        else:
            raise SinklensError(f"Layer {self.layer}: a cached decoding step has {kv_len} keys but the pruning hook "
                                f"holds {None if self.keys is None else self.keys.shape[2]} earlier ones. Start the "
                                "generation inside the pruning context (or use gqa='shared'/'q_only' or save_pruned).")
        self.keys = keys
        self.x = self.cos = self.sin = self.rot_q = None
        pruned = (rot_q @ keys.transpose(-1, -2) * self.scaling).to(scores.dtype)
        scores = scores.clone()
        chosen = scores[:, self.head_index]
        scores[:, self.head_index] = torch.where(masked_like(chosen), chosen, pruned)
        return scores


# --- the applied pruning ------------------------------------------------------------------------

class PruneHandle(Edit):
    """An applied QK column pruning (see :func:`apply_pruning`); its plan is :attr:`plan`.
    ``restore()`` undoes it."""

    kind = "QK pruning"
    applied_by = "sinklens.apply_pruning(...)"
    scoped_call = "sinklens.prune_qk(model, ...)"

    def __init__(self, model, plan: PruningPlan):
        info = model_info(model)
        if info != plan.info:
            raise InputError(f"This pruning plan was made for model {plan.info.name!r} ({plan.info.n_layers} layers, "
                             f"d_model {plan.info.d_model}), not for {info.name!r}: plan it on this model.")
        gs = info.group_size
        units = {("q", l, h) for l, h in plan.heads} | {("k", l, g) for l, g in plan.k_edits}
        units |= {("kread", l, h // gs) for l, h in plan.k_copies}
        super().__init__(model, units)
        self.plan, self.info = plan, info
        full = info.d_model
        try:
            copies: dict[int, dict[int, Tensor]] = {}
            for (layer, head), keep in plan.k_copies.items():
                copies.setdefault(layer, {})[head] = keep
            for layer, per_head in copies.items():  # snapshot K before any edit of this pruning
                fills = {h: b for (l, h), b in plan.k_copy_bias.items() if l == layer}
                for name, fn, prepend in _KCopyHooks(model, info, layer, per_head, fills).hooks():
                    self.hook(name, fn, prepend)
            for (layer, head), keep in plan.q_edits.items():
                wq, rows = weights(model, layer).q, (head_rows(info, head),)
                scale = plan.q_scale.get((layer, head))
                if scale is None:
                    self.zero(wq, rows, drop_mask(keep, full, wq.device))
                else:
                    kept = wq[rows].float().masked_fill(drop_mask(keep, full, wq.device), 0)
                    self.write(wq, rows, kept * scale)
                    q_bias = bias(model, layer, "q")
                    if q_bias is not None:
                        self.write(q_bias, rows, q_bias[rows].float() * scale)
            for (layer, group), keep in plan.k_edits.items():
                wk = weights(model, layer).k
                self.zero(wk, (head_rows(info, group),), drop_mask(keep, full, wk.device))
            for which, biases, n_rows in (("q", plan.q_bias, info.n_heads), ("k", plan.k_bias, info.n_kv_heads)):
                for layer in sorted({l for l, _ in biases}):
                    self._add_bias(model, layer, which, {i: b for (l, i), b in biases.items() if l == layer}, n_rows)
        except Exception:
            self.restore()
            raise
        self.register()

    def _add_bias(self, model, layer: int, which: str, per_head: dict[int, Tensor], n_rows: int) -> None:
        """A permanent hook adding fill biases to the rows of some heads at the output of the q or k projection.

        Args:
            model: the bridge.
            layer: the layer.
            which: ``"q"`` or ``"k"``.
            per_head: head (query head for q, KV head for k) -> its bias [d_head].
            n_rows: heads of that projection.
        """
        names = layout(model).hooks(layer)
        point = names.q_out if which == "q" else names.k_out
        if point is None:
            raise InputError(f'fill="mean" adds a bias to the {which} projection, which the {layout(model).name} '
                             'layout has no hook for: use fill="zero".')
        device = next(iter(per_head.values())).device
        delta = torch.zeros(n_rows, self.info.d_head, dtype=torch.float32, device=device)
        for index, value in per_head.items():
            delta[index] = value

        def add(tensor: Tensor, hook) -> Tensor:  # [batch, pos, rows * d_head], or split per head
            return tensor + delta.reshape(tensor.shape[2:]).to(tensor.device, tensor.dtype)

        self.hook(point, add)

    @property
    def heads(self) -> list[Head]:
        return self.plan.heads

    @property
    def dims(self) -> dict[Head, Tensor]:
        return dict(self.plan.dims)

    @property
    def layout(self) -> str:
        """See :attr:`PruningPlan.layout`."""
        return self.plan.layout

    def params_zeroed(self) -> dict:
        """See :meth:`PruningPlan.params_zeroed`."""
        return self.plan.params_zeroed()

    def as_dict(self) -> dict:
        """See :meth:`PruningPlan.as_dict`."""
        return self.plan.as_dict()

    def dims_frame(self) -> pd.DataFrame:
        """See :meth:`PruningPlan.dims_frame`."""
        return self.plan.dims_frame()

    def __repr__(self) -> str:
        state = "active" if self.active else "restored"
        spec = self.plan.spec
        return (f"PruneHandle({heads_text(spec.heads)}, k={spec.k}, policy={spec.policy}, gqa={spec.gqa}, "
                f"fill={spec.fill}, temperature={spec.temperature}, {state})")


# --- public entry points ------------------------------------------------------------------------

def apply_pruning(model, heads: Sequence[Head] | PruneSpec | PruningPlan, k: int | None = None,
                  dims: DimsArg | None = None, *, calibration=None, basis: Basis | None = None,
                  gqa: GQAPolicy | None = None, seed: int | None = None, force: bool | None = None,
                  fill: Fill | None = None, temperature: bool | None = None, objective: Objective | None = None,
                  pool: int | None = None, attention_mask: Int[Tensor, "batch pos"] | None = None,
                  tokens=None) -> PruneHandle:
    """Prune the Q/K input columns of ``heads`` to ``k`` kept dims now; ``handle.restore()`` undoes it.

    Every argument is checked (and bos_top dims measured) before the model is touched.

    Args:
        model: a bridge from :func:`sinklens.load_model` (raw mode).
        heads: ``(layer, head)`` pairs, a :class:`~sinklens.prune.spec.PruneSpec`, or a :class:`PruningPlan` from
            :func:`plan_pruning` (with a spec or a plan, leave the other pruning arguments out; a plan also
            takes no calibration).
        k, dims, calibration, basis, gqa, seed, force, fill, temperature, objective, pool, attention_mask: as in
            :func:`plan_pruning`.
        tokens: deprecated spelling of ``calibration``.
    """
    calibration, temperature = temperature_argument(calibration, temperature, where="apply_pruning")
    calibration = calibration_argument(calibration, where="apply_pruning", tokens=tokens)
    if isinstance(heads, PruningPlan):
        given = {name for name, value in dict(k=k, dims=dims, calibration=calibration, basis=basis, gqa=gqa,
                                              seed=seed, force=force, fill=fill, temperature=temperature,
                                              objective=objective, pool=pool,
                                              attention_mask=attention_mask).items() if value is not None}
        if given:
            raise InputError(f"A PruningPlan is complete: pass it alone, without {sorted(given)}.")
        return PruneHandle(model, heads)
    plan = plan_pruning(model, heads, k, dims, calibration=calibration, basis=basis, gqa=gqa, seed=seed, force=force,
                        fill=fill, temperature=temperature, objective=objective, pool=pool,
                        attention_mask=attention_mask)
    return PruneHandle(model, plan)


@contextmanager
def prune_qk(model, heads: Sequence[Head] | PruneSpec | PruningPlan, k: int | None = None,
             dims: DimsArg | None = None, *, calibration=None, basis: Basis | None = None,
             gqa: GQAPolicy | None = None, seed: int | None = None, force: bool | None = None,
             fill: Fill | None = None, temperature: bool | None = None, objective: Objective | None = None,
             pool: int | None = None, attention_mask: Int[Tensor, "batch pos"] | None = None,
             tokens=None) -> Iterator[PruneHandle]:
    """Context manager: inside it every forward sees the pruned model; on exit it is restored bitwise.

    ``prune_qk(model, heads, k=10, dims="bos_top", calibration=probe)`` and
    ``prune_qk(model, PruneSpec(heads, k=10), calibration=probe)`` are the same pruning. Yields the handle.

    Args:
        model, heads, k, dims, calibration, basis, gqa, seed, force, fill, temperature, objective, pool,
            attention_mask: as in :func:`apply_pruning`.
        tokens: deprecated spelling of ``calibration``.
    """
    calibration, temperature = temperature_argument(calibration, temperature, where="prune_qk")
    calibration = calibration_argument(calibration, where="prune_qk", tokens=tokens)
    with applied(apply_pruning, model, heads, k, dims, calibration=calibration, basis=basis, gqa=gqa, seed=seed,
                 force=force, fill=fill, temperature=temperature, objective=objective, pool=pool,
                 attention_mask=attention_mask) as handle:
        yield handle


__all__ = ["PruneHandle", "PruningPlan", "apply_pruning", "fill_bias", "plan_pruning", "prune_qk"]
