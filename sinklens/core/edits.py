"""Reversible edits of a bridged model: saved weight slices, permanent hooks, the registry of active edits.

QK column pruning (:mod:`sinklens.prune.pruning`), whole-head removal (:mod:`sinklens.prune.removal`) and attention
calibration (:mod:`sinklens.prune.attention_calibration`) and attention-window restriction
(:mod:`sinklens.prune.attention_window`) are edits.
An edit writes its weights in place and adds permanent hooks (which survive ``run_with_hooks``,
``run_with_cache`` and ``reset_hooks()``; a forward after ``reset_hooks(including_permanent=True)`` removed one
raises instead of silently computing another model), so every forward sees it: plain calls, hooked runs,
``generate``. ``restore()`` writes the saved slices back (bitwise) and removes the hooks. The active
edits are listed on the model; an edit that overlaps an active one is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .errors import HandleUsageError, InputError, SinklensError

Unit = tuple  # ("q" | "k" | "kread" | "o" | "pattern", layer, head or kv head): what an edit writes or reads


def active_edits(model) -> list:
    """The edit handles (pruning, head removal, attention calibration) applied to ``model`` now, oldest first.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
    """
    return list(model.__dict__.get("_sinklens_edits", []))


def pattern_edits(model) -> list:
    """The active edits of ``model`` that rewrite attention patterns per sequence (attention calibrations): the sdpa
    census cannot run under them and the evaluation cannot share an MC context between choices.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
    """
    return [e for e in active_edits(model) if getattr(e, "per_sequence_pattern", False)]


def eager_pattern_edits(model) -> list:
    """The active edits of ``model`` that act at the eager attention hooks (``hook_attn_scores`` / ``hook_pattern``):
    attention calibrations and attention-window restrictions. The fused (sdpa) census cannot run under them.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
    """
    return [e for e in active_edits(model)
            if getattr(e, "per_sequence_pattern", False) or getattr(e, "eager_pattern", False)]


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


def _attach(model, name: str, fn: Callable, prepend: bool = False, owner: str = "edit") -> PermanentHook:
    """Add ``fn`` to hook point ``name`` as a guarded permanent hook; its ``remove()`` takes it off.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        name: the hook point.
        fn: the hook ``fn(tensor, hook)``.
        prepend: run it before the point's other hooks.
        owner: what the hook belongs to, for the message when it goes missing (e.g. "QK pruning").
    """
    return PermanentHook(_hook_point(model, name), name, fn, prepend, owner)


def _hook_point(model, name: str):
    """The HookPoint called ``name`` (aliases included), from a name table built once per model.

    The bridge's ``hook_dict`` rebuilds its alias table on every access (about 1 ms); edits attach hooks in
    tight loops (a k sweep applies thousands of layer edits), so the table is kept on the model.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        name: the hook point's name, e.g. ``"blocks.3.attn.hook_attn_scores"``.
    """
    table = model.__dict__.get("_sinklens_hook_points")
    if table is None:
        table = model.__dict__["_sinklens_hook_points"] = dict(model.hook_dict)
    try:
        return table[name]
    except KeyError:
        raise InputError(f"The model has no hook point {name!r}.") from None


class PermanentHook:
    """A permanent TransformerLens hook that cannot disappear silently.

    ``reset_hooks(including_permanent=True)`` (or a point's ``remove_hooks``) drops every permanent hook,
    also those an active edit relies on, while the edit's handle still says active. A plain torch forward
    pre-hook on the same point, which TransformerLens' resets do not touch, checks before the point runs
    that the hook is still attached and raises :class:`~sinklens.core.errors.SinklensError` otherwise: the model
    never silently computes another edit than the one its handle describes.

    Args:
        point: the HookPoint.
        name: its name (for the message).
        fn: the hook ``fn(tensor, hook)``.
        prepend: run it before the point's other hooks.
        owner: what the hook belongs to (for the message).
    """

    def __init__(self, point, name: str, fn: Callable, prepend: bool = False, owner: str = "edit"):
        self.point, self.name, self.owner = point, name, owner
        self.handle = point.add_hook(fn, dir="fwd", is_permanent=True, prepend=prepend)
        self._guard = point.register_forward_pre_hook(self._check_present)

    def present(self) -> bool:
        """Whether the hook is still attached to its point."""
        return any(h is self.handle for h in self.point.fwd_hooks)

    def _check_present(self, module, args) -> None:
        if not self.present():
            raise SinklensError(
                f"A hook of the active {self.owner} at {self.name} was removed (reset_hooks(including_permanent=True) "
                "or remove_hooks): this forward would compute another model than the edit's handle describes. Call "
                "the handle's restore() and apply the edit again; while sinklens edits are active, clear your own "
                "hooks with reset_hooks() (without including_permanent).")

    def remove(self) -> None:
        """Take the hook and its guard off the point (idempotent)."""
        self._guard.remove()
        self.handle.hook.remove()
        self.point.fwd_hooks[:] = [h for h in self.point.fwd_hooks if h is not self.handle]


class Edit:
    """Base of reversible edits: saved weight slices, permanent hooks, registration on the model.

    A subclass checks its input, calls ``super().__init__(model, units)`` (refuses overlaps), makes its
    changes with :meth:`zero` and :meth:`hook`, then calls :meth:`register`.
    """

    kind = "edit"
    per_sequence_pattern = False  # True: rewrites attention patterns per sequence (see pattern_edits)
    applied_by = "sinklens.apply_pruning(...)"  # the call that made this handle (for messages)
    scoped_call = "sinklens.prune_qk(model, ...)"  # the context manager applying the same edit for a with block

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
        self._hooks.append(_attach(self.model, name, fn, prepend, owner=self.kind))

    def register(self) -> None:
        """List this edit among the model's active edits."""
        self.model.__dict__.setdefault("_sinklens_edits", []).append(self)
        self.active = True

    def __enter__(self):
        """A handle is no context manager: the edit is already applied. Raises :class:`HandleUsageError` naming the
        scoped call (``with sinklens.prune_qk(...)``) and ``handle.restore()``."""
        name = type(self).__name__
        article = "an" if self.kind[0] in "aeiou" else "a"
        scoped = f"`with {self.scoped_call} as handle:` for {article} {self.kind} scoped to a with block"
        if self.active:
            raise HandleUsageError(f"{name} is not a context manager: {self.applied_by} already applied this "
                                   f"{self.kind}, and it stays until handle.restore(). Use {scoped}, or call "
                                   "handle.restore() to undo this one.")
        raise HandleUsageError(f"{name} is not a context manager, and this {self.kind} was already restored (the "
                               f"model is back as it was). Use {scoped}, or {self.applied_by} to apply it again "
                               "(handle.restore() undoes it).")

    def __exit__(self, *exc) -> bool:
        return False  # never reached: __enter__ raises (defined so that `with` calls __enter__ and its message)

    def restore(self) -> None:
        """Undo the edit: write the saved weights back bitwise and remove the hooks.

        A second call is a no-op (it changes nothing, not even a later edit of the same heads); ``repr(handle)``
        says ``restored``.
        """
        if not self.active and not self._saved and not self._hooks:
            return
        with torch.no_grad():
            for weight, index, original in reversed(self._saved):
                weight[index] = original
        for hook in self._hooks:
            hook.remove()
        self._saved, self._hooks = [], []
        edits = self.model.__dict__.get("_sinklens_edits", [])
        edits[:] = [e for e in edits if e is not self]
        self.active = False


@contextmanager
def applied(apply: Callable[..., Edit], *args, **kwargs) -> Iterator[Edit]:
    """The edit ``apply(*args, **kwargs)`` makes, for the body of a ``with`` block, restored however the block ends:
    the one scoped form of every edit (``prune_qk``, ``remove_heads``, ``calibrate_attention``,
    ``restrict_attention``, a sweep's head edit). Nothing is applied before the block is entered.

    Args:
        apply: the edit's persistent form (``apply_pruning``, ``apply_head_removal``, ...), returning its handle.
        args, kwargs: its arguments.
    """
    handle = apply(*args, **kwargs)
    try:
        yield handle
    finally:
        handle.restore()


def heads_text(heads, limit: int = 6) -> str:
    """``heads=[(0, 1), (2, 3)]`` for a handle's repr; past ``limit`` heads, the first ones and the count.

    Args:
        heads: ``(layer, head)`` pairs.
        limit: how many to list in full.
    """
    pairs = [tuple(int(x) for x in h) for h in heads]
    if len(pairs) <= limit:
        return f"heads={pairs}"
    return f"heads=[{', '.join(map(str, pairs[:limit]))}, ...] ({len(pairs)} heads)"


__all__ = ["Edit", "PermanentHook", "active_edits", "count_parameters", "eager_pattern_edits", "heads_text",
           "pattern_edits"]
