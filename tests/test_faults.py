"""Faults of this wave's features (issue 21, item 6): an interrupt (Ctrl-C) or a full disk in the middle of a head
search leaves the model unedited and the results file consistent, and a rerun resumes where it stopped."""

from __future__ import annotations

import sqlite3

import pytest

import sinklens as sl
from sinklens.assess.evaluation import build_plan
from sinklens.assess.sweep import Sweep

from helpers import mc_items, write_items

HEAD_SETS = [((0, 1),), ((1, 0),), ((1, 2),), ((2, 3),)]


def head_search(model, tmp_path, results):
    """A calibration head search's sweep: unshared MC context (the edit is per sequence), one split."""
    plan = build_plan(model, "default", items=write_items(tmp_path, mc_items(4)), n_lm_prompts=2, lm_seq_len=12,
                      n_copy=2, copy_len=6, share_context=False)
    return Sweep(model, {"search": plan}, head_edits=[sl.CalibrationOptions(threshold=0.05, min_queries=1)],
                 results=results, show_progress=False)


class _InterruptAt:
    """A forward hook on one block that raises KeyboardInterrupt (what Ctrl-C raises) on its n-th call."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self, module, args, output):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt


def test_ctrl_c_in_a_head_search_restores_the_model_and_resumes(tiny, tmp_path):
    path = tmp_path / "heads.sqlite"
    sweep = head_search(tiny, tmp_path, path)
    configs = [("calibration", heads, "search") for heads in HEAD_SETS]
    sweep.run(configs[:2])
    done = sweep.file.keys()  # dense and two configurations
    interrupt = _InterruptAt(1)  # the third configuration (heads of layer 1), as it reaches block 2
    hook = tiny.original_model.model.layers[2].register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            sweep.run(configs[2:])
    finally:
        hook.remove()
    assert interrupt.calls == 1
    assert sl.active_edits(tiny) == []  # the interrupted configuration's calibration was restored
    sweep.close()
    with sqlite3.connect(path) as conn:
        assert [k for (k,) in conn.execute("SELECT key FROM results ORDER BY rowid")] == done
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rerun = head_search(tiny, tmp_path, path)
    records = rerun.run(configs)
    assert [r.cached for r in records] == [True, True, False, False]
    assert len(rerun.file) == len(done) + 2
    rerun.close()


def test_a_full_disk_under_a_head_search_is_a_write_error_and_resumes(tiny, tmp_path):
    path = tmp_path / "heads.sqlite"
    sweep = head_search(tiny, tmp_path, path)
    configs = [("calibration", heads, "search") for heads in HEAD_SETS]
    sweep.run(configs[:1])
    done = sweep.file.keys()
    pages = sweep.file.conn.execute("PRAGMA page_count").fetchone()[0]
    sweep.file.conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "disk full" from here on
    with pytest.raises(sl.WriteError) as err:
        sweep.run(configs[1:])
    assert str(path) in str(err.value) and "database or disk is full" in str(err.value)
    assert sl.active_edits(tiny) == []
    sweep.close()
    rerun = head_search(tiny, tmp_path, path)
    assert [r.cached for r in rerun.run(configs)] == [True, False, False, False]
    assert len(rerun.file) == len(done) + 3
    rerun.close()
