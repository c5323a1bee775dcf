"""Committed notebooks: valid, output-free, one typed `parameters` cell validated right after it."""

import ast
import json
from pathlib import Path

import pytest

from sinklens.series.params import notebook_parameters

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_the_series_exists():
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_hygiene(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "strip outputs"
    tagged = [i for i, c in enumerate(code) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert tagged == [0], "exactly one parameters cell, the first code cell"
    check = "".join(code[1]["source"])
    assert "check_params(globals())" in check, "the cell after the parameters validates their types"
    params = notebook_parameters(path)
    assert {"model_name", "out_dir"} <= set(params)
    for name, (kind, default) in params.items():
        assert isinstance(default, kind), f"{name}: default {default!r} is not {kind.__name__}"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    for cell in code:  # notebooks call the package: no function or class definitions of their own
        tree = ast.parse("".join(cell["source"]))
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
