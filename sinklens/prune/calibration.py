"""Calibration tokens, and what a pruning measures on them once: attention inputs, their means and norms.

A pruning whose kept dims or values are fitted on data (``bos_top``'s BOS vectors, ``act_weight``'s input
norms, the ``optimized`` search, ``fill="mean"``'s means, the score temperature) measures it on
calibration tokens passed beside its :class:`~sinklens.prune.spec.PruneSpec` (``tokens=`` of
:func:`sinklens.prune_qk`, ``dims_tokens=`` of :func:`sinklens.reconstruction_error`). A
:class:`CalibrationSet` holds those tokens and measures, lazily and once, what is asked of it:

- the attention input of a layer (what q_proj/k_proj multiply) at every real position, fp32, captured in
  one dense forward for all the layers asked together (:meth:`CalibrationSet.inputs`), with the layer's
  rotary tables;
- per layer, the mean and the L2 norm of each input dim: the mean over the real non-BOS positions (the
  value ``fill="mean"`` gives a dropped dim: BOS is the sink, not typical text), the norm over every real
  position (the Wanda criterion's ||x_d||_2 "over calibration tokens");
- the BOS vectors of ``bos_top`` (:meth:`CalibrationSet.massive`);
- the optimized search's rankings, cached per head so a sweep over k reuses their prefix
  (:mod:`sinklens.prune.search` fills :attr:`CalibrationSet.rankings`).

Calibration tokens must start with BOS: the means leave BOS out and the fits are made in the setting the
pruning is studied in (BOS-prepended prompts). Pass ``sinklens.probe_tokens(model, ..., split="probe")`` and
evaluate on ``split="heldout"``. One set can be reused by every pruning of the same (unedited) model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

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
    """Calibration tokens of one model and what is measured on them (module docstring).

    Args:
        model: a bridge from :func:`sinklens.load_model`, without active edits.
        tokens: BOS-prepended prompts (ids or a TokenBatch), e.g. ``sinklens.probe_tokens(model, 32, 64)``.
        attention_mask: 0/1 mask of real tokens for id tensors (None: all real).
        argument: the name the caller's users passed ``tokens`` as (for error messages).
        batch_size: prompts per forward.
    """

    def __init__(self, model, tokens, attention_mask: Int[Tensor, "batch pos"] | None = None, *,
                 argument: str = "tokens", batch_size: int = 8):
        info = model_info(model)
        batch = as_batch(model, tokens, attention_mask)
        require_bos(model, batch, f"The calibration set ({argument}=)")
        self.model, self.info, self.batch, self.argument = model, info, batch, argument
        self.batch_size = check_int("batch_size", batch_size, minimum=1, meaning="prompts per forward")
        self._inputs: dict[int, LayerInputs] = {}
        self._massive: MassiveActivations | None = None
        self.rankings: dict[tuple, list[int]] = {}  # the optimized search's per-head rankings (sinklens.prune.search)
        self.search_cost: dict[tuple, dict] = {}  # their cost: seconds and candidates evaluated per head
        self.fingerprint = fingerprint(batch)

    @property
    def positions(self) -> Int[Tensor, "batch pos"]:
        """0/1 mask of the real non-BOS positions (the tokens the fill means are taken over)."""
        mask = self.batch.attention_mask.clone()
        mask.scatter_(1, mask.argmax(1, keepdim=True), 0)
        return mask

    def check_model(self, model) -> None:
        """Refuse a model other than the one these tokens are measured on.

        Args:
            model: the model a pruning is planned on.
        """
        if model is not self.model and model_info(model) != self.info:
            raise InputError(f"This CalibrationSet was measured on {self.info.name!r}, not on "
                             f"{model_info(model).name!r}: make one on this model.")

    def describe(self) -> dict:
        """JSON-ready provenance: prompt count and length, whether BOS was prepended, a fingerprint of the ids."""
        return {"n_prompts": int(self.batch.tokens.shape[0]), "seq_len": int(self.batch.tokens.shape[1]),
                "n_tokens": int(self.batch.attention_mask.sum()), "prepend_bos": True,
                "fingerprint": self.fingerprint}

    def inputs(self, layers: Sequence[int]) -> dict[int, LayerInputs]:
        """The attention inputs of ``layers`` (measured once, in one dense forward for those not measured yet).

        Args:
            layers: model layers.
        """
        layers = sorted({int(layer) for layer in layers})
        missing = [layer for layer in layers if layer not in self._inputs]
        if missing:
            if active_edits(self.model):
                raise InputError(f"Calibration ({self.argument}=) would measure layers {missing} on a model with "
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
            raise InputError(f"The calibration prompts ({self.argument}=) hold no token besides BOS: the mean fill "
                             "needs text tokens. Pass longer prompts.")
        return torch.einsum("bp,bpd->d", weight, x) / weight.sum()

    def norm(self, layer: int) -> Float[Tensor, " d_model"]:
        """L2 norm of each attention-input dim over every real calibration position (fp32).

        Args:
            layer: the model layer.
        """
        x = self.inputs([layer])[layer].x
        weight = self.batch.attention_mask.to(x.device, torch.float32)
        return torch.einsum("bp,bpd->d", weight, x.square()).sqrt()

    def massive(self, layers: Sequence[int]) -> MassiveActivations:
        """The BOS vectors of ``layers`` for ``bos_top`` (one forward for every layer, measured once).

        Args:
            layers: model layers.
        """
        if self._massive is None or not set(layers) <= set(self._massive.layers):
            if active_edits(self.model):
                raise InputError(f'dims="bos_top" would measure the BOS vectors ({self.argument}=) on a model with '
                                 "active edits: restore them first.")
            self._massive = massive_activations(self.model, self.batch, show_progress=False)
        return self._massive


def calibration_set(model, tokens, attention_mask: Int[Tensor, "batch pos"] | None = None, *,
                    argument: str = "tokens") -> CalibrationSet:
    """``tokens`` as a :class:`CalibrationSet` of ``model`` (itself when it already is one, checked against the
    model).

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        tokens: a CalibrationSet, or BOS-prepended prompts (ids or a TokenBatch).
        attention_mask: 0/1 mask of real tokens for id tensors.
        argument: the argument's name in the caller's signature (error messages name it).
    """
    if isinstance(tokens, CalibrationSet):
        tokens.check_model(model)
        return tokens
    if tokens is None:
        raise InputError(f"This pruning is fitted on calibration tokens: pass BOS-prepended probe prompts as "
                         f"{argument}= (e.g. sinklens.probe_tokens(model, 32, 64, split='probe')) or a "
                         "sinklens.CalibrationSet.")
    if isinstance(tokens, MassiveActivations):
        raise InputError(f"{argument}= is a MassiveActivations, which only holds BOS vectors (enough for "
                         'dims="bos_top" with fill="zero"): this pruning needs the calibration prompts themselves. '
                         f"Pass the tokens (or a sinklens.CalibrationSet) as {argument}=.")
    if not isinstance(tokens, (Tensor, TokenBatch)):
        raise InputError(f"{argument}= must be token ids, a TokenBatch or a sinklens.CalibrationSet, got "
                         f"{type(tokens).__name__}.")
    return CalibrationSet(model, tokens, attention_mask, argument=argument)


__all__ = ["CalibrationSet", "LayerInputs", "calibration_set", "fingerprint"]
