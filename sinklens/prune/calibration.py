"""The calibration input of a pruning: :class:`CalibrationSet`, and the one resolver of what a spec needs from it.

A pruning whose kept dims or values are fitted on data (``bos_top``'s BOS vectors, ``act_weight``'s input
norms, the ``optimized`` search, ``fill="mean"``'s means, the score temperature) measures it on calibration
prompts passed beside its :class:`~sinklens.prune.spec.PruneSpec` as ``calibration=``, the one keyword of every
function that fits a pruning (``plan_pruning``, ``apply_pruning``, ``prune_qk``, ``select_dims``,
``reconstruction_error``, ``k_sweep``, ``Sweep``, ``layer_selection``). It takes a :class:`CalibrationSet`, or what
one is made from: BOS-prepended ids or a TokenBatch (:meth:`CalibrationSet.from_tokens`), or, for a pruning that
needs only BOS vectors (plain ``bos_top``: zero fill, no temperature), a MassiveActivations measured on them
(:meth:`CalibrationSet.from_massive`). :func:`calibration_need` says what a spec needs (nothing, BOS vectors or
the prompts' attention inputs) and :func:`resolve_calibration` turns the argument into a set, refusing what cannot
give it, before any forward. The former keywords ``tokens=``, ``dims_tokens=`` and ``calibration_tokens=`` still
work for one release, with a DeprecationWarning (:func:`calibration_argument`).

A :class:`CalibrationSet` measures, lazily and once, what is asked of it:

- the attention input of a layer (what q_proj/k_proj multiply) at every real position, fp32, captured in
  one dense forward for all the layers asked together (:meth:`CalibrationSet.inputs`), with the layer's
  rotary tables;
- per layer, the mean and the L2 norm of each input dim: the mean over the real non-BOS positions (the
  value ``fill="mean"`` gives a dropped dim: BOS is the sink, not typical text), the norm over every real
  position (the Wanda criterion's ||x_d||_2 "over calibration tokens");
- the BOS vectors of ``bos_top`` (:meth:`CalibrationSet.massive`);
- the optimized search's rankings, cached per head so a sweep over k reuses their prefix
  (:mod:`sinklens.prune.search` fills :attr:`CalibrationSet.rankings`).

Calibration prompts must start with BOS: the means leave BOS out and the fits are made in the setting the
pruning is studied in (BOS-prepended prompts). Pass ``sinklens.probe_tokens(model, ..., split="probe")`` and
evaluate on ``split="held_out"``. One set can be reused by every pruning of the same (unedited) model.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..core.edits import active_edits
from ..core.errors import InputError
from ..core.hooks import batches, run_hooked
from ..core.loading import model_info
from ..core.qk import layout
from ..core.tokens import TokenBatch, as_batch, require_bos
from ..core.validate import check_int
from ..measure.massive import MassiveActivations, massive_activations
from .spec import OLD_TEMPERATURE, PruneSpec


@dataclass
class LayerInputs:
    """The attention input of one layer on every calibration prompt, with its rotary tables (fp32; None for a
    family without rotary, e.g. GPT-2's learned positions)."""

    x: Float[Tensor, "batch pos d_model"]
    cos: Float[Tensor, "batch pos d_head"] | None
    sin: Float[Tensor, "batch pos d_head"] | None


def fingerprint(batch: TokenBatch) -> str:
    """A short hash of a batch's ids and mask: tells whether two token sets are the same prompts.

    Args:
        batch: the tokens.
    """
    ids = batch.tokens.cpu().numpy().tobytes() + batch.attention_mask.cpu().long().numpy().tobytes()
    return hashlib.sha256(ids).hexdigest()[:16]


class CalibrationSet:
    """Calibration prompts of one model and what is measured on them (module docstring).

    Args:
        model: a bridge from :func:`sinklens.load_model`, without active edits.
        tokens: BOS-prepended prompts (ids or a TokenBatch), e.g. ``sinklens.probe_tokens(model, 32, 64)``.
        attention_mask: 0/1 mask of real tokens for id tensors (None: all real).
        batch_size: prompts per forward.
    """

    def __init__(self, model, tokens, attention_mask: Int[Tensor, "batch pos"] | None = None, *,
                 batch_size: int = 8):
        info = model_info(model)
        batch = as_batch(model, tokens, attention_mask)
        require_bos(model, batch, "The calibration set (calibration=)")
        self.model, self.info, self.batch = model, info, batch
        self.batch_size = check_int("batch_size", batch_size, minimum=1, meaning="prompts per forward")
        self._inputs: dict[int, LayerInputs] = {}
        self._massive: MassiveActivations | None = None
        self.rankings: dict[tuple, list[int]] = {}  # the optimized search's per-head rankings (sinklens.prune.search)
        self.search_cost: dict[tuple, dict] = {}  # their cost: seconds and candidates evaluated per head
        self.fingerprint: str | None = fingerprint(batch)

    @classmethod
    def from_tokens(cls, model, tokens, attention_mask: Int[Tensor, "batch pos"] | None = None, *,
                    batch_size: int = 8) -> CalibrationSet:
        """A set of BOS-prepended prompts (the same as the constructor).

        Args:
            model: a bridge from :func:`sinklens.load_model`, without active edits.
            tokens: BOS-prepended ids or a TokenBatch.
            attention_mask: 0/1 mask of real tokens for id tensors (None: all real).
            batch_size: prompts per forward.
        """
        return cls(model, tokens, attention_mask, batch_size=batch_size)

    @classmethod
    def from_massive(cls, model, massive: MassiveActivations) -> CalibrationSet:
        """A BOS-only set: the BOS vectors of a MassiveActivations measured before, enough for plain ``bos_top``
        (zero fill, no temperature) and nothing else (no attention inputs, means or norms).

        Args:
            model: the bridge the activations were measured on.
            massive: from :func:`sinklens.massive_activations` on BOS-prepended prompts.
        """
        if not isinstance(massive, MassiveActivations):
            raise InputError(f"from_massive takes a sinklens.MassiveActivations, got {type(massive).__name__}.")
        if massive.prepend_bos is False:
            raise InputError('dims="bos_top" needs BOS vectors, but these activations were measured without BOS: '
                             "measure them on prompts with prepend_bos=True.")
        self = cls.__new__(cls)
        self.model, self.info, self.batch, self.batch_size = model, model_info(model), None, 8
        self._inputs, self._massive = {}, massive
        self.rankings, self.search_cost = {}, {}
        self.fingerprint = None
        return self

    @property
    def bos_only(self) -> bool:
        """Whether this set holds only BOS vectors (:meth:`from_massive`), not the prompts themselves."""
        return self.batch is None

    @property
    def source(self) -> TokenBatch | MassiveActivations:
        """What this set was made from: its prompts (:meth:`from_tokens`) or its BOS vectors (:meth:`from_massive`).
        Unlike the set, which holds its model, it pickles: another copy of the model (a Ray worker's) rebuilds the
        same set from it (with :attr:`batch_size`)."""
        return self._massive if self.batch is None else self.batch

    @property
    def prepend_bos(self) -> bool | None:
        """Whether the prompts started with BOS (always, for prompts; as the MassiveActivations says, else)."""
        return True if self.batch is not None else self._massive.prepend_bos

    def _prompts(self, what: str) -> TokenBatch:
        if self.batch is None:
            raise InputError(f"This CalibrationSet holds only BOS vectors (CalibrationSet.from_massive), but {what} "
                             "needs the calibration prompts themselves: pass calibration= as "
                             "sinklens.CalibrationSet.from_tokens(model, probe) (or the BOS-prepended probe ids).")
        return self.batch

    @property
    def positions(self) -> Int[Tensor, "batch pos"]:
        """0/1 mask of the real non-BOS positions (the tokens the fill means are taken over)."""
        mask = self._prompts("the fill means").attention_mask.clone()
        mask.scatter_(1, mask.argmax(1, keepdim=True), 0)
        return mask

    def check_model(self, model) -> None:
        """Refuse a model other than the one these prompts are measured on.

        Args:
            model: the model a pruning is planned on.
        """
        if model is not self.model and model_info(model) != self.info:
            raise InputError(f"This CalibrationSet was measured on {self.info.name!r}, not on "
                             f"{model_info(model).name!r}: make one on this model.")

    def as_dict(self) -> dict:
        """JSON-ready provenance: prompt count and length, whether BOS was prepended, a fingerprint of the ids
        (a BOS-only set: its kind and layers)."""
        if self.batch is None:
            return {"kind": "bos_vectors", "prepend_bos": self.prepend_bos, "layers": list(self._massive.layers),
                    "fingerprint": None}
        return {"n_prompts": int(self.batch.tokens.shape[0]), "seq_len": int(self.batch.tokens.shape[1]),
                "n_tokens": int(self.batch.attention_mask.sum()), "prepend_bos": True,
                "fingerprint": self.fingerprint}

    def inputs(self, layers: Sequence[int]) -> dict[int, LayerInputs]:
        """The attention inputs of ``layers`` (measured once, in one dense forward for those not measured yet).

        Args:
            layers: model layers.
        """
        self._prompts("measuring attention inputs")
        layers = sorted({int(layer) for layer in layers})
        missing = [layer for layer in layers if layer not in self._inputs]
        if missing:
            if active_edits(self.model):
                raise InputError(f"The calibration set (calibration=) would measure layers {missing} on a model with "
                                 f"active edits ({len(active_edits(self.model))}): restore them first.")
            self._capture(missing)
        return {layer: self._inputs[layer] for layer in layers}

    def _capture(self, layers: list[int]) -> None:
        names = layout(self.model)
        parts: dict[int, dict[str, list[Tensor]]] = {layer: {"x": [], "cos": [], "sin": []} for layer in layers}
        for _, sub in batches(self.batch, self.batch_size, desc="calibration", show_progress=False):
            hooks = []
            n = sub.tokens.shape[0]
            for layer in layers:
                hook_names = names.hooks(layer)

                def keep(slot, layer=layer, n=n):
                    def capture(tensor, hook):
                        value = tensor.float()
                        parts[layer][slot].append(value.expand(n, *value.shape[1:]).clone())
                    return capture

                hooks.append((hook_names.input, keep("x")))
                if names.rotary is not None:
                    hooks += [(hook_names.cos, keep("cos")), (hook_names.sin, keep("sin"))]
            run_hooked(self.model, sub, hooks, layers)
        for layer in layers:
            self._inputs[layer] = LayerInputs(*(torch.cat(parts[layer][slot]) if parts[layer][slot] else None
                                                for slot in ("x", "cos", "sin")))

    def mean(self, layer: int) -> Float[Tensor, " d_model"]:
        """Mean of each attention-input dim over the real non-BOS calibration positions (fp32).

        Args:
            layer: the model layer.
        """
        x = self.inputs([layer])[layer].x
        weight = self.positions.to(x.device, torch.float32)
        if float(weight.sum()) == 0:
            raise InputError("The calibration prompts (calibration=) hold no token besides BOS: the mean fill "
                             "needs text tokens. Pass longer prompts.")
        return torch.einsum("bp,bpd->d", weight, x) / weight.sum()

    def norm(self, layer: int) -> Float[Tensor, " d_model"]:
        """L2 norm of each attention-input dim over every real calibration position (fp32).

        Args:
            layer: the model layer.
        """
        x = self.inputs([layer])[layer].x
        weight = self._prompts("the act_weight norms").attention_mask.to(x.device, torch.float32)
        return torch.einsum("bp,bpd->d", weight, x.square()).sqrt()

    def massive(self, layers: Sequence[int]) -> MassiveActivations:
        """The BOS vectors of ``layers`` for ``bos_top`` (one forward for every layer, measured once).

        Args:
            layers: model layers.
        """
        if self.batch is None:
            missing = sorted(set(layers) - set(self._massive.layers))
            if missing:
                raise InputError(f"The MassiveActivations passed as calibration= lacks layers {missing}: measure them "
                                 "with sinklens.massive_activations(model, prompts, layers=...).")
            return self._massive
        if self._massive is None or not set(layers) <= set(self._massive.layers):
            if active_edits(self.model):
                raise InputError('dims="bos_top" would measure the BOS vectors (calibration=) on a model with '
                                 "active edits: restore them, or measure once on the dense model with "
                                 "sinklens.massive_activations and pass CalibrationSet.from_massive(model, it).")
            self._massive = massive_activations(self.model, self.batch, show_progress=False)
        return self._massive


Need = Literal["nothing", "bos", "inputs"]
NEEDS: tuple[str, ...] = ("nothing", "bos", "inputs")


def calibration_need(spec: PruneSpec) -> Need:
    """What ``spec`` is fitted on: ``"nothing"`` (``random``, ``weight_norm`` or explicit dims, zero fill, no
    temperature), ``"bos"`` (plain ``bos_top``: the BOS vectors of the calibration prompts only) or ``"inputs"``
    (``act_weight``, ``optimized``, mean fill or a temperature: the prompts' attention inputs).

    Args:
        spec: the pruning.
    """
    if spec.policy in ("act_weight", "optimized") or spec.fill != "zero" or spec.temperature:
        return "inputs"
    return "bos" if spec.policy == "bos_top" else "nothing"


def _need_of(specs) -> Need:
    specs = [specs] if isinstance(specs, PruneSpec) else list(specs)
    return max((calibration_need(spec) for spec in specs), key=NEEDS.index, default="nothing")


def resolve_calibration(model, specs: PruneSpec | Sequence[PruneSpec], calibration, *,
                        attention_mask: Int[Tensor, "batch pos"] | None = None) -> CalibrationSet | None:
    """The calibration set the pruning(s) ``specs`` are fitted on, from a ``calibration=`` argument, or None when
    they are fitted on nothing (:func:`calibration_need`); refused, before any forward, when it cannot give what
    they need.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        specs: one spec or several (the set must serve the most demanding).
        calibration: a :class:`CalibrationSet` (checked against the model), BOS-prepended ids or a TokenBatch
            (made into one, :meth:`CalibrationSet.from_tokens`), or, when only BOS vectors are needed, a
            MassiveActivations measured on them (:meth:`CalibrationSet.from_massive`); None when nothing is needed.
        attention_mask: 0/1 mask of real tokens for id tensors.
    """
    need = _need_of(specs)
    if need == "nothing":
        return None
    example = "e.g. calibration=sinklens.probe_tokens(model, 32, 64, split='probe'), or a sinklens.CalibrationSet"
    if calibration is None:
        what = "its BOS vectors" if need == "bos" else "their attention inputs"
        raise InputError(f"This pruning is fitted on calibration prompts ({what}): pass BOS-prepended probe prompts "
                         f"as calibration= ({example}).")
    if isinstance(calibration, CalibrationSet):
        calibration.check_model(model)
        out = calibration
    elif isinstance(calibration, MassiveActivations):
        out = CalibrationSet.from_massive(model, calibration)
    elif isinstance(calibration, (Tensor, TokenBatch)):
        out = CalibrationSet.from_tokens(model, calibration, attention_mask)
    else:
        raise InputError(f"calibration= must be token ids, a TokenBatch or a sinklens.CalibrationSet (a "
                         f"MassiveActivations for plain bos_top), got {type(calibration).__name__}.")
    if need == "inputs" and out.bos_only:
        raise InputError("calibration= holds only BOS vectors (a MassiveActivations: enough for dims=\"bos_top\" with "
                         "zero fill and no temperature), but this pruning (act_weight, optimized, mean fill or a "
                         f"temperature) is fitted on the calibration prompts themselves: pass the prompts ({example}).")
    return out


def calibration_argument(calibration=None, *, where: str, **old) -> object:
    """The ``calibration=`` value of a call that may still use a former keyword (``tokens=``, ``dims_tokens=``,
    ``calibration_tokens=``): the old keyword's value with a DeprecationWarning naming ``calibration=``, refused
    when both are given. Callers with a temperature read a ``calibration="none"|"temperature"`` string (the former
    temperature option) with :func:`temperature_argument` first.

    Args:
        calibration: the value passed as ``calibration=``.
        where: the function's name (messages name it).
        old: the former keyword by name and its value (None: not given).
    """
    given = {name: value for name, value in old.items() if value is not None}
    if not given:
        return calibration
    name, value = next(iter(given.items()))
    if calibration is not None:
        raise InputError(f"{where}: both {name}= and calibration= were given; they are the same input (the "
                         f"calibration prompts). Pass calibration= only ({name}= is its deprecated spelling).")
    warnings.warn(f"{where}({name}=...) is deprecated: use calibration=... (the same calibration prompts, the same "
                  "numbers).", DeprecationWarning, stacklevel=3)
    return value


def temperature_argument(calibration, temperature: bool | None, *, where: str) -> tuple[object, bool | None]:
    """``(calibration input, temperature)`` of a call that may pass the former temperature option as
    ``calibration="none"|"temperature"``: that string becomes ``temperature`` with a DeprecationWarning.

    Args:
        calibration: the value passed as ``calibration=``.
        temperature: the value passed as ``temperature=`` (None: not given).
        where: the function's name (messages name it).
    """
    if not isinstance(calibration, str):
        return calibration, temperature
    if calibration not in OLD_TEMPERATURE:
        raise InputError(f"{where}: calibration={calibration!r} is not a calibration input. calibration= takes the "
                         "calibration prompts (a sinklens.CalibrationSet or BOS-prepended ids); the score "
                         "temperature is temperature=True.")
    if temperature is not None:
        raise InputError(f"{where}: both calibration={calibration!r} (the former temperature option) and "
                         f"temperature={temperature!r} were given: pass temperature= only.")
    warnings.warn(f'{where}(calibration="{calibration}") is deprecated: the score temperature is now '
                  f"temperature={calibration == 'temperature'} (calibration= takes the calibration prompts).",
                  DeprecationWarning, stacklevel=3)
    return None, calibration == "temperature"


__all__ = ["CalibrationSet", "LayerInputs", "NEEDS", "Need", "calibration_argument", "calibration_need",
           "fingerprint", "resolve_calibration", "temperature_argument"]
