"""Sweep engine: prefix reuse equals full forwards, results file resume (SIGKILL), refusals."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

import sinklens as sl
from sinklens.evaluation import build_plan
from sinklens.sweep import Sweep

from helpers import build_tiny_checkpoint

TESTS = os.path.dirname(os.path.abspath(__file__))
ITEMS = [
    {"id": f"i{i}", "task": "t" + str(i % 2), "context": f"w{5 + i} w{6 + i} w{7 + i}",
     "choices": [f" w{20 + i}", f" w{40 + i} w{41 + i}", f" w{60 + i}"], "gold": i % 3}
    for i in range(6)
]
# (method, layers, split): every single layer, every pair, all three, and head removal
CONFIGS = ([("qk", (l,), "all") for l in range(3)] + [("qk", p, "all") for p in ((0, 1), (0, 2), (1, 2))]
           + [("qk", (0, 1, 2), "all")] + [("remove", (l,), "all") for l in range(3)])
# atol on summed log-likelihoods (float32 forward); top-1 hits and acc must be identical
ATOL = 1e-5



def write_items(folder) -> str:
    path = os.path.join(str(folder), "items.jsonl")
    with open(path, "w") as fh:
        fh.write("".join(json.dumps(item) + "\n" for item in ITEMS))
    return path


def make_sweep(model, items: str, results=None, **kwargs) -> Sweep:
    """The sweep every test (and the killed subprocess) runs: heads 0-1 of each layer, k=4."""
    plan = build_plan(model, "default", items=items, n_lm_prompts=2, lm_seq_len=12, n_copy=2, copy_len=6)
    massive = sl.massive_activations(model, sl.probe_tokens(model, 4, 16), show_progress=False)
    heads = [(layer, h) for layer in range(sl.model_info(model).n_layers) for h in (0, 1)]
    return Sweep(model, {"all": plan}, sl.PruneSpec(heads, 4), massive=massive, results=results, show_progress=False,
                 **kwargs)


def full_forward(model, sweep: Sweep, method: str, layers) -> pd.DataFrame:
    """The naive evaluation: edit the model, run the whole plan from the embeddings."""
    heads = list(sweep.heads_of(layers))
    edit = (sl.prune_qk(model, heads, 4, dims="bos_top", tokens=sweep.massive) if method == "qk"
            else sl.remove_heads(model, heads))
    with edit:
        return sweep.plans["all"].run(model).per_item


def assert_items_close(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(got[["part", "task", "item", "n_tokens", "n_correct", "acc", "acc_norm"]],
                                  expected[["part", "task", "item", "n_tokens", "n_correct", "acc", "acc_norm"]])
    pd.testing.assert_frame_equal(got[["nll", "mc_nll"]], expected[["nll", "mc_nll"]], check_exact=False, rtol=0,
                                  atol=ATOL)


def test_prefix_reuse_equals_full_forward(tiny, tmp_path):
    sweep = make_sweep(tiny, write_items(tmp_path))
    for method, layers, split in CONFIGS:
        record = sweep.evaluate(method, layers, split)
        assert_items_close(record.result.per_item, full_forward(tiny, sweep, method, layers))
    assert not sl.active_edits(tiny)
    starts = {tuple(json.loads(c)["layers"]): json.loads(e)["start_layer"] for c, e in
              sweep.file.conn.execute("SELECT config, extra FROM results WHERE config LIKE '%qk%'")}
    assert starts[(1,)] == 1 and starts[(2,)] == 2 and starts[(1, 2)] == 1  # resumed at the first edited layer


def test_greedy_extension_starts_at_new_layer(tiny, tmp_path):
    sweep = make_sweep(tiny, write_items(tmp_path))
    sweep.evaluate("qk", (0,), "all", keep_prefix=True)
    record = sweep.evaluate("qk", (0, 2), "all")
    extra = json.loads(sweep.file.conn.execute("SELECT extra FROM results WHERE key = ?", (record.key,)).fetchone()[0])
    assert extra["start_layer"] == 2  # from layer 0's pruned residuals, not from the dense ones
    assert_items_close(record.result.per_item, full_forward(tiny, sweep, "qk", (0, 2)))


def test_forward_equivalents_of_a_single_layer_sweep(tiny, tmp_path):
    sweep = make_sweep(tiny, write_items(tmp_path))
    n = sl.model_info(tiny).n_layers
    sweep.run([("qk", (l,), "all") for l in range(n)])
    expected = (1 + sum((n - l) / n for l in range(n))) / n  # one dense pass, then layers l..n-1
    assert sweep.cost()["forward_equivalents_per_config"] == pytest.approx(expected)


def test_rerun_skips_finished_configurations(tiny, tmp_path):
    path = tmp_path / "sweep.sqlite"
    items = write_items(tmp_path)
    first = make_sweep(tiny, items, results=path)
    done = first.run(CONFIGS[:4])
    first.close()
    second = make_sweep(tiny, items, results=path)
    again = second.run(CONFIGS[:4])
    assert all(r.cached for r in again) and second.cost()["configs_evaluated"] == 0
    for a, b in zip(done, again):
        pd.testing.assert_frame_equal(a.result.per_item, b.result.per_item)  # exact round trip
        assert a.params == b.params
    assert len(second.file) == 5  # dense + 4


def test_spec_round_trips_through_the_results_file(tiny, tmp_path):
    path = tmp_path / "sweep.sqlite"
    items = write_items(tmp_path)
    first = make_sweep(tiny, items, results=path)
    record = first.evaluate("qk", (0, 2), "all")
    assert record.spec == sl.PruneSpec([(0, 0), (0, 1), (2, 0), (2, 1)], 4)
    first.close()
    second = make_sweep(tiny, items, results=path)
    again = second.evaluate("qk", (0, 2), "all")
    assert again.cached and again.spec == record.spec
    (config,) = second.file.conn.execute("SELECT config FROM results WHERE key = ?", (again.key,)).fetchone()
    assert sl.PruneSpec.from_dict(json.loads(config)["spec"]) == record.spec
    with sl.prune_qk(tiny, again.spec, tokens=second.massive) as handle:  # the stored spec prunes the same dims
        assert handle.params_zeroed() == again.params
    # another spec is another configuration: nothing is reused
    other = Sweep(tiny, second.plans, second.spec.replace(k=5), massive=second.massive, results=path,
                  show_progress=False)
    assert not other.has("qk", (0, 2), "all") and other.has("dense", (), "all")


CHILD = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    import sinklens as sl
    from sinklens.sweep import ResultsFile
    from test_sweep import CONFIGS, make_sweep

    put = ResultsFile.put
    def slow_put(self, *args, **kwargs):
        put(self, *args, **kwargs)
        print("row", flush=True)
        time.sleep(0.25)
    ResultsFile.put = slow_put
    model = sl.load_model(sys.argv[1], device="cpu")
    make_sweep(model, sys.argv[2], results=sys.argv[3]).run(CONFIGS)
    print("finished", flush=True)
""")


def test_sigkill_mid_sweep_resumes_without_lost_or_duplicated_rows(tmp_path):
    folder = build_tiny_checkpoint(tmp_path / "gqa", 6, 2)  # one model: this test runs a subprocess
    tiny = sl.load_model(str(folder), device="cpu")
    items, path = write_items(tmp_path), tmp_path / "killed.sqlite"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=TESTS))
    child = subprocess.Popen([sys.executable, str(script), str(folder), items, str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env={**os.environ, "SINKLENS_PROGRESS": "0"})
    rows = 0
    for line in child.stdout:
        rows += line.strip() == "row"
        assert line.strip() != "finished", "the child finished before it was killed"
        if rows == 3:
            os.kill(child.pid, signal.SIGKILL)
            break
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    with sqlite3.connect(path) as conn:
        before = conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    assert 3 <= before < len(CONFIGS) + 1
    resumed = make_sweep(tiny, items, results=path)
    records = resumed.run(CONFIGS)
    assert sum(r.cached for r in records) == before - 1  # every row the child committed (dense aside) is reused
    keys = resumed.file.keys()
    assert len(keys) == len(set(keys)) == len(CONFIGS) + 1
    clean = make_sweep(tiny, items)  # the same sweep, uninterrupted, in memory
    for record, (method, layers, split) in zip(records, CONFIGS):
        assert_items_close(record.result.per_item, clean.evaluate(method, layers, split).result.per_item)


def test_refuses_results_of_another_model(tiny, tmp_path):
    path = tmp_path / "sweep.sqlite"
    items = write_items(tmp_path)
    make_sweep(tiny, items, results=path).run(CONFIGS[:1])
    other = sl.load_model(str(build_tiny_checkpoint(tmp_path / "other", 4, 4, seed=7)), device="cpu")
    with pytest.raises(sl.InputError, match="written with model .*fingerprint.*fresh=True"):
        make_sweep(other, items, results=path)
    fresh = make_sweep(other, items, results=path, fresh=True)  # starting fresh is allowed
    assert len(fresh.file) == 0


def test_refuses_results_of_another_sinklens_version(tiny, tmp_path, monkeypatch):
    path = tmp_path / "sweep.sqlite"
    items = write_items(tmp_path)
    make_sweep(tiny, items, results=path).close()
    monkeypatch.setattr("sinklens.sweep.__version__", "999.0")
    with pytest.raises(sl.InputError, match="sinklens version.*delete the file"):
        make_sweep(tiny, items, results=path)


def test_refuses_a_file_that_is_not_a_results_file(tiny, tmp_path):
    path = tmp_path / "junk.sqlite"
    path.write_text("not a database" * 100)
    with pytest.raises(sl.InputError, match="not a sinklens results file"):
        make_sweep(tiny, write_items(tmp_path), results=path)


@pytest.mark.parametrize("config, fragment", [
    (("qk", (), "all"), "layer set is empty"),
    (("qk", (7,), "all"), "out of range"),
    (("prune", (0,), "all"), "Unknown method"),
    (("qk", (0,), "test"), "Unknown split"),
])
def test_bad_configurations(tiny, tmp_path, config, fragment):
    sweep = make_sweep(tiny, write_items(tmp_path))
    with pytest.raises(sl.InputError, match=fragment):
        sweep.run([config])


def test_layer_without_heads_is_refused(tiny, tmp_path):
    plan = build_plan(tiny, "copy", n_copy=2, copy_len=4)
    sweep = Sweep(tiny, {"all": plan}, sl.PruneSpec([(0, 1)], 4, "random"), show_progress=False)
    with pytest.raises(sl.InputError, match="no heads to prune"):
        sweep.evaluate("remove", (1,), "all")
