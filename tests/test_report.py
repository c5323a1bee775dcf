"""The run report (index.html), the headline numbers and the README block, on run folders built here."""

import html
import json
import os
import re
import time
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from sinklens.__main__ import main
from sinklens.core.errors import InputError
from sinklens.report.views import AttentionView, views_page
from sinklens.series import RunFolder, findings, headline, outputs, pngs, report, runner, wording

from helpers import write_notebook as _write_notebook

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


def make_run(root, failed=False, with_outputs=True, reference=False):
    """A run folder as the runner leaves it: notebook 01 ok (summary, table, plotly figure, attention view),
    02 ok (summary) or failed, 03 not run after a failure; plus a file no notebook claims. ``reference``: a
    default run of the embedded model (the only kind the README's headline takes)."""
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
    if not with_outputs:
        for entry in entries:
            entry.pop("outputs", None)
    manifest = {"model": runner.DEFAULT_MODEL if reference else "tiny", "run_dir": str(run_dir),
                "started": "2026-01-01T00:00:00+0000", "default_run": reference and not failed,
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
    # headline numbers: scalars and small mappings, no setting or long mappings; a summary's own headline wins.
    # Known keys read as labels with units, unknown ones as words; the raw key stays as the row's tooltip.
    cards = page.split('id="headline"')[1].split('<h2 id="nb-')[0]
    assert "<th>sink rate Sink^eps: heads with alpha_0 &gt; eps</th><td class=\"num\">67.6 %</td>" in cards
    assert 'title="strongest_head.layer"><th>strongest sink head: layer</th>' in cards
    assert ">kept<" in cards and ">0.25<" in cards
    assert "by_layer" not in cards and "n_layers" not in cards and "n_prompts" not in cards
    assert 'href="alpha_summary.json">alpha_summary.json</a>' in cards  # the raw JSON, linked
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
    run_dir = make_run(tmp_path, with_outputs=False)
    base = time.time() - 1000
    stamps = {"alpha_summary.json": 10, "tables/scores.csv": 11, "figures/alpha_curve.html": 12,
              "figures/attention_alpha.html": 13, "01_alpha.ipynb": 20, "beta_summary.json": 30,
              "02_beta.ipynb": 40, "extra.sqlite": 50}
    for rel, offset in stamps.items():
        os.utime(run_dir / rel, (base + offset, base + offset))
    notebooks, unclaimed = outputs.attribute_outputs(run_dir, outputs.read_run_manifest(run_dir))
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
    assert headline.headline_numbers(summary) == [("rate", 0.123456), ("flag", True), ("none", None),
                                                  ("label", "short"), ("best.layer", 3)]
    assert headline.headline_numbers({"headline": {"a": 1}, "b": 2}) == [("a", 1)]
    assert headline.headline_numbers([1, 2]) == []
    assert len(headline.headline_numbers({f"k{i}": i for i in range(30)})) == headline.MAX_HEADLINE
    assert [headline.format_value(v) for v in (0.123456, 1234567.0, True, None, 3)] == ["0.1235", "1.235e+06", "true",
                                                                                      "-", "3"]


def test_labels_and_units():
    # a stored fraction shown as the percent its unit says; a mapping entry gets the outer label and the inner one
    assert headline.labelled("best_retention", 0.9217) == ("retention of that set (held-out)", "92.17 %")
    assert headline.labelled("d_loss_at_k.bos_top", 0.6309) == (
        "change of loss at k, all sink-specialized heads pruned (BOS top-k dims)", "0.6309 nats")
    assert headline.labelled("removal_retention_same_heads", None)[1] == "-"  # no unit after a missing value
    # keys nobody labelled (a later notebook's summary) still read as words
    assert headline.labelled("tokens_to_sink_pct", 12.5) == ("tokens to sink (%)", "12.5")
    assert headline.labelled("context.max_len", 4096) == ("context: max len", "4096")
    # a mapping whose key holds a dot itself (the threshold) keeps its label
    assert headline.labelled("smallest_k_median_below_0.2.bos_top", 500) == (
        "smallest k with median attention error < 0.2 (BOS top-k dims)", "500")
    # ... and an inner key that is a number with a decimal point (a tolerance) reads as that number
    assert headline.labelled("kv_heads_at_tolerance.0.02", 68) == (
        "KV heads on sink + window within the loss tolerance (0.02)", "68 KV heads")
    assert wording.caption("sink_heatmap") and wording.caption("no_such_figure") is None


def test_readme_headline_is_rewritten_between_the_markers_only(tmp_path):
    run_dir = make_run(tmp_path, reference=True)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert headline.update_readme_headline(readme, run_dir) is True
    text = readme.read_text()
    before, block, after = re.split(r"<!-- headline:start -->\n|\n<!-- headline:end -->", text)
    assert before == README.split("<!-- headline:start -->")[0]
    assert after == README.split("<!-- headline:end -->")[1]
    assert "old numbers" not in block
    assert ("Run `20260101-000000-tiny`: `python -m sinklens run --only 01 02`, model `smollm2-135m`" in block)
    assert "commit abc1234def with uncommitted changes" in block
    assert "`alpha_summary.json` (01 Alpha study)" in block
    assert "| sink rate Sink^eps: heads with alpha_0 > eps | 67.6 % |" in block
    assert "| kept | 5 |" in block
    # idempotent: the same run gives the same file, and says nothing changed
    assert headline.update_readme_headline(readme, run_dir) is False and readme.read_text() == text


@pytest.mark.parametrize("text", ["# no markers\n", "<!-- headline:end -->\n<!-- headline:start -->\n",
                                  README + "<!-- headline:start -->\n"])
def test_readme_without_one_pair_of_markers_is_refused(tmp_path, text):
    run_dir = make_run(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(InputError, match="needs exactly one `<!-- headline:start -->` line followed by"):
        headline.update_readme_headline(readme, run_dir)
    assert readme.read_text() == text


def test_command_line_rewrites_report_and_readme(tmp_path, capsys):
    run_dir = make_run(tmp_path, reference=True)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert main(["report", str(run_dir), "--no-png"]) == 0
    assert (run_dir / "index.html").is_file() and readme.read_text() == README  # a report never touches the README
    assert main(["headline", str(run_dir), "--readme", str(readme)]) == 0
    assert "| sink rate Sink^eps: heads with alpha_0 > eps | 67.6 % |" in readme.read_text()
    assert f"headline numbers updated from {run_dir.name}" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nowhere"), "--no-png"]) == 2
    assert "manifest.json does not exist: pass a run folder" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["not default", "failed"])
def test_headline_refuses_a_run_that_is_not_the_reference(tmp_path, capsys, kind):
    run_dir = make_run(tmp_path, reference=kind == "failed", failed=kind == "failed")
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert main(["headline", str(run_dir), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir} cannot give the README's headline numbers" in err and "then `make headline`" in err
    assert ("its status is 'failed'" if kind == "failed" else "it is not a default run") in err
    assert readme.read_text() == README


def test_plotly_spec_reads_the_figure_back(tmp_path):
    fig = go.Figure(go.Bar(x=["a", "b"], y=[1.5, float("nan")])).update_layout(width=300, title="t </script>")
    path = RunFolder(tmp_path).save_figure(fig, "bars")
    spec = pngs.plotly_spec(path)
    assert spec["data"][0]["x"] == ["a", "b"] and spec["data"][0]["y"][0] == 1.5
    assert spec["layout"]["width"] == 300 and spec["layout"]["title"]["text"] == "t </script>"
    assert outputs.classify_figure(path).width == 300
    with pytest.raises(InputError, match="no Plotly.newPlot"):
        pngs.plotly_spec(RunFolder(tmp_path).save_html("<html></html>", "plain"))


def test_pngs_are_skipped_with_the_reason_when_no_browser(tmp_path, monkeypatch):
    run_dir = make_run(tmp_path)
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    try:
        import kaleido  # noqa: F401
        expected = pngs.NO_BROWSER
    except ImportError:
        expected = pngs.NO_KALEIDO
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
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert not runner.plan_run(folder, model=str(other), out=out).default_run


@pytest.fixture
def series(tmp_path):
    """One notebook that writes a summary and a table, then fails when told to; the root (tmp_path) has a README."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    _write_notebook(folder / "01_alpha.ipynb",
                    'model_name: str = "m"\nn: int = 3\nfail: bool = False\nout_dir: str = "x"',
                    "import pandas as pd\nfrom sinklens.series import RunFolder\nrun = RunFolder(out_dir)\n"
                    "run.save_json({'n': n, 'score': n / 4}, 'alpha')\n"
                    "run.save_table(pd.DataFrame({'i': range(n)}), 'rows')\n"
                    "if fail:\n    raise ValueError('boom from alpha')")
    (tmp_path / "README.md").write_text(README)
    return folder


def test_a_run_writes_the_report_and_never_the_readme(series, tmp_path, capsys):
    out = tmp_path / "runs"
    readme = tmp_path / "README.md"
    assert main(["run", "--notebooks", str(series), "--out", str(out), "-p", "fail=true"]) == 1
    run_dir = (out / "latest").resolve()
    manifest = outputs.read_run_manifest(run_dir)
    assert manifest["default_run"] is False
    assert manifest["notebooks"][0]["outputs"] == ["alpha.json", "tables/rows.csv"]  # recorded for a failure too
    page = (run_dir / "index.html").read_text()
    assert "ValueError: boom from alpha" in page and ">score<" in page and 'href="tables/rows.csv"' in page

    assert main(["run", "--notebooks", str(series), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    run_dir = (out / "latest").resolve()
    assert outputs.read_run_manifest(run_dir)["default_run"] is True and "Report: " in stdout
    assert readme.read_text() == README  # even the reference run leaves the checkout alone
    # the explicit command takes the block from it
    assert main(["headline", str(out / "latest"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert f"Run `{run_dir.name}`: `python -m sinklens run --notebooks" in text and "| score | 0.75 |" in text
    assert text.endswith("Text after the block.\n")


# --- findings --------------------------------------------------------------------------------------------

CASES = {"BOS at position 0": 67.6, "first text token at position 1 (after BOS)": 1.5,
         "first text token at position 0 (no BOS)": 60.2}
SUMMARIES = {  # the shapes notebooks 01-05 write, with made-up numbers; 06 is a later notebook nobody knows yet
    "sink_discovery.json": {
        "model": {"name": "m", "n_layers": 30}, "eps": 0.3, "n_prompts": 128, "n_heads": 270,
        "probe": {"n_prompts": 128, "seq_len": 64}, "sink_rate_pct": 67.61, "n_heads_mean_alpha0_above_eps": 200,
        "strongest_head": {"layer": 18, "head": 8, "mean_alpha0": 0.9979},
        "massive_dims_by_layer": {str(layer): [247, 507] if layer > 11 else [507] for layer in range(2, 29)},
        "bos_comparison": {"verdict": "position", "sink_rate_pct": CASES}},
    "specialized_heads.json": {"heads": [[1, 2]] * 140, "n_heads": 270, "eps": 0.3, "q": 0.9,
                               "probe": {"n_prompts": 128, "seq_len": 64}},
    "topk_pruning.json": {"headline": {"layer": 14, "n_heads_pruned": 9, "n_sink_heads": 140, "k": 10,
                                       "frob_rel_median": 0.4359, "alpha0_dense_mean": 0.6182,
                                       "alpha0_pruned_mean": 0.5455, "next_kl": 0.02238, "d_loss": 0.01649}},
    "reconstruction_error.json": {"headline": {
        "k": 10, "n_sink_heads": 140,
        "frob_rel_median_at_k": {"bos_top": 0.4888, "random": 0.9206, "weight_norm": 0.9184},
        "smallest_k_median_below_0.2": {"bos_top": 500, "random": 576, "weight_norm": 500},
        "d_loss_at_k": {"bos_top": 0.6309, "random": 1.736, "weight_norm": 1.596, "head_removal": 4.079}}},
    "layer_selection.json": {"settings": {"k": 10}, "headline": {
        "metric": "acc/mean", "target_retention": 0.91, "n_sink_heads": 140, "n_configurations": 124,
        "best_layers": "15,16,22", "best_n_heads": 57, "best_params_zeroed": 4129536, "best_retention": 0.9217,
        "best_ci_low": 0.893, "best_ci_high": 0.9527, "removal_retention_same_heads": 0.8064}},
    "long_context.json": {"model": {"name": "m"}, "headline": {"max_len": 4096, "sink_rate_at_max_pct": 41.5}},
}


def make_series_run(root, summaries=SUMMARIES, figures=("sink_heatmap", "my_new_figure")):
    """A run folder whose notebooks 01-06 each wrote one summary (notebook 01 also the named figures)."""
    run_dir = root / "20260101-000000-smollm2-135m"
    run = RunFolder(run_dir)
    entries = []
    for i, (name, data) in enumerate(summaries.items(), 1):
        notebook = f"{i:02d}_{Path(name).stem}.ipynb"
        _executed(run_dir / notebook, f"{i:02d} {Path(name).stem.replace('_', ' ')}")
        (run_dir / name).write_text(json.dumps(data))
        written = [name]
        if i == 1:
            for figure in figures:
                run.save_figure(go.Figure(go.Bar(y=[1, 2])), figure)
                written.append(f"figures/{figure}.html")
        entries.append({"notebook": notebook, "parameters": {}, "passed": {}, "status": "ok", "wall_s": 1.0,
                        "outputs": written})
    (run_dir / "manifest.json").write_text(json.dumps({"model": "smollm2-135m", "run_dir": str(run_dir),
                                                       "status": "ok", "notebooks": entries}))
    return run_dir


def test_findings_are_written_from_the_summaries(tmp_path):
    run_dir = make_series_run(tmp_path)
    sentences = findings.findings(headline.summaries_of(run_dir))
    text = "\n".join(sentences)
    assert ("Sink^0.3 = 67.6 % of the 270 heads put alpha_0 > 0.3 on the first token (mean over 128 prompts of 64 "
            "tokens); the strongest sink head is L18H8 (mean alpha_0 0.998).") in text
    assert ("The sink is positional: without BOS the first text token is a sink in 60.2 % of the heads (BOS itself: "
            "67.6 %), and the same token behind BOS in 1.5 %.") in text
    assert "in 27 of 30 layers (layers 2-28): dim 507 in 27 layers, dim 247 in 17 layers." in text
    assert ("140 of 270 heads (52 %) are sink-specialized (alpha_0 > 0.3 on >= 90 % of 128 prompts of 64 "
            "tokens).") in text
    assert "Pruning the 9 sink-specialized heads of layer 14 to k = 10 BOS dims: median attention error" in text
    assert "= 0.44, mean alpha_0 0.62 -> 0.55; next-token KL 0.022 nats, loss +0.016 nats." in text
    assert ("the median attention error is 0.49 (BOS top-k dims), 0.92 (random dims) and 0.92 (largest weight "
            "norms).") in text
    assert "falls below 0.2 at k = 500 (BOS top-k dims), 576 (random dims) and 500 (largest weight norms)." in text
    assert "+4.08 nats (whole heads removed)" in text
    assert ("QK-pruning layers 15,16,22 (57 heads, 4,129,536 Q/K parameters) at k = 10 keeps 92.2 % of acc/mean on "
            "held-out items (95 % CI 89.3 % to 95.3 %; target 91 %); removing the same heads whole keeps "
            "80.6 %.") in text
    assert "different lists" not in text  # one count of sink-specialized heads: 140 everywhere
    smallest = SUMMARIES["reconstruction_error.json"]["headline"]["smallest_k_median_below_0.2"]
    never_headline = dict(SUMMARIES["reconstruction_error.json"]["headline"],
                          **{"smallest_k_median_below_0.2": dict.fromkeys(smallest)})
    never = {"reconstruction_error.json": {"parameters": {"ks": [1, 10, 50]}, "headline": never_headline}}
    assert ("No kept-dims policy brings the median error below 0.2 at the k tried (k up to 50)."
            in findings.findings(headline.summaries_of(make_series_run(tmp_path / "never", never))))
    # 3 + 1 + 1 + 3 + 1 sentences; the unknown long_context.json gives none: its numbers are in the tables
    assert len(sentences) == 9


def test_report_leads_with_findings_labels_and_captions(tmp_path):
    run_dir = make_series_run(tmp_path)
    page = report.write_report(run_dir, png=False).read_text()
    assert page.index('<h2 id="findings">Findings</h2>') < page.index('id="headline"') < page.index('<h2 id="nb-')
    assert "<li>140 of 270 heads (52 %) are sink-specialized" in page
    cards = page.split('id="headline"')[1].split('<h2 id="nb-')[0]
    assert "<th>sink-specialized heads</th>" in cards and "<th>retention of that set (held-out)</th>" in cards
    assert ">92.17 %<" in cards and ">0.6309 nats<" in cards
    # the summary of a notebook nobody wrote a builder or labels for is still there, generically
    assert "06 long context" in cards and "<th>max len</th>" in cards and "<th>sink rate at max (%)</th>" in cards
    assert f'<p class="caption">{html.escape(wording.CAPTIONS["sink_heatmap"])}</p>' in page
    assert page.count('class="caption"') == 1  # my_new_figure has none and is shown without


def test_missing_or_partial_summaries_give_no_sentence(tmp_path):
    partial = {name: data for name, data in SUMMARIES.items() if name != "topk_pruning.json"}
    partial["layer_selection.json"] = {"settings": {"k": 10}}  # e.g. a run that failed before the selection
    partial["reconstruction_error.json"] = json.loads(json.dumps(SUMMARIES["reconstruction_error.json"]))
    partial["reconstruction_error.json"]["headline"]["n_sink_heads"] = 138  # another head list
    run_dir = make_series_run(tmp_path, partial)
    text = "\n".join(findings.findings(headline.summaries_of(run_dir)))
    assert "Pruning the" not in text and "QK-pruning" not in text and "Sink^0.3 = 67.6 %" in text
    assert ("The notebooks of this run worked on different lists of sink-specialized heads: 140 "
            "(specialized_heads.json), 138 (reconstruction_error.json).") in text
    page = report.write_report(run_dir, png=False).read_text()
    assert "layer_selection.json" in page  # its card and raw link stay


LONG_AND_BEYOND = {  # shaped like notebooks 06 and 07's summaries
    "long_context.json": {"details": {"detail_length": 1024}, "headline": {
        "lengths": "64..8192", "eps": 0.3, "n_sink_heads_at_shortest": 216, "sink_rate_pct_shortest": 80.0,
        "sink_rate_pct_longest": 46.3, "sink_heads_alpha0_shortest": 0.6375, "sink_heads_alpha0_longest": 0.3118,
        "sink_heads_still_above_eps_pct": 57.9, "non_first_sinks": 204, "non_first_sink_heads": 115,
        "massive_positions": 1, "massive_position_kinds": "BOS:1"}},
    "beyond_bos_dims.json": {"n_sink_heads": 138, "baseline_variant": "bos_top/zero/none",
                             "optimized_in_sample_best_at_k": 0.3434,
                             "selection": {"target_retention": 0.91}, "headline": {
        "k": 10, "best_variant": "act_weight/mean/temperature", "best_frob_rel_median": 0.373,
        "baseline_frob_rel_median": 0.4984, "sample_best_variant": "bos_top/zero/temperature",
        "sample_best_frob_rel_median": 0.3845, "n_heads_compared": 6, "bos_optimized_overlap_mean": 0.5667,
        "selection_heads_bos_top": 51, "selection_heads_best": 73, "selection_params_bos_top": 3694848,
        "selection_params_best": 5288704}},
}


def test_findings_of_long_context_and_beyond_bos(tmp_path):
    text = "\n".join(findings.findings(headline.summaries_of(make_series_run(tmp_path, LONG_AND_BEYOND))))
    assert ("From 64 to 8192 tokens, Sink^0.3 goes from 80.0 % to 46.3 %; the 216 heads with alpha_0 > 0.3 at 64 "
            "tokens average alpha_0 0.64 there and 0.31 at 8192 tokens, 57.9 % of them still above 0.3.") in text
    assert ("A full census of one 1024-token prompt finds 204 non-first sinks in 115 heads; massive activations sit "
            "at 1 position (BOS:1).") in text
    assert ("Beyond the BOS dims at k = 10, over the 138 sink-specialized heads on held-out prompts: the best variant "
            "without a search, act_weight/mean/temperature, has a median attention error of 0.37 against 0.50 for "
            "bos_top/zero/none.") in text
    assert ("On 6 heads with the optimized search, the best is bos_top/zero/temperature (0.38); fitted and measured "
            "on the same prompts, the optimized search reaches 0.34; bos_top and optimized share 57 % of their kept "
            "dims.") in text
    assert ("Layer selection at 91 % retention: act_weight/mean/temperature QK-prunes 73 heads (5,288,704 Q/K "
            "parameters), bos_top/zero/none 51 heads (3,694,848).") in text
    partial = {"beyond_bos_dims.json": {"headline": {"k": 10}}}  # a failed or older run: no sentence
    assert findings.findings(headline.summaries_of(make_series_run(tmp_path / "partial", partial))) == []


CALIBRATION = {"attention_calibration.json": {  # shaped like notebook 08's summary
    "metric": "acc/mean", "cost": {"total": 23.4}, "layer_set": {"n_heads": 51, "retention": 0.94},
    "headline": {"n_head_candidates": 18, "n_kept_heads": 2, "kept_gain": 0.0123, "kept_gain_low": -0.004,
                 "act_recipe_gain": -0.25, "act_recipe_gain_low": -0.3, "alpha0_change": 0.0412,
                 "non_first_sinks_before": 1.25, "non_first_sinks_after": 0.5, "same_heads_qk_retention": 0.9512,
                 "same_heads_removal_retention": 0.7, "same_heads_qk_calibration_retention": 0.9401}}}


def test_findings_of_attention_calibration(tmp_path):
    text = "\n".join(findings.findings(headline.summaries_of(make_series_run(tmp_path, CALIBRATION))))
    assert ("Attention calibration (ACT): of 18 candidate heads calibrated one at a time (23.4 forward-equivalents), "
            "2 raised acc/mean with a bootstrap lower bound above 0.") in text
    assert ("On held-out items the kept heads calibrated together change acc/mean by +1.23 % (bootstrap lower bound "
            "-0.40 %); ACT's recipe (every head of layers 2 to L-2) changes it by -25.00 % (bootstrap lower bound "
            "-30.00 %).") in text
    assert ("Calibrated, the shown heads' alpha_0 changes by +0.041 and their non-first sinks per prompt go from "
            "1.25 to 0.50.") in text
    assert ("On the 51 heads of notebook 05's best layer set, acc/mean retention is 95.1 % QK-pruned, 70.0 % removed "
            "whole and 94.0 % QK-pruned and calibrated.") in text
    nothing = json.loads(json.dumps(CALIBRATION))
    nothing["attention_calibration.json"]["headline"].update(n_kept_heads=0, kept_gain=None, kept_gain_low=None)
    text = "\n".join(findings.findings(headline.summaries_of(make_series_run(tmp_path / "none", nothing))))
    assert "kept heads calibrated together" not in text and "On held-out items ACT's recipe" in text


def _refuse_constant(name: str):
    raise AssertionError(f"{name} in a JSON file: not strict JSON")


def test_summaries_are_written_as_strict_json(tmp_path):
    """Missing values (NaN, infinities, pd.NA, NaT: e.g. a policy whose median error never falls below the
    threshold) become null, numpy numbers plain numbers; the file parses under a strict parser."""
    smallest = pd.Series({"bos_top": 500, "random": pd.NA}, dtype="Int64")
    data = {"headline": {"smallest_k_median_below_0.2": smallest.to_dict(), "frob_rel": float("nan"),
                         "ratio": np.float64("inf"), "n": np.int64(3), "when": pd.NaT,
                         "medians": np.array([0.5, np.nan])}, "ks": (1, 10)}
    path = RunFolder(tmp_path / "run").save_json(data, "reconstruction_error")
    read = json.loads(path.read_text(), parse_constant=_refuse_constant)
    assert read == {"headline": {"smallest_k_median_below_0.2": {"bos_top": 500, "random": None}, "frob_rel": None,
                                 "ratio": None, "n": 3, "when": None, "medians": [0.5, None]}, "ks": [1, 10]}


def test_report_reads_older_run_folders_with_nan(tmp_path):
    """Run folders written before summaries were strict JSON hold NaN for a missing value: the report and the
    findings read them as they read null."""
    recon = json.loads(json.dumps(SUMMARIES["reconstruction_error.json"]))
    recon["parameters"] = {"ks": [1, 10, 50]}
    recon["headline"]["smallest_k_median_below_0.2"] = {"bos_top": 500, "random": float("nan"),
                                                        "weight_norm": float("nan")}
    selection = json.loads(json.dumps(SUMMARIES["layer_selection.json"]))
    selection["headline"]["removal_retention_same_heads"] = float("nan")
    run_dir = make_series_run(tmp_path, {"reconstruction_error.json": recon, "layer_selection.json": selection})
    assert "NaN" in (run_dir / "reconstruction_error.json").read_text()  # json.dumps writes it, as before
    text = "\n".join(findings.findings(headline.summaries_of(run_dir)))
    assert ("falls below 0.2 at k = 500 (BOS top-k dims); never with random dims, largest weight norms "
            "(k up to 50).") in text
    page = report.write_report(run_dir, png=False).read_text()
    assert "reconstruction_error.json" in page and "layer_selection.json" in page


STREAMING = {"streaming_heads.json": {  # shaped like notebook 09's summary
    "model": {"n_ctx": 8192}, "settings": {"sink": 4, "curve_window": 1020, "score_window": 64, "score_len": 512,
                                           "ablation_window": 124},
    "comparison": {"n_kv_heads": 90, "n_cheap": 22}, "kv_context": 8192,
    "kv_budget": [{"tolerance": 0.05, "kv_heads": 45, "held_out_increase": 0.0204, "saved_mib": 44.4,
                   "cache_mib": 90.0, "llama2_7b_saved_gib": 1.98, "llama2_7b_cache_gib": 4.0}],
    "headline": {"curve_tokens": 8448, "ppl_past_context_sink_window": 9.871, "ppl_past_context_window_only": 412.3,
                 "spearman_score_alpha0": -0.4123, "sink_groups_among_cheap": 3, "n_sink_groups": 40,
                 "kv_heads_at_tolerance": {"0.05": 45}, "held_out_increase_at_tolerance": {"0.05": 0.0204},
                 "ppl_by_sinks": {"0": 30.5, "4": 10.25}, "spearman_score_non_first": None,
                 "ppl_by_initial": {"bos": 10.25, "newline": 11.0}}}}


def test_findings_of_streaming_heads(tmp_path):
    text = "\n".join(findings.findings(headline.summaries_of(make_series_run(tmp_path, STREAMING))))
    assert ("Streaming 8,448 tokens with 4 sinks + a 1020-token window and StreamingLLM's position shift, the "
            "perplexity past the trained 8,192-token context is 9.87; window only (no sinks) reaches 412.3.") in text
    assert ("Per KV head (4 sinks + 64 keys on 512-token text), the streaming score has Spearman -0.41 with alpha_0; "
            "3 of the 40 KV groups holding a sink-specialized head are among the 22 cheapest to stream.") in text
    assert ("KV budget at 8,192 tokens, per tolerance: 0.05 nats: 45/90 KV heads (held out +0.020, 44 of 90 MiB; "
            "Llama-2-7B shape 1.98 of 4 GiB).") in text
    assert ("Perplexity by sink count at a 124-token window (0: 30.50, 4: 10.25); four newlines in place of BOS "
            "11.00 against 10.25.") in text
    partial = {"streaming_heads.json": {"headline": {"curve_tokens": 10}}}  # a failed or older run: no sentence
    assert findings.findings(headline.summaries_of(make_series_run(tmp_path / "partial", partial))) == []
