"""Reversible edits of a bridged model: saved weight slices, permanent hooks, the registry of active edits.

QK column pruning (:mod:`sinklens.pruning`) and whole-head removal (:mod:`sinklens.removal`) are edits.
An edit writes its weights in place and adds permanent hooks (which survive ``run_with_hooks``,
``run_with_cache`` and ``reset_hooks()``), so every forward sees it: plain calls, hooked runs,
``generate``. ``restore()`` writes the saved slices back (bitwise) and removes the hooks. The active
edits are listed on the model; an edit that overlaps an active one is refused.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .errors import InputError

Unit = tuple  # ("q" | "k" | "kread" | "o", layer, head or kv head): what an edit writes or reads


def active_edits(model) -> list:
    """The pruning / head-removal handles currently applied to ``model`` (oldest first).

    Args:
        model: a bridge from :func:`sinklens.load_model`.
    """
    return list(model.__dict__.get("_sinklens_edits", []))


def count_parameters(model) -> int:
    """Parameters of the HF model (tied weights counted once).

    Args:
        model: a bridge from :func:`sinklens.load_model`.
    """
    return sum(p.numel() for p in model.original_model.parameters())


def _conflicts(a: set, b: set) -> set:
    """Units two edits both write, or one writes and the other reads."""
    clash = {u for u in a & b if u[0] != "kread"}
    clash |= {u for u in a if u[0] == "k" and ("kread",) + u[1:] in b}
    clash |= {u for u in b if u[0] == "k" and ("kread",) + u[1:] in a}
    return clash


def attach(model, name: str, fn: Callable, prepend: bool = False):
    """Add ``fn`` to hook point ``name`` as a permanent hook; returns what :func:`detach` needs.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        name: the hook point.
        fn: the hook ``fn(tensor, hook)``.
        prepend: run it before the point's other hooks.
    """
    point = model.hook_dict[name]
    handle = point.add_hook(fn, dir="fwd", is_permanent=True, prepend=prepend)
    return point, handle


def detach(point, handle) -> None:
    """Remove a hook added by :func:`attach`.

    Args:
        point, handle: what :func:`attach` returned.
    """
    handle.hook.remove()
    point.fwd_hooks[:] = [h for h in point.fwd_hooks if h is not handle]


class Edit:
    """Base of reversible edits: saved weight slices, permanent hooks, registration on the model.

    A subclass checks its input, calls ``super().__init__(model, units)`` (refuses overlaps), makes its
    changes with :meth:`zero` and :meth:`hook`, then calls :meth:`register`.
    """

    kind = "edit"

    def __init__(self, model, units: set[Unit]):
        self.model = model
        self._units = units
        self._saved: list[tuple[Tensor, tuple, Tensor]] = []
        self._hooks: list = []
        self.active = False
        for other in active_edits(model):
            clash = _conflicts(units, other._units)
            if clash:
                where = sorted({(u[1], u[2]) for u in clash})
                raise InputError(f"This {self.kind} overlaps an active {other.kind} at (layer, head or kv head) "
                                 f"{where}: restore the other one first (nested or overlapping edits of the same heads "
                                 "are refused).")

    def zero(self, weight: Tensor, index: tuple, value_mask: Tensor | None = None) -> None:
        """Save ``weight[index]`` and set it to zero (where ``value_mask`` is True, if given).

        Args:
            weight: the live weight.
            index: the slice of it the edit owns.
            value_mask: within the slice, True where the value is zeroed (None: all).
        """
        with torch.no_grad():
            original = weight[index].clone()
            self._saved.append((weight, index, original))
            if value_mask is None:
                weight[index] = 0
            else:
                weight[index] = original.masked_fill(value_mask, 0)

    def write(self, weight: Tensor, index: tuple, value: Tensor) -> None:
        """Save ``weight[index]`` and overwrite it with ``value`` (e.g. kept W_Q columns scaled by a temperature).

        Args:
            weight: the live weight (or bias).
            index: the slice of it the edit owns.
            value: the new values (broadcast to the slice, cast to its dtype).
        """
        with torch.no_grad():
            self._saved.append((weight, index, weight[index].clone()))
            weight[index] = value.to(weight.dtype)

    def hook(self, name: str, fn: Callable, prepend: bool = False) -> None:
        """Add a permanent hook that :meth:`restore` removes.

        Args:
            name: the hook point.
            fn: the hook ``fn(tensor, hook)``.
            prepend: run it before the point's other hooks.
        """
        self._hooks.append(attach(self.model, name, fn, prepend))

    def register(self) -> None:
        """List this edit among the model's active edits."""
        self.model.__dict__.setdefault("_sinklens_edits", []).append(self)
        self.active = True

    def restore(self) -> None:
        """Undo the edit: write the saved weights back bitwise and remove the hooks (idempotent)."""
        if not self.active and not self._saved and not self._hooks:
            return
        with torch.no_grad():
            for weight, index, original in reversed(self._saved):
                weight[index] = original
        for point, handle in self._hooks:
            detach(point, handle)
        self._saved, self._hooks = [], []
        edits = self.model.__dict__.get("_sinklens_edits", [])
        edits[:] = [e for e in edits if e is not self]
        self.active = False


__all__ = ["Edit", "active_edits", "attach", "count_parameters", "detach"]
