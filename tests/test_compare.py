"""The cross-model report, from run folders whose files are written here with known numbers (the summaries'
layout as the notebooks write it); the command line on them; bad input. A real run of three models, compared and
rendered in Chromium, is in tests/test_browser.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sinklens as sl
from sinklens.report.compare import compare_runs, write_comparison
from sinklens.series.cli import main


def write_run(folder: Path, model: str, rates: list[float], massive: dict, specialized: tuple[int, int],
              lengths: dict[int, list[float]] | None = None, best: dict | None = None) -> Path:
    """A run folder holding what notebooks 01, 02, 05 and 06 write (only the fields the report reads, plus some)."""
    (folder / "tables").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"model": model, "status": "ok"}))
    n_layers = len(rates)
    info = {"name": model, "model_type": "llama", "n_layers": n_layers, "n_heads": 4}
    overall = sum(rates) / n_layers
    (folder / "sink_discovery.json").write_text(json.dumps({
        "model": info, "eps": 0.3, "n_heads": 4 * n_layers, "sink_rate_pct": overall,
        "sink_rate_by_layer_pct": {str(i): r for i, r in enumerate(rates)}, "massive_dims_by_layer": massive}))
    (folder / "specialized_heads.json").write_text(json.dumps({"n_specialized": specialized[0],
                                                               "n_heads": specialized[1], "heads": []}))
    if lengths is not None:
        rows = ["length,layer,sink_rate"] + [f"{length},{layer},{rate}" for length, per_layer in lengths.items()
                                             for layer, rate in enumerate(per_layer)]
        (folder / "tables" / "sink_rate_by_length.csv").write_text("\n".join(rows) + "\n")
    if best is not None:
        (folder / "layer_selection.json").write_text(json.dumps({"settings": {"k": 10, "target_retention": 0.91},
                                                                 "best": best}))
    return folder


@pytest.fixture
def runs(tmp_path):
    a = write_run(tmp_path / "a", "smollm2-135m", [0.0, 50.0, 100.0], {"1": [7, 9], "2": [9]}, (5, 12),
                  lengths={64: [0.0, 60.0, 90.0], 256: [0.0, 30.0, 60.0]},
                  best={"layers": [1, 2], "n_heads": 6, "retention": 0.95})
    b = write_run(tmp_path / "b", "/models/tiny-qwen2", [10.0, 20.0, 30.0, 40.0, 50.0], {}, (0, 20))  # 01 and 02 only
    return a, b


def test_the_comparison_reads_each_run_folders_numbers(runs):
    a, b = runs
    comparison = compare_runs([a, b])
    summary = comparison.summary.set_index("model")
    assert list(summary.index) == ["smollm2-135m", "tiny-qwen2"]
    assert summary.loc["smollm2-135m", "sink_rate_pct"] == pytest.approx(50.0)
    assert summary.loc["tiny-qwen2", "sink_rate_pct"] == pytest.approx(30.0)
    assert summary.loc["smollm2-135m", "specialized_share"] == pytest.approx(5 / 12)
    assert summary.loc["tiny-qwen2", "specialized_share"] == 0
    assert summary.loc["smollm2-135m", "massive_dims"] == [7, 9]
    assert summary.loc["smollm2-135m", "massive_dims_layers"] == "9: L1-2 (2 layers); 7: L1"
    assert summary.loc["tiny-qwen2", "massive_dims_layers"] == "none"
    # sink rate against length: the mean over layers
    assert summary.loc["smollm2-135m", "sink_rate_pct_shortest"] == pytest.approx(50.0)
    assert summary.loc["smollm2-135m", "sink_rate_pct_longest"] == pytest.approx(30.0)
    assert comparison.length["length"].tolist() == [64, 256]
    assert summary.loc["smollm2-135m", "best_retention"] == 0.95 and summary.loc["smollm2-135m", "k"] == 10
    assert summary.loc["smollm2-135m", "best_layers"] == "1,2"
    # relative depth: layer / (n_layers - 1), so a 3-layer and a 5-layer model line up
    depth = comparison.depth
    assert depth[depth["model"] == "tiny-qwen2"]["relative_depth"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert depth[depth["model"] == "smollm2-135m"]["relative_depth"].tolist() == [0.0, 0.5, 1.0]
    assert comparison.missing["tiny-qwen2"] == ["layer_selection.json (notebook 05)",
                                                "tables/sink_rate_by_length.csv (notebook 06)"]


def test_the_report_page_and_command_line(runs, tmp_path, capsys):
    a, b = runs
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    page = tmp_path / "cmp" / "index.html"
    assert f"Comparison: {page}" in capsys.readouterr().out
    text = page.read_text()
    assert (tmp_path / "cmp" / "plotly.min.js").is_file() and '<script src="plotly.min.js">' in text
    assert "http" not in text.replace("http://www.w3.org", "")  # offline: no remote script or style
    for name in ("sink_rate_by_depth", "sink_rate_by_length", "specialized_share", "best_retention"):
        assert f'id="{name}"' in text
    assert "tiny-qwen2: no layer_selection.json (notebook 05)" in text
    assert (tmp_path / "cmp" / "summary.csv").read_text().count("\n") == 3
    # the same model twice gets the run folder's name beside it
    twice = compare_runs([a, write_run(tmp_path / "a2", "smollm2-135m", [1.0, 2.0, 3.0], {}, (1, 12))])
    assert twice.summary["model"].tolist() == ["smollm2-135m", "smollm2-135m (a2)"]


def test_bad_input_is_refused_naming_it(runs, tmp_path, capsys):
    with pytest.raises(sl.InputError, match="does not exist"):
        write_comparison([tmp_path / "nowhere"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(sl.InputError, match="is not a run folder"):
        compare_runs([tmp_path / "empty"])
    (runs[0] / "sink_discovery.json").write_text("{not json")
    with pytest.raises(sl.InputError, match="sink_discovery.json is not readable JSON"):
        compare_runs([runs[0]])
    assert main(["run", "--ray", "--ci"]) == 2
    assert "--ray runs several models as Ray tasks: pass them with --models" in capsys.readouterr().err
    assert main(["run", "--models", "a", "a"]) == 2
    assert "--models needs distinct model names" in capsys.readouterr().err
