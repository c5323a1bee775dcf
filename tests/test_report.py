"""The run report (index.html), the headline numbers and the README block, on run folders built here."""

import html
import json
import os
import re
import time
from html.parser import HTMLParser

import nbformat
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from sinklens import report, runner
from sinklens.errors import InputError
from sinklens.runs import RunFolder
from sinklens.views import AttentionView, views_page
from test_runner import _write_notebook

README = """# project

Intro text.

## Headline numbers

<!-- headline:start -->
old numbers
<!-- headline:end -->

## After
Text after the block.
"""


def _executed(path, title):
    nbformat.write(new_notebook(cells=[new_markdown_cell(f"# {title}\n\nWhat it does."), new_code_cell("1 + 1")]),
                   str(path))


def make_run(root, failed=False, outputs=True):
    """A run folder as the runner leaves it: notebook 01 ok (summary, table, plotly figure, attention view),
    02 ok (summary) or failed, 03 not run after a failure; plus a file no notebook claims."""
    run_dir = root / "20260101-000000-tiny"
    run = RunFolder(run_dir)
    _executed(run_dir / "01_alpha.ipynb", "01 Alpha study")
    run.save_json({"model": {"name": "tiny", "n_layers": 2}, "parameters": {"n_prompts": 4},
                   "sink_rate_pct": 67.604, "n_heads": 8, "strongest_head": {"layer": 1, "head": 3},
                   "by_layer": {str(i): i / 10 for i in range(30)}, "verdict": "position",
                   "heads": [[1, 3], [1, 2]]}, "alpha_summary")
    run.save_table(pd.DataFrame({"layer": range(25), "score": [i / 7 for i in range(25)]}), "scores")
    run.save_figure(go.Figure(go.Scatter(x=[0, 1, 2], y=[3, 1, 2])).update_layout(title="alpha <figure>"),
                    "alpha_curve")
    view = AttentionView(layer=1, heads=[0, 1], tokens=["<s>", "a", "b"], pattern=torch.eye(3).expand(2, 3, 3),
                         title="tiny view")
    run.save_html(views_page([view]), "attention_alpha")
    first = ["alpha_summary.json", "figures/alpha_curve.html", "figures/attention_alpha.html", "figures/plotly.min.js",
             "tables/scores.csv"]
    time.sleep(0.02)
    _executed(run_dir / "02_beta.ipynb", "02 Beta check")
    run.save_json({"headline": {"kept": 5, "error": 0.25}, "details": list(range(100))}, "beta_summary")
    (run_dir / "extra.sqlite").write_bytes(b"not really")
    entries = [{"notebook": "01_alpha.ipynb", "parameters": {"model_name": "tiny", "n_prompts": 4,
                                                             "out_dir": str(run_dir)},
                "passed": {"model_name": "tiny", "n_prompts": 4, "out_dir": str(run_dir)}, "status": "ok",
                "wall_s": 12.5, "outputs": first, "output": "01_alpha.ipynb"},
               {"notebook": "02_beta.ipynb", "parameters": {"model_name": "tiny", "out_dir": str(run_dir)},
                "passed": {"model_name": "tiny", "out_dir": str(run_dir)}, "status": "ok", "wall_s": 3.25,
                "outputs": ["beta_summary.json"]}]
    if failed:
        entries[1] |= {"status": "failed", "error": {"cell_index": 3, "exec_count": 2, "ename": "ValueError",
                                                     "evalue": "boom <b>from</b> beta"}}
        entries.append({"notebook": "03_gamma.ipynb", "parameters": {}, "passed": {}, "status": "not run",
                        "wall_s": None})
    if not outputs:
        for entry in entries:
            entry.pop("outputs", None)
    manifest = {"model": "tiny", "run_dir": str(run_dir), "started": "2026-01-01T00:00:00+0000",
                "finished": "2026-01-01T00:01:00+0000", "ci": False, "argv": ["run", "--only", "01", "02"],
                "versions": {"python": "3.11", "sinklens": "0.1.0"}, "git": {"commit": "abc1234def5678", "dirty": True},
                "status": "failed" if failed else "ok", "wall_s": 15.75, "notebooks": entries}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return run_dir


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [(tag, name, value) for name, value in attrs if name in ("src", "href") and value]


def _links(path):
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.links


def test_index_links_and_embeds_every_output(tmp_path):
    run_dir = make_run(tmp_path)
    index = report.write_report(run_dir, png=False)
    assert index == run_dir / "index.html"
    page = index.read_text()
    # notebooks: title from the executed notebook, status, wall time, link to it
    assert "01 Alpha study" in page and "02 Beta check" in page
    assert page.count('<span class="status ok">ok</span>') == 5  # run, two notebooks in the contents and headings
    assert "12.5 s" in page and 'href="01_alpha.ipynb"' in page and 'href="02_beta.ipynb"' in page
    # headline numbers: scalars and small mappings, no setting or long mappings; a summary's own headline wins
    assert "sink_rate_pct" in page and "67.6<" in page and "strongest_head.layer" in page
    assert ">kept<" in page and ">0.25<" in page
    cards = page.split('id="headline"')[1].split('<h2 id="nb-')[0]
    assert "by_layer" not in cards and "n_layers" not in cards and "n_prompts" not in cards
    # the whole summary is there too, long values shortened
    assert "by_layer" in page and "(100 items)" in page
    # tables: first rows, row count, link to the CSV
    assert 'href="tables/scores.csv"' in page and "first 10 of 25 rows, 2 columns" in page
    assert "<td>0.1429</td>" in page and "<td>24</td>" not in page
    # figures: plotly and the attention view as iframes of the local files
    assert '<iframe src="figures/alpha_curve.html"' in page and '<iframe src="figures/attention_alpha.html"' in page
    assert "(attention view)" in page
    # the file no notebook wrote, and the parameters that were set for this run
    assert 'href="extra.sqlite"' in page and "Other files" in page
    assert "n_prompts</th><td>4 (set for this run)" in page
    assert "commit abc1234def with uncommitted changes" in page


def test_index_of_a_failed_run_shows_the_failure(tmp_path):
    run_dir = make_run(tmp_path, failed=True)
    page = report.write_report(run_dir, png=False).read_text()
    assert '<span class="status failed">failed</span>' in page
    assert "cell 2: ValueError: boom &lt;b&gt;from&lt;/b&gt; beta" in page  # escaped, never markup
    assert "Full traceback in the executed notebook." in page
    assert '<span class="status not-run">not run</span>' in page and "Not run: an earlier notebook failed." in page
    assert "03 gamma" in page  # no executed copy: title from the file name
    assert '<iframe src="figures/alpha_curve.html"' in page  # what finished is still shown


def test_report_pages_load_nothing_from_the_network(tmp_path):
    run_dir = make_run(tmp_path)
    report.write_report(run_dir, png=False)
    pages = [run_dir / "index.html", *sorted((run_dir / "figures").glob("*.html"))]
    assert len(pages) == 3
    for page in pages:
        for tag, name, value in _links(page):
            assert not re.match(r"^\s*([a-z][a-z0-9+.-]*:|//)", value, re.I), f"{page.name}: <{tag} {name}={value}>"
            target = page.parent / value.split("#")[0] if not value.startswith("#") else page
            assert target.exists(), f"{page.name}: broken link {value}"
    text = (run_dir / "index.html").read_text()
    assert "<script" not in text and "@import" not in text and "url(" not in text


def test_outputs_of_older_manifests_go_by_modification_time(tmp_path):
    run_dir = make_run(tmp_path, outputs=False)
    base = time.time() - 1000
    stamps = {"alpha_summary.json": 10, "tables/scores.csv": 11, "figures/alpha_curve.html": 12,
              "figures/attention_alpha.html": 13, "01_alpha.ipynb": 20, "beta_summary.json": 30,
              "02_beta.ipynb": 40, "extra.sqlite": 50}
    for rel, offset in stamps.items():
        os.utime(run_dir / rel, (base + offset, base + offset))
    notebooks, unclaimed = report.attribute_outputs(run_dir, report.read_manifest(run_dir))
    assert [p.name for p in notebooks[0].summaries] == ["alpha_summary.json"]
    assert [p.name for p in notebooks[0].tables] == ["scores.csv"]
    assert sorted((f.path.name, f.kind) for f in notebooks[0].figures) == [("alpha_curve.html", "plotly"),
                                                                          ("attention_alpha.html", "attention")]
    assert [p.name for p in notebooks[1].summaries] == ["beta_summary.json"]
    assert unclaimed == ["extra.sqlite"]


def test_headline_numbers():
    summary = {"model": {"name": "m"}, "parameters": {"eps": 0.3}, "probe": {"n": 1}, "rate": 0.123456,
               "flag": True, "none": None, "label": "short", "long": "x" * 81, "best": {"layer": 3, "dims": [1, 2]},
               "big": {str(i): i for i in range(7)}, "rows": [1, 2]}
    assert report.headline_numbers(summary) == [("rate", 0.123456), ("flag", True), ("none", None),
                                                ("label", "short"), ("best.layer", 3)]
    assert report.headline_numbers({"headline": {"a": 1}, "b": 2}) == [("a", 1)]
    assert report.headline_numbers([1, 2]) == []
    assert len(report.headline_numbers({f"k{i}": i for i in range(30)})) == report.MAX_HEADLINE
    assert [report.format_value(v) for v in (0.123456, 1234567.0, True, None, 3)] == ["0.1235", "1.235e+06", "true",
                                                                                    "-", "3"]


def test_readme_headline_is_rewritten_between_the_markers_only(tmp_path):
    run_dir = make_run(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert report.update_readme_headline(readme, run_dir) is True
    text = readme.read_text()
    before, block, after = re.split(r"<!-- headline:start -->\n|\n<!-- headline:end -->", text)
    assert before == README.split("<!-- headline:start -->")[0]
    assert after == README.split("<!-- headline:end -->")[1]
    assert "old numbers" not in block
    assert "Run `20260101-000000-tiny`: `python -m sinklens run --only 01 02`, model `tiny`" in block
    assert "commit abc1234def with uncommitted changes" in block
    assert "`alpha_summary.json` (01 Alpha study)" in block and "| sink_rate_pct | 67.6 |" in block
    assert "| kept | 5 |" in block
    # idempotent: the same run gives the same file, and says nothing changed
    assert report.update_readme_headline(readme, run_dir) is False and readme.read_text() == text


@pytest.mark.parametrize("text", ["# no markers\n", "<!-- headline:end -->\n<!-- headline:start -->\n",
                                  README + "<!-- headline:start -->\n"])
def test_readme_without_one_pair_of_markers_is_refused(tmp_path, text):
    run_dir = make_run(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(InputError, match="needs exactly one `<!-- headline:start -->` line followed by"):
        report.update_readme_headline(readme, run_dir)
    assert readme.read_text() == text


def test_command_line_rewrites_report_and_readme(tmp_path, capsys):
    run_dir = make_run(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert report.main([str(run_dir), "--no-png", "--readme", str(readme)]) == 0
    assert (run_dir / "index.html").is_file() and "| sink_rate_pct | 67.6 |" in readme.read_text()
    assert "headline numbers updated" in capsys.readouterr().out
    assert report.main([str(tmp_path / "nowhere"), "--no-png"]) == 2
    assert "manifest.json does not exist: pass a run folder" in capsys.readouterr().err


def test_plotly_spec_reads_the_figure_back(tmp_path):
    fig = go.Figure(go.Bar(x=["a", "b"], y=[1.5, float("nan")])).update_layout(width=300, title="t </script>")
    path = RunFolder(tmp_path).save_figure(fig, "bars")
    spec = report.plotly_spec(path)
    assert spec["data"][0]["x"] == ["a", "b"] and spec["data"][0]["y"][0] == 1.5
    assert spec["layout"]["width"] == 300 and spec["layout"]["title"]["text"] == "t </script>"
    assert report.classify_figure(path).width == 300
    with pytest.raises(InputError, match="no Plotly.newPlot"):
        report.plotly_spec(RunFolder(tmp_path).save_html("<html></html>", "plain"))


def test_pngs_are_skipped_with_the_reason_when_no_browser(tmp_path, monkeypatch):
    run_dir = make_run(tmp_path)
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    try:
        import kaleido  # noqa: F401
        expected = report.NO_BROWSER
    except ImportError:
        expected = report.NO_KALEIDO
    page = report.write_report(run_dir, log=lambda text: None).read_text()
    assert html.escape(expected) in page and not list((run_dir / "figures").glob("*.png"))


def test_default_run_is_the_whole_series_with_defaults(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _write_notebook(folder / "01_a.ipynb", 'model_name: str = "m"\nn: int = 4\nout_dir: str = "x"', "pass")
    _write_notebook(folder / "02_b.ipynb", 'model_name: str = "m"\nout_dir: str = "x"', "pass")
    out = tmp_path / "runs"
    assert runner.plan_run(folder, out=out).default_run
    assert runner.plan_run(folder, model=runner.DEFAULT_MODEL, out=out).default_run
    assert not runner.plan_run(folder, ci=True, out=out).default_run
    assert not runner.plan_run(folder, only=["01"], out=out).default_run
    assert not runner.plan_run(folder, overrides={"n": "4"}, out=out).default_run
    assert not runner.plan_run(folder, model="other-model", out=out).default_run


@pytest.fixture
def series(tmp_path):
    """One notebook that writes a summary and a table, then fails when told to; the root (tmp_path) has a README."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _write_notebook(folder / "01_alpha.ipynb",
                    'model_name: str = "m"\nn: int = 3\nfail: bool = False\nout_dir: str = "x"',
                    "import pandas as pd\nfrom sinklens.runs import RunFolder\nrun = RunFolder(out_dir)\n"
                    "run.save_json({'n': n, 'score': n / 4}, 'alpha')\n"
                    "run.save_table(pd.DataFrame({'i': range(n)}), 'rows')\n"
                    "if fail:\n    raise ValueError('boom from alpha')")
    (tmp_path / "README.md").write_text(README)
    return folder


def test_runner_writes_the_report_and_the_readme_headline(series, tmp_path, capsys):
    from sinklens.__main__ import main

    out = tmp_path / "runs"
    readme = tmp_path / "README.md"
    assert main(["run", "--notebooks", str(series), "--out", str(out), "-p", "fail=true"]) == 1
    run_dir = (out / "latest").resolve()
    manifest = report.read_manifest(run_dir)
    assert manifest["default_run"] is False
    assert manifest["notebooks"][0]["outputs"] == ["alpha.json", "tables/rows.csv"]  # recorded for a failure too
    page = (run_dir / "index.html").read_text()
    assert "ValueError: boom from alpha" in page and ">score<" in page and 'href="tables/rows.csv"' in page
    assert readme.read_text() == README  # not a default run: README untouched

    assert main(["run", "--notebooks", str(series), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    run_dir = (out / "latest").resolve()
    assert report.read_manifest(run_dir)["default_run"] is True
    assert "Report: " in stdout and "README.md: headline numbers updated from this run." in stdout
    text = readme.read_text()
    assert f"Run `{run_dir.name}`: `python -m sinklens run --notebooks" in text and "| score | 0.75 |" in text
    assert text.endswith("Text after the block.\n")
