"""One version: sinklens.__version__ is pyproject.toml's, and what manifests and result files record."""

from __future__ import annotations

import re
from pathlib import Path

import sinklens as sl
from sinklens.assess import sweep
from sinklens.core import version
from sinklens.prune import checkpoint


def test_version_is_pyprojects():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]  # the [project] table (tomllib needs Python 3.11)
    assert sl.__version__ == re.search(r'^version = "([^"]+)"$', project, re.MULTILINE).group(1)
    assert checkpoint.__version__ is version.__version__ and sweep.__version__ is version.__version__
