"""Sweeps and layer selections on Ray workers, against the same work done serially in this process.

One local cluster for the module (``ray.init(num_cpus=2)``; its workers inherit this process's environment, so
they import this checkout's sinklens). Tiny random models of two families (Llama-3 GQA and GPT-NeoX) and the
embedded model. Checked: every number of a Ray run equals the serial run's (max difference printed), the same
configurations are stored once each, a worker killed mid-sweep is restarted and its configuration retried, Ctrl-C
on a driver leaves a consistent, resumable results file and no workers, a second driver on a results file is
refused naming the file, and the input errors (Ray missing, an address that does not answer, a model path a
worker cannot read).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray  # pinned in requirements-ray.txt: make test installs it, nothing here is skipped without it

import sinklens as sl
from sinklens.assess.evaluation import build_plan
from sinklens.assess.sweep import Sweep

from helpers import build_family_checkpoint, mc_items, write_items

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ["llama3", "gpt_neox"]
EVAL = dict(n_lm_prompts=2, lm_seq_len=12, n_copy=2, copy_len=6)
TOL = 1e-6


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two tiny families with 4 layers, in a folder every (local) worker reads, and an MC item file."""
    root = tmp_path_factory.mktemp("ray-models")
    built = {family: build_family_checkpoint(root / family, family, n_layers=4) for family in FAMILIES}
    return built, write_items(root, mc_items(8, n_choices=3))


def rows(path: Path) -> dict[str, tuple[dict, dict, pd.DataFrame]]:
    """Every stored configuration of a results file, read with sqlite3 directly: key -> (config, metrics, items)."""
    with sqlite3.connect(path) as conn:
        found = conn.execute("SELECT key, config, metrics, items FROM results").fetchall()
    import io

    out = {key: (json.loads(c), json.loads(m), pd.read_parquet(io.BytesIO(i))) for key, c, m, i in found}
    assert len(out) == len(found)  # keys are unique
    return out


def configurations(found: dict) -> dict:
    """The rows of a results file but the dense one (a serial sweep stores it to fill its cache; on Ray the
    workers compute their own)."""
    return {key: row for key, row in found.items() if row[0]["method"] != "dense"}


def max_difference(a: dict, b: dict) -> float:
    """Largest absolute difference between two results files' numbers (same keys required)."""
    assert set(a) == set(b)
    worst = 0.0
    for key in a:
        (ca, ma, ia), (cb, mb, ib) = a[key], b[key]
        assert ca == cb
        assert set(ma) == set(mb)
        worst = max([worst] + [abs(ma[n] - mb[n]) for n in ma if np.isfinite(ma[n])])
        assert [np.isfinite(ma[n]) for n in ma] == [np.isfinite(mb[n]) for n in ma]
        pd.testing.assert_frame_equal(ia.select_dtypes(exclude="number"), ib.select_dtypes(exclude="number"))
        na, nb = ia.select_dtypes("number").to_numpy(float), ib.select_dtypes("number").to_numpy(float)
        assert (np.isnan(na) == np.isnan(nb)).all()
        if na.size:
            worst = max(worst, float(np.nanmax(np.abs(na - nb), initial=0.0)))
    return worst


def selection_kwargs(items: Path, model) -> dict:
    n_layers = sl.model_info(model).n_layers
    heads = [(layer, head) for layer in range(n_layers) for head in (0, 1)]
    return dict(target_retention=0.5, heads=heads, n_prompts=4, seq_len=16,
                evaluation=sl.EvalOptions(items=str(items), **EVAL),
                search=sl.SearchOptions(strategy=["single_layer_rank", "greedy", "exhaustive"], exhaustive_pool=3,
                                        exhaustive_size=2, patience=5),
                n_boot=20, show_progress=False)


def test_layer_selection_on_two_ray_workers_equals_the_serial_run(cluster, folders, tmp_path):
    """Llama-3 (GQA); GPT-NeoX's numbers are compared in the killed-worker test."""
    family = "llama3"
    built, items = folders
    model = sl.load_model(str(built[family]), device="cpu")
    kwargs = selection_kwargs(items, model)
    serial = sl.layer_selection(model, sl.PruneSpec.template(4), results=tmp_path / "serial.sqlite", **kwargs)
    executor = sl.RayExecutor(workers=2)
    parallel = sl.layer_selection(model, sl.PruneSpec.template(4), results=tmp_path / "ray.sqlite",
                                  executor=executor, **kwargs)
    assert not executor.actors  # the selection stopped its workers
    a, b = rows(tmp_path / "serial.sqlite"), rows(tmp_path / "ray.sqlite")
    worst = max_difference(a, b)
    print(f"{family}: {len(a)} serial rows, {len(b)} Ray rows (2 workers), max |difference| {worst:.3g}")
    assert len(a) == len(b) > 10 and worst <= TOL
    # the same decisions, row for row
    assert serial.table["key"].tolist() == parallel.table["key"].tolist()
    numbers = [c for c in serial.table.columns if serial.table[c].dtype.kind == "f"]
    assert np.nanmax(np.abs(serial.table[numbers].to_numpy() - parallel.table[numbers].to_numpy())) <= TOL
    # the Ray run's rows were computed on the workers (two processes other than this one)
    with sqlite3.connect(tmp_path / "ray.sqlite") as conn:
        workers = {json.loads(e).get("worker") for (e,) in conn.execute("SELECT extra FROM results")} - {None}
    assert len(workers) == 2 and all(f"pid {os.getpid()})" not in w for w in workers)


def embedded_sweep(model, results) -> Sweep:
    plan = build_plan(model, "default", limit=2, n_lm_prompts=2, lm_seq_len=32, n_copy=2, copy_len=8)
    heads = [(layer, head) for layer in (3, 12, 14, 20) for head in range(3)]
    return Sweep(model, {"all": plan}, sl.PruneSpec(heads, 10, "random"), results=results, show_progress=False)


EMBEDDED_CONFIGS = [("qk", (3,), "all"), ("qk", (14,), "all"), ("qk", (12, 20), "all"),
                    ("head_removal", (14,), "all")]


def test_a_sweep_of_the_embedded_model_on_ray_equals_the_serial_sweep(cluster, smollm, tmp_path):
    serial = embedded_sweep(smollm, tmp_path / "serial.sqlite")
    expected = serial.run(EMBEDDED_CONFIGS)
    serial.close()
    sweep = embedded_sweep(smollm, tmp_path / "ray.sqlite")
    executor = sl.RayExecutor(workers=2)
    try:
        got = sweep.run(EMBEDDED_CONFIGS, executor=executor)
    finally:
        executor.close()
        sweep.close()
    a, b = configurations(rows(tmp_path / "serial.sqlite")), rows(tmp_path / "ray.sqlite")
    worst = max_difference(a, b)
    print(f"smollm2-135m: {len(a)} serial rows, {len(b)} Ray rows, max |difference| {worst:.3g}")
    assert len(a) == len(b) == len(EMBEDDED_CONFIGS)
    assert worst <= TOL
    assert [r.key for r in got] == [r.key for r in expected] and [r.params for r in got] == [r.params for r in expected]


def tiny_sweep(folder: Path, items: Path, results) -> Sweep:
    model = sl.load_model(str(folder), device="cpu")
    plan = build_plan(model, "default", items=str(items), **EVAL)
    heads = [(layer, head) for layer in range(4) for head in (0, 1)]
    return Sweep(model, {"all": plan}, sl.PruneSpec(heads, 4, "random"), results=results, show_progress=False)


CONFIGS = [("qk", (layer,), "all") for layer in range(4)] + [("qk", pair, "all") for pair in
                                                              [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]] + \
          [("head_removal", (layer,), "all") for layer in range(4)]


def test_a_worker_killed_mid_sweep_is_restarted_and_its_configuration_retried(cluster, folders, tmp_path):
    built, items = folders
    serial = tiny_sweep(built["gpt_neox"], items, tmp_path / "serial.sqlite")
    serial.run(CONFIGS)
    serial.close()
    killed = {}

    def kill_once(executor, config, done):
        if not killed:
            victim = executor.actors[0]
            killed["pid"] = ray.get(victim.pid.remote())
            ray.kill(victim, no_restart=False)  # Ray restarts it (max_restarts) and retries its configuration
            killed["actor"] = victim

    sweep = tiny_sweep(built["gpt_neox"], items, tmp_path / "ray.sqlite")
    executor = sl.RayExecutor(workers=2, on_result=kill_once)
    try:
        sweep.run(CONFIGS, executor=executor)
        restarted = ray.get(killed["actor"].pid.remote())  # the same actor, a new process
    finally:
        executor.close()
        sweep.close()
    assert killed and restarted != killed["pid"]
    a, b = configurations(rows(tmp_path / "serial.sqlite")), rows(tmp_path / "ray.sqlite")
    worst = max_difference(a, b)
    print(f"killed worker pid {killed['pid']} (restarted as {restarted}): {len(b)} rows, max |difference| {worst:.3g}")
    assert len(b) == len(CONFIGS) and worst <= TOL  # nothing lost, nothing twice (keys are unique)


DRIVER = """
import os, sys, time
sys.path.insert(0, {tests!r})
import ray, sinklens as sl
from test_ray import CONFIGS, tiny_sweep
ray.init(address={address!r}, log_to_driver=False, logging_level="ERROR")
def report(executor, config, done):
    print("stored", done, flush=True)
    time.sleep(0.3)  # slow enough for the signal to arrive mid-sweep
sweep = tiny_sweep({folder!r}, {items!r}, {results!r})
try:
    sweep.run(CONFIGS, executor=sl.RayExecutor(workers=2, on_result=report))
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
print("finished", flush=True)
"""


def test_ctrl_c_on_the_driver_stops_the_workers_and_the_results_file_resumes(cluster, folders, tmp_path):
    built, items = folders
    results = tmp_path / "ray.sqlite"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(REPO / "tests"), address=cluster, folder=str(built["llama3"]),
                                    items=str(items), results=str(results)))
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env)
    try:
        for line in driver.stdout:
            if line.startswith("stored"):
                break
        # a second driver on the same results file is refused, naming the file
        with pytest.raises(sl.InputError, match=rf"Results file {results} is in use by another driver"):
            tiny_sweep(built["llama3"], items, results)
        driver.send_signal(signal.SIGINT)
        out, err = driver.communicate(timeout=60)
    finally:
        driver.kill()
    assert driver.returncode == 130 and "interrupted" in out, err[-2000:]
    stored = rows(results)
    assert 1 <= len(stored) < len(CONFIGS)  # interrupted mid-sweep
    with sqlite3.connect(results) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    deadline = time.time() + 30  # the driver's workers are gone: the cluster's CPUs are free again
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2
    # resumed (here, by the local executor): the rows already stored are kept, the others added, once each
    sweep = tiny_sweep(built["llama3"], items, results)
    records = sweep.run(CONFIGS)
    sweep.close()
    assert sum(r.cached for r in records) == len(stored)
    serial = tiny_sweep(built["llama3"], items, tmp_path / "serial.sqlite")
    serial.run(CONFIGS)
    serial.close()
    resumed = rows(results)
    worst = max_difference(rows(tmp_path / "serial.sqlite"), resumed)
    print(f"Ctrl-C after {len(stored)} of {len(CONFIGS)} rows; resumed to {len(resumed)} rows, max |difference| "
          f"{worst:.3g}")
    assert len(resumed) == len(CONFIGS) + 1 and worst <= TOL


# --- bad input -------------------------------------------------------------------------------------------------------

def test_ray_missing_is_refused_naming_the_extra(monkeypatch, folders):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(sl.InputError, match=r'pip install "sinklens\[ray\]"'):
        sl.RayExecutor()
    built, items = folders
    model = sl.load_model(str(built["llama3"]), device="cpu")
    with pytest.raises(sl.InputError, match=r'pip install "sinklens\[ray\]"'):
        sl.layer_selection(model, executor="ray", **selection_kwargs(items, model))


def test_a_cluster_address_that_does_not_answer_is_refused_in_time(cluster, folders, tmp_path):
    built, items = folders
    sweep = tiny_sweep(built["llama3"], items, None)
    for address in ("192.0.2.77:6379", "127.0.0.1:9"):  # TEST-NET-1 (nothing there: silence), a closed port
        start = time.perf_counter()
        with pytest.raises(sl.InputError, match=rf"Ray cluster at {address} does not answer"):
            sweep.run(CONFIGS[:2], executor=sl.RayExecutor(address, connect_timeout=3))
        assert time.perf_counter() - start < 30
    with pytest.raises(sl.InputError, match="executor must be None or 'local', 'ray'"):
        sweep.run(CONFIGS[:2], executor="slurm")
    assert len(sweep.file) == 0  # nothing was evaluated


def test_a_model_path_a_worker_cannot_read_is_refused_before_any_configuration(cluster, folders, tmp_path):
    built, items = folders
    moved = shutil.copytree(built["gpt_neox"], tmp_path / "neox")
    sweep = tiny_sweep(moved, items, tmp_path / "ray.sqlite")
    moved.rename(tmp_path / "elsewhere")  # the driver holds the model; the workers find nothing at its path
    with pytest.raises(sl.InputError, match=rf"Ray worker on node [0-9.]+ \(pid \d+\) cannot read the model path "
                                            rf"{moved}"):
        sweep.run(CONFIGS[:2], executor=sl.RayExecutor(workers=2))
    assert len(sweep.file) == 0
    sweep.close()


def test_head_configurations_on_ray_equal_the_serial_sweep(cluster, folders, tmp_path):
    """Head-edit configurations (attention calibration of head sets): the options travel in the workers' recipe."""
    built, items = folders
    configs = [("calibration", ((0, 0),), "all"), ("calibration", ((1, 1), (2, 0)), "all"),
               ("calibration", ((3, 2), (3, 3)), "all"), ("qk", (2,), "all")]

    def head_sweep(results):
        model = sl.load_model(str(built["llama3"]), device="cpu")
        plan = build_plan(model, "default", items=str(items), share_context=False, **EVAL)
        return Sweep(model, {"all": plan}, sl.PruneSpec([(2, 0), (2, 1)], 4, "random"),
                     head_edits=[sl.CalibrationOptions(threshold=0.05, min_queries=1)], results=results,
                     show_progress=False)

    serial = head_sweep(tmp_path / "serial.sqlite")
    serial.run(configs)
    serial.close()
    sweep = head_sweep(tmp_path / "ray.sqlite")
    executor = sl.RayExecutor(workers=2)
    try:
        sweep.run(configs, executor=executor)
    finally:
        executor.close()
        sweep.close()
    a, b = configurations(rows(tmp_path / "serial.sqlite")), rows(tmp_path / "ray.sqlite")
    worst = max_difference(a, b)
    print(f"head configurations: {len(a)} serial rows, {len(b)} Ray rows, max |difference| {worst:.3g}")
    assert len(b) == len(configs) and worst <= TOL
    assert sorted(c["options"]["threshold"] for c, _, _ in b.values() if c["method"] == "calibration") == [0.05] * 3
