"""Memory stays bounded as the model grows: the census holds at most one layer's pattern of one batch.

Checked by what is alive, not by timing-sensitive memory readings: a probe hook, placed before the census'
own hook at every layer's ``hook_pattern``, counts the pattern-shaped tensors ([.., T, T] with at least
batch x heads x T x T entries) that Python can still reach. If the census kept any layer's pattern (or a
copy of it) the count would grow with the layer index over the embedded model's 30 layers, and tensors
would remain after the forward.
"""

from __future__ import annotations

import gc

import pytest
import torch

import sinklens as sl

pytestmark = pytest.mark.integration

N_PROMPTS, SEQ_LEN, BATCH = 6, 40, 3  # T = 40 matches no other width of the model (9 heads, 64, 576, 1536)


def pattern_sized(n_entries: int, length: int) -> int:
    """Number of distinct tensors alive with a [..., T, T] shape and at least ``n_entries`` entries."""
    seen = set()
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.dim() >= 2 and tuple(obj.shape[-2:]) == (length, length) \
                and obj.numel() >= n_entries and not obj.is_meta:
            seen.add(obj.untyped_storage().data_ptr())
    return len(seen)


def test_census_holds_one_layer_pattern_at_a_time(smollm):
    info = sl.model_info(smollm)
    probe = sl.probe_tokens(smollm, n_prompts=N_PROMPTS, seq_len=SEQ_LEN)
    one_layer = BATCH * info.n_heads * SEQ_LEN * SEQ_LEN
    alive: list[tuple[int, int]] = []  # (layer, pattern-sized tensors alive when its pattern arrives)

    def probe_hook(layer):
        def count(pattern, hook):
            assert pattern.numel() == one_layer
            alive.append((layer, pattern_sized(one_layer, SEQ_LEN)))
        return count

    handles = []
    for layer in range(info.n_layers):
        point = smollm.hook_dict[f"blocks.{layer}.attn.hook_pattern"]
        handles.append((point, point.add_hook(probe_hook(layer), dir="fwd", is_permanent=True)))
    try:
        gc.collect()
        before = pattern_sized(one_layer, SEQ_LEN)
        census = sl.run_census(smollm, probe, batch_size=BATCH, show_progress=False)
    finally:
        for point, handle in handles:
            handle.hook.remove()
            point.fwd_hooks[:] = [h for h in point.fwd_hooks if h is not handle]
    gc.collect()
    assert len(alive) == info.n_layers * (N_PROMPTS // BATCH)
    counts = [count - before for _, count in alive]
    print(f"pattern-sized tensors alive at each layer's pattern hook: min {min(counts)}, max {max(counts)}")
    # the scores and the pattern of the current layer at most; the same at layer 29 as at layer 0
    assert max(counts) <= 2
    assert counts[info.n_layers - 1] == counts[0] and counts[-1] == counts[0]
    assert pattern_sized(one_layer, SEQ_LEN) == before  # nothing kept after the census
    assert census.alpha.shape == (N_PROMPTS, info.n_layers, info.n_heads, SEQ_LEN)  # what it keeps instead
    assert not smollm.hook_dict["ln_final.hook_in"].fwd_hooks  # the stop hook is gone


def test_probe_detects_a_census_that_keeps_patterns(smollm, monkeypatch):
    """The check above fails for a census that keeps every layer's pattern (a copy, as a careless hook would)."""
    from sinklens.measure import census as census_module

    kept = []
    original = census_module._PatternReducer.hook

    def keeping_hook(self, slot):
        reduce = original(self, slot)

        def keep(pattern, hook):
            kept.append(pattern.float())
            reduce(pattern, hook)
        return keep

    monkeypatch.setattr(census_module._PatternReducer, "hook", keeping_hook)
    info = sl.model_info(smollm)
    probe = sl.probe_tokens(smollm, n_prompts=BATCH, seq_len=SEQ_LEN)
    one_layer = BATCH * info.n_heads * SEQ_LEN * SEQ_LEN
    sl.run_census(smollm, probe, batch_size=BATCH, show_progress=False)
    assert pattern_sized(one_layer, SEQ_LEN) >= info.n_layers
    kept.clear()
