"""Typed notebook parameters and the checks of their values.

A notebook's ``parameters`` cell declares annotated variables (``n_prompts: int = 64``). The
annotations are the single source of the parameter types: :func:`check_params` validates the
kernel's values against them after papermill's injected cell, and :func:`notebook_parameters`
reads them from the ``.ipynb`` file (for validating a command line before anything runs).

Values are checked too, by name, with the package's own choices (:data:`VALUE_CHECKS`): the
runner applies the same checks to a command line before it creates a run folder or starts a
kernel, and a notebook opened in JupyterLab applies them in its second cell. A parameter that
is not listed there is only type-checked; the package function that receives it checks the rest.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..assess.selection import HEAD_REMOVAL_CHOICES, STRATEGIES
from ..core.errors import InputError
from ..core.validate import as_int, check_choice, check_fraction
from ..measure.massive import BASES
from ..prune.spec import GQA_POLICIES

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
            raise InputError(f"Parameter {name} must be an int >= {low}, got {value!r}.")
    return check


def _ints_at_least(low: int) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, list) or any(as_int(v) is None or v < low for v in value):
            raise InputError(f"Parameter {name} must be a list of ints >= {low}, e.g. [{max(low, 1)}, 10], "
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


def _choice(choices: Sequence[str]) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        check_choice(name, value, choices)
    return check


def _choices(choices: Sequence[str]) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, list) or not value:
            raise InputError(f"Parameter {name} must be a non-empty list drawn from {tuple(choices)}, got {value!r}.")
        for item in value:
            check_choice(f"entry of {name}", item, choices)
    return check


def _existing_file_or_empty(name: str, value: Any) -> None:
    if value and not Path(value).expanduser().is_file():
        raise InputError(f"Parameter {name}: {value} is not a file. Pass an existing file, or leave it empty.")


# Model-independent checks (a model's own limits, such as k <= d_model, are checked where it is loaded).
VALUE_CHECKS: dict[str, Callable[[str, Any], None]] = {
    **dict.fromkeys(["n_prompts", "batch_size", "n_boot", "top_n", "k", "model_prompts", "limit", "n_lm_prompts",
                     "n_copy", "greedy_pool", "exhaustive_pool", "exhaustive_size", "patience"], _at_least(1)),
    **dict.fromkeys(["seq_len", "lm_seq_len"], _at_least(2)),
    **dict.fromkeys(["view_prompt", "n_random"], _at_least(0)),
    "layer": _at_least(-1),
    **dict.fromkeys(["eps", "q", "non_first_threshold"], _fraction()),
    "target_retention": _fraction(open_low=True),
    **dict.fromkeys(["thresholds", "targets"], _fractions),
    **dict.fromkeys(["ks", "k_values"], _ints_at_least(1)),
    **dict.fromkeys(["seeds", "model_seeds"], _ints_at_least(0)),
    "basis": _choice(BASES),
    "gqa": _choice(GQA_POLICIES),
    "head_removal": _choice(HEAD_REMOVAL_CHOICES),
    **dict.fromkeys(["strategies", "selection_strategy"], _choices(STRATEGIES)),
    "items_file": _existing_file_or_empty,
}


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
