"""One description of a QK column pruning: :class:`PruneSpec`, and the head lists it prunes.

A PruneSpec says *what* to prune (heads, k, the kept-dims policy and its basis or seed, the GQA
handling, the fill value of dropped dims, the fitted score temperature), never *on what data*: the calibration
prompts a policy or a fit measures (``bos_top``'s BOS vectors, ``act_weight``'s input norms, the
``optimized`` search, ``fill="mean"``'s means, the temperature) are passed beside it as ``calibration=``
(a :class:`sinklens.prune.calibration.CalibrationSet`). Every function that prunes takes one (``apply_pruning``,
``prune_qk``, ``plan_pruning``, ``select_dims``, ``reconstruction_error``, ``k_sweep``'s configurations, the
layer-selection sweep and ``layer_selection``'s template), and every record of a pruning
(handles, checkpoint manifests, sweep results, reconstruction tables) writes its fields, so a record
reads back into the spec that made it (:meth:`PruneSpec.from_dict`).

Two call forms, the same pruning (bitwise):

    sl.prune_qk(model, heads, k=10, dims="bos_top", calibration=probe)             # keyword arguments
    spec = sl.PruneSpec(heads, k=10, policy="bos_top")
    sl.prune_qk(model, spec, calibration=probe)                                   # a spec in place of heads

With a spec, the other pruning arguments (k, dims, basis, gqa, seed, force, fill, temperature, objective, pool)
are left out. ``PruneSpec.template(k, ...)`` is a spec without heads, for :func:`sinklens.layer_selection`, which
fills in the heads of each configuration.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import InitVar, dataclass
from typing import Literal, Union, get_args

import pandas as pd
import torch
from torch import Tensor

from ..core.choices import BASES, FILLS, GQA_POLICIES, POLICIES, Basis, Fill, GQAPolicy, Policy
from ..core.errors import InputError
from ..core.loading import ModelInfo
from ..core.validate import as_int, check_choice, check_index, check_int, check_k

Head = tuple[int, int]
OLD_TEMPERATURE = ("none", "temperature")  # the values of the former ``calibration=`` field (read back, deprecated)
Objective = Literal["frob_rel", "kl"]  # the pattern error the optimized search minimises
OBJECTIVES: tuple[str, ...] = get_args(Objective)
DATA_POLICIES = ("bos_top", "act_weight", "optimized")  # policies measured on calibration prompts
DEFAULT_POOL = 64  # candidate dims of the optimized search (the best act_weight dims; see sinklens.prune.search)
EXPLICIT = "explicit"  # the policy name of dims given by the caller
# what ``dims=`` accepts: a policy name, one set of k dims for every head, or a set per head
DimsArg = Union[Policy, Sequence[int], Tensor, Mapping[Head, Union[Sequence[int], Tensor]]]


# --- head lists ---------------------------------------------------------------------------------

def head_pairs(heads) -> list[Head]:
    """``heads`` as a sorted list of distinct ``(layer, head)`` int pairs (structure only, no model needed).

    Args:
        heads: an iterable of ``(layer, head)`` pairs.
    """
    example = "e.g. heads=[(12, 3), (12, 5)]"
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence) and not hasattr(heads, "__iter__"):
        raise InputError(f"heads must be a list of (layer, head) pairs ({example}), got {type(heads).__name__}.")
    heads = list(heads)
    if not heads:
        raise InputError(f"heads is empty: pass at least one (layer, head) pair ({example}).")
    if len(heads) == 2 and all(as_int(x) is not None for x in heads):
        raise InputError(f"heads={tuple(heads)} looks like a single pair: wrap it in a list, heads=[{tuple(heads)}].")
    out = []
    for pair in heads:
        if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
            raise InputError(f"Each head must be a (layer, head) pair ({example}), got {pair!r}.")
        layer, head = (as_int(x) for x in pair)
        if layer is None or head is None:
            raise InputError(f"Head {pair!r} must hold two ints (layer, head).")
        out.append((layer, head))
    if len(set(out)) != len(out):
        dup = sorted({p for p in out if out.count(p) > 1})
        raise InputError(f"Duplicate heads {dup}: list each (layer, head) once.")
    return sorted(out)


def check_heads(heads, info: ModelInfo) -> list[Head]:
    """A non-empty list of distinct ``(layer, head)`` pairs inside the model, sorted.

    Args:
        heads: an iterable of ``(layer, head)`` pairs.
        info: the model's :class:`~sinklens.core.loading.ModelInfo` (layer and head ranges).
    """
    out = head_pairs(heads)
    for layer, head in out:
        check_index("layer", layer, info.n_layers, "layers")
        check_index("head", head, info.n_heads, "query heads per layer")
    return out


def layer_heads(heads: Sequence[Head], layer: int = -1) -> tuple[int, list[Head]]:
    """``(layer, the pairs of heads in that layer)``.

    Args:
        heads: ``(layer, head)`` pairs, e.g. the sink-specialized heads.
        layer: the layer to pick, or -1 for the layer holding most of ``heads`` (the lowest such layer on ties).
    """
    layer = check_int("layer", layer, minimum=-1, meaning="-1: the layer with most heads")
    pairs = sorted((int(l), int(h)) for l, h in heads)
    if not pairs:
        raise InputError("No heads to choose a layer from: lower eps or q, or pass other heads.")
    if layer == -1:
        counts = pd.Series([l for l, _ in pairs]).value_counts()
        layer = int(min(counts[counts == counts.max()].index))
    chosen = [p for p in pairs if p[0] == layer]
    if not chosen:
        raise InputError(f"Layer {layer} holds none of the heads; layers that do: {sorted({l for l, _ in pairs})}. "
                         "Pass one of them, or -1 for the layer with most heads.")
    return int(layer), chosen


# --- the spec -----------------------------------------------------------------------------------

def _dim_set(dims, k: int, where: str) -> tuple[int, ...]:
    """One set of explicit dims as sorted ints: integer dtype, exactly k, no duplicates (range: :meth:`check`)."""
    if isinstance(dims, Tensor):
        values = dims
    else:
        try:
            values = torch.as_tensor(list(dims), device="cpu")
        except (TypeError, ValueError, RuntimeError) as err:
            raise InputError(f"{where}: dims must be a 1-D list or tensor of ints, got {dims!r}.") from err
    if values.dim() != 1 or values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise InputError(f"{where}: dims must be a 1-D tensor of integer indices, got dtype {values.dtype}, "
                         f"shape {tuple(values.shape)}.")
    if values.numel() != k:
        raise InputError(f"{where}: got {values.numel()} dims but k={k}: pass exactly k dims (or change k).")
    out = sorted(int(v) for v in values.tolist())
    if len(set(out)) != k:
        raise InputError(f"{where}: dims hold duplicates; pass k distinct indices.")
    return tuple(out)


def variant_label(policy: str, fill: str, temperature: bool) -> str:
    """``policy/fill/temperature`` or ``policy/fill/none``: a kept-dims variant's name in tables, figures and
    headlines (e.g. ``"act_weight/mean/temperature"``, ``"bos_top/zero/none"``); the one place labels are built.

    Args:
        policy: the kept-dims policy.
        fill: ``"zero"`` or ``"mean"``.
        temperature: whether a score temperature is fitted (a former ``"none"``/``"temperature"`` string is read).
    """
    if isinstance(temperature, str):
        temperature = old_temperature(temperature, "variant")
    return f"{policy}/{fill}/{'temperature' if temperature else 'none'}"


def old_temperature(value, where: str) -> bool:
    """The temperature flag of a former ``calibration="none"|"temperature"`` value (records and deprecated keywords).

    Args:
        value: ``"none"`` or ``"temperature"``.
        where: what held it (for the error message).
    """
    if value not in OLD_TEMPERATURE:
        raise InputError(f'{where}: unknown calibration {value!r}; the score temperature is now temperature=True or '
                         'False (calibration="temperature" is temperature=True).')
    return value == "temperature"


@dataclass(frozen=True)
class PruneSpec:
    """What a QK column pruning does (see :mod:`sinklens.prune.spec`); frozen, hashable, JSON-ready.

    Args:
        heads: the ``(layer, head)`` pairs to prune (stored sorted); empty only in a template
            (:meth:`template`), which no pruning accepts until heads are filled in.
        k: input dims kept per head.
        policy: how the kept dims are chosen: ``"bos_top"`` (the k largest |x_d| of the BOS vector at the
            head's layer, measured on the calibration prompts passed beside the spec), ``"random"`` (seeded
            control), ``"weight_norm"`` (largest column norms of the head's stacked W_Q and W_K rows),
            ``"act_weight"`` (||x_d||_2 over the calibration prompts x the column norms of W_Q^h and W_K^h: the
            Wanda criterion), ``"optimized"`` (greedy forward selection minimising the head's pattern error on the
            calibration prompts, :mod:`sinklens.prune.search`) or ``"explicit"`` (the ``dims`` given).
        basis: where ``bos_top`` measures the BOS vector: ``"normalized"`` (attention input) or ``"resid"``;
            None for the other policies.
        gqa: ``"exact"`` (private pruned K per selected head; siblings untouched), ``"shared"`` (shared K rows
            keep the union of the group's dims; whole groups only unless ``force``) or ``"q_only"``.
        seed: the seed of ``random`` dims; None for the other policies.
        force: let ``gqa="shared"`` prune a partial group (its other heads change too).
        dims: ``policy="explicit"`` only: the kept dims of each head, aligned with ``heads``.
        fill: the value of a dropped input dim: ``"zero"`` (the thesis) or ``"mean"`` (its mean over the non-BOS
            calibration tokens: a constant bias on the head's q and k projections, exact in the model and in
            saved checkpoints).
        temperature: fit one scale per head on its pruned scores (on the calibration prompts, minimising the
            pattern KL), folded into the kept W_Q columns and q bias; False: no scale.
        objective: ``policy="optimized"`` only: the pattern error the search minimises, ``"frob_rel"`` or
            ``"kl"``.
        pool: ``policy="optimized"`` only: how many candidate dims the search ranks (the pool's best act_weight
            dims; k may not exceed it).
        calibration: deprecated spelling of ``temperature`` (``"none"`` / ``"temperature"``); warns.

    ``basis``, ``seed``, ``objective`` and ``pool`` are stored as None where the policy ignores them, so two
    specs describing the same pruning are equal.
    """

    heads: tuple[Head, ...]
    k: int
    policy: Policy | Literal["explicit"] = "bos_top"
    basis: Basis | None = "normalized"
    gqa: GQAPolicy = "exact"
    seed: int | None = 0
    force: bool = False
    dims: tuple[tuple[int, ...], ...] | None = None
    fill: Fill = "zero"
    temperature: bool = False
    objective: Objective | None = "frob_rel"
    pool: int | None = DEFAULT_POOL
    calibration: InitVar[str | None] = None

    def __post_init__(self, calibration):
        def set_(name: str, value) -> None:  # the dataclass is frozen: normalize fields in place once
            object.__setattr__(self, name, value)

        if calibration is not None:
            warnings.warn('PruneSpec(calibration=...) is deprecated: use temperature=True (was calibration='
                          '"temperature") or temperature=False (was "none").', DeprecationWarning, stacklevel=3)
            set_("temperature", old_temperature(calibration, "PruneSpec"))
        heads = self.heads
        template = isinstance(heads, tuple) and len(heads) == 0  # PruneSpec.template; a list [] is refused
        set_("heads", () if template else tuple(head_pairs(heads)))
        set_("k", check_int("k", self.k, meaning="input dims kept per head"))
        if self.k < 1:
            raise InputError(f"k={self.k} is out of range: choose 1 <= k <= d_model.")
        check_choice("gqa policy", self.gqa, GQA_POLICIES)
        if not isinstance(self.force, bool):
            raise InputError(f"force must be True or False, got {self.force!r}.")
        if not isinstance(self.temperature, bool):
            raise InputError(f"temperature must be True or False, got {self.temperature!r}.")
        check_choice("dims policy", self.policy, POLICIES + (EXPLICIT,))
        if self.policy == "bos_top":
            check_choice("basis", self.basis, BASES)
        elif self.basis is not None:
            check_choice("basis", self.basis, BASES)
            set_("basis", None)
        if self.policy == "random":
            set_("seed", check_int("seed", self.seed, minimum=0))
        else:
            set_("seed", None)
        if self.policy == EXPLICIT:
            if template:
                raise InputError('A template has no heads, so it cannot hold explicit dims: use a policy name.')
            if self.dims is None or len(self.dims) != len(self.heads):
                raise InputError('policy="explicit" needs dims: one set of k dims per head, aligned with heads.')
            set_("dims", tuple(_dim_set(d, self.k, f"dims for head {p}") for p, d in zip(self.heads, self.dims)))
        elif self.dims is not None:
            raise InputError(f'dims are only given with policy="explicit", not with policy={self.policy!r}.')
        check_choice("fill", self.fill, FILLS)
        if self.policy == "optimized":
            check_choice("objective", self.objective, OBJECTIVES)
            pool = check_int("pool", self.pool, minimum=1, meaning="candidate dims of the optimized search")
            if pool < self.k:
                raise InputError(f"k={self.k} exceeds pool={pool}: the optimized search ranks only pool candidate "
                                 f"dims. Pass pool >= k (spec.replace(pool={self.k})).")
            set_("pool", pool)
        else:
            set_("objective", None)
            set_("pool", None)

    @property
    def is_template(self) -> bool:
        """Whether this spec has no heads yet (:meth:`template`)."""
        return not self.heads

    @property
    def variant_label(self) -> str:
        """The kept-dims variant's name in tables, figures and headlines (:func:`variant_label`)."""
        return variant_label(self.policy, self.fill, self.temperature)

    @classmethod
    def template(cls, k: int, policy: Policy = "bos_top", *, basis: Basis = "normalized", gqa: GQAPolicy = "exact",
                 seed: int = 0, force: bool = False, fill: Fill = "zero", temperature: bool = False,
                 objective: Objective = "frob_rel", pool: int = DEFAULT_POOL) -> PruneSpec:
        """A spec without heads: the pruning of every configuration of :func:`sinklens.layer_selection`, which
        fills in each configuration's heads (``spec.replace(heads=...)``).

        Args:
            k: input dims kept per head.
            policy, basis, gqa, seed, force, fill, temperature, objective, pool: as the fields of
                :class:`PruneSpec` (no explicit dims: they belong to heads).
        """
        return cls((), k, policy, basis=basis, gqa=gqa, seed=seed, force=force, fill=fill, temperature=temperature,
                   objective=objective, pool=pool)

    @classmethod
    def of(cls, heads, k: int, dims: DimsArg = "bos_top", *, basis: Basis = "normalized", gqa: GQAPolicy = "exact",
           seed: int = 0, force: bool = False, fill: Fill = "zero", temperature: bool = False,
           objective: Objective = "frob_rel", pool: int = DEFAULT_POOL) -> PruneSpec:
        """The spec of the keyword call form (``dims`` a policy name or explicit dims).

        Args:
            heads: the ``(layer, head)`` pairs to prune.
            k: input dims kept per head.
            dims: a policy name (``"bos_top"``, ``"random"``, ``"weight_norm"``, ``"act_weight"``,
                ``"optimized"``), one 1-D set of k indices for every head, or a mapping ``{(layer, head): indices}``
                covering exactly ``heads``.
            basis, gqa, seed, force, fill, temperature, objective, pool: as the fields of :class:`PruneSpec`.
        """
        extra = dict(basis=basis, gqa=gqa, seed=seed, force=force, fill=fill, temperature=temperature,
                     objective=objective, pool=pool)
        if isinstance(dims, str):
            return cls(head_pairs(heads), k, dims, **extra)
        pairs = head_pairs(heads)
        if isinstance(dims, Mapping):
            given = {}
            for key, value in dims.items():
                given[head_pairs([key])[0]] = value
            if set(given) != set(pairs):
                extra, missing = sorted(set(given) - set(pairs)), sorted(set(pairs) - set(given))
                raise InputError(f"The dims mapping must cover exactly the pruned heads: missing {missing}, "
                                 f"extra {extra}.")
            per_head = [given[p] for p in pairs]
        else:
            k = check_int("k", k, meaning="input dims kept per head")
            shared = _dim_set(dims, k, "dims")
            per_head = [shared] * len(pairs)
        return cls(pairs, k, EXPLICIT, dims=per_head, **extra)

    def check(self, info: ModelInfo) -> PruneSpec:
        """This spec, after checking it fits the model (head and layer ranges, k and dims within d_model).

        Args:
            info: the model's :class:`~sinklens.core.loading.ModelInfo`.
        """
        if self.is_template:
            raise InputError("This PruneSpec is a template (no heads): give it the heads to prune, "
                             "spec.replace(heads=[(layer, head), ...]), or pass it to sinklens.layer_selection.")
        check_heads(self.heads, info)
        check_k(self.k, info.d_model)
        for pair, dims in zip(self.heads, self.dims or ()):
            if dims[0] < 0 or dims[-1] >= info.d_model:
                raise InputError(f"dims for head {pair}: dims must lie in [0, {info.d_model}) (d_model), "
                                 f"found {dims[0]}..{dims[-1]}.")
        return self

    def replace(self, **changes) -> PruneSpec:
        """A copy with some fields changed (e.g. ``spec.replace(k=20)``, ``spec.replace(heads=...)``).

        Args:
            changes: field names and their new values.
        """
        return dataclasses.replace(self, **changes)

    def layers(self) -> list[int]:
        """The layers holding pruned heads, ascending."""
        return sorted({l for l, _ in self.heads})

    def as_dict(self) -> dict:
        """JSON-ready fields (heads as ``[layer, head]`` lists, explicit dims as ``[{"layer", "head", "dims"}]``)."""
        dims = None if self.dims is None else [{"layer": l, "head": h, "dims": list(d)}
                                               for (l, h), d in zip(self.heads, self.dims)]
        return {"heads": [list(p) for p in self.heads], "k": self.k, "policy": self.policy, "basis": self.basis,
                "gqa": self.gqa, "seed": self.seed, "force": self.force, "dims": dims, "fill": self.fill,
                "temperature": self.temperature, "objective": self.objective, "pool": self.pool}

    @classmethod
    def from_dict(cls, record: Mapping) -> PruneSpec:
        """The spec written by :meth:`as_dict`, or read back from a pruning record (handle, manifest, sweep row),
        including records written before the vocabulary change (``calibration: "none"|"temperature"``, explicit
        dims keyed ``"layer.head"``).

        Args:
            record: a mapping with the spec's fields (a record's other keys are ignored; its ``dims``, the kept
                dims per head, are the spec's only for ``policy="explicit"``).
        """
        missing = [name for name in ("heads", "k", "policy") if name not in record]
        if missing:
            raise InputError(f"Not a pruning record: it lacks {missing} (pass PruneSpec.as_dict() or a handle's "
                             "as_dict()).")
        heads = [tuple(p) for p in record["heads"]]
        dims = None
        if record["policy"] == EXPLICIT:
            kept = dims_by_head(record.get("dims"))
            dims = [kept.get(p) for p in head_pairs(heads)]
            if any(d is None for d in dims):
                raise InputError("The record's explicit policy lacks the dims of some heads.")
        if "temperature" in record:
            temperature = bool(record["temperature"])
        else:  # written before the vocabulary change
            temperature = old_temperature(record.get("calibration") or "none", "pruning record")
        return cls(heads, record["k"], record["policy"], basis=record.get("basis"), gqa=record.get("gqa", "exact"),
                   seed=record.get("seed"), force=record.get("force", False), dims=dims,
                   fill=record.get("fill", "zero"), temperature=temperature,
                   objective=record.get("objective") or "frob_rel", pool=record.get("pool") or DEFAULT_POOL)


def parse_head(text: str) -> Head:
    """A head written as ``"layer.head"`` (the form of results written before the vocabulary change) as a pair.

    Args:
        text: e.g. ``"12.3"``.
    """
    try:
        layer, head = str(text).split(".")
        return int(layer), int(head)
    except ValueError as err:
        raise InputError(f"{text!r} is not a head written as 'layer.head' (e.g. '12.3').") from err


def parse_layers(value) -> list[int]:
    """A layer set as a list of ints: a list as written now (or its JSON text, ``"[1, 3]"``, as a CSV holds it), or
    the ``"1,3"`` string of older results.

    Args:
        value: a list of ints, its JSON text, or a comma-separated string.
    """
    if isinstance(value, str) and value.strip().startswith("["):
        value = json.loads(value)
    if isinstance(value, str):
        return [int(part) for part in value.split(",") if part.strip()]
    if isinstance(value, (int, float)):  # a one-layer set read from a CSV column of numbers
        return [int(value)]
    return [int(v) for v in value]


def parse_heads(value) -> list[Head]:
    """Heads as ``(layer, head)`` pairs: ``[[l, h], ...]`` as written now (or its JSON text), or the ``"l.h l.h"``
    string of older results.

    Args:
        value: a list of pairs, its JSON text, or a space-separated string of ``layer.head``.
    """
    if isinstance(value, str) and value.strip().startswith("["):
        value = json.loads(value)
    if isinstance(value, str):
        return [parse_head(part) for part in value.split()]
    return [(int(l), int(h)) for l, h in value]


def dims_by_head(value) -> dict[Head, list[int]]:
    """Kept dims per head from a record: ``[{"layer", "head", "dims"}, ...]`` as written now, or the
    ``{"layer.head": [...]}`` mapping of older records (None: empty).

    Args:
        value: the record's ``dims``.
    """
    if not value:
        return {}
    if isinstance(value, Mapping):
        return {parse_head(key): list(dims) for key, dims in value.items()}
    return {(int(row["layer"]), int(row["head"])): list(row["dims"]) for row in value}


def dims_records(dims: Mapping[Head, Sequence[int]]) -> list[dict]:
    """Kept dims per head as JSON-ready records ``[{"layer", "head", "dims"}, ...]``, sorted by head.

    Args:
        dims: ``{(layer, head): dims}`` (lists or 1-D tensors).
    """
    return [{"layer": int(l), "head": int(h), "dims": [int(d) for d in dims[(l, h)]]} for l, h in sorted(dims)]


def as_spec(heads, k: int | None = None, dims: DimsArg | None = None, *, basis: Basis | None = None,
            gqa: GQAPolicy | None = None, seed: int | None = None, force: bool | None = None,
            fill: Fill | None = None, temperature: bool | None = None, objective: Objective | None = None,
            pool: int | None = None) -> PruneSpec:
    """The spec a pruning function was called with: ``heads`` when it is a :class:`PruneSpec` (the other
    arguments then left out), else :meth:`PruneSpec.of` with its defaults (dims ``"bos_top"``, basis
    ``"normalized"``, gqa ``"exact"``, seed 0, force False, fill ``"zero"``, temperature False, objective
    ``"frob_rel"``, pool 64).

    Args:
        heads: ``(layer, head)`` pairs, or a PruneSpec.
        k, dims, basis, gqa, seed, force, fill, temperature, objective, pool: the keyword form's arguments (None:
            not given).
    """
    given = {name: value for name, value in dict(k=k, dims=dims, basis=basis, gqa=gqa, seed=seed, force=force,
                                                 fill=fill, temperature=temperature, objective=objective,
                                                 pool=pool).items() if value is not None}
    if isinstance(heads, PruneSpec):
        if given:
            raise InputError(f"Pass either a PruneSpec or the pruning arguments, not both: got a PruneSpec and "
                             f"{sorted(given)}. Change the spec instead (spec.replace({next(iter(given))}=...)).")
        return heads
    if k is None:
        raise InputError("k is missing: pass the number of kept dims per head (k=10), or a PruneSpec in place of "
                         "heads.")
    given.pop("k")
    return PruneSpec.of(heads, k, given.pop("dims", "bos_top"), **given)


__all__ = ["DATA_POLICIES", "DEFAULT_POOL", "DimsArg", "EXPLICIT", "FILLS", "Fill", "GQAPolicy", "GQA_POLICIES",
           "Head", "OBJECTIVES", "OLD_TEMPERATURE", "Objective", "POLICIES", "Policy", "PruneSpec", "as_spec",
           "check_heads", "dims_by_head", "dims_records", "head_pairs", "layer_heads", "old_temperature",
           "parse_head", "parse_heads", "parse_layers", "variant_label"]
