"""Sweep engine: prefix reuse equals full forwards, results file resume (SIGKILL), refusals."""

from __future__ import annotations

import hashlib
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
from sinklens.assess.evaluation import build_plan, plan_fingerprint
from sinklens.assess.sweep import SCHEMA, Sweep

from helpers import build_tiny_checkpoint, mc_items, write_items

TESTS = os.path.dirname(os.path.abspath(__file__))
ITEMS = mc_items(6)
# (method, layers, split): every single layer, every pair, all three, and head removal
CONFIGS = ([("qk", (l,), "all") for l in range(3)] + [("qk", p, "all") for p in ((0, 1), (0, 2), (1, 2))]
           + [("qk", (0, 1, 2), "all")] + [("head_removal", (l,), "all") for l in range(3)])
# atol on summed log-likelihoods (float32 forward); top-1 hits and acc must be identical
ATOL = 1e-5



def make_sweep(model, items: str, results=None, **kwargs) -> Sweep:
    """The sweep every test (and the killed subprocess) runs: heads 0-1 of each layer, k=4."""
    plan = build_plan(model, "default", items=items, n_lm_prompts=2, lm_seq_len=12, n_copy=2, copy_len=6)
    massive = sl.massive_activations(model, sl.probe_tokens(model, 4, 16), show_progress=False)
    heads = [(layer, h) for layer in range(sl.model_info(model).n_layers) for h in (0, 1)]
    return Sweep(model, {"all": plan}, sl.PruneSpec(heads, 4), calibration=massive, results=results,
                 show_progress=False, **kwargs)


def full_forward(model, sweep: Sweep, method: str, layers) -> pd.DataFrame:
    """The naive evaluation: edit the model, run the whole plan from the embeddings."""
    heads = list(sweep.heads_of(layers))
    edit = (sl.prune_qk(model, heads, 4, dims="bos_top", calibration=sweep.calibration) if method == "qk"
            else sl.remove_heads(model, heads))
    with edit:
        return sweep.plans["all"].run(model).per_item


def assert_items_close(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(got[["part", "task", "item", "n_tokens", "n_correct", "acc", "acc_norm"]],
                                  expected[["part", "task", "item", "n_tokens", "n_correct", "acc", "acc_norm"]])
    pd.testing.assert_frame_equal(got[["nll", "mc_nll"]], expected[["nll", "mc_nll"]], check_exact=False, rtol=0,
                                  atol=ATOL)


def test_prefix_reuse_equals_full_forward(tiny, tmp_path):
    sweep = make_sweep(tiny, write_items(tmp_path, ITEMS))
    for method, layers, split in CONFIGS:
        record = sweep.evaluate(method, layers, split)
        assert_items_close(record.result.per_item, full_forward(tiny, sweep, method, layers))
    assert not sl.active_edits(tiny)
    starts = {tuple(json.loads(c)["layers"]): json.loads(e)["start_layer"] for c, e in
              sweep.file.conn.execute("SELECT config, extra FROM results WHERE config LIKE '%qk%'")}
    assert starts[(1,)] == 1 and starts[(2,)] == 2 and starts[(1, 2)] == 1  # resumed at the first edited layer


def test_greedy_extension_starts_at_new_layer(tiny, tmp_path):
    sweep = make_sweep(tiny, write_items(tmp_path, ITEMS))
    sweep.evaluate("qk", (0,), "all", keep_prefix=True)
    record = sweep.evaluate("qk", (0, 2), "all")
    extra = json.loads(sweep.file.conn.execute("SELECT extra FROM results WHERE key = ?", (record.key,)).fetchone()[0])
    assert extra["start_layer"] == 2  # from layer 0's pruned residuals, not from the dense ones
    assert_items_close(record.result.per_item, full_forward(tiny, sweep, "qk", (0, 2)))


def test_forward_equivalents_of_a_single_layer_sweep(tiny, tmp_path):
    sweep = make_sweep(tiny, write_items(tmp_path, ITEMS))
    n = sl.model_info(tiny).n_layers
    sweep.run([("qk", (l,), "all") for l in range(n)])
    expected = (1 + sum((n - l) / n for l in range(n))) / n  # one dense pass, then layers l..n-1
    assert sweep.cost()["forward_equivalents_per_config"] == pytest.approx(expected)


def test_rerun_skips_finished_configurations(tiny, tmp_path):
    path = tmp_path / "sweep.sqlite"
    items = write_items(tmp_path, ITEMS)
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
    items = write_items(tmp_path, ITEMS)
    first = make_sweep(tiny, items, results=path)
    record = first.evaluate("qk", (0, 2), "all")
    assert record.spec == sl.PruneSpec([(0, 0), (0, 1), (2, 0), (2, 1)], 4)
    first.close()
    second = make_sweep(tiny, items, results=path)
    again = second.evaluate("qk", (0, 2), "all")
    assert again.cached and again.spec == record.spec
    (config,) = second.file.conn.execute("SELECT config FROM results WHERE key = ?", (again.key,)).fetchone()
    assert sl.PruneSpec.from_dict(json.loads(config)["spec"]) == record.spec
    with sl.prune_qk(tiny, again.spec, calibration=second.calibration) as handle:  # the stored spec: the same dims
        assert handle.params_zeroed() == again.params
    # another spec is another configuration: nothing is reused
    other = Sweep(tiny, second.plans, second.spec.replace(k=5), calibration=second.calibration, results=path,
                  show_progress=False)
    assert not other.has("qk", (0, 2), "all") and other.has("dense", (), "all")


# --- fitted variants: kept dims, fill means and temperatures measured on a CalibrationSet ----------------------

FITTED = [("act_weight", "mean", True), ("bos_top", "zero", True)]
EVAL = dict(n_lm_prompts=2, lm_seq_len=12, n_copy=2, copy_len=6)


def fitted_sweep(model, items: str, variant=FITTED[0], calibration=None, results=None) -> Sweep:
    """Heads 0-1 of each layer at k=4 with a fitted variant, on a calibration set of 4 probe prompts."""
    policy, fill, temperature = variant
    plan = build_plan(model, "default", items=items, **EVAL)
    heads = [(layer, h) for layer in range(sl.model_info(model).n_layers) for h in (0, 1)]
    if calibration is None:
        calibration = sl.CalibrationSet(model, sl.probe_tokens(model, 4, 16, split="probe"))
    spec = sl.PruneSpec(heads, 4, policy, fill=fill, temperature=temperature)
    return Sweep(model, {"all": plan}, spec, calibration=calibration, results=results, show_progress=False)


@pytest.mark.parametrize("variant", FITTED, ids=lambda v: "/".join(map(str, v)))
def test_fitted_sweep_equals_an_independent_evaluation(tiny, tmp_path, variant):
    items = write_items(tmp_path, ITEMS)
    sweep = fitted_sweep(tiny, items, variant)
    calibration = sweep.calibration
    assert isinstance(calibration, sl.CalibrationSet)
    for layers in ((0,), (2,), (1, 2)):
        record = sweep.evaluate("qk", layers, "all")
        assert record.spec == sweep.spec.replace(heads=sweep.heads_of(layers))
        assert (record.spec.policy, record.spec.fill, record.spec.temperature) == variant
        # independent: the model edited by prune_qk, evaluated from the embeddings by sl.evaluate
        with sl.prune_qk(tiny, record.spec, calibration=calibration) as handle:
            expected = sl.evaluate(tiny, items=items, show_progress=False, **EVAL)
            assert handle.params_zeroed() == record.params
            assert len(handle.as_dict()["q_scale"]) == len(record.heads)  # a temperature was fitted per head
        assert_items_close(record.result.per_item, expected.per_item)
        assert set(record.metrics) == set(expected.metrics)
        for name, value in expected.metrics.items():
            assert record.metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert not sl.active_edits(tiny)


def test_fitted_keys_follow_the_calibration_set_and_the_variant(tiny, tmp_path):
    items = write_items(tmp_path, ITEMS)
    prompts = sl.probe_tokens(tiny, 4, 16, split="probe")
    first = fitted_sweep(tiny, items, calibration=sl.CalibrationSet(tiny, prompts))
    assert first.settings["calibration"] == {"fingerprint": first.calibration.fingerprint,
                                             "n_tokens": int(first.calibration.batch.attention_mask.sum())}
    same = fitted_sweep(tiny, items, calibration=prompts)  # ids are made into a calibration set of the same prompts
    other = fitted_sweep(tiny, items, calibration=sl.CalibrationSet(tiny, sl.probe_tokens(tiny, 5, 16, split="probe")))
    variant = fitted_sweep(tiny, items, FITTED[1], calibration=first.calibration)
    keys = [s.key("qk", (0, 1), "all") for s in (first, same, other, variant)]
    assert keys[0] == keys[1] and len(set(keys)) == 3
    assert len({s.key("dense", (), "all") for s in (first, same, other, variant)}) == 1  # the dense row is shared


def test_resumed_fitted_sweep_reuses_its_rows(tiny, tmp_path):
    items, path = write_items(tmp_path, ITEMS), tmp_path / "fitted.sqlite"
    configs = [("qk", (0,), "all"), ("qk", (1, 2), "all")]
    first = fitted_sweep(tiny, items, results=path)
    done = first.run(configs)
    first.close()
    again = fitted_sweep(tiny, items, results=path)  # a new calibration set of the same prompts
    records = again.run(configs)
    assert all(r.cached for r in records) and again.cost()["configs_evaluated"] == 0
    for a, b in zip(done, records):
        pd.testing.assert_frame_equal(a.result.per_item, b.result.per_item)
        assert a.spec == b.spec and a.params == b.params
    other = fitted_sweep(tiny, items, results=path,
                         calibration=sl.CalibrationSet(tiny, sl.probe_tokens(tiny, 5, 16, split="probe")))
    assert not other.has(*configs[0]) and other.has("dense", (), "all")  # fitted on other tokens: not reused


def test_plain_bos_top_key_is_its_spec_dims_and_heads(tiny, tmp_path):
    sweep = make_sweep(tiny, write_items(tmp_path, ITEMS))
    assert set(sweep.settings) == {"spec", "dims", "heads"}  # BOS vectors only: no calibration fingerprint
    # the key of a plain bos_top configuration, built as before fitted variants existed
    n = sl.model_info(tiny).n_layers
    massive = sweep.calibration.massive(range(n))
    top = {layer: massive.top_dims(layer, 4, "normalized").sort().values.tolist() for layer in range(n)}
    settings = {"spec": {**sl.PruneSpec([(0, 0)], 4).as_dict(), "heads": None},
                "dims": [{"layer": l, "head": h, "dims": top[l]} for l in range(n) for h in (0, 1)],
                "heads": [[l, [0, 1]] for l in range(n)]}
    payload = {"schema": SCHEMA, "model": sweep.fingerprint, "plan": plan_fingerprint(sweep.plans["all"]),
               "settings": settings, "method": "qk", "layers": [0, 2]}
    expected = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
    assert sweep.key("qk", (2, 0), "all") == expected


def test_fitted_spec_without_calibration_tokens_is_refused_before_any_forward(tiny, tmp_path, monkeypatch):
    plan = build_plan(tiny, "copy", n_copy=2, copy_len=4)
    monkeypatch.setattr("sinklens.assess.sweep.dims_of",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured")))
    monkeypatch.setattr(sl.CalibrationSet, "inputs", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    for spec in (sl.PruneSpec([(0, 1)], 4, "random", fill="mean"), sl.PruneSpec([(0, 1)], 4, "act_weight"),
                 sl.PruneSpec([(0, 1)], 4, "bos_top")):
        with pytest.raises(sl.InputError, match="fitted on calibration prompts.*pass .*as calibration="):
            Sweep(tiny, {"all": plan}, spec, show_progress=False)
    massive = sl.massive_activations(tiny, sl.probe_tokens(tiny, 2, 8), show_progress=False)
    with pytest.raises(sl.InputError, match="calibration= holds only BOS vectors.*pass the prompts"):
        Sweep(tiny, {"all": plan}, sl.PruneSpec([(0, 1)], 4, "bos_top", fill="mean"), calibration=massive,
              show_progress=False)
    no_bos = sl.probe_tokens(tiny, 2, 8, prepend_bos=False)
    with pytest.raises(sl.InputError, match=r"calibration="):
        Sweep(tiny, {"all": plan}, sl.PruneSpec([(0, 1)], 4, "act_weight"), calibration=no_bos, show_progress=False)


CHILD = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    import sinklens as sl
    from sinklens.assess.sweep import ResultsFile
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
    items, path = write_items(tmp_path, ITEMS), tmp_path / "killed.sqlite"
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
    items = write_items(tmp_path, ITEMS)
    make_sweep(tiny, items, results=path).run(CONFIGS[:1])
    other = sl.load_model(str(build_tiny_checkpoint(tmp_path / "other", 4, 4, seed=7)), device="cpu")
    with pytest.raises(sl.InputError, match="written with model .*fingerprint.*fresh=True"):
        make_sweep(other, items, results=path)
    fresh = make_sweep(other, items, results=path, fresh=True)  # starting fresh is allowed
    assert len(fresh.file) == 0


def test_refuses_results_of_another_sinklens_version(tiny, tmp_path, monkeypatch):
    path = tmp_path / "sweep.sqlite"
    items = write_items(tmp_path, ITEMS)
    make_sweep(tiny, items, results=path).close()
    monkeypatch.setattr("sinklens.assess.sweep.__version__", "999.0")
    with pytest.raises(sl.InputError, match="sinklens version.*delete the file"):
        make_sweep(tiny, items, results=path)


def test_refuses_a_file_that_is_not_a_results_file(tiny, tmp_path):
    path = tmp_path / "junk.sqlite"
    path.write_text("not a database" * 100)
    with pytest.raises(sl.InputError, match="not a sinklens results file"):
        make_sweep(tiny, write_items(tmp_path, ITEMS), results=path)


@pytest.mark.parametrize("config, fragment", [
    (("qk", (), "all"), "layer set is empty"),
    (("qk", (7,), "all"), "out of range"),
    (("prune", (0,), "all"), "Unknown method"),
    (("qk", (0,), "test"), "Unknown split"),
])
def test_bad_configurations(tiny, tmp_path, config, fragment):
    sweep = make_sweep(tiny, write_items(tmp_path, ITEMS))
    with pytest.raises(sl.InputError, match=fragment):
        sweep.run([config])


def test_layer_without_heads_is_refused(tiny, tmp_path):
    plan = build_plan(tiny, "copy", n_copy=2, copy_len=4)
    sweep = Sweep(tiny, {"all": plan}, sl.PruneSpec([(0, 1)], 4, "random"), show_progress=False)
    with pytest.raises(sl.InputError, match="no heads to prune"):
        sweep.evaluate("head_removal", (1,), "all")


# --- head configurations -------------------------------------------------------------------------
# a head edit's configuration against the naive evaluation: the edit applied by its own public call, the whole plan
# run from the embeddings (no residual cache); heads chosen so that some share a layer and the first edited layer
# varies
HEAD_SETS = [((0, 1),), ((1, 0), (1, 2)), ((2, 3),), ((0, 0), (2, 1))]


def calibration_sweep(model, items: str, results=None, **options) -> Sweep:
    plan = build_plan(model, "default", items=items, n_lm_prompts=2, lm_seq_len=12, n_copy=2, copy_len=6,
                      share_context=False)
    return Sweep(model, {"all": plan}, head_edits=[sl.CalibrationOptions(threshold=0.05, min_queries=1, **options)],
                 results=results, show_progress=False)


def test_head_configurations_equal_full_forwards_under_the_public_edit(tiny, tmp_path):
    sweep = calibration_sweep(tiny, write_items(tmp_path, ITEMS))
    records = sweep.run([("calibration", heads, "all") for heads in HEAD_SETS])
    for heads, record in zip(HEAD_SETS, records):
        assert record.heads == tuple(sorted(heads)) and record.layers == tuple(sorted({l for l, _ in heads}))
        with sl.calibrate_attention(tiny, heads, threshold=0.05, min_queries=1):
            expected = sweep.plans["all"].run(tiny).per_item
        assert_items_close(record.result.per_item, expected)
    dense = sweep.dense("all").result.per_item
    changed = [not record.result.per_item["nll"].equals(dense["nll"]) for record in records]
    assert any(changed)  # the edit does something on this model: the comparison above is not dense vs dense
    # layers below the first edited head are reused: a head set in layer 2 alone runs a third of the model
    assert sweep.forward_equivalents == pytest.approx(1 + (3 + 2 + 1 + 3) / 3)


def test_head_configurations_resume_and_key_their_settings(tiny, tmp_path):
    items, path = write_items(tmp_path, ITEMS), tmp_path / "heads.sqlite"
    first = calibration_sweep(tiny, items, results=path)
    record = first.evaluate("calibration", [(1, 2), (1, 0)], "all")  # order does not matter
    first.close()
    again = calibration_sweep(tiny, items, results=path)
    reread = again.evaluate("calibration", [(1, 0), (1, 2)], "all")
    assert reread.cached and reread.key == record.key
    pd.testing.assert_frame_equal(reread.result.per_item, record.result.per_item)
    stored = again.file.get(record.key)["config"]
    assert stored["heads"] == [[1, 0], [1, 2]] and stored["options"] == sl.CalibrationOptions(
        threshold=0.05, min_queries=1).as_dict()
    again.close()
    other = calibration_sweep(tiny, items, results=path, beta=0.7)  # other settings: another key, computed anew
    assert not other.has("calibration", [(1, 0), (1, 2)], "all")
    other.close()


def test_head_edit_sweeps_refuse_bad_setups(tiny, tmp_path):
    items = write_items(tmp_path, ITEMS)
    shared = build_plan(tiny, "mc", items=items)  # MC choices packed behind one context
    with pytest.raises(sl.InputError, match="share_context=False"):
        Sweep(tiny, {"all": shared}, head_edits=[sl.CalibrationOptions()], show_progress=False)
    plan = build_plan(tiny, "copy", n_copy=2, copy_len=4)
    with pytest.raises(sl.InputError, match="spec= .* or head_edits="):
        Sweep(tiny, {"all": plan}, show_progress=False)
    with pytest.raises(sl.InputError, match="given twice"):
        Sweep(tiny, {"all": plan}, head_edits=[sl.CalibrationOptions(), sl.CalibrationOptions(beta=0.5)])
    with pytest.raises(sl.InputError, match="option objects"):
        Sweep(tiny, {"all": plan}, head_edits=[{"beta": 0.4}])
    sweep = Sweep(tiny, {"all": plan}, head_edits=[sl.CalibrationOptions()], show_progress=False)
    with pytest.raises(sl.InputError, match="method"):
        sweep.evaluate("qk", (0,), "all")  # no spec: no layer methods
    with pytest.raises(sl.InputError, match="head set is empty"):
        sweep.evaluate("calibration", (), "all")
    with pytest.raises(sl.InputError, match="head"):
        sweep.run([("calibration", [(0, 0)], "all"), ("calibration", [(0, 99)], "all")])
    assert sweep.n_evaluated == 0  # the bad configuration was refused before the good one ran
    with pytest.raises(sl.InputError, match="beta"):
        sl.CalibrationOptions(beta=1.5)
    with pytest.raises(sl.InputError, match="threshold"):
        sl.CalibrationOptions(threshold=0)
    with pytest.raises(sl.InputError, match="min_queries"):
        sl.CalibrationOptions(min_queries=0)
