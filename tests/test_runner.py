"""`python -m sinklens run`: validation before anything runs, run folders, manifest, latest link, failures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from sinklens.__main__ import main
from sinklens.series import RunFolder, runner

from helpers import write_notebook as _write_notebook

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"


@pytest.fixture
def series(tmp_path):
    """Three quick notebooks that need no model: 01 writes its parameters, 02 fails unless told not to, 03 writes."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    write = "with open(os.path.join(out_dir, NAME + '.json'), 'w') as fh:\n    json.dump(P, fh)"
    _write_notebook(folder / "01_alpha.ipynb",
                    'model_name: str = "m"\nn_prompts: int = 4\neps: float = 0.3\nflag: bool = False\n'
                    'sizes: list = [1]\nout_dir: str = "runs/scratch"', "NAME = 'alpha'\n" + write)
    _write_notebook(folder / "02_beta.ipynb", 'model_name: str = "m"\nn_boot: int = 10\nfail: bool = True\n'
                    'out_dir: str = "runs/scratch"',
                    "NAME = 'beta'\nif fail:\n    raise ValueError('boom from beta')\n" + write)
    _write_notebook(folder / "03_gamma.ipynb", 'model_name: str = "m"\nout_dir: str = "runs/scratch"',
                    "NAME = 'gamma'\n" + write)
    (folder / "helper.ipynb").write_text("not part of the series")  # no NN_ prefix: never run
    return folder


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("args, message", [
    (["-p", "n_promts=8"], "unknown parameter 'n_promts'"),
    (["-p", "n_prompts=lots"], "n_prompts is declared as int"),
    (["-p", "n_prompts=8.5"], "n_prompts is declared as int"),
    (["-p", "eps=high"], "eps is declared as float"),
    (["-p", "k_values=3"], "k_values is declared as list"),
    (["-p", "out_dir=/tmp/x"], "use --out"),
    (["-p", "model_name=x"], "use --model"),
    (["-p", "n_prompts"], "not key=value"),
    (["--only", "99"], "--only 99: no such notebook"),
    (["--only", "01", "-p", "n_boot=5"], "declared by 02_head_specialization"),
    # values, checked by name with the package's own choices
    (["-p", "eps=1.5"], "-p eps=1.5: eps must lie in [0, 1], got 1.5"),
    (["-p", "n_prompts=0"], "-p n_prompts=0: Parameter n_prompts must be an int >= 1, e.g. n_prompts=1; got 0"),
    (["-p", "gqa=both"], "-p gqa=both: Unknown gqa 'both': use one of ('exact', 'shared', 'q_only')"),
    (["-p", "strategies=[greedy, best]"], "Unknown entry of strategies 'best'"),
    (["-p", "ks=[1, 0]"], "ks must be a list of ints >= 1 (empty: the default k grid)"),
    (["-p", "items_file=/no/such/items.jsonl"], "items_file: /no/such/items.jsonl is not a file"),
    (["-p", "heads_from=/no/such/specialized_heads.json"], "heads_from: /no/such/specialized_heads.json is not a file"),
    # the model name, before any kernel
    (["--model", "no-such-model"], "--model no-such-model: Unknown model 'no-such-model'"),
    (["--model", "/no/such/folder"], "--model /no/such/folder: Unknown model"),
])
def test_bad_arguments_exit_2_before_anything_runs(tmp_path, capsys, args, message):
    out = tmp_path / "runs"
    code, stdout, stderr = _run(["run", "--notebooks", str(NOTEBOOKS), "--out", str(out), *args], capsys)
    assert code == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]


def _head_list_file(folder, model_name, heads=((1, 0),), n_layers=3, n_heads=4):
    """A specialized_heads.json as notebook 02 writes it, for a model of the given name and shape."""
    path = folder / "specialized_heads.json"
    path.write_text(json.dumps({"heads": [list(h) for h in heads], "eps": 0.3, "q": 0.9,
                                "probe": {"n_prompts": 8, "seq_len": 32},
                                "model": {"name": model_name, "n_layers": n_layers, "n_heads": n_heads,
                                          "d_model": 48}}))
    return path


def test_heads_from_of_another_model_or_not_a_head_list_exits_2(tmp_path, capsys):
    out = tmp_path / "runs"
    other = _head_list_file(tmp_path, "meta-llama/Llama-2-7b-hf")
    code, _, stderr = _run(["run", "--notebooks", str(NOTEBOOKS), "--out", str(out), "--only", "03",
                            "-p", f"heads_from={other}"], capsys)
    assert code == 2 and f"heads_from {other} holds the heads of model 'meta-llama/Llama-2-7b-hf'" in stderr
    assert "leave heads_from empty" in stderr
    broken = tmp_path / "broken.json"
    broken.write_text('{"heads": [[0, 1]]}')
    code, _, stderr = _run(["run", "--notebooks", str(NOTEBOOKS), "--out", str(out), "--only", "03",
                            "-p", f"heads_from={broken}"], capsys)
    assert code == 2 and f"heads_from {broken} is not a head list written by notebook 02" in stderr
    out_of_range = _head_list_file(tmp_path, runner.DEFAULT_MODEL, heads=[(3, 0)])
    code, _, stderr = _run(["run", "--notebooks", str(NOTEBOOKS), "--out", str(out), "--only", "03",
                            "-p", f"heads_from={out_of_range}"], capsys)
    assert code == 2 and "lists head (3, 0), outside a model of 3 layers x 4 heads" in stderr
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]


def test_unwritable_out_and_bad_params_file(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, stderr = _run(["run", "--notebooks", str(NOTEBOOKS), "--out", str(blocker / "runs")], capsys)
    assert code == 2 and "Pass a writable folder with --out" in stderr
    params = tmp_path / "params.yaml"
    params.write_text("n_prompts: many\n")
    code, _, stderr = _run(["run", "--notebooks", str(NOTEBOOKS), "--out", str(tmp_path / "r"), "--params",
                            str(params)], capsys)
    assert code == 2 and "n_prompts must be int" in stderr and "params.yaml" in stderr
    code, _, stderr = _run(["run", "--notebooks", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "does not exist" in stderr


def test_parse_value_uses_the_declared_type():
    assert runner.parse_value("n", "12", int) == 12
    assert runner.parse_value("eps", "1", float) == 1.0 and isinstance(runner.parse_value("eps", "1", float), float)
    assert runner.parse_value("flag", "False", bool) is False and runner.parse_value("flag", "yes", bool) is True
    assert runner.parse_value("ks", "[1, 2, 10]", list) == [1, 2, 10]
    assert runner.parse_value("name", "12", str) == "12"
    with pytest.raises(runner.InputError):
        runner.parse_value("flag", "maybe", bool)


def test_plan_passes_each_notebook_only_what_it_declares(series, tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("eps: 1\nn_boot: 7\n")
    model = tmp_path / "tiny-model"  # a checkpoint folder: --model is checked, never loaded, by the plan
    model.mkdir()
    (model / "config.json").write_text("{}")
    plan = runner.plan_run(series, model=str(model), overrides={"n_prompts": "5", "sizes": "[2, 3]"},
                           params_file=params, ci=True, out=tmp_path / "runs")
    assert [nb.path.name for nb in plan.notebooks] == ["01_alpha.ipynb", "02_beta.ipynb", "03_gamma.ipynb"]
    alpha, beta, gamma = (nb.passed for nb in plan.notebooks)
    # -p beats --params beats CI_PARAMS beats the series probe; ints become floats for float parameters
    assert alpha == {"n_prompts": 5, "eps": 1.0, "sizes": [2, 3], "model_name": str(model)}
    assert isinstance(alpha["eps"], float)
    assert beta == {"n_boot": 7, "model_name": str(model)}
    assert gamma == {"model_name": str(model)}
    assert plan.notebooks[0].effective["flag"] is False  # declared default kept
    ci_only = runner.plan_run(series, ci=True, out=tmp_path / "runs")
    assert ci_only.notebooks[0].passed["n_prompts"] == runner.CI_PARAMS["n_prompts"]
    assert ci_only.notebooks[1].passed["n_boot"] == runner.CI_PARAMS["n_boot"]
    assert ci_only.notebooks[0].passed["eps"] == runner.SERIES_PARAMS["eps"]  # the series probe, set once


def test_the_series_probe_is_one_for_every_notebook():
    """Without --ci, -p or --params every notebook that declares a probe parameter gets the series' value,
    whatever its own default (the notebooks' defaults differ: they serve a notebook opened alone)."""
    plan = runner.plan_run(NOTEBOOKS)
    for name, value in runner.SERIES_PARAMS.items():
        given = {nb.path.stem: nb.passed[name] for nb in plan.notebooks if name in nb.declared}
        assert len(given) >= 3 and set(given.values()) == {value}, (name, given)
    assert plan.default_run
    assert not runner.plan_run(NOTEBOOKS, overrides={"n_prompts": "128"}).default_run  # -p: not the reference run


def test_run_folder_names_are_never_reused(tmp_path):
    first = runner.new_run_folder(tmp_path, "org/Some Model")
    second = runner.new_run_folder(tmp_path, "org/Some Model")
    assert first != second and first.is_dir() and second.is_dir()
    assert first.name.endswith("-Some_Model")
    assert second.name.startswith(first.name[:15])


def test_failing_notebook_stops_the_run_and_keeps_what_finished(series, tmp_path, capsys):
    out = tmp_path / "runs"
    code, stdout, stderr = _run(["run", "--notebooks", str(series), "--out", str(out), "-p", "n_prompts=6"], capsys)
    assert code == 1
    assert "ValueError: boom from beta" in stderr and "02_beta.ipynb" in stderr
    assert "[1/3] 01_alpha.ipynb" in stdout and "[3/3]" not in stdout
    run_dir = (out / "latest").resolve()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert [e["status"] for e in manifest["notebooks"]] == ["ok", "failed", "not run"]
    assert manifest["notebooks"][1]["error"]["ename"] == "ValueError"
    assert manifest["notebooks"][1]["error"]["evalue"] == "boom from beta"
    assert json.loads((run_dir / "alpha.json").read_text())["n_prompts"] == 6  # finished output kept
    assert (run_dir / "01_alpha.ipynb").is_file() and (run_dir / "02_beta.ipynb").is_file()
    assert not (run_dir / "gamma.json").exists() and not (run_dir / "03_gamma.ipynb").exists()

    # a second run goes to a new folder and moves `latest`
    code, _, _ = _run(["run", "--notebooks", str(series), "--out", str(out), "--only", "03"], capsys)
    assert code == 0
    second = (out / "latest").resolve()
    assert second != run_dir and run_dir.is_dir() and (second / "gamma.json").is_file()
    assert os.readlink(out / "latest") == second.name  # relative link
    assert json.loads((second / "gamma.json").read_text())["out_dir"] == str(second)


def _refuse_constant(name: str):
    raise AssertionError(f"{name} in a run's JSON file: not strict JSON")


def _git_status() -> str:
    return subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=all"],
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.notebook
def test_two_real_ci_runs_side_by_side(tmp_path):
    """Two `python -m sinklens run --ci --only 01` started together, one from the checkout (its working directory,
    as `make run` does), one from a folder elsewhere (the series is the checkout's wherever the command starts),
    both succeed, write nothing into the checkout (no kernel-ipc-N sockets, no README change: `git status` is the
    same before and after), each describes itself in its own run folder, and every JSON file they write is strict
    JSON (no NaN or Infinity)."""
    before = _git_status()
    command = [sys.executable, "-m", "sinklens", "run", "--only", "01", "--ci"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([*command, "--out", str(tmp_path / f"runs{i}")], cwd=cwd, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, cwd in ((1, REPO), (2, elsewhere))]
    results = [(proc.wait(timeout=600), proc.stdout.read(), proc.stderr.read()) for proc in procs]
    for proc in procs:
        proc.stdout.close()
        proc.stderr.close()
    for code, stdout, stderr in results:
        assert code == 0, stdout + stderr
        assert "[1/1] 01_sink_discovery.ipynb" in stdout
        assert "WARNING" not in stdout + stderr, stdout + stderr  # e.g. ipykernel's unencrypted-TCP warning
    assert _git_status() == before
    assert not list(REPO.glob("kernel-ipc*"))
    for i in (1, 2):
        out = tmp_path / f"runs{i}"
        run_dir = (out / "latest").resolve()
        assert run_dir.parent == out.resolve() and run_dir.name.endswith("-smollm2-135m")
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["status"] == "ok" and manifest["model"] == "smollm2-135m" and manifest["ci"] is True
        assert set(manifest["versions"]) >= {"torch", "transformer-lens", "transformers", "sinklens"}
        assert manifest["versions"]["transformer-lens"].startswith("4.")
        (entry,) = manifest["notebooks"]
        assert entry["notebook"] == "01_sink_discovery.ipynb" and entry["status"] == "ok" and entry["wall_s"] > 0
        assert entry["parameters"]["n_prompts"] == runner.CI_PARAMS["n_prompts"]
        assert entry["parameters"]["seq_len"] == runner.CI_PARAMS["seq_len"]
        assert entry["parameters"]["out_dir"] == str(run_dir)
        assert "n_boot" not in entry["passed"]  # 01 does not declare it
        executed = nbformat.read(str(run_dir / "01_sink_discovery.ipynb"), 4)
        assert any(cell.get("outputs") for cell in executed.cells if cell.cell_type == "code")
        summary = json.loads((run_dir / "sink_discovery.json").read_text())
        assert summary["n_prompts"] == runner.CI_PARAMS["n_prompts"] and summary["model"]["name"] == "smollm2-135m"
        assert (run_dir / "index.html").is_file()
        for path in run_dir.rglob("*.json"):
            json.loads(path.read_text(), parse_constant=_refuse_constant)


def test_the_series_is_the_checkouts_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notebooks").mkdir()  # another project's notebooks folder here is not the series
    (tmp_path / "items.jsonl").write_text("")
    plan = runner.plan_run(only=["05"], overrides={"items_file": "items.jsonl"}, out="runs")
    (notebook,) = plan.notebooks
    assert notebook.path == NOTEBOOKS / "05_layer_selection.ipynb" and plan.repo_root == REPO
    assert plan.out_root == tmp_path / "runs"  # --out is taken from the working directory
    # the notebooks run in the checkout: a file parameter given relative to here reaches them absolute
    assert notebook.passed["items_file"] == str(tmp_path / "items.jsonl")


def test_default_output_root_is_runs_beside_the_notebooks(series, tmp_path, monkeypatch):
    monkeypatch.chdir(series)
    assert runner.plan_run(series).out_root == tmp_path / "runs"


def test_installed_without_a_checkout_the_error_names_notebooks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "source_checkout", lambda: None)
    code, _, stderr = _run(["run", "--out", str(tmp_path / "runs")], capsys)
    assert code == 2 and "pass the notebook series with --notebooks DIR" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_kernel_sockets_live_in_a_private_folder_removed_afterwards():
    with runner.kernel_config() as first, runner.kernel_config() as second:
        folders = [Path(config.KernelManager.ip).parent for config in (first, second)]
        assert first.KernelManager.transport == "ipc" and folders[0] != folders[1]
        assert all(folder.is_dir() and not folder.is_relative_to(REPO) for folder in folders)
    assert not any(folder.exists() for folder in folders)


def test_relative_out_dir_from_the_notebooks_folder_means_the_project_root(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")  # an interactive Jupyter session
    assert RunFolder("runs/scratch").path == tmp_path / "runs" / "scratch"
    monkeypatch.chdir(tmp_path)  # papermill and the runner work from the root
    assert RunFolder("runs/scratch").path.resolve() == tmp_path / "runs" / "scratch"
    assert RunFolder(tmp_path / "abs").path == tmp_path / "abs"


def test_the_runner_passes_the_run_files_to_later_notebooks(tmp_path):
    """A notebook that declares ``selection_from`` (notebook 08) gets the run's ``layer_selection.json`` once an
    earlier notebook wrote it, as ``heads_from`` gets ``specialized_heads.json``; before that it is told nothing and
    the log says what the notebook does instead."""
    folder = tmp_path / "series"
    folder.mkdir()
    _write_notebook(folder / "01_reader.ipynb", 'model_name: str = "m"\nselection_from: str = ""\n'
                    'out_dir: str = "runs/scratch"', "json.dump(selection_from, open(os.path.join(out_dir, "
                                                     "'first.json'), 'w'))")
    _write_notebook(folder / "02_writer.ipynb", 'model_name: str = "m"\nout_dir: str = "runs/scratch"',
                    "json.dump({'best': None}, open(os.path.join(out_dir, 'layer_selection.json'), 'w'))")
    _write_notebook(folder / "03_reader.ipynb", 'model_name: str = "m"\nselection_from: str = ""\n'
                    'out_dir: str = "runs/scratch"', "json.dump(selection_from, open(os.path.join(out_dir, "
                                                     "'second.json'), 'w'))")
    lines = []
    plan = runner.plan_run(folder, out=tmp_path / "runs")
    run_dir, manifest = runner.execute(plan, log=lines.append)
    assert manifest["status"] == "ok"
    assert json.loads((run_dir / "first.json").read_text()) == ""
    assert json.loads((run_dir / "second.json").read_text()) == str(run_dir / "layer_selection.json")
    assert manifest["notebooks"][2]["passed"]["selection_from"] == str(run_dir / "layer_selection.json")
    assert any("no layer_selection.json in this run yet: 01_reader uses its fallback layer set" in line
               for line in lines)
