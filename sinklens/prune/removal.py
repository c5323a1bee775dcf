"""Whole-head removal: a head's input columns of o_proj are zeroed, so it adds nothing to the residual stream.

The baseline QK column pruning is compared with. Same two forms as pruning: :func:`remove_heads`
(a context manager, restored on exit) pairs with :func:`sinklens.prune_qk`; :func:`apply_head_removal`
(persistent, ``handle.restore()``) pairs with :func:`sinklens.apply_pruning`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ..core.edits import Edit, applied, count_parameters, heads_text
from ..core.loading import model_info
from ..core.qk import check_editable, weights
from .spec import Head, check_heads


class HeadRemovalHandle(Edit):
    """Whole heads removed (see :func:`apply_head_removal`). ``restore()`` undoes it."""

    kind = "head removal"
    applied_by = "sinklens.apply_head_removal(...)"
    scoped_call = "sinklens.remove_heads(model, heads)"

    def __init__(self, model, heads: Sequence[Head]):
        check_editable(model)
        info = model_info(model)
        heads = check_heads(heads, info)
        super().__init__(model, {("o", l, h) for l, h in heads})
        self.info, self.heads = info, heads
        dh = info.d_head
        for layer, head in heads:
            self.zero(weights(model, layer).o, (slice(None), slice(head * dh, (head + 1) * dh)))
        self.register()

    def params_zeroed(self) -> dict:
        """o_proj weights zeroed and their share of the model's parameters."""
        total = count_parameters(self.model)
        n = len(self.heads) * self.info.d_head * self.info.d_model
        return {"o": n, "total": n, "model_params": total, "share": n / total, "layout": "grouped"}

    def as_dict(self) -> dict:
        """JSON-ready description (heads as ``[layer, head]`` pairs, counts)."""
        return {"kind": "head_removal", "heads": [list(p) for p in self.heads], "params_zeroed": self.params_zeroed()}

    def __repr__(self) -> str:
        return f"HeadRemovalHandle({heads_text(self.heads)}, {'active' if self.active else 'restored'})"


def apply_head_removal(model, heads: Sequence[Head]) -> HeadRemovalHandle:
    """Remove whole heads now (their o_proj input columns zeroed); ``handle.restore()`` undoes it.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        heads: the ``(layer, head)`` pairs to remove.
    """
    return HeadRemovalHandle(model, heads)


@contextmanager
def remove_heads(model, heads: Sequence[Head]) -> Iterator[HeadRemovalHandle]:
    """Context manager: ``heads`` contribute nothing inside it; restored bitwise on exit.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        heads: the ``(layer, head)`` pairs to remove.
    """
    with applied(apply_head_removal, model, heads) as handle:
        yield handle


__all__ = ["HeadRemovalHandle", "apply_head_removal", "remove_heads"]
