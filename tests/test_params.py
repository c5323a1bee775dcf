"""Notebook parameters: every one the series declares has a value check, a bad value is refused before a run
folder exists, and the command line refuses it without importing the heavy stack."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sinklens.core import choices
from sinklens.core.errors import InputError
from sinklens.series import runner
from sinklens.series.params import VALUE_CHECKS, check_value, notebook_parameters

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
SERIES = runner.discover_notebooks(NOTEBOOKS)


def _declared() -> dict[str, list[str]]:
    """``{parameter: [notebooks declaring it]}`` over the whole series."""
    found: dict[str, list[str]] = {}
    for notebook in SERIES:
        for name in notebook_parameters(notebook):
            found.setdefault(name, []).append(notebook.name[:2])
    return found


def test_every_declared_parameter_has_a_value_check():
    missing = {name: users for name, users in _declared().items() if name not in VALUE_CHECKS}
    assert not missing, ("parameters without a value check in sinklens.series.params.VALUE_CHECKS "
                         f"(name: notebooks declaring it): {missing}")


@pytest.mark.parametrize("notebook", SERIES, ids=lambda path: path.name[:2])
def test_every_default_passes_its_check(notebook):
    for name, (_, default) in notebook_parameters(notebook).items():
        check_value(name, default)  # a check stricter than the notebook's own default would refuse every run


# A bad value of each parameter that gained a check, as `-p NAME=VALUE` text, and the notebook that declares it.
BAD = [
    ("02", "top_heads", "0"),
    ("05", "metric", "accuracy"),
    ("06", "lengths", "[64, 1]"),
    ("06", "lengths", "[]"),
    ("06", "n_long_prompts", "0"),
    ("06", "first_keys", "0"),
    ("06", "detail_length", "1"),
    ("06", "view_keys", "0"),
    ("07", "n_calibration", "0"),
    ("07", "n_held_out", "0"),
    ("07", "max_heads", "-1"),
    ("07", "compare_ks", "[5, 0]"),
    ("07", "pool", "0"),
    ("07", "policies", "[bos_top, best]"),
    ("07", "policies", "bos_top"),
    ("07", "all_heads_policies", "[]"),
    ("07", "fills", "[median]"),
    ("07", "temperatures", "[platt]"),
    ("07", "temperatures", "[True, True]"),
    ("07", "heads_from", "/no/such/specialized_heads.json"),
    ("08", "selection_from", "/no/such/layer_selection.json"),
    ("08", "beta", "1.5"),
    ("08", "threshold", "0"),
    ("08", "threshold", "1.0"),
    ("08", "min_queries", "0"),
    ("08", "candidates", "some"),
    ("08", "n_candidates", "0"),
    ("08", "screen_layers", "0"),
    ("08", "screen_prompts", "0"),
    ("08", "top_m", "-1"),
    ("08", "ci", "0"),
    ("09", "sink", "-1"),
    ("09", "score_window", "0"),
    ("09", "score_len", "2"),
    ("09", "tolerances", "[0.02, -0.1]"),
    ("09", "tolerances", "[]"),
    ("09", "cheap_share", "0"),
    ("09", "ablation_sinks", "[0, -1]"),
    ("09", "ablation_windows", "[0]"),
    ("09", "curve_len", "1"),
]


@pytest.mark.parametrize("notebook, name, text", BAD, ids=[f"{name}={text}" for _, name, text in BAD])
def test_a_bad_value_is_refused_before_a_run_folder_exists(tmp_path, notebook, name, text):
    out = tmp_path / "runs"
    with pytest.raises(InputError) as caught:
        runner.plan_run(NOTEBOOKS, only=[notebook], overrides={name: text}, out=out)
    message = str(caught.value)
    assert message.startswith(f"-p {name}=") and "\n" not in message, message
    assert f"{name}" in message.split(":", 1)[1], message
    assert not out.exists()


@pytest.mark.parametrize("name, constant", [("policies", choices.POLICIES), ("all_heads_policies", choices.POLICIES),
                                            ("fills", choices.FILLS)])
def test_choice_parameters_take_the_package_choices(name, constant):
    check_value(name, list(constant))  # every choice of the package passes
    with pytest.raises(InputError, match=f"use one of {tuple(constant)}".replace("(", r"\(").replace(")", r"\)")):
        check_value(name, ["no-such-choice"])


def test_runner_set_parameters_are_checked_in_a_notebook_run_by_hand():
    for name in runner.RESERVED:
        with pytest.raises(InputError, match=f"Parameter {name} must be a non-empty string, e.g. {name}="):
            check_value(name, " ")


def test_choices_are_one_definition_re_exported_by_the_modules_that_use_them():
    from sinklens.assess import selection
    from sinklens.core import embedded
    from sinklens.measure import massive
    from sinklens.prune import spec

    assert spec.POLICIES is choices.POLICIES and spec.FILLS is choices.FILLS
    assert spec.GQA_POLICIES is choices.GQA_POLICIES
    assert selection.STRATEGIES is choices.STRATEGIES and selection.HEAD_REMOVAL_CHOICES is choices.HEAD_REMOVAL_CHOICES
    assert massive.BASES is choices.BASES and embedded.EMBEDDED_MODELS is choices.EMBEDDED_MODELS


HEAVY = ("torch", "pandas", "numpy", "transformers", "transformer_lens", "plotly", "papermill")


def test_command_line_refuses_a_bad_value_with_one_line_and_imports_nothing_heavy(tmp_path):
    """`python -m sinklens run -p policies=[bos_top, best]` from a folder outside the checkout: exit 2, one line
    naming the parameter, no run folder, and (``-X importtime`` lists every module imported) none of the heavy
    stack imported on the way."""
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "sinklens", "run", "-p",
                           "policies=[bos_top, best]", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    messages = [line for line in lines if not line.startswith("import time:")]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(messages) == 1 and messages[0].startswith("error: -p policies=[bos_top, best]: "), messages
    assert "Unknown entry of policies 'best'" in messages[0]
    assert "sinklens.series.params" in imported  # the listing is real
    heavy = sorted(name for name in imported if name.split(".")[0] in HEAVY)
    assert not heavy, f"the command line imported heavy modules before refusing a bad value: {heavy[:10]}"
    assert not out.exists()
