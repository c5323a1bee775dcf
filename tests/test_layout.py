"""The package's layout rules, checked on its source: imports flow one way through the stages (core, measure,
prune, assess, report, series), no module imports another's private names, and the tree is ruff-clean
(pinned in requirements.txt, configured in pyproject.toml)."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sinklens"


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            yield node


def test_no_module_imports_another_modules_private_names():
    found = [f"{path.relative_to(ROOT)}:{node.lineno} {alias.name}"
             for path in sorted(PACKAGE.rglob("*.py")) for node in _imports(path) if node.level >= 1 or
             (node.module or "").startswith("sinklens")
             for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not found, f"private names imported across modules (make them public where they belong): {found}"


STAGES = ("core", "measure", "prune", "assess", "report", "series")


def _stage_of_module(dotted: str) -> str | None:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "sinklens" and parts[1] in STAGES else None


def _imported_modules(path: Path, root: Path = PACKAGE):
    """(line, absolute dotted module) of every sinklens import in ``path`` (below ``root``), relative ones
    resolved."""
    package = ["sinklens", *path.relative_to(root).with_suffix("").parts]
    package = package[:-1]  # a module's package (an __init__'s own package is its folder: same climb below)
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
                names = [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
            else:
                names = [node.module or ""]
            for name in names:
                yield node.lineno, name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            yield node.lineno, node.args[0].value


def test_every_module_lives_in_a_stage():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert not loose, f"modules outside the stage subpackages {STAGES}: {loose}"


def test_imports_flow_one_way_through_the_stages():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) < 2 or parts[0] not in STAGES:
            continue  # sinklens/__init__.py (the lazy table of every stage) and __main__ (the command line)
        own = STAGES.index(parts[0])
        for line, module in _imported_modules(path):
            stage = _stage_of_module(module)
            if stage is not None and STAGES.index(stage) > own:
                found.append(f"{path.relative_to(ROOT)}:{line} ({parts[0]}) imports {module} ({stage})")
    assert not found, f"imports against the stage order {' < '.join(STAGES)}: {found}"


def test_the_layering_rule_sees_an_upward_import(tmp_path):
    # the rule above on a made-up module: a relative import climbing from core into report is reported
    fake = tmp_path / "sinklens" / "core" / "probe.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from ..report.views import attention_view\nfrom . import edits\n")
    assert [m for _, m in _imported_modules(fake, tmp_path / "sinklens")] == ["sinklens.report.views",
                                                                               "sinklens.core.edits"]


def test_research_modules_do_not_import_the_series_machinery():
    # __main__ is the command line (python -m sinklens): the one place that starts the series
    research = [p for p in PACKAGE.rglob("*.py") if "series" not in p.relative_to(PACKAGE).parts
                and p.name != "__main__.py"]
    found = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in research for node in _imports(path)
             if "series" in (node.module or "").split(".")]
    assert not found, f"research modules import sinklens.series: {found}"


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.fail("ruff is not installed in this environment: it is pinned in requirements.txt (make test "
                    "installs it)")
    result = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_notebooks_use_only_the_top_level_names():
    # a notebook calls the package through `sl.` (or `from sinklens import <public name>`) and the series harness
    import json

    import sinklens as sl

    found = []
    for notebook in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                found += [f"{notebook.name}: import {a.name}" for a in node.names
                          if a.name.startswith("sinklens") and a.name != "sinklens"]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sinklens"):
                if node.module == "sinklens":
                    found += [f"{notebook.name}: from sinklens import {a.name}" for a in node.names
                              if a.name not in sl.__all__]
                elif node.module != "sinklens.series":
                    found.append(f"{notebook.name}: from {node.module} import ...")
    assert not found, f"notebooks reach past sinklens' public names: {found}"


def test_the_ray_extra_and_the_test_requirements_pin_the_same_ray():
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ray"]
    pinned = [line.strip() for line in (ROOT / "requirements-ray.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert extra == pinned and len(pinned) == 1 and "==" in pinned[0], (extra, pinned)
