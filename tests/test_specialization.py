"""Sink-specialized heads and the bootstrap table, on scores with a known structure."""

import numpy as np
import pytest
import torch

import sinklens as sl


def structured_scores(n=200, seed=0):
    """Scores [n, 2 layers, 3 heads] where head (1, 2) exceeds 0.3 on 95% of prompts,
    head (0, 0) on 85%, and the rest on none."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand((n, 2, 3), generator=g) * 0.2
    above = torch.rand(n, generator=g)
    scores[:, 1, 2] = torch.where(above < 0.95, 0.8, 0.1)
    scores[:, 0, 0] = torch.where(above < 0.85, 0.6, 0.1)
    return scores


def test_specialized_heads_follow_eps_and_q():
    scores = structured_scores()
    frac = (scores > 0.3).float().mean(0)
    assert 0.9 <= frac[1, 2] < 1.0 and 0.75 < frac[0, 0] < 0.9  # the generator did what we meant
    assert sl.sink_specialized_heads(scores, eps=0.3, q=0.9) == [(1, 2)]
    assert sl.sink_specialized_heads(scores, eps=0.3, q=0.75) == [(0, 0), (1, 2)]
    assert sl.sink_specialized_heads(scores, eps=0.9, q=0.5) == []
    assert sl.sink_specialized_heads(scores, eps=0.3, q=0.9, layers=[10, 20]) == [(20, 2)]


def test_table_means_and_bootstrap_interval():
    scores = structured_scores(n=400)
    table = sl.specialization_table(scores, eps=0.3, q=0.9, n_boot=2000, seed=1)
    assert len(table) == 6
    assert table.iloc[0][["layer", "head"]].tolist() == [1, 2]
    row = table.set_index(["layer", "head"]).loc[(0, 0)]
    values = scores[:, 0, 0].double().numpy()
    assert row["mean"] == pytest.approx(values.mean(), rel=1e-6)
    assert row.frac_above_eps == pytest.approx((values > 0.3).mean())
    half_width = 1.96 * values.std(ddof=1) / np.sqrt(len(values))  # normal approximation
    assert row.ci_low < row["mean"] < row.ci_high
    assert (row.ci_high - row.ci_low) / 2 == pytest.approx(half_width, rel=0.15)
    assert table.specialized.sum() == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps=1.5), r"eps must lie in \[0, 1\]"),
    (dict(q=-0.1), r"q must lie in \[0, 1\]"),
    (dict(eps="0.3"), "eps must be a number"),
])
def test_bad_thresholds(kwargs, message):
    with pytest.raises(sl.InputError, match=message):
        sl.sink_specialized_heads(structured_scores(10), **kwargs)


def test_bad_scores():
    with pytest.raises(sl.InputError, match=r"\[batch, layer, head\]"):
        sl.sink_specialized_heads(torch.zeros(0, 2, 3))
    with pytest.raises(sl.InputError, match=r"\[batch, layer, head\]"):
        sl.specialization_table(torch.zeros(4, 3))
