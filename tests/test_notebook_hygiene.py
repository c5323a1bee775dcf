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


def _saved_outputs(path: Path) -> set[tuple[str, str]]:
    """(kind, name) of every ``run.save_*(..., "name")`` call with a literal name in a notebook."""
    nb = json.loads(path.read_text())
    found = set()
    for cell in (c for c in nb["cells"] if c["cell_type"] == "code"):
        for node in ast.walk(ast.parse("".join(cell["source"]))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr.startswith("save_") and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "run"):
                kind = {"save_html": "figure"}.get(node.func.attr, node.func.attr[len("save_"):])
                names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                found |= {(kind, name) for name in names}
    return found


def test_no_two_notebooks_write_the_same_output():
    # the series shares one run folder: a name saved by two notebooks would be overwritten by the later one
    owners: dict[tuple[str, str], list[str]] = {}
    for path in NOTEBOOKS:
        for output in _saved_outputs(path):
            owners.setdefault(output, []).append(path.name[:2])
    assert sum(len(_saved_outputs(p)) for p in NOTEBOOKS) > 20  # the scan sees the notebooks' outputs
    assert {output: nbs for output, nbs in owners.items() if len(nbs) > 1} == {}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_reads_every_parameter(path, capfd):
    """papermill parses each parameter line itself (its --help-notebook, the types of -p values): a line it cannot
    parse (e.g. quotes inside the comment) is skipped with a printed "Unable to parse line"."""
    import papermill

    found = papermill.inspect_notebook(str(path))
    out, err = capfd.readouterr()
    assert "Unable to parse" not in out + err, out + err
    assert sorted(found) == sorted(notebook_parameters(path)), "papermill and sinklens read other parameters"
