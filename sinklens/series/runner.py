"""Run the notebook series headless: ``python -m sinklens run``.

Every notebook matching ``notebooks/[0-9][0-9]_*.ipynb`` runs in sorted order with papermill
into a new folder ``<out>/<YYYYmmdd-HHMMSS>-<model>/`` (never an existing one), receiving only
the parameters its ``parameters`` cell declares, plus ``model_name`` and ``out_dir`` (the run
folder). The probe of the series (:data:`SERIES_PARAMS`: prompts, their length, eps and q) is
set once for the run and passed to every notebook that declares it; a notebook that declares
``heads_from`` gets this run's ``specialized_heads.json`` once an earlier notebook wrote it, so
the whole run works on one list of sink-specialized heads (and one that declares ``selection_from`` gets the run's
``layer_selection.json`` the same way). Parameter overrides are parsed to the
declared types, their values and the model name are checked before a run folder is created or
a kernel started. The folder receives the executed notebooks, a ``manifest.json`` (versions,
git commit, parameters, wall time, status and the files written, per notebook) and the report
``index.html`` (:mod:`sinklens.series.report`); ``<out>/latest`` points at the newest run.
A failing notebook stops the series; what finished is kept, the failure is recorded and shown
in the report. A run writes nothing into the checkout: the README's headline block is
refreshed by the explicit ``python -m sinklens headline`` (``make headline``), and the
kernels' IPC sockets live in a private temporary folder per run, so runs started side by
side from one checkout are independent.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

# Only light modules here: `python -m sinklens run` checks its arguments before importing torch, pandas or
# papermill (those are imported by the functions that run notebooks, read head lists or write the report).
from ..core.choices import EMBEDDED_MODELS
from ..core.errors import InputError, SinklensError
from ..core.files import atomic_write_text
from .folder import json_text
from .params import PATH_PARAMS, check_value, coerce_value, notebook_parameters

NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
DEFAULT_MODEL = next(iter(EMBEDDED_MODELS))
# The probe of the series, set once for the run and passed to every notebook that declares these parameters: every
# notebook measures on the same prompts with the same definition of a sink-specialized head. -p/--params set them
# for the whole run the same way.
SERIES_PARAMS: dict[str, Any] = {"n_prompts": 64, "seq_len": 64, "eps": 0.3, "q": 0.9}
# Small parameters for --ci: the whole series in well under a minute per notebook on 2 CPU cores.
# Applied to the notebooks that declare them; -p and --params still override them.
CI_PARAMS: dict[str, Any] = {
    "n_prompts": 8, "seq_len": 32, "batch_size": 8, "n_boot": 100,  # census, bootstrap (all notebooks)
    "ks": [1, 10, 50], "seeds": [0, 1], "model_prompts": 2,  # k sweep (04)
    "limit": 2, "n_lm_prompts": 2, "n_copy": 2,  # evaluation items per split (05's selection and 07's two)
    "greedy_pool": 2, "exhaustive_pool": 2, "exhaustive_size": 2, "n_random": 1,  # layer search (05)
    "n_calibration": 4, "n_held_out": 4, "max_heads": 2, "compare_ks": [5, 10], "pool": 12,  # beyond BOS dims (07)
    "lengths": [64, 128, 256], "detail_length": 128,  # long context (06)
    "n_candidates": 2, "screen_prompts": 2,  # attention calibration (08)
    "score_window": 8, "score_len": 40, "budget_steps": 3, "curve_len": 320, "curve_ref_len": 160,  # streaming (09)
    "curve_window": 60, "bin_size": 32, "ablation_len": 96, "ablation_window": 16, "ablation_windows": [8, 16],
}
# Set by the runner itself, never by -p or a params file.
RESERVED = {"model_name": "--model", "out_dir": "--out"}
HEADS_FROM = "heads_from"  # the parameter through which a notebook takes the run's head list
SELECTION_FROM = "selection_from"  # ... and notebook 05's layer selection (notebook 08 compares edits on its heads)
# runner-filled parameters: name -> what the notebook does while the run has no such file yet
RUN_INPUTS = {HEADS_FROM: "measures its own heads", SELECTION_FROM: "uses its fallback layer set"}
MANIFEST = "manifest.json"
LATEST = "latest"
EXIT_INPUT = 2
EXIT_FAILED = 1
RAY_INSTALL = 'pip install "sinklens[ray]"'  # (sinklens.assess.executor imports torch: not imported here)


def source_checkout() -> Path | None:
    """The source checkout sinklens is imported from: the folder above the package that holds ``pyproject.toml``
    and ``notebooks/``; None when sinklens is installed without one (e.g. from a wheel)."""
    root = Path(__file__).resolve().parents[2]  # <checkout>/sinklens/series/runner.py
    return root if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir() else None


def default_notebooks_dir() -> Path:
    """The ``notebooks`` folder of the source checkout (whatever the working directory); an InputError naming
    ``--notebooks`` when sinklens is installed without its checkout."""
    root = source_checkout()
    if root is None:
        raise InputError(f"sinklens is installed without its source checkout ({Path(__file__).resolve().parents[2]} "
                         "holds no pyproject.toml and notebooks/): pass the notebook series with --notebooks DIR.")
    return root / "notebooks"


def discover_notebooks(folder: str | os.PathLike) -> list[Path]:
    """The series: files matching ``[0-9][0-9]_*.ipynb`` in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"Notebook folder {folder} does not exist: run from the repository root or pass "
                         "--notebooks DIR.")
    found = sorted(folder.glob(NOTEBOOK_GLOB))
    if not found:
        raise InputError(f"No notebooks matching {NOTEBOOK_GLOB} in {folder}: pass the folder that holds the series.")
    return found


def select_notebooks(notebooks: Sequence[Path], only: Iterable[str] | None) -> list[Path]:
    """The notebooks named by ``only`` (number prefix ``01``, stem or file name), in series order."""
    if not only:
        return list(notebooks)
    chosen = set()
    for name in only:
        hits = [nb for nb in notebooks if name in (nb.name[:2], nb.stem, nb.name)]
        if not hits:
            raise InputError(f"--only {name}: no such notebook. Available: "
                             f"{', '.join(nb.stem for nb in notebooks)} (give the number, e.g. --only 01).")
        chosen.update(hits)
    return [nb for nb in notebooks if nb in chosen]


def parse_assignments(items: Iterable[str] | None) -> dict[str, str]:
    """``["key=value", ...]`` from ``-p`` into a dict of raw strings."""
    parsed = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise InputError(f"-p {item!r} is not key=value: write e.g. -p n_prompts=64.")
        parsed[key] = value
    return parsed


_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def parse_value(name: str, text: str, kind: type) -> Any:
    """Convert the command-line text of parameter ``name`` to its declared type."""
    example = {int: "64", float: "0.3", bool: "true", str: "text", list: "[1, 2]", dict: "{a: 1}"}.get(kind, "...")
    fail = InputError(f"-p {name}={text!r}: {name} is declared as {kind.__name__}; write e.g. -p {name}={example}.")
    if kind is str:
        return text
    if kind is int:
        if not re.fullmatch(r"\s*[+-]?\d+\s*", text):
            raise fail
        return int(text)
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise fail from None
    if kind is bool:
        if text.strip().lower() not in _BOOLS:
            raise fail
        return _BOOLS[text.strip().lower()]
    if kind in (list, dict):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise fail from None
        if not isinstance(value, kind):
            raise fail
        return value
    raise InputError(f"Parameter {name} has type {kind.__name__}, which the command line cannot set.")


def load_params_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML (or JSON) mapping ``{parameter: value}``.

    Args:
        path: the ``--params`` file.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise InputError(f"Cannot read --params {path}: {err}. Pass an existing YAML file.") from err
    except yaml.YAMLError as err:
        raise InputError(f"--params {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise InputError(f"--params {path} must hold a mapping of parameter names to values, e.g. `n_prompts: 64`.")
    return data


@dataclass
class NotebookPlan:
    """One notebook of the series and the parameters it will receive."""

    path: Path
    declared: dict[str, tuple[type, Any]]
    passed: dict[str, Any]

    @property
    def effective(self) -> dict[str, Any]:
        """Declared defaults overlaid with the passed values (what the notebook runs with)."""
        return {name: default for name, (_, default) in self.declared.items()} | self.passed


@dataclass
class RunPlan:
    """Everything checked before a run starts."""

    model: str
    notebooks: list[NotebookPlan]
    out_root: Path
    repo_root: Path
    ci: bool = False
    argv: list[str] = field(default_factory=list)
    complete: bool = True  # every notebook of the series is selected
    customized: bool = False  # -p or --params set a value

    @property
    def default_run(self) -> bool:
        """The reference run: whole series, default model, default parameters (no --ci, -p or --params)."""
        return self.complete and not self.ci and not self.customized and self.model == DEFAULT_MODEL


def check_model(model: str) -> str:
    """Refuse a ``--model`` that ``load_model`` could not load, without loading it: a bundled name passes, a
    folder must hold a checkpoint, a hub id must be in the local cache or the hub reachable.

    Args:
        model: the ``--model`` value.
    """
    if model not in EMBEDDED_MODELS:
        from ..core.sources import resolve_checkpoint  # imports torch: only for a model that is not bundled

        try:
            resolve_checkpoint(model)
        except SinklensError as err:
            raise InputError(f"--model {model}: {err}") from None
    return model


def plan_run(notebooks_dir: str | os.PathLike | None = None, model: str | None = None,
             overrides: Mapping[str, str] | None = None, params_file: str | os.PathLike | None = None,
             only: Iterable[str] | None = None, ci: bool = False, out: str | os.PathLike | None = None) -> RunPlan:
    """Validate a run (notebooks, parameter types and values, model name, output folder) without running anything.

    Precedence of values: notebook default < ``SERIES_PARAMS`` < ``CI_PARAMS`` (with ``ci``) <
    ``params_file`` < ``overrides`` (raw ``-p`` strings, parsed to each notebook's declared type).

    Args:
        notebooks_dir: folder of the series (default the ``notebooks/`` folder of the source checkout, from any
            working directory: :func:`default_notebooks_dir`).
        model: model name, checkpoint folder or hub id (default the embedded model).
        overrides: ``{name: text}`` from ``-p name=text``.
        params_file: YAML file of ``{name: value}``.
        only: notebooks to run (number prefix, stem or file name); default all.
        ci: use the small ``CI_PARAMS``.
        out: folder that receives the run folders (default ``runs/`` beside the notebooks folder).
    """
    notebooks_dir = Path(notebooks_dir) if notebooks_dir is not None else default_notebooks_dir()
    series = discover_notebooks(notebooks_dir)
    selected = select_notebooks(series, only)
    declared = {nb: notebook_parameters(nb) for nb in selected}
    model = model or DEFAULT_MODEL
    if not isinstance(model, str) or not model.strip():
        raise InputError("--model must be a non-empty model name, folder or hub id.")
    overrides = dict(overrides or {})
    from_file = load_params_file(params_file) if params_file is not None else {}
    for source, names in (("-p", overrides), (f"--params {params_file}", from_file)):
        for name in names:
            if name in RESERVED:
                raise InputError(f"{source}: {name} is set by the runner; use {RESERVED[name]} instead.")
            if not any(name in params for params in declared.values()):
                users = [nb.stem for nb in discover_notebooks(notebooks_dir)
                         if nb not in declared and name in notebook_parameters(nb)]
                known = sorted({n for p in declared.values() for n in p} - set(RESERVED))
                hint = (f" It is declared by {', '.join(users)}, which --only does not select." if users else
                        f" Known parameters: {', '.join(known)}.")
                raise InputError(f"{source}: unknown parameter {name!r}: no selected notebook declares it.{hint}")
    plans = []
    for nb, params in declared.items():
        passed: dict[str, Any] = {name: value for name, value in SERIES_PARAMS.items() if name in params}
        setter = dict.fromkeys(passed, "the series probe")
        if ci:
            passed |= {name: value for name, value in CI_PARAMS.items() if name in params}
            setter |= {name: "--ci" for name in CI_PARAMS if name in params}
        for name, value in from_file.items():
            if name in params:
                try:
                    passed[name] = coerce_value(name, value, params[name][0])
                except InputError as err:
                    raise InputError(f"--params {params_file}: {err} ({nb.name} declares it as "
                                     f"{params[name][0].__name__}).") from None
                setter[name] = f"--params {params_file}"
        for name, text in overrides.items():
            if name in params:
                passed[name] = parse_value(name, text, params[name][0])
                setter[name] = f"-p {name}={text}"
        for name, value in passed.items():
            try:
                check_value(name, value)
            except InputError as err:
                raise InputError(f"{setter[name]}: {err}") from None
            if name in PATH_PARAMS and value:  # the notebooks run in the checkout, not in this working directory
                passed[name] = str(Path(value).expanduser().resolve())
        if passed.get(HEADS_FROM):
            from .head_list import check_model_name, read_head_list  # imports torch (the census)

            check_model_name(read_head_list(passed[HEADS_FROM]), model)
        passed["model_name"] = model
        plans.append(NotebookPlan(nb, params, passed))
    check_model(model)
    # absolute: the notebooks run with the repository root as working directory
    out_root = Path(out).expanduser().resolve() if out is not None else notebooks_dir.resolve().parent / "runs"
    _check_writable(out_root)
    return RunPlan(model=model, notebooks=plans, out_root=out_root, repo_root=notebooks_dir.resolve().parent, ci=ci,
                   complete=len(selected) == len(series), customized=bool(overrides or from_file))


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as err:
        raise InputError(f"Cannot write run folders under {root}: {err.strerror or err}. "
                         "Pass a writable folder with --out DIR.") from None


def model_label(model: str) -> str:
    """The model part of a run folder name: the last path or hub-id component, filesystem-safe."""
    label = Path(model.rstrip("/\\")).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def new_run_folder(out_root: str | os.PathLike, model: str) -> Path:
    """Create ``<out_root>/<YYYYmmdd-HHMMSS>-<model>``; if that exists, ``...-2``, ``...-3``, ... (never reused)."""
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{model_label(model)}"
    for attempt in range(1, 1000):
        folder = out_root / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise InputError(f"Could not find a free run folder name under {out_root}: clean it up or pass another --out.")


def update_latest(out_root: Path, run_dir: Path, log: Callable[[str], None] = print) -> None:
    """Point ``<out_root>/latest`` at ``run_dir`` (relative symlink, replaced atomically)."""
    link = out_root / LATEST
    if link.exists() and not link.is_symlink():
        log(f"warning: {link} exists and is not a symlink; left alone.")
        return
    tmp = out_root / f".{LATEST}-{uuid.uuid4().hex[:8]}"
    try:
        os.symlink(run_dir.name, tmp)
        os.replace(tmp, link)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        log(f"warning: could not update {link}: {err}")


def package_versions() -> dict[str, str | None]:
    """Versions of the packages that decide the numbers."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("sinklens", "torch", "transformer-lens", "transformers", "papermill"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(repo_root: Path) -> dict[str, Any] | None:
    """Commit and dirtiness of the checkout, or None outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo_root), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def report_hook(run_dir: Path, manifest: dict, log: Callable[[str], None] = print) -> None:
    """Write the run report ``index.html`` (called once after the notebooks, also after a failure). Problems
    here are reported as warnings: they never change the run's status.

    Args:
        run_dir: the run folder.
        manifest: its manifest, as written.
        log: where the report's path and warnings go.
    """
    try:
        from .report import write_report  # imports pandas

        log(f"Report: {write_report(run_dir, manifest, log=log)}")
    except Exception as error:
        log(f"warning: the report index.html could not be written: {type(error).__name__}: {error}")


def _snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (mtime_ns, size)}`` of the files in a run folder."""
    found = {}
    for path in run_dir.rglob("*"):
        try:
            if path.is_file():
                stat = path.stat()
                found[path.relative_to(run_dir).as_posix()] = (stat.st_mtime_ns, stat.st_size)
        except OSError:  # removed while listing
            continue
    return found


def _kernel_name(notebook: Path) -> str:
    spec = json.loads(notebook.read_text(encoding="utf-8")).get("metadata", {}).get("kernelspec", {})
    return spec.get("name") or "python3"


@contextlib.contextmanager
def kernel_config() -> Iterator[Any]:
    """Configuration of the notebook kernels, valid inside the ``with`` block.

    Kernels talk over local IPC sockets, not TCP ports: nothing listens on the network, and
    ipykernel does not warn about unencrypted TCP once per notebook. The sockets are files named
    after ``KernelManager.ip``; by default ``kernel-ipc-N`` in the working directory (the
    checkout), numbered from 1 by each process, so two runs side by side would take each other's
    sockets. Here they go to a private temporary folder, removed when the block ends.
    """
    from traitlets.config import Config

    with tempfile.TemporaryDirectory(prefix="sinklens-kernels-") as folder:
        yield Config({"KernelManager": {"transport": "ipc", "ip": os.path.join(folder, "ipc")}})


@contextlib.contextmanager
def _quiet_progress():
    """Kernels started inside inherit SINKLENS_PROGRESS=0: no progress bars in executed notebooks."""
    before = os.environ.get("SINKLENS_PROGRESS")
    os.environ["SINKLENS_PROGRESS"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SINKLENS_PROGRESS", None)
        else:
            os.environ["SINKLENS_PROGRESS"] = before


def _write_manifest(run_dir: Path, manifest: dict) -> None:
    atomic_write_text(run_dir / MANIFEST, json_text(manifest), what="run manifest")


def execute(plan: RunPlan, log: Callable[[str], None] = print,
            err: Callable[[str], None] | None = None) -> tuple[Path, dict]:
    """Run the planned notebooks into a new run folder; return it and the manifest.

    Stops at the first failing notebook (its error is reported through ``err``); the manifest
    is rewritten after every notebook so an interrupted run still describes itself. A notebook
    that declares ``heads_from`` and was not given one gets this run's ``specialized_heads.json``
    once an earlier notebook has written it (else it measures its own heads, and the log says so).

    Args:
        plan: the checked run (:func:`plan_run`).
        log: progress lines.
        err: failure lines (default: stderr).
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from .head_list import HEAD_LIST_FILE, SELECTION_FILE

    files = {HEADS_FROM: HEAD_LIST_FILE, SELECTION_FROM: SELECTION_FILE}  # the run's file of each runner input

    err = err or (lambda text: print(text, file=sys.stderr, flush=True))
    run_dir = new_run_folder(plan.out_root, plan.model)
    manifest = {
        "model": plan.model, "run_dir": str(run_dir.resolve()), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ci": plan.ci, "default_run": plan.default_run, "argv": plan.argv, "versions": package_versions(),
        "git": git_state(plan.repo_root),
        "status": "running",
        "notebooks": [{"notebook": nb.path.name, "parameters": nb.effective | {"out_dir": str(run_dir)},
                       "passed": nb.passed | {"out_dir": str(run_dir)}, "status": "pending", "wall_s": None}
                      for nb in plan.notebooks],
    }
    _write_manifest(run_dir, manifest)
    log(f"Run folder: {run_dir}")
    total = len(plan.notebooks)
    status = "ok"
    for i, (nb, entry) in enumerate(zip(plan.notebooks, manifest["notebooks"]), 1):
        log(f"[{i}/{total}] {nb.path.name} ...")
        for name, fallback in RUN_INPUTS.items():
            file = files[name]
            if name in nb.declared and name not in entry["passed"]:
                if (run_dir / file).is_file():
                    entry["passed"][name] = entry["parameters"][name] = str(run_dir / file)
                else:
                    log(f"      no {file} in this run yet: {nb.path.stem} {fallback}.")
        start = time.perf_counter()
        entry["status"] = "running"
        _write_manifest(run_dir, manifest)
        before = _snapshot(run_dir)
        try:
            with _quiet_progress(), kernel_config() as config:
                papermill.execute_notebook(str(nb.path), str(run_dir / nb.path.name), parameters=entry["passed"],
                                           kernel_name=_kernel_name(nb.path), progress_bar=False, log_output=False,
                                           cwd=str(plan.repo_root), config=config)
            entry["status"] = "ok"
        except PapermillExecutionError as error:
            entry["status"] = "failed"
            entry["error"] = {"cell_index": error.cell_index, "exec_count": error.exec_count,
                              "ename": error.ename, "evalue": error.evalue}
            err(f"FAILED: {nb.path.name}, cell {error.exec_count}: {error.ename}: {error.evalue}\n"
                f"  full traceback in {run_dir / nb.path.name}")
        except Exception as error:  # kernel died, notebook unreadable, ...
            entry["status"] = "failed"
            entry["error"] = {"ename": type(error).__name__, "evalue": str(error)}
            err(f"FAILED: {nb.path.name}: {type(error).__name__}: {error}")
        finally:
            entry["wall_s"] = round(time.perf_counter() - start, 2)
            # what this notebook wrote: files new or changed since it started (not the bookkeeping)
            entry["outputs"] = sorted(rel for rel, stat in _snapshot(run_dir).items()
                                      if before.get(rel) != stat and not rel.startswith(".")
                                      and rel not in (MANIFEST, nb.path.name))
            if entry["status"] == "running":  # interrupted (KeyboardInterrupt)
                entry["status"] = "interrupted"
                manifest["status"] = "interrupted"
                _write_manifest(run_dir, manifest)
        if entry["status"] == "ok":
            entry["output"] = nb.path.name
            log(f"      ok in {entry['wall_s']:.1f} s")
        else:
            status = "failed"
            for later in manifest["notebooks"][i:]:
                later["status"] = "not run"
            break
    manifest["status"] = status
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest["wall_s"] = round(sum(e["wall_s"] or 0 for e in manifest["notebooks"]), 2)
    _write_manifest(run_dir, manifest)
    report_hook(run_dir, manifest, log=log)
    update_latest(plan.out_root, run_dir, log)
    log(f"{'Done' if status == 'ok' else 'Stopped after a failure'}: {run_dir}")
    return run_dir, manifest


def run(notebooks_dir: str | os.PathLike | None = None, model: str | None = None,
        overrides: Mapping[str, str] | None = None, params_file: str | os.PathLike | None = None,
        only: Iterable[str] | None = None, ci: bool = False, out: str | os.PathLike | None = None,
        argv: Sequence[str] | None = None) -> int:
    """Plan and execute a run; return the exit code (0 ok, 1 a notebook failed, 2 bad input: nothing was run).

    Args:
        notebooks_dir: folder of the series (default ``notebooks/``).
        model: model name, checkpoint folder or hub id.
        overrides: ``{name: text}`` from ``-p``.
        params_file: YAML file of parameter values.
        only: notebooks to run.
        ci: small parameters for a quick check.
        out: folder that receives the run folders.
        argv: the command line, recorded in the manifest.
    """
    try:
        plan = plan_run(notebooks_dir, model, overrides, params_file, only, ci, out)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_INPUT
    plan.argv = list(argv or [])
    _, manifest = execute(plan, log=lambda text: print(text, flush=True))
    return 0 if manifest["status"] == "ok" else EXIT_FAILED


def _execute_quietly(plan: RunPlan) -> tuple[str, str]:
    """One model's series (a Ray task's body): its run folder and status."""
    run_dir, manifest = execute(plan, log=lambda text: print(f"[{model_label(plan.model)}] {text}", flush=True))
    return str(run_dir), manifest["status"]


def run_models(models: Sequence[str], *, ray_address: str | None = None, use_ray: bool = False,
               notebooks_dir: str | os.PathLike | None = None, overrides: Mapping[str, str] | None = None,
               params_file: str | os.PathLike | None = None, only: Iterable[str] | None = None, ci: bool = False,
               out: str | os.PathLike | None = None, argv: Sequence[str] | None = None,
               cpus_per_model: int = 1) -> int:
    """One series per model (``run --models A B C [--ray [ADDRESS]]``), each into its own run folder as today, then
    the cross-model report of the finished ones (:mod:`sinklens.report.compare`) in ``<out>/<time>-compare/``.

    Every model's run is planned (parameters, model, output folder checked) before any starts. With ``use_ray``
    each series is a Ray task (``cpus_per_model`` CPUs; one GPU when the cluster has GPUs) on the cluster at
    ``ray_address`` (None: a new local cluster): the checkout, the models and ``out`` must be at the same paths on
    every node. Returns the exit code: 0 all ok, 1 a series failed, 2 bad input (nothing was run).

    Args:
        models: model names, checkpoint folders or hub ids (distinct).
        ray_address: the cluster's address (with ``use_ray``).
        use_ray: run the series as Ray tasks (else one after another here).
        notebooks_dir, overrides, params_file, only, ci, out: as in :func:`run`, for every model.
        argv: the command line, recorded in each manifest.
        cpus_per_model: CPUs of each Ray task.
    """
    try:
        if len(set(models)) != len(models) or not models:
            raise InputError(f"--models needs distinct model names, got {list(models)}.")
        plans = [plan_run(notebooks_dir, model, overrides, params_file, only, ci, out) for model in models]
        connected = False
        if use_ray:
            from ..assess.executor import connect_ray  # Ray only here: `make run` does not need it

            connected = connect_ray(ray_address, log_to_driver=True)  # each series' progress lines
    except InputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_INPUT
    for plan in plans:
        plan.argv = list(argv or [])
    results: list[tuple[str, str]] = []
    if use_ray:
        import ray

        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_cpus=cpus_per_model, num_gpus=gpus, max_retries=0)(_execute_quietly)
        try:
            print(f"Ray: {len(plans)} series on {ray.cluster_resources().get('CPU', 0):g} CPUs, {gpus} GPU per "
                  "series", flush=True)
            results = ray.get([task.remote(plan) for plan in plans])
        finally:
            if connected:
                ray.shutdown()
    else:
        results = [_execute_quietly(plan) for plan in plans]
    for (run_dir, status), model in zip(results, models):
        print(f"{model}: {status}: {run_dir}", flush=True)
    finished = [run_dir for run_dir, _ in results]
    from ..report.compare import write_comparison

    target = plans[0].out_root / f"{time.strftime('%Y%m%d-%H%M%S')}-compare"
    try:
        print(f"Comparison: {write_comparison(finished, target)}", flush=True)
    except SinklensError as error:
        print(f"warning: the comparison could not be written: {error}", flush=True)
    return 0 if all(status == "ok" for _, status in results) else EXIT_FAILED
