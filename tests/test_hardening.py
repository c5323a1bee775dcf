"""Regression tests of the hardening cases (issue 13): each bad input or fault ends in a sinklens error that names
the argument or file, raised before heavy work, and no fault leaves a silent wrong result or half-written files."""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens

import sinklens as sl
from sinklens.errors import SinklensError

# --- silent failure: hook resets under an active edit ---------------------------------------------------------


def _edits(model):
    """One active edit of every kind, as (name, apply) pairs; apply returns the handle."""
    info = sl.model_info(model)
    gs = info.group_size
    tokens = random_tokens(4, 12, seed=3)
    last = info.n_heads - 1
    return {
        # weights only: q rows edited (q_only), or the whole KV group's shared k rows (every head of group 0)
        "weights_q_only": lambda: sl.apply_pruning(model, [(1, 0)], 5, dims="random", gqa="q_only"),
        "weights_shared_group": lambda: sl.apply_pruning(model, [(1, h) for h in range(gs)], 5, dims="random"),
        # a private K copy (hooks) under gqa="exact" when only part of a group is pruned (GQA), else shared rows
        "k_copy": lambda: sl.apply_pruning(model, [(2, last)], 5, dims="random", gqa="exact"),
        # mean fill: bias hooks at the q / k projections
        "mean_fill": lambda: sl.apply_pruning(model, [(0, 0)], 5, dims="random", fill="mean", tokens=tokens),
        "head_removal": lambda: sl.apply_head_removal(model, [(1, 1), (2, 0)]),
    }


@pytest.mark.parametrize("kind", ["weights_q_only", "weights_shared_group", "k_copy", "mean_fill", "head_removal"])
def test_hook_reset_under_an_active_edit_never_goes_silent(tiny, kind):
    tokens = random_tokens(2, 10, seed=5)
    handle = _edits(tiny)[kind]()
    edited = tiny(tokens)
    hooked = bool(handle._hooks)
    if kind == "mean_fill" or (kind == "k_copy" and sl.model_info(tiny).group_size > 1):
        assert hooked  # the case this test is about
    tiny.reset_hooks(including_permanent=True)
    if hooked:  # the hooks the edit relies on are gone: the next forward refuses instead of computing another model
        with pytest.raises(SinklensError, match=r"reset_hooks\(including_permanent=True\).*restore\(\)"):
            tiny(tokens)
    else:  # an edit of the weights alone survives every reset
        assert torch.equal(tiny(tokens), edited)
    handle.restore()
    assert not any(point._forward_pre_hooks or point.fwd_hooks for point in tiny.hook_points())
    dense = tiny(tokens)
    again = _edits(tiny)[kind]()  # applied again after the restore, it computes the same edit
    assert torch.equal(tiny(tokens), edited)
    again.restore()
    assert torch.equal(tiny(tokens), dense)


def test_plain_reset_keeps_hooked_edits(tiny):
    tokens = random_tokens(2, 10, seed=5)
    with sl.prune_qk(tiny, [(0, 0)], 5, dims="random", fill="mean", tokens=random_tokens(4, 12, seed=3)):
        edited = tiny(tokens)
        tiny.reset_hooks()
        assert torch.equal(tiny(tokens), edited)
