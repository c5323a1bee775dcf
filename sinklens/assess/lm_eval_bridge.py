"""lm-evaluation-harness on the in-memory model (optional dependency: ``pip install lm-eval==0.4.13``).

``HFLM`` accepts an already-loaded ``PreTrainedModel``: we hand it ``bridge.original_model`` (whose
layers are the bridge's blocks) and the bridge's tokenizer, so pruning edits active on the bridge
(weights edited in place, permanent hooks) are what the harness evaluates.

Task data: the harness downloads datasets from the Hugging Face hub. When the hub cannot be
reached (or ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set), datasets is switched to offline mode
for the call, so a task whose data is not in the local cache fails with :class:`TaskDataUnavailableError`
naming the dataset, instead of retrying for minutes. That message comes within about a second: before
importing the harness (~5 s) and indexing its ~15k task files (~10-20 s), the named tasks' YAML files
are found by a text scan and their ``dataset_path`` looked up in the local caches; only when that
cannot decide (a group, a Python task, something cached) does the harness's own loading decide. Local
tasks (a YAML with ``dataset_path: json`` and ``data_files``, passed through ``include_path``) run offline.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml
from huggingface_hub import constants as hub_constants

from ..core.errors import InputError, SinklensError
from ..core.loading import model_info
from ..core.sources import hub_reachable
from ..core.validate import check_int
from .evaluation import bundled_items_path, load_items

PRUNING_PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
LM_EVAL_SUITES = {"pruning-paper": PRUNING_PAPER_TASKS}
LM_EVAL_PIN = "lm-eval==0.4.13"


class MissingDependencyError(SinklensError, ImportError):
    """An optional dependency is not installed."""


class TaskDataUnavailableError(SinklensError, ConnectionError):
    """A harness task's dataset is neither cached locally nor downloadable."""


@dataclass
class LmEvalResult:
    """Results of :func:`evaluate_lm_eval`.

    Args:
        metrics: ``"<task>/<metric>"`` -> value.
        table: one row per task and metric (columns task, metric, value, stderr).
        samples: the per-document records (with ``log_samples=True``).
        raw: the harness's own results dict.
    """

    metrics: dict[str, float]
    table: pd.DataFrame
    samples: dict = field(default_factory=dict, repr=False)
    raw: dict = field(default_factory=dict, repr=False)


def _missing_harness(err: Exception | None = None) -> MissingDependencyError:
    detail = f" ({err})" if err is not None else ""
    return MissingDependencyError(f"lm-evaluation-harness is not installed{detail}: pip install {LM_EVAL_PIN} "
                                  "(or pip install 'sinklens[eval]').")


def _harness_root() -> Path:
    """The installed ``lm_eval`` package folder, found without importing it (the import takes seconds)."""
    try:
        spec = importlib.util.find_spec("lm_eval")
    except (ImportError, ValueError) as err:
        raise _missing_harness(err) from err
    if spec is None or not spec.submodule_search_locations:
        raise _missing_harness()
    return Path(list(spec.submodule_search_locations)[0])


def _import_harness():
    """The harness entry points; an optional dependency, so imported on use (not at module import)."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError as err:
        raise _missing_harness(err) from err
    return simple_evaluate, HFLM, TaskManager, get_task_dict


def _resolve_tasks(tasks) -> list[str]:
    if isinstance(tasks, str):
        names = list(LM_EVAL_SUITES[tasks]) if tasks in LM_EVAL_SUITES else [tasks]
    else:
        names = list(tasks) if tasks is not None else []
    if not names or not all(isinstance(t, str) and t for t in names):
        raise InputError(f"tasks must be a suite name ({sorted(LM_EVAL_SUITES)}), a task name or a non-empty list of "
                         f"task names, got {tasks!r}.")
    return list(dict.fromkeys(names))


_MANAGERS: dict = {}


def _task_manager(TaskManager, include_path, names: list[str]):
    """A TaskManager that knows ``names``: the local folder alone when it holds them all (fast),
    else the harness's ~15k built-in tasks plus the folder (indexing takes ~30 s, cached)."""
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    key = str(include_path)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=str(include_path) if include_path is not None else None)
    return _MANAGERS[key]


@contextlib.contextmanager
def _datasets_offline(enabled: bool):
    """Temporarily put datasets / huggingface_hub in offline mode (fail fast instead of retrying)."""
    if not enabled:
        yield
        return
    import datasets
    import huggingface_hub.constants as hub

    saved = (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def _describe_data(name: str, cfg: dict | None) -> str:
    cfg = cfg or {}
    path, subset = cfg.get("dataset_path"), cfg.get("dataset_name")
    if path is None:
        return f"task {name!r}"
    return f"task {name!r} (dataset {path!r}" + (f", subset {subset!r})" if subset else ")")


def _indexed_cfg(manager, name: str) -> dict | None:
    entry = manager.task_index.get(name) if hasattr(manager, "task_index") else None
    return getattr(entry, "cfg", None)


def _unavailable(listed: str, where: str) -> TaskDataUnavailableError:
    return TaskDataUnavailableError(
        f"Could not fetch the data of lm-eval {listed}: not in the local datasets cache and {where}. Fetch "
        "it on a machine with access (the harness caches it under ~/.cache/huggingface/datasets) and copy "
        "that cache here, or write a local task YAML (dataset_path: json, dataset_kwargs: {data_files: ...}) "
        "and pass its folder as include_path=.")


# --- offline: the missing data named before the harness is imported --------------------------------

_OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}
_OFFLINE_WHERE = "the Hugging Face hub cannot be reached (or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)"
# dataset builders that read local files (data_files / data_dir), never the hub
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "sql", "xml", "webdataset", "imagefolder",
                   "audiofolder", "videofolder", "pdffolder", "niftifolder"}


def _offline() -> bool:
    """True when datasets will not reach the hub: an offline flag is set, or the hub does not answer."""
    flags = (os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(flag in _OFFLINE_VALUES for flag in flags) or not hub_reachable()


class _YamlLoader(yaml.SafeLoader):
    """Reads harness task YAMLs as data: ``!function`` tags stay strings (nothing is imported)."""


_YamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _read_task_yaml(path: Path, depth: int = 0) -> dict:
    """A task YAML with its ``include`` files merged under it, as the harness merges them."""
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_YamlLoader)  # noqa: S506 (a SafeLoader)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a mapping")
    includes = cfg.pop("include", None)
    if includes is None or depth > 8:
        return cfg
    merged: dict = {}
    for include in includes if isinstance(includes, list) else [includes]:
        merged.update(_read_task_yaml(path.parent / include, depth + 1))
    return merged | cfg


def _task_files(names: list[str], roots: list[Path]) -> dict[str, Path]:
    """The YAML file defining each named task (``task: <name>`` at the top level), later roots winning,
    the first file in sorted order within a root (the harness's rules); names not found are left out."""
    wanted = set(names)
    pattern = re.compile(r"^task:[ \t]*['\"]?([^'\"\s#]+)", re.MULTILINE)
    found: dict[str, Path] = {}
    for root in roots:
        in_root: dict[str, Path] = {}
        for path in sorted(root.glob("**/*.yaml"), key=lambda p: p.as_posix()):
            if "__pycache__" in path.parts or ".ipynb_checkpoints" in path.parts:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            for match in pattern.finditer(text):
                if match.group(1) in wanted:
                    in_root.setdefault(match.group(1), path)
        found |= in_root
    return found


def _cached_locally(dataset: str) -> bool:
    """Whether the hub download cache or the datasets cache may hold ``dataset`` (conservative: any folder
    whose name matches, ignoring case, underscores and dashes, counts)."""
    hub_dir = Path(hub_constants.HF_HUB_CACHE) / ("datasets--" + dataset.replace("/", "--"))
    if hub_dir.exists():
        return True
    cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(hub_constants.HF_HOME) / "datasets").expanduser()

    def squash(text: str) -> str:
        return re.sub(r"[_\-/]", "", text.lower())

    return cache.is_dir() and any(squash(entry.name) == squash(dataset) for entry in cache.iterdir())


def _check_data_offline(names: list[str], include_path: Path | None) -> None:
    """Raise :class:`TaskDataUnavailableError` when every named task is a YAML task found by a text scan and
    some of them read a hub dataset that no local cache holds; otherwise return and let the harness decide."""
    roots = [_harness_root() / "tasks"] + ([include_path] if include_path is not None else [])
    files = _task_files(names, roots)
    if set(files) != set(names):
        return  # a group, a tag or an unknown name: the harness's index decides (and names close matches)
    missing = []
    for name in names:
        try:
            cfg = _read_task_yaml(files[name])
        except (OSError, ValueError, yaml.YAMLError):
            return
        dataset = cfg.get("dataset_path")
        if cfg.get("task") != name or "class" in cfg or not isinstance(dataset, str):
            return
        kwargs = cfg.get("dataset_kwargs") or {}
        local = (dataset in _LOCAL_BUILDERS or Path(dataset).expanduser().exists()
                 or (isinstance(kwargs, dict) and ("data_files" in kwargs or "data_dir" in kwargs)))
        if not local and not _cached_locally(dataset):
            missing.append(_describe_data(name, cfg))
    if missing:
        raise _unavailable("; ".join(missing), _OFFLINE_WHERE)


# --- the run -------------------------------------------------------------------------------------


def evaluate_lm_eval(model, tasks: str | Sequence[str] = "pruning-paper", limit: int | None = None, *,
                     include_path: str | Path | None = None, batch_size: int = 16, prepend_bos: bool = True,
                     num_fewshot: int | None = None, log_samples: bool = False) -> LmEvalResult:
    """Run lm-evaluation-harness ``tasks`` on ``model`` as it is now (pruning edits included).

    Every argument, and offline the availability of the tasks' data, is checked before the harness
    loads anything heavy.

    Args:
        model: the bridge (from :func:`sinklens.load_model`), edited or not.
        tasks: ``"pruning-paper"`` (boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge,
            openbookqa; report acc and acc_norm), a task name, or a list of task names.
        limit: at most this many documents per task, or None for all.
        include_path: a folder of extra task YAMLs (e.g. a local JSONL task from :func:`write_local_task`).
        batch_size: requests per forward.
        prepend_bos: every request starts with BOS (the harness's ``add_bos_token``), as in
            :func:`sinklens.evaluate`.
        num_fewshot: few-shot examples per request, or None for each task's default.
        log_samples: keep the per-document records in ``result.samples``.
    """
    names = _resolve_tasks(tasks)
    limit = check_int("limit", limit, minimum=1, allow_none=True, meaning="documents per task")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    num_fewshot = check_int("num_fewshot", num_fewshot, minimum=0, allow_none=True)
    if include_path is not None and not Path(include_path).is_dir():
        raise InputError(f"include_path {include_path} is not a folder: pass the folder holding the task YAML files.")
    include_path = Path(include_path) if include_path is not None else None
    for name, value in (("prepend_bos", prepend_bos), ("log_samples", log_samples)):
        if not isinstance(value, bool):
            raise InputError(f"{name} must be True or False, got {value!r}.")
    info = model_info(model)
    _harness_root()  # installed? (found without importing it)
    offline = _offline()
    if offline:
        _check_data_offline(names, include_path)
    simple_evaluate, HFLM, TaskManager, get_task_dict = _import_harness()
    manager = _task_manager(TaskManager, include_path, names)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        hints = {name: difflib.get_close_matches(name, manager.all_tasks, n=3) for name in unknown}
        raise InputError(f"Unknown lm-eval task(s) {unknown} (close matches: {hints}). Check the name, or pass the "
                         "folder of a local task YAML as include_path=.")
    hf = model.original_model
    lm = HFLM(pretrained=hf, tokenizer=model.tokenizer, batch_size=batch_size, device=str(info.device),
              add_bos_token=prepend_bos)
    if prepend_bos and lm.tok_encode("a")[:1] != [info.bos_id]:
        raise InputError("The tokenizer does not prepend BOS when asked (add_special_tokens=True), so the harness "
                         "cannot score with BOS: call with prepend_bos=False.")
    with _datasets_offline(offline):
        missing = []
        for name in names:  # load each task's data first, to name every one that cannot be fetched
            try:
                get_task_dict([name], manager)
            except (ConnectionError, FileNotFoundError) as err:
                missing.append((name, err))
        if missing:
            where = _OFFLINE_WHERE if offline else "the download failed"
            listed = "; ".join(f"{_describe_data(name, _indexed_cfg(manager, name))} ({type(err).__name__}: {err})"
                               for name, err in missing)
            raise _unavailable(listed, where) from missing[0][1]
        raw = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              log_samples=log_samples, bootstrap_iters=100)
    rows = []
    for task, values in raw["results"].items():
        for key, value in values.items():
            if "," not in key or key.split(",")[0].endswith("_stderr"):
                continue
            metric, _filter = key.split(",", 1)
            if not isinstance(value, (int, float)):
                continue
            stderr = values.get(f"{metric}_stderr,{_filter}")
            rows.append({"task": task, "metric": metric, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else float("nan")})
    table = pd.DataFrame(rows, columns=["task", "metric", "value", "stderr"])
    metrics = {f"{r.task}/{r.metric}": r.value for r in table.itertuples()}
    return LmEvalResult(metrics=metrics, table=table, samples=raw.get("samples", {}) if log_samples else {}, raw=raw)


def write_local_task(items: str | Path | None, folder: str | Path, *, task: str = "sinklens_items") -> Path:
    """Write a harness task YAML that reads a sinklens JSONL item file offline; returns its path.

    Pass ``folder`` as ``include_path`` and ``task`` as the task name. The choices keep their own
    leading space (``target_delimiter: ""``), so the harness sends the same continuations as
    :func:`sinklens.evaluate`.

    Args:
        items: a JSONL item file (validated first), or None for the bundled items.
        folder: where the YAML is written (created if needed).
        task: the task's name (letters, digits and underscores).
    """
    source = bundled_items_path() if items is None else Path(items)
    load_items(source)  # validate before writing
    if not isinstance(task, str) or not task.replace("_", "").isalnum():
        raise InputError(f"task must be a name of letters, digits and underscores, got {task!r}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task}.yaml"
    path.write_text(
        f"task: {task}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(source.resolve()))}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n", encoding="utf-8")
    return path


__all__ = ["LM_EVAL_SUITES", "LmEvalResult", "MissingDependencyError", "PRUNING_PAPER_TASKS",
           "TaskDataUnavailableError", "evaluate_lm_eval", "write_local_task"]
