"""Attention views (pattern from the model, offline HTML), head choice, census summaries and census figures."""

import html
import json
import re

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import sinklens as sl
from sinklens.core.hooks import pattern_hook
from sinklens.report import summaries, views
from sinklens.report.plots import census as plots

from helpers import padded_mask, random_tokens


def _captured_pattern(model, ids, layer):
    store = {}

    def keep(pattern, hook):
        store["pattern"] = pattern.detach().clone()

    model.run_with_hooks(ids.unsqueeze(0), fwd_hooks=[(pattern_hook(layer), keep)])
    return store["pattern"][0]


def _render_props(html):
    """The JSON properties of every CircuitsVis.render call in a page."""
    render = r'CircuitsVis\.render\("[^"]+", CircuitsVis\.AttentionHeads, (\{.*?\})\);\n</script>'
    calls = re.findall(render, html, re.S)
    return [json.loads(c.replace("<\\/", "</")) for c in calls]


def test_view_pattern_is_the_models_hook_pattern(tiny, hf_reference):
    info = sl.model_info(tiny)
    ids = random_tokens(1, 12, seed=3)[0]
    layer, heads = info.n_layers - 1, [info.n_heads - 1, 0]
    view = views.attention_view(tiny, ids, [(layer, h) for h in heads])
    hooked = _captured_pattern(tiny, ids, layer)
    assert torch.equal(view.pattern, hooked[heads])
    reference = hf_reference(ids.unsqueeze(0), output_attentions=True).attentions[layer][0, heads]
    torch.testing.assert_close(view.pattern, reference, atol=1e-6, rtol=0)
    assert view.token_ids == ids.tolist()
    assert view.tokens == [f"w{i}" if i > 2 else tiny.tokenizer.decode([i]) for i in ids.tolist()]
    assert view.head_names() == [f"L{layer}H{h}" for h in heads]
    assert view.heads == [(layer, h) for h in heads]  # (layer, head) pairs, in the order given


def test_view_html_is_self_contained_and_carries_the_pattern(tiny):
    ids = random_tokens(1, 10, seed=4)[0]
    first = views.attention_view(tiny, ids, [(0, 1)])
    second = views.attention_view(tiny, ids, layer=1)
    page = views.views_page([first, second], title="two views")
    assert not re.search(r"<script[^>]*\bsrc\s*=", page), "no external script"
    assert "unpkg.com" not in page and "import {" not in page
    assert page.count("var CircuitsVis=") == 1, "the circuitsvis bundle is inlined once per page"
    props = _render_props(page)
    assert len(props) == 2
    torch.testing.assert_close(torch.tensor(props[0]["attention"]), first.pattern, atol=1e-5, rtol=0)
    assert props[1]["attentionHeadNames"] == second.head_names()
    assert len(props[1]["attention"]) == sl.model_info(tiny).n_heads
    assert props[0]["tokens"] == first.tokens
    single = first.html()
    assert single.startswith("<!DOCTYPE html>") and single.count("var CircuitsVis=") == 1
    assert not re.search(r"<script[^>]*\bsrc\s*=", single)
    assert page.count(f"<h2>{html.escape(first.title)}</h2>") == 1  # each view of a page has its heading
    assert single.count(html.escape(first.title)) == 2  # <title> and <h1>; not titled twice on the page


def test_view_of_a_padded_batch_row_drops_the_padding(tiny):
    tokens = random_tokens(3, 16, seed=5)
    mask = padded_mask(3, 16, "left", seed=5)
    row = int(mask.sum(1).argmin())
    batch = sl.TokenBatch(tokens, mask, True)
    view = views.attention_view(tiny, batch, [(2, 0)], row=row)
    real = tokens[row][mask[row].bool()]
    assert view.token_ids == real.tolist()
    assert torch.equal(view.pattern, _captured_pattern(tiny, real, 2)[[0]])


def test_view_rejects_bad_input_before_running(tiny):
    info = sl.model_info(tiny)
    ids = random_tokens(1, 8)[0]
    with pytest.raises(sl.InputError, match="layer"):
        views.attention_view(tiny, ids, layer=info.n_layers)
    with pytest.raises(sl.InputError, match="head"):
        views.attention_view(tiny, ids, [(0, info.n_heads)])
    with pytest.raises(sl.InputError, match="heads is empty"):
        views.attention_view(tiny, ids, [])
    with pytest.raises(sl.InputError, match="one layer, but heads span layers"):
        views.attention_view(tiny, ids, [(0, 0), (1, 0)])
    with pytest.raises(sl.InputError, match=r"Pass heads=.*or layer="):
        views.attention_view(tiny, ids)
    with pytest.raises(sl.InputError, match="looks like a single pair"):
        views.attention_view(tiny, ids, [0, 1])  # head indices of the former call form
    with pytest.raises(sl.InputError, match="one prompt"):
        views.attention_view(tiny, random_tokens(2, 8), layer=0)
    with pytest.raises(sl.InputError, match="non-empty list of AttentionView"):
        views.views_page([])


@pytest.fixture
def censuses(tiny):
    tokens = random_tokens(6, 20, seed=7)
    with_bos = sl.run_census(tiny, sl.TokenBatch(tokens, torch.ones_like(tokens), True), show_progress=False)
    without = sl.run_census(tiny, sl.TokenBatch(tokens[:, 1:], torch.ones_like(tokens[:, 1:]), False),
                            show_progress=False)
    return with_bos, without


def test_strongest_sink_head_from_census_and_table(censuses):
    census, _ = censuses
    mean = census.sink_scores(0).mean(0)
    layer, head = summaries.strongest_sink_head(census)
    assert mean[census.layers.index(layer), head] == mean.max()
    table = sl.specialization_table(census.sink_scores(0), n_boot=20, layers=census.layers)
    assert summaries.strongest_sink_head(table) == (layer, head)
    shuffled = pd.DataFrame({"layer": [3, 1, 2], "head": [0, 5, 1], "mean": [0.2, 0.9, 0.4]})
    assert summaries.strongest_sink_head(shuffled) == (1, 5)
    with pytest.raises(sl.InputError, match="specialization_table"):
        summaries.strongest_sink_head(pd.DataFrame({"layer": [1]}))


def test_first_token_verdict_reads_the_comparison(censuses):
    real = summaries.first_token_verdict(sl.first_token_comparison(*censuses))  # case names stay in sync
    assert real["verdict"] in {"position", "token", "mixed", "none"}
    assert set(real["sink_rate_pct"]) == {summaries.CASE_BOS, summaries.CASE_AFTER_BOS, summaries.CASE_NO_BOS}

    def frame(bos, after, no_bos):
        rates = {summaries.CASE_BOS: bos, summaries.CASE_AFTER_BOS: after, summaries.CASE_NO_BOS: no_bos}
        return pd.DataFrame([{"case": c, "layer": l, "mean_alpha": r / 100, "sink_rate": r}
                             for c, r in rates.items() for l in range(2)])
    assert summaries.first_token_verdict(frame(80, 2, 75))["verdict"] == "position"
    assert summaries.first_token_verdict(frame(80, 2, 10))["verdict"] == "token"
    assert summaries.first_token_verdict(frame(80, 60, 75))["verdict"] == "mixed"
    assert summaries.first_token_verdict(frame(0, 0, 0))["verdict"] == "none"
    assert summaries.first_token_verdict(frame(80, 2, 75))["sink_rate_pct"][summaries.CASE_NO_BOS] == pytest.approx(75)
    with pytest.raises(sl.InputError, match="first_token_comparison"):
        summaries.first_token_verdict(pd.DataFrame({"case": ["x"]}))


def test_non_first_summary_accounts_for_every_hit(tiny, censuses):
    census, _ = censuses
    hits = census.non_first_sinks(0.1, min_queries=4)
    summary = summaries.non_first_summary(census, tiny, threshold=0.1, min_queries=4)
    assert summary["n_hits"].sum() == len(hits)
    assert set(summary["token_id"]) == set(hits["token_id"])
    if len(summary):
        top = summary.iloc[0]
        assert top["n_hits"] == (hits["token_id"] == top["token_id"]).sum()
        assert top["token"] == tiny.tokenizer.decode([int(top["token_id"])])


def test_first_token_record(tiny):
    batch = sl.tokenize(tiny, ["w5 w6 w7", "w9 w3"], prepend_bos=True, padding_side="left")
    record = summaries.first_token_record(tiny, batch)
    assert record["prepend_bos"] is True and record["first_ids"] == [sl.model_info(tiny).bos_id]
    plain = summaries.first_token_record(tiny, sl.tokenize(tiny, ["w5 w6 w7", "w9 w3"], prepend_bos=False))
    assert plain["first_ids"] == [5, 9] and plain["first_strings"] == ["w5", "w9"]


def test_census_figures_show_the_census(tiny, censuses):
    census, without = censuses
    heat = plots.sink_heatmap(census)
    assert isinstance(heat, go.Figure)
    torch.testing.assert_close(torch.tensor(heat.data[0].z, dtype=torch.float32), census.sink_scores(0).mean(0))
    bars = plots.sink_rate_bars(census, eps=0.3)
    assert list(bars.data[0].y) == pytest.approx(census.sink_rate_by_layer(0.3).tolist())
    table = sl.specialization_table(census.sink_scores(0), eps=0.3, q=0.5, n_boot=20, layers=census.layers)
    spec = plots.specialization(table, eps=0.3)
    n_specialized = sum(len(t.x) for t in spec.data if t.name == "sink-specialized")
    assert n_specialized == table["specialized"].sum() and sum(len(t.x) for t in spec.data) == len(table)
    scatter = plots.confidence_vs_alpha(census, table)
    assert sum(len(t.x) for t in scatter.data) == len(table)
    grid = plots.prompt_consistency(census, table.head(3))
    assert len(grid.data[0].x) == 3 and len(grid.data[0].y) == census.n_prompts
    assert isinstance(plots.specialization_heatmap(table), go.Figure)
    comparison = plots.bos_comparison(sl.first_token_comparison(census, without))
    assert len(comparison.data) == 6
    massive = sl.massive_activations(tiny, random_tokens(3, 12, seed=2), show_progress=False)
    profile = plots.massive_profile(massive, n=2)
    assert profile.layout.yaxis.type == "log"
    assert list(profile.data[0].y) == pytest.approx(massive.top_values(2, "resid")["top1_abs"].tolist())
    norms = plots.first_token_norms(massive)
    assert list(norms.data[0].y) == pytest.approx(massive.norms("resid")["first_norm"].tolist())
    share = plots.norm_share(massive, [1, 4])
    assert len(share.data) == 4 and list(share.data[1].y) == pytest.approx(massive.norm_share(4, "resid").tolist())
    assert len(plots.rank_stability(massive, [2]).data) == 2
    with pytest.raises(sl.InputError, match="Census"):
        plots.sink_heatmap(table)
    with pytest.raises(sl.InputError, match="specialization_table"):
        plots.specialization(table.drop(columns="ci_low"))
    with pytest.raises(sl.InputError, match="not in the census"):
        plots.prompt_consistency(census, [(99, 0)])
