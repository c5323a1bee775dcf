"""One version: pyproject.toml's, which the installed distribution carries, sinklens.__version__ reports, and
checkpoint manifests and results files record."""

from __future__ import annotations

import re
import sqlite3
from importlib import metadata
from pathlib import Path

import sinklens as sl
from sinklens.assess.sweep import open_results

from helpers import build_tiny_checkpoint


def pyproject_version() -> str:
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]  # the [project] table (tomllib needs Python 3.11)
    return re.search(r'^version = "([^"]+)"$', project, re.MULTILINE).group(1)


def test_version_is_pyprojects(tmp_path):
    # a stale install (pyproject's version bumped, pip install -e . not rerun) or none at all fails here
    assert metadata.version("sinklens") == pyproject_version()
    assert sl.__version__ == pyproject_version()
    # what a pruned checkpoint's manifest and a results file record
    tiny = sl.load_model(str(build_tiny_checkpoint(tmp_path / "tiny", 4, 4)), device="cpu")
    with sl.remove_heads(tiny, [(0, 1)]):
        folder = sl.save_pruned(tiny, tmp_path / "ck")
    assert sl.read_manifest(folder)["sinklens_version"] == pyproject_version()
    open_results(tiny, tmp_path / "results.sqlite").close()
    with sqlite3.connect(tmp_path / "results.sqlite") as conn:
        assert conn.execute("SELECT value FROM meta WHERE name = 'sinklens'").fetchone() == (pyproject_version(),)
