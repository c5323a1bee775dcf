"""The package's layout rules, checked on its source: no module imports another's private names, the
series machinery stays out of the research modules, and the tree is ruff-clean (pinned in requirements.txt,
configured in pyproject.toml)."""

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
