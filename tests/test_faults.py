"""Faults of this wave's features (issue 21, item 6): an interrupt (Ctrl-C) or a full disk in the middle of a head
search (attention calibration, sink + window restriction) leaves the model unedited and the results file
consistent, and a rerun resumes where it stopped. Ray's faults (a killed worker, Ctrl-C on the driver, a second
driver, an address that does not answer) are in tests/test_ray.py; bad values of the new parameters in the tests of
each feature and tests/test_params.py."""

from __future__ import annotations

import sqlite3

import pytest

import sinklens as sl
from sinklens.assess.evaluation import build_plan
from sinklens.assess.executor import resolve_executor
from sinklens.assess.sweep import Sweep

from helpers import mc_items, write_items

HEAD_SETS = [((0, 1),), ((1, 0),), ((1, 2),), ((2, 3),)]


# the head edits of this wave's searches, with settings that change these tiny models' outputs
EDITS = {"calibration": lambda: sl.CalibrationOptions(threshold=0.05, min_queries=1),
         "window": lambda: sl.WindowOptions(sink=1, window=3)}


def head_search(model, tmp_path, results, method="calibration"):
    """A head search's sweep: unshared MC context (a calibration is computed per sequence), one split."""
    plan = build_plan(model, "default", items=write_items(tmp_path, mc_items(4)), n_lm_prompts=2, lm_seq_len=12,
                      n_copy=2, copy_len=6, share_context=False)
    return Sweep(model, {"search": plan}, head_edits=[EDITS[method]()], results=results, show_progress=False)


class _InterruptAt:
    """A forward hook on one block that raises KeyboardInterrupt (what Ctrl-C raises) on its n-th call."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self, module, args, output):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt


@pytest.mark.parametrize("method", sorted(EDITS))
def test_ctrl_c_in_a_head_search_restores_the_model_and_resumes(tiny, tmp_path, method):
    path = tmp_path / "heads.sqlite"
    sweep = head_search(tiny, tmp_path, path, method)
    configs = [(method, heads, "search") for heads in HEAD_SETS]
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
    rerun = head_search(tiny, tmp_path, path, method)
    records = rerun.run(configs)
    assert [r.cached for r in records] == [True, True, False, False]
    assert len(rerun.file) == len(done) + 2
    rerun.close()


@pytest.mark.parametrize("method", sorted(EDITS))
def test_a_full_disk_under_a_head_search_is_a_write_error_and_resumes(tiny, tmp_path, method):
    path = tmp_path / "heads.sqlite"
    sweep = head_search(tiny, tmp_path, path, method)
    configs = [(method, heads, "search") for heads in HEAD_SETS]
    sweep.run(configs[:1])
    done = sweep.file.keys()
    pages = sweep.file.conn.execute("PRAGMA page_count").fetchone()[0]
    sweep.file.conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "disk full" from here on
    with pytest.raises(sl.WriteError) as err:
        sweep.run(configs[1:])
    assert str(path) in str(err.value) and "database or disk is full" in str(err.value)
    assert sl.active_edits(tiny) == []
    sweep.close()
    rerun = head_search(tiny, tmp_path, path, method)
    assert [r.cached for r in rerun.run(configs)] == [True, False, False, False]
    assert len(rerun.file) == len(done) + 3
    rerun.close()


# --- bad values of this wave's new parameters: the error type, and a message naming the argument --------------------
# (name, call on the tiny model, fragment of the message that names the argument)
BAD_VALUES = [
    ("CalibrationOptions beta", lambda m: sl.CalibrationOptions(beta=-0.1), "beta"),
    ("CalibrationOptions threshold", lambda m: sl.CalibrationOptions(threshold=1.0), "threshold"),
    ("CalibrationOptions min_queries", lambda m: sl.CalibrationOptions(min_queries=0), "min_queries"),
    ("WindowOptions sink", lambda m: sl.WindowOptions(sink=-1), "sink"),
    ("WindowOptions window", lambda m: sl.WindowOptions(window=0), "window"),
    ("restriction kv_heads", lambda m: sl.apply_attention_restriction(m, kv_heads=[(0, 99)]), "head"),
    ("search candidates", lambda m: sl.calibration_head_search(m, candidates="everything"), "candidates"),
    ("search n_candidates", lambda m: sl.calibration_head_search(m, n_candidates=0), "n_candidates"),
    ("search ci", lambda m: sl.calibration_head_search(m, ci=1.5), "ci"),
    ("search top_m", lambda m: sl.calibration_head_search(m, top_m=0), "top_m"),
    ("streaming window", lambda m: sl.streaming_perplexity(m, sl.probe_stream(m, 40), window=0), "window"),
    ("streaming engine", lambda m: sl.streaming_perplexity(m, sl.probe_stream(m, 40), engine="fast"), "engine"),
    ("streaming sweep seq_len", lambda m: sl.streaming_sweep(m, seq_len=10_000), "seq_len"),
    ("ablation sinks", lambda m: sl.streaming_ablation(m, sl.probe_stream(m, 40), sinks=[-1]), "sinks"),
    ("ablation initial", lambda m: sl.streaming_ablation(m, sl.probe_stream(m, 40), initial=["eos"]), "initial"),
    ("executor name", lambda m: resolve_executor("slurm"), "executor"),
    ("Ray workers", lambda m: sl.RayExecutor(workers=0), "workers"),
]


@pytest.mark.parametrize("name, call, fragment", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_of_the_new_parameters_are_named(tiny, name, call, fragment):
    with pytest.raises(sl.InputError) as err:
        call(tiny)
    assert fragment in str(err.value), str(err.value)
    assert sl.active_edits(tiny) == []  # refused before anything was applied


def test_kv_budget_bad_values_are_named(tmp_path):
    from helpers import build_family_checkpoint

    model = sl.load_model(str(build_family_checkpoint(tmp_path / "m", "llama3")), device="cpu")
    sweep = sl.streaming_sweep(model, sink=2, window=8, seq_len=24, n_texts=1)
    scores = sl.streaming_head_scores(sweep)
    for kwargs, fragment in [({"tolerances": [-0.1]}, "tolerances"), ({"tolerances": []}, "tolerances"),
                             ({"steps": 0}, "steps"), ({"context": 0}, "context")]:
        with pytest.raises(sl.InputError, match=fragment):
            sl.kv_budget(sweep, scores, **kwargs)
    with pytest.raises(sl.InputError, match="scores"):
        sl.kv_budget(sweep, scores.drop(columns="score"))
    sweep.close()
