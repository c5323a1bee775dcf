"""Typed notebook parameters.

A notebook's ``parameters`` cell declares annotated variables (``n_prompts: int = 64``). The
annotations are the single source of the parameter types: :func:`check_params` validates the
kernel's values against them after papermill's injected cell, and :func:`notebook_parameters`
reads them from the ``.ipynb`` file (for validating a command line before anything runs).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

from .errors import InputError

_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}


def _coerce(name: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise InputError(f"Parameter {name} must be {kind.__name__}, got {value!r} ({type(value).__name__}).")
    return value


def check_params(namespace: dict) -> dict:
    """Validate the annotated parameters in a notebook's globals; return them as a dict.

    ints are accepted for float parameters (papermill passes ``-p eps 1`` as an int).
    """
    annotations = namespace.get("__annotations__", {})
    if not annotations:
        raise InputError("No annotated parameters found: declare them as `name: type = value` in the parameters cell.")
    params = {}
    for name, kind in annotations.items():
        kind = _TYPES.get(kind, kind) if isinstance(kind, str) else kind
        if name not in namespace:
            raise InputError(f"Parameter {name} is declared but has no value.")
        params[name] = namespace[name] = _coerce(name, namespace[name], kind)
    return params


def parameters_cell(notebook: str | Path) -> dict:
    """The (single) code cell tagged ``parameters`` of a notebook file."""
    cells = json.loads(Path(notebook).read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise InputError(f"{notebook} must have exactly one cell tagged 'parameters', found {len(tagged)}.")
    return tagged[0]


def notebook_parameters(notebook: str | Path) -> dict[str, tuple[type, Any]]:
    """``{name: (type, default)}`` read from the annotated assignments of the parameters cell."""
    cell = parameters_cell(notebook)
    source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            kind = _TYPES.get(ast.unparse(node.annotation))
            if kind is None:
                raise InputError(f"{notebook}: parameter {node.target.id} has unsupported type {ast.unparse(node.annotation)}.")
            found[node.target.id] = (kind, ast.literal_eval(node.value) if node.value is not None else None)
    return found
