"""Edit handles explain themselves: ``with handle:`` names the scoped call, a second restore() is a no-op, and
repr says what the handle edits and whether it is active or restored."""

from __future__ import annotations

import pytest
import torch

import sinklens as sl


def _weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.original_model.named_parameters()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_with_on_an_applied_pruning_names_prune_qk_and_restore(tiny):
    handle = sl.apply_pruning(tiny, [(0, 0), (1, 1)], 3, dims="random")
    pruned = _weights(tiny)
    with pytest.raises(sl.HandleUsageError) as err:
        with handle:
            pytest.fail("the body of `with handle:` must not run")
    text = str(err.value)
    assert "PruneHandle is not a context manager" in text
    assert "with sinklens.prune_qk(model, ...) as handle:" in text and "handle.restore()" in text
    assert "already applied" in text
    assert isinstance(err.value, TypeError) and isinstance(err.value, sl.InputError)
    assert handle.active and _same(_weights(tiny), pruned)  # the failed `with` changed nothing
    handle.restore()


def test_with_on_a_restored_pruning_says_it_was_restored(tiny):
    dense = _weights(tiny)
    handle = sl.apply_pruning(tiny, [(0, 0)], 3, dims="random")
    handle.restore()
    with pytest.raises(sl.HandleUsageError, match=r"already restored.*prune_qk\(model, \.\.\.\).*apply_pruning"):
        with handle:
            pass
    assert _same(_weights(tiny), dense)


def test_with_on_a_head_removal_names_remove_heads(tiny):
    handle = sl.apply_head_removal(tiny, [(1, 0)])
    with pytest.raises(sl.HandleUsageError, match=r"HeadRemovalHandle is not a context manager.*"
                                                  r"with sinklens\.remove_heads\(model, heads\) as handle:.*"
                                                  r"handle\.restore\(\)"):
        with handle:
            pass
    handle.restore()
    with pytest.raises(sl.HandleUsageError, match=r"already restored.*apply_head_removal"):
        with handle:
            pass


def test_the_scoped_forms_still_work_and_yield_the_handle(tiny):
    dense = _weights(tiny)
    with sl.prune_qk(tiny, [(0, 0)], 3, dims="random") as handle:
        assert isinstance(handle, sl.PruneHandle) and handle.active
        assert not _same(_weights(tiny), dense)
    assert not handle.active and _same(_weights(tiny), dense)
    with sl.remove_heads(tiny, [(2, 1)]) as removal:
        assert removal.active and sl.active_edits(tiny) == [removal]
    assert not removal.active and _same(_weights(tiny), dense)


@pytest.mark.parametrize("kind", ["pruning", "removal"])
def test_a_second_restore_is_a_no_op_seen_only_in_repr(tiny, kind, recwarn):
    dense = _weights(tiny)
    apply = (lambda: sl.apply_pruning(tiny, [(0, 0), (2, 1)], 4, dims="random")) if kind == "pruning" else \
        (lambda: sl.apply_head_removal(tiny, [(0, 0), (2, 1)]))
    first = apply()
    assert repr(first).endswith(", active)")
    first.restore()
    assert _same(_weights(tiny), dense)
    second = apply()  # the same heads edited again after the first restore
    edited = _weights(tiny)
    assert first.restore() is None  # the second restore: no error ...
    assert len(recwarn) == 0  # ... no warning ...
    assert _same(_weights(tiny), edited) and sl.active_edits(tiny) == [second]  # ... and the later edit untouched
    assert repr(first).endswith(", restored)") and repr(second).endswith(", active)")
    second.restore()
    assert _same(_weights(tiny), dense)


def test_repr_says_what_a_handle_edits(tiny):
    spec = sl.PruneSpec([(0, 0), (1, 1)], 3, "random")
    handle = sl.apply_pruning(tiny, spec)
    assert repr(handle).startswith("PruneHandle(heads=[(0, 0), (1, 1)], k=3, policy=random, ")
    handle.restore()
    assert repr(handle).endswith("restored)")
    n_layers, n_heads = sl.model_info(tiny).n_layers, sl.model_info(tiny).n_heads
    heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    removal = sl.apply_head_removal(tiny, heads)
    assert repr(removal) == (f"HeadRemovalHandle(heads=[{', '.join(map(str, heads[:6]))}, ...] ({len(heads)} heads), "
                             "active)")
    removal.restore()
