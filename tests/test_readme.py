"""The README's Python example runs as written (smaller sizes), on the session's embedded model."""

import re
from pathlib import Path

import pytest

import sinklens as sl

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[1] / "README.md"
SMALLER = {  # README text -> the same call with CI sizes
    "n_prompts=64": "n_prompts=8",
    "sl.evaluate(model)": "sl.evaluate(model, limit=4, n_lm_prompts=2, n_copy=2, show_progress=False)",
    '"pruned-k10"': "str(OUT)",
}


def test_readme_python_example_runs(smollm, tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    for text, smaller in SMALLER.items():
        assert text in code, f"the README example no longer contains {text!r}: update this test"
        code = code.replace(text, smaller)
    monkeypatch.setattr(sl, "load_model", lambda *args, **kwargs: smollm)
    names = {"OUT": tmp_path / "pruned"}
    exec(compile(code, str(README), "exec"), names)
    assert names["heads"] and len(names["errors"]) == len(names["heads"])
    assert (names["errors"]["frob_rel"] > 0).all()
    assert names["pruned"].metrics["acc/mean"] != names["dense"].metrics["acc/mean"]
    assert (tmp_path / "pruned" / "sinklens_manifest.json").is_file()
    assert not sl.active_edits(smollm)  # the example restores the shared model
