"""Typed notebook parameters and the checks of their values.

A notebook's ``parameters`` cell declares annotated variables (``n_prompts: int = 64``). The
annotations are the single source of the parameter types: :func:`check_params` validates the
kernel's values against them after papermill's injected cell, and :func:`notebook_parameters`
reads them from the ``.ipynb`` file (for validating a command line before anything runs).

Values are checked too, by name, with the package's own choices (:data:`VALUE_CHECKS`): the
runner applies the same checks to a command line before it creates a run folder or starts a
kernel, and a notebook opened in JupyterLab applies them in its second cell. Every parameter a
notebook declares has an entry (``tests/test_params.py`` fails on one without); the package
function that receives a value still checks what depends on the model (e.g. k <= d_model).
The choices come from :mod:`sinklens.core.choices`, which imports nothing heavy, so the command
line refuses a bad value in a moment.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# light modules only: the command line checks a run's values before torch or pandas is imported
from ..core.choices import (
    BASES,
    CALIBRATION_CANDIDATES,
    FILLS,
    GQA_POLICIES,
    HEAD_REMOVAL_CHOICES,
    POLICIES,
    STRATEGIES,
)
from ..core.errors import InputError
from ..core.validate import as_int, check_choice, check_choices, check_fraction

_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}


def coerce_value(name: str, value: Any, kind: type) -> Any:
    """``value`` of parameter ``name`` as its declared type ``kind``; ints are accepted for floats.

    Args:
        name: the parameter, named in the error.
        value: the value given (from papermill, a params file or a notebook's defaults).
        kind: the declared type (int, float, str, bool, list or dict).
    """
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise InputError(f"Parameter {name} must be {kind.__name__}, got {value!r} ({type(value).__name__}).")
    return value


# --- value checks, by parameter name --------------------------------------------------------------------


def _at_least(low: int) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if as_int(value) is None or value < low:
            raise InputError(f"Parameter {name} must be an int >= {low}, e.g. {name}={max(low, 1)}; got {value!r}.")
    return check


def _ints_at_least(low: int, empty: str = "") -> Callable[[str, Any], None]:
    """A list of ints >= ``low``; empty only where ``empty`` says what an empty list means."""
    def check(name: str, value: Any) -> None:
        if not isinstance(value, list) or not (value or empty) or any(as_int(v) is None or v < low for v in value):
            kind = f"a list of ints >= {low} ({empty})" if empty else f"a non-empty list of ints >= {low}"
            raise InputError(f"Parameter {name} must be {kind}, e.g. {name}=[{max(low, 1)}, {max(low, 1) * 10}]; "
                             f"got {value!r}.")
    return check


def _fraction(open_low: bool = False) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        check_fraction(name, value, open_low=open_low)
    return check


def _fractions(name: str, value: Any) -> None:
    if not isinstance(value, list) or not value:
        raise InputError(f"Parameter {name} must be a non-empty list of fractions, e.g. [0.9], got {value!r}.")
    for item in value:
        check_fraction(f"each entry of {name}", item)


def _open_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise InputError(f"Parameter {name} must be a number in (0, 1), e.g. {name}=0.1; got {value!r}.")
def _positive_floats(name: str, value: Any) -> None:
    if (not isinstance(value, list) or not value
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in value)):
        raise InputError(f"Parameter {name} must be a non-empty list of numbers > 0, e.g. {name}=[0.02, 0.05]; "
                         f"got {value!r}.")


def _choice(choices: Sequence[str]) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        check_choice(name, value, choices)
    return check


def _choices(choices: Sequence[str]) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, list):
            raise InputError(f"Parameter {name} must be a non-empty list drawn from {tuple(choices)}, e.g. "
                             f"{name}=[{choices[0]}]; got {value!r}.")
        check_choices(name, value, choices, single=f"entry of {name}", drop_duplicates=True)
    return check


def _file_or_empty(example: str) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if value and not Path(value).expanduser().is_file():
            raise InputError(f"Parameter {name}: {value} is not a file. Pass an existing file ({example}), or leave "
                             "it empty.")
    return check


def _text(example: str) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"Parameter {name} must be a non-empty string, e.g. {name}={example}; got {value!r}.")
    return check


def _flags(name: str, value: Any) -> None:
    if not isinstance(value, list) or not value or any(not isinstance(v, bool) for v in value) \
            or len(set(value)) != len(value):
        raise InputError(f"Parameter {name} must be a non-empty list of distinct True/False, e.g. "
                         f"{name}=[False, True]; "
                         f"got {value!r}.")


def _metric(name: str, value: Any) -> None:
    # the metric names depend on the suite and the item file: sinklens.layer_selection checks the name itself
    group, _, rest = value.partition("/") if isinstance(value, str) else ("", "", "")
    if not group or not rest:
        raise InputError(f"Parameter {name} must be a metric name group/name, e.g. {name}=acc/mean (or lm/ppl, "
                         f"mc/acc, copy/acc); got {value!r}.")


# Model-independent checks (a model's own limits, such as k <= d_model, are checked where it is loaded). The choice
# checks name their constants (sinklens.core.choices), so a renamed choice or parameter is a one-line change here.
VALUE_CHECKS: dict[str, Callable[[str, Any], None]] = {
    **dict.fromkeys(["n_prompts", "batch_size", "n_boot", "top_n", "k", "model_prompts", "limit", "n_lm_prompts",
                     "n_copy", "greedy_pool", "exhaustive_pool", "exhaustive_size", "patience", "top_heads"],
                    _at_least(1)),
    **dict.fromkeys(["seq_len", "lm_seq_len"], _at_least(2)),
    **dict.fromkeys(["view_prompt", "n_random"], _at_least(0)),
    "layer": _at_least(-1),
    **dict.fromkeys(["eps", "q", "non_first_threshold"], _fraction()),
    "target_retention": _fraction(open_low=True),
    **dict.fromkeys(["thresholds", "targets"], _fractions),
    **dict.fromkeys(["ks", "k_values"], _ints_at_least(1, empty="empty: the default k grid")),
    **dict.fromkeys(["seeds", "model_seeds"], _ints_at_least(0)),
    "basis": _choice(BASES),
    "gqa": _choice(GQA_POLICIES),
    "head_removal": _choice(HEAD_REMOVAL_CHOICES),
    **dict.fromkeys(["strategies", "selection_strategy"], _choices(STRATEGIES)),
    "metric": _metric,
    "items_file": _file_or_empty("a JSONL file of multiple-choice items"),
    "heads_from": _file_or_empty("the specialized_heads.json of a run, written by notebook 02"),
    # set by the runner (--model, --out); checked here for a notebook run by hand
    "model_name": _text("smollm2-135m"),
    "out_dir": _text("runs/scratch"),
    # 06 long context
    "lengths": _ints_at_least(2),  # prompt lengths, BOS included
    **dict.fromkeys(["n_long_prompts", "first_keys", "view_keys"], _at_least(1)),
    "detail_length": _at_least(2),
    # 07 beyond-BOS dims
    **dict.fromkeys(["n_calibration", "n_held_out", "pool"], _at_least(1)),
    "max_heads": _at_least(0),  # 0: every sink-specialized head
    "compare_ks": _ints_at_least(1),
    **dict.fromkeys(["policies", "all_heads_policies"], _choices(POLICIES)),
    "fills": _choices(FILLS),
    "temperatures": _flags,
    # 08 attention calibration
    "selection_from": _file_or_empty("the layer_selection.json of a run, written by notebook 05"),
    "beta": _fraction(),
    "threshold": _open_fraction,
    **dict.fromkeys(["min_queries", "n_candidates", "screen_layers", "screen_prompts"], _at_least(1)),
    "top_m": _at_least(0),  # 0: keep the heads whose gain's lower bound is above 0
    "candidates": _choice(CALIBRATION_CANDIDATES),
    "ci": _fraction(open_low=True),
    # 09 streaming heads (sink + window attention, the KV budget)
    "sink": _at_least(0),  # 0: window attention
    **dict.fromkeys(["score_window", "score_texts", "budget_steps", "kv_context", "curve_window", "bin_size",
                     "ablation_window"], _at_least(1)),
    **dict.fromkeys(["score_len", "curve_len", "curve_ref_len", "ablation_len"], _at_least(3)),
    "tolerances": _positive_floats,  # loss increases in nats
    "cheap_share": _fraction(open_low=True),
    "ablation_sinks": _ints_at_least(0),
    "ablation_windows": _ints_at_least(1),
}
# parameters that name a file: the runner passes them as absolute paths (the notebooks run in the checkout)
PATH_PARAMS = ("items_file", "heads_from", "selection_from")


def check_value(name: str, value: Any) -> Any:
    """Check the value of parameter ``name`` with its entry of :data:`VALUE_CHECKS` (if any); return it.

    Args:
        name: the parameter name, as declared in a notebook's parameters cell.
        value: its value, already of the declared type (:func:`coerce_value`).
    """
    check = VALUE_CHECKS.get(name)
    if check is not None:
        check(name, value)
    return value


def check_params(namespace: dict) -> dict:
    """Validate the annotated parameters in a notebook's globals (type, then value); return them as a dict.

    ints are accepted for float parameters (papermill passes ``-p eps 1`` as an int).

    Args:
        namespace: the notebook's ``globals()`` after its parameters cell (and papermill's injected one).
    """
    annotations = namespace.get("__annotations__", {})
    if not annotations:
        raise InputError("No annotated parameters found: declare them as `name: type = value` in the parameters cell.")
    params = {}
    for name, kind in annotations.items():
        kind = _TYPES.get(kind, kind) if isinstance(kind, str) else kind
        if name not in namespace:
            raise InputError(f"Parameter {name} is declared but has no value.")
        params[name] = namespace[name] = check_value(name, coerce_value(name, namespace[name], kind))
    return params


def parameters_cell(notebook: str | Path) -> dict:
    """The (single) code cell tagged ``parameters`` of a notebook file.

    Args:
        notebook: path of the ``.ipynb`` file.
    """
    cells = json.loads(Path(notebook).read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise InputError(f"{notebook} must have exactly one cell tagged 'parameters', found {len(tagged)}.")
    return tagged[0]


def notebook_parameters(notebook: str | Path) -> dict[str, tuple[type, Any]]:
    """``{name: (type, default)}`` read from the annotated assignments of the parameters cell.

    Args:
        notebook: path of the ``.ipynb`` file.
    """
    cell = parameters_cell(notebook)
    source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            kind = _TYPES.get(ast.unparse(node.annotation))
            if kind is None:
                raise InputError(f"{notebook}: parameter {node.target.id} has unsupported type "
                                 f"{ast.unparse(node.annotation)}.")
            found[node.target.id] = (kind, ast.literal_eval(node.value) if node.value is not None else None)
    return found
