"""The notebook series (`python -m sinklens run --ci`) on two tiny non-Llama families: GPT-2 and Qwen2 (GQA).

Each run executes every notebook of the series on a random-init checkpoint folder of tests/tiny_families.py
(about 100 s per family on 2 busy CPU cores). The probe's eps and q are lowered so that a random model has
sink-specialized heads, and the k grid stays within the tiny width (48).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sinklens.series import runner

from tiny_families import build_family_checkpoint

REPO = Path(__file__).resolve().parent.parent
TINY_OVERRIDES = ["-p", "eps=0.1", "-p", "q=0.5", "-p", "ks=[1, 10, 40]"]


@pytest.mark.notebook
@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_series_ci_runs_on_a_tiny_family(family, tmp_path):
    folder = build_family_checkpoint(tmp_path / f"tiny-{family}", family)
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "sinklens", "run", "--ci", "--model", str(folder), "--out", str(out),
                           *TINY_OVERRIDES], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = (out / "latest").resolve()
    manifest = json.loads((run_dir / runner.MANIFEST).read_text())
    notebooks = runner.discover_notebooks(REPO / "notebooks")
    assert manifest["status"] == "ok" and manifest["ci"] is True
    assert [entry["notebook"] for entry in manifest["notebooks"]] == [path.name for path in notebooks]
    assert all(entry["status"] == "ok" for entry in manifest["notebooks"])
    discovery = json.loads((run_dir / "sink_discovery.json").read_text())
    assert discovery["model"]["model_type"] == family
    selection = json.loads((run_dir / "layer_selection.json").read_text())
    assert selection["heads"] and selection["cost"]["configs_evaluated"] > 0  # evaluate ran on the family
    assert all(math.isfinite(selection["dense"][split]["lm/ppl"]) for split in ("calibration", "heldout"))
