"""Running the bridge batch by batch with hooks that reduce activations as they fire."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from .progress import progress
from .tokens import TokenBatch


def pattern_hook(layer: int) -> str:
    """Hook name of the [batch, head, query, key] attention pattern of ``layer``."""
    return f"blocks.{layer}.attn.hook_pattern"


def resid_pre_hook(layer: int) -> str:
    """Hook name of the residual stream entering ``layer``."""
    return f"blocks.{layer}.hook_resid_pre"


def batches(batch: TokenBatch, batch_size: int, desc: str,
            show_progress: bool = True) -> Iterator[tuple[int, TokenBatch]]:
    """Yield ``(offset, sub_batch)`` slices of ``batch`` with a progress bar."""
    n = batch.tokens.shape[0]
    starts = range(0, n, batch_size)
    for start in progress(starts, desc=desc, total=len(starts), enabled=show_progress):
        sl = slice(start, start + batch_size)
        yield start, TokenBatch(batch.tokens[sl], batch.attention_mask[sl], batch.prepend_bos)


class _ReachedFinalNorm(Exception):
    """Raised by the hook on the final norm's input: every layer's hooks have fired."""


def _stop_before_unembedding(tensor, hook) -> None:
    raise _ReachedFinalNorm


def run_hooked(model, batch: TokenBatch, fwd_hooks: Sequence[tuple[str, Callable]], layers: Sequence[int]) -> None:
    """One forward of ``batch`` with ``fwd_hooks``, stopping after the last layer of ``layers``.

    The final norm and the unembedding never run: statistics need only the layers, and the logits
    ([batch, pos, vocab] in fp32) would often be the largest tensor of the whole forward.

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        batch: the tokens (on the model's input device).
        fwd_hooks: ``(hook name, function)`` pairs, as for ``run_with_hooks``.
        layers: the layers the hooks read; the forward stops after the last of them.
    """
    last = max(layers) + 1
    hooks = list(fwd_hooks)
    stop = last if last < model.cfg.n_layers else None
    if stop is None:
        hooks.append(("ln_final.hook_in", _stop_before_unembedding))
    with torch.inference_mode(), contextlib.suppress(_ReachedFinalNorm):
        model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=hooks, stop_at_layer=stop)


def relative_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a 0/1 mask [batch, pos]: first real position, number of real tokens, and for every
    relative position r the absolute position ``start + r`` (clamped) with a validity mask."""
    lengths = mask.sum(1)
    starts = mask.argmax(1)
    rel = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    absolute = (starts[:, None] + rel).clamp(max=mask.shape[1] - 1)
    valid = rel < lengths[:, None]
    return absolute, valid, lengths


def gather_relative(values: torch.Tensor, absolute: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-key values [batch, head, pos] at absolute positions, re-indexed by relative position (from
    :func:`relative_index`), NaN past each prompt's end."""
    index = absolute[:, None, :].expand_as(values)
    return values.gather(2, index).masked_fill(~valid[:, None, :], float("nan"))
