"""lm-evaluation-harness on the in-memory model (optional dependency: ``pip install lm-eval==0.4.13``).

``HFLM`` accepts an already-loaded ``PreTrainedModel``: we hand it ``bridge.original_model`` (whose
layers are the bridge's blocks) and the bridge's tokenizer, so pruning edits active on the bridge
(weights edited in place, permanent hooks) are what the harness evaluates.

Task data: the harness downloads datasets from the Hugging Face hub. When the hub cannot be
reached, datasets is switched to offline mode for the call, so a task whose data is not in the
local cache fails at once with :class:`TaskDataUnavailableError` naming the dataset, instead of
retrying for minutes. Local tasks (a YAML with ``dataset_path: json`` and ``data_files``, passed
through ``include_path``) run offline.
"""

from __future__ import annotations

import contextlib
import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import InputError, SinklensError
from .loading import hub_reachable, model_info

PRUNING_PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
LM_EVAL_SUITES = {"pruning-paper": PRUNING_PAPER_TASKS}
LM_EVAL_PIN = "lm-eval==0.4.13"


class MissingDependencyError(SinklensError, ImportError):
    """An optional dependency is not installed."""


class TaskDataUnavailableError(SinklensError, ConnectionError):
    """A harness task's dataset is neither cached locally nor downloadable."""


@dataclass
class LmEvalResult:
    """Harness results: ``metrics`` (``"<task>/<metric>"`` -> value), a tidy ``table`` (task,
    metric, value, stderr), the per-sample records when asked for, and the raw results dict."""

    metrics: dict[str, float]
    table: pd.DataFrame
    samples: dict = field(default_factory=dict, repr=False)
    raw: dict = field(default_factory=dict, repr=False)


def _import_harness():
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise MissingDependencyError(f"lm-evaluation-harness is not installed ({err}): pip install {LM_EVAL_PIN} "
                                     "(or pip install 'sinklens[eval]').") from err
    return simple_evaluate, HFLM, TaskManager


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


def _describe_data(manager, name: str) -> str:
    entry = manager.task_index.get(name) if hasattr(manager, "task_index") else None
    cfg = getattr(entry, "cfg", None) or {}
    path, subset = cfg.get("dataset_path"), cfg.get("dataset_name")
    if path is None:
        return f"task {name!r}"
    return f"task {name!r} (dataset {path!r}" + (f", subset {subset!r})" if subset else ")")


def evaluate_lm_eval(model, tasks: str | Sequence[str] = "pruning-paper", limit: int | None = None, *,
                     include_path: str | Path | None = None, batch_size: int = 16, prepend_bos: bool = True,
                     num_fewshot: int | None = None, log_samples: bool = False) -> LmEvalResult:
    """Run lm-evaluation-harness ``tasks`` on ``model`` as it is now (pruning edits included).

    ``tasks``: ``"pruning-paper"`` (boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge,
    openbookqa; report acc and acc_norm), a task name, or a list. ``limit``: at most this many
    documents per task. ``include_path``: a folder of extra task YAMLs (e.g. a local JSONL task).
    ``prepend_bos``: every request starts with BOS (the harness's ``add_bos_token``), as in
    :func:`sinklens.evaluate`.
    """
    names = _resolve_tasks(tasks)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit must be a positive int (documents per task) or None, got {limit!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}.")
    if include_path is not None and not Path(include_path).is_dir():
        raise InputError(f"include_path {include_path} is not a folder: pass the folder holding the task YAML files.")
    if not isinstance(prepend_bos, bool):
        raise InputError(f"prepend_bos must be True or False, got {prepend_bos!r}.")
    simple_evaluate, HFLM, TaskManager = _import_harness()
    manager = _task_manager(TaskManager, include_path, names)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        hints = {name: difflib.get_close_matches(name, manager.all_tasks, n=3) for name in unknown}
        raise InputError(f"Unknown lm-eval task(s) {unknown} (close matches: {hints}). Check the name, or pass the "
                         "folder of a local task YAML as include_path=.")
    info = model_info(model)
    hf = model.original_model
    lm = HFLM(pretrained=hf, tokenizer=model.tokenizer, batch_size=batch_size, device=str(info.device),
              add_bos_token=prepend_bos)
    if prepend_bos and lm.tok_encode("a")[:1] != [info.bos_id]:
        raise InputError("The tokenizer does not prepend BOS when asked (add_special_tokens=True), so the harness "
                         "cannot score with BOS: call with prepend_bos=False.")
    offline = not hub_reachable()
    from lm_eval.tasks import get_task_dict

    with _datasets_offline(offline):
        missing = []
        for name in names:  # load each task's data first, to name every one that cannot be fetched
            try:
                get_task_dict([name], manager)
            except (ConnectionError, FileNotFoundError) as err:
                missing.append((name, err))
        if missing:
            where = "the Hugging Face hub cannot be reached" if offline else "the download failed"
            listed = "; ".join(f"{_describe_data(manager, name)} ({type(err).__name__}: {err})" for name, err in missing)
            raise TaskDataUnavailableError(
                f"Could not fetch the data of lm-eval {listed}: not in the local datasets cache and {where}. Fetch "
                "it on a machine with access (the harness caches it under ~/.cache/huggingface/datasets) and copy "
                "that cache here, or write a local task YAML (dataset_path: json, dataset_kwargs: {data_files: ...}) "
                "and pass its folder as include_path=.") from missing[0][1]
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


def write_local_task(items: str | Path | None, folder: str | Path, task: str = "sinklens_items") -> Path:
    """Write a harness task YAML that reads a sinklens JSONL item file offline; returns its path.

    Pass ``folder`` as ``include_path`` and ``task`` as the task name. The choices keep their own
    leading space (``target_delimiter: ""``), so the harness sends the same continuations as
    :func:`sinklens.evaluate`.
    """
    from .evaluation import bundled_items_path, load_items

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
