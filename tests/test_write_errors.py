"""Every write failure is a WriteError naming the path and the cause, and nothing half-written is left:
checkpoints (save_pruned, with the leftovers of killed saves removed on the next save), run folders and
results files. Disk-full is simulated by patched writers and, where this process may mount one (root), by a real
tiny tmpfs."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import plotly.graph_objects as go
import pytest
import transformers
from safetensors import SafetensorError

import sinklens as sl
from sinklens.core.files import atomic_write_bytes, atomic_write_text, owner_tag
from sinklens.prune.checkpoint import MANIFEST, remove_leftovers
from sinklens.series.folder import RunFolder

from helpers import build_tiny_checkpoint, write_items

TESTS = str(Path(__file__).parent)
REPO = str(Path(__file__).parent.parent)
FULL = "No space left on device"


def _hidden(folder: Path) -> list[str]:
    """Temporary leftovers: dot-files and dot-folders."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, FULL)


# --- save_pruned: whichever file fails --------------------------------------------------------------------------

def _fail_weights(monkeypatch, model):
    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a shard")  # what a full disk leaves: a truncated file
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)


def _fail_config(monkeypatch, model):
    monkeypatch.setattr(transformers.PretrainedConfig, "to_json_file", _disk_full)


def _fail_tokenizer(monkeypatch, model):
    def save(folder, *args, **kwargs):  # the Rust tokenizers library raises a plain Exception for I/O errors
        (Path(folder) / "tokenizer.json").write_text("{\"trunc")
        raise Exception("No space left on device (os error 28)")
    monkeypatch.setattr(model.tokenizer, "save_pretrained", save)


def _fail_manifest(monkeypatch, model):
    real = pathlib.Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name == MANIFEST:
            real(self, data[:10], *args, **kwargs)
            raise OSError(errno.ENOSPC, FULL)
        return real(self, data, *args, **kwargs)
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


@pytest.mark.parametrize("fail", [_fail_weights, _fail_config, _fail_tokenizer, _fail_manifest],
                         ids=["weights", "config", "tokenizer", "manifest"])
def test_a_failed_checkpoint_write_is_a_write_error_and_leaves_nothing(tiny, tmp_path, monkeypatch, fail):
    target, new = tmp_path / "ckpt", tmp_path / "new"
    with sl.prune_qk(tiny, [(0, 0)], 3, dims="random"):
        sl.save_pruned(tiny, target)
        before = _snapshot(target)
        fail(monkeypatch, tiny)
        with pytest.raises(sl.WriteError) as err:
            sl.save_pruned(tiny, new)
        with pytest.raises(sl.WriteError):
            sl.save_pruned(tiny, target, overwrite=True)
    text = str(err.value)
    assert str(new) in text and FULL in text and "nothing was written" in text, text
    assert not new.exists()
    assert _snapshot(target) == before  # the earlier checkpoint is intact
    assert _hidden(tmp_path) == []  # no .partial-* or .old-* folder left


def test_an_interrupted_save_leaves_no_partial_folder(tiny, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(transformers.PretrainedConfig, "to_json_file", interrupt)
    with sl.prune_qk(tiny, [(0, 0)], 3, dims="random"):
        with pytest.raises(KeyboardInterrupt):
            sl.save_pruned(tiny, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


# --- a real full disk (a tiny tmpfs) --------------------------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (skipped where this process may not mount one)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("cannot run mount here")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True, timeout=30)


def test_a_real_full_disk(tiny, tiny_disk):
    with sl.prune_qk(tiny, [(0, 0)], 3, dims="random"):  # its weights (~330 kB) do not fit in 64 kB
        with pytest.raises(sl.WriteError) as err:
            sl.save_pruned(tiny, tiny_disk / "ckpt")
    assert str(tiny_disk / "ckpt") in str(err.value) and FULL in str(err.value)
    assert list(tiny_disk.iterdir()) == []
    run = RunFolder(tiny_disk / "run")
    run.save_json({"headline": {"ok": 1}}, "summary")
    before = _snapshot(run.path)
    with pytest.raises(sl.WriteError) as err:
        run.save_json({"big": "x" * 200_000}, "summary")
    assert str(run.path / "summary.json") in str(err.value) and FULL in str(err.value)
    assert _snapshot(run.path) == before and _hidden(run.path) == []
    with pytest.raises(sl.WriteError, match="plotly"):  # the shared 3.6 MB plotly bundle does not fit either
        run.save_figure(go.Figure(go.Scatter(x=[1, 2], y=[3, 4])), "fig")
    assert list((run.path / "figures").iterdir()) == []


# --- leftovers of killed saves ---------------------------------------------------------------------------------

def _tag_of_child(sleep: bool) -> tuple[str, subprocess.Popen]:
    """The owner_tag() of a new Python process: still running if ``sleep``, else ended and reaped."""
    code = "from sinklens.core.files import owner_tag; import sys, time; print(owner_tag(), flush=True); "
    code += "time.sleep(120)" if sleep else "sys.exit(0)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": REPO})
    tag = child.stdout.readline().strip()
    if not sleep:
        child.wait(timeout=60)
    return tag, child


def test_leftovers_of_ended_processes_are_removed_and_live_ones_kept(tiny, tmp_path):
    if not Path("/proc/self/stat").exists():
        pytest.skip("process start times come from /proc")
    dead, _ = _tag_of_child(sleep=False)
    live, sleeper = _tag_of_child(sleep=True)
    try:
        host, boot, pid, start = owner_tag().split("-")
        other_boot = "f" * 6 if boot != "f" * 6 else "e" * 6
        other_host = "f" * 6 if host != "f" * 6 else "e" * 6
        reused = f"{host}-{boot}-{sleeper.pid}-1"  # the live process's pid, but another start time: pid reused
        (tmp_path / "ckpt").mkdir()
        (tmp_path / "ckpt" / "config.json").write_text("{}")
        names = {
            "removed": [f".ckpt.partial-{dead}-abcd1234", f".other.partial-{dead}-abcd1234",
                        f".ckpt.partial-{host}-{other_boot}-{pid}-{start}-abcd1234", f".ckpt.partial-{reused}-x_y_z123",
                        f".ckpt.old-{dead}-abcd1234"],  # an old checkpoint moved aside, ckpt exists again
            "kept": [f".ckpt.partial-{live}-abcd1234",  # a concurrent save of another process
                     f".other.partial-{owner_tag()}-abcd1234",  # a concurrent save of this process
                     f".ckpt.partial-{other_host}-{boot}-{pid}-{start}-abcd1234",  # another machine's
                     ".ckpt.partial-abcd1234",  # an older sinklens's: its process is unknown
                     f".gone.old-{dead}-abcd1234"],  # possibly the only copy of `gone`
        }
        for name in names["removed"] + names["kept"]:
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_bytes(b"partial")
        with sl.prune_qk(tiny, [(0, 0)], 3, dims="random"):
            sl.save_pruned(tiny, tmp_path / "ckpt", overwrite=True)
        assert _hidden(tmp_path) == sorted(names["kept"])
        assert sl.read_manifest(tmp_path / "ckpt")["edits"]
        assert remove_leftovers(tmp_path) == []  # nothing more to remove while `live` runs
        sleeper.kill()
        sleeper.wait(timeout=60)
        assert remove_leftovers(tmp_path) == [tmp_path / f".ckpt.partial-{live}-abcd1234"]
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait(timeout=60)


KILLED_SAVE = textwrap.dedent("""
    import sys, time
    import torch, transformers
    torch.set_num_threads(1)
    import sinklens as sl

    real = transformers.PreTrainedModel.save_pretrained
    def slow(self, *args, **kwargs):
        real(self, *args, **kwargs)
        print("weights written", flush=True)
        time.sleep(120)
    transformers.PreTrainedModel.save_pretrained = slow
    model = sl.load_model(sys.argv[1], device="cpu")
    sl.apply_pruning(model, [(0, 0)], 3, dims="random")
    sl.save_pruned(model, sys.argv[2])
""")


def test_a_save_killed_by_sigkill_is_cleaned_up_by_the_next_save(tmp_path):
    folder = build_tiny_checkpoint(tmp_path / "mha", 4, 4)
    parent = tmp_path / "out"
    script = tmp_path / "child.py"
    script.write_text(KILLED_SAVE)
    child = subprocess.Popen([sys.executable, str(script), str(folder), str(parent / "ckpt")], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONPATH": REPO})
    try:
        assert child.stdout.readline().strip() == "weights written"
        leftovers = _hidden(parent)
        assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt.partial-")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert _hidden(parent) == leftovers and not (parent / "ckpt").exists()  # the killed save left it
    model = sl.load_model(str(folder), device="cpu")
    with sl.prune_qk(model, [(0, 0)], 3, dims="random"):
        sl.save_pruned(model, parent / "another")  # any save into the same parent removes it
    assert _hidden(parent) == [] and sorted(p.name for p in parent.iterdir()) == ["another"]


# --- run folders ---------------------------------------------------------------------------------------------------

def _half_then_full(monkeypatch, cls, method):
    """Patch ``cls.method`` (a writer taking the path first) to write half its output, then fail as a full disk."""
    real = getattr(cls, method)

    def write(self, path, *args, **kwargs):
        if method in ("write_text", "write_bytes"):
            real(self, args[0][: len(args[0]) // 2], *args[1:], **kwargs)
        else:
            Path(path).write_text("half,a,tab")
        raise OSError(errno.ENOSPC, FULL)
    if method in ("write_text", "write_bytes"):
        monkeypatch.setattr(cls, method, lambda self, *a, **k: write(self, self, *a, **k))
    else:
        monkeypatch.setattr(cls, method, write)


@pytest.mark.parametrize("what", ["json", "table", "html", "figure"])
def test_run_folder_writes_are_whole_or_raise_a_write_error(tmp_path, monkeypatch, what):
    run = RunFolder(tmp_path / "run")
    figure = go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))
    save = {"json": lambda: run.save_json({"headline": {"a": 1.5}}, "summary"),
            "table": lambda: run.save_table(pd.DataFrame({"a": [1, 2]}), "numbers"),
            "html": lambda: run.save_html("<html><body>view</body></html>", "view"),
            "figure": lambda: run.save_figure(figure, "plot")}[what]
    path = save()
    before = path.read_bytes()
    if what == "table":
        _half_then_full(monkeypatch, pd.DataFrame, "to_csv")
    else:
        _half_then_full(monkeypatch, pathlib.Path, "write_text")
    with pytest.raises(sl.WriteError) as err:
        save()
    assert str(path) in str(err.value) and FULL in str(err.value)
    assert err.value.errno == errno.ENOSPC
    assert path.read_bytes() == before  # the earlier file, whole
    assert _hidden(path.parent) == [] and _hidden(run.path) == []


def test_a_figure_never_leaves_a_truncated_plotly_bundle(tmp_path, monkeypatch):
    run = RunFolder(tmp_path / "run")
    _half_then_full(monkeypatch, pathlib.Path, "write_text")
    with pytest.raises(sl.WriteError, match=r"plotly bundle .*plotly\.min\.js: No space left on device"):
        run.save_figure(go.Figure(go.Scatter(x=[1], y=[2])), "plot")
    assert list((run.path / "figures").iterdir()) == []
    monkeypatch.undo()
    path = run.save_figure(go.Figure(go.Scatter(x=[1], y=[2])), "plot")  # the next try writes both
    assert 'src="plotly.min.js"' in path.read_text() and (path.parent / "plotly.min.js").stat().st_size > 1_000_000


def test_atomic_writes_name_the_path_and_cause(tmp_path, monkeypatch):
    target = tmp_path / "run_manifest.json"
    atomic_write_text(target, json.dumps({"ok": True}), what="run manifest")
    atomic_write_bytes(tmp_path / "blob.bin", b"\x00\x01")
    assert json.loads(target.read_text()) == {"ok": True} and (tmp_path / "blob.bin").read_bytes() == b"\x00\x01"
    monkeypatch.setattr(os, "replace", _disk_full)  # the final rename fails (e.g. a read-only folder)
    with pytest.raises(sl.WriteError, match=rf"Cannot write run manifest {target}: {FULL}\. Nothing half-written"):
        atomic_write_text(target, json.dumps({"ok": False}), what="run manifest")
    monkeypatch.undo()
    with pytest.raises(TypeError):  # not a write failure: passed through unchanged, the temporary file removed
        atomic_write_text(target, None)
    assert json.loads(target.read_text()) == {"ok": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "run_manifest.json"]


# --- results files ---------------------------------------------------------------------------------------------

def test_a_full_results_file_keeps_earlier_rows_and_a_rerun_resumes(tmp_path):
    sys.path.insert(0, TESTS)
    from test_sweep import CONFIGS, ITEMS, make_sweep

    folder = build_tiny_checkpoint(tmp_path / "gqa", 6, 2)
    model = sl.load_model(str(folder), device="cpu")
    items, path = write_items(tmp_path, ITEMS), tmp_path / "results.sqlite"
    sweep = make_sweep(model, items, results=path)
    sweep.run(CONFIGS[:3])
    done = sweep.file.keys()
    pages = sweep.file.conn.execute("PRAGMA page_count").fetchone()[0]
    sweep.file.conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "disk full" from here on
    with pytest.raises(sl.WriteError) as err:
        sweep.run(CONFIGS[3:])
    text = str(err.value)
    assert str(path) in text and "database or disk is full" in text and "rows before it are intact" in text, text
    sweep.close()
    with sqlite3.connect(path) as conn:
        assert [k for (k,) in conn.execute("SELECT key FROM results ORDER BY rowid")] == done
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rerun = make_sweep(model, items, results=path)
    records = rerun.run(CONFIGS)
    assert [r.cached for r in records] == [True] * 3 + [False] * (len(CONFIGS) - 3)
    assert len(rerun.file) == len(done) + len(CONFIGS) - 3
    rerun.close()


class _Failing:
    """A connection whose next INSERT fails with ``message`` (as a read-only or locked database answers)."""

    def __init__(self, conn, message):
        self.conn, self.message = conn, message

    def __getattr__(self, name):
        return getattr(self.conn, name)

    def __enter__(self):
        return self.conn.__enter__()

    def __exit__(self, *exc):
        return self.conn.__exit__(*exc)

    def execute(self, sql, *args):
        if sql.lstrip().upper().startswith("INSERT"):
            raise sqlite3.OperationalError(self.message)
        return self.conn.execute(sql, *args)


@pytest.mark.parametrize("message", ["attempt to write a readonly database", "database is locked"])
def test_a_read_only_or_locked_results_file_is_a_write_error(tmp_path, message):
    from sinklens.assess.sweep import ResultsFile

    path = tmp_path / "results.sqlite"
    results = ResultsFile(path, {"schema": "2", "sinklens": "x", "model": "m", "fingerprint": "f"})
    row = SimpleNamespace(per_item=pd.DataFrame({"task": ["t"], "nll": [1.0]}), metrics={"nll": 1.0})  # what put reads
    results.put("first", {"method": "dense"}, row, {})
    results.conn = _Failing(results.conn, message)
    with pytest.raises(sl.WriteError, match=rf"results file {path}: {message}\. This row was not written"):
        results.put(uuid.uuid4().hex, {"method": "qk"}, row, {})
    results.conn = results.conn.conn
    assert results.keys() == ["first"]
    results.close()
