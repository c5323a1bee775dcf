"""layer_selection: each strategy on a tiny model, checked against independent recomputation."""

from __future__ import annotations

import itertools
import json

import pytest

import sinklens as sl
from sinklens.assess import selection
from sinklens.assess.evaluation import evaluate, retention_value

ITEMS = [
    {"id": f"i{i}", "task": "t" + str(i % 2), "context": f"w{5 + i} w{6 + 2 * i} w{7 + 3 * i}",
     "choices": [f" w{20 + i}", f" w{40 + i} w{41 + i}", f" w{60 + i}", f" w{90 + i} w{3 + i}"], "gold": i % 4}
    for i in range(12)
]
PROBE = dict(n_prompts=8, seq_len=16, eps=0.05, q=0.5)
EVAL = dict(n_lm_prompts=2, lm_seq_len=12, n_copy=3, copy_len=6)
K, TARGET = 4, 0.9



@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("selection")
    items = folder / "items.jsonl"
    items.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    model = sl.load_model(str(tiny_dir), device="cpu")
    kwargs = dict(k=K, target_retention=TARGET, strategy=list(selection.STRATEGIES), **PROBE,
                  eval_kwargs=dict(items=str(items), **EVAL), exhaustive_pool=3, exhaustive_size=3, n_random=2,
                  patience=5, n_boot=50, results=folder / "sweep.sqlite", show_progress=False)
    return model, kwargs, sl.layer_selection(model, **kwargs)


def _layers(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _sort_key(row):
    return (-row["retention"], row["loss"], _layers(row["layers"]))


def test_heads_and_dims_are_measured(setup):
    model, _, sel = setup
    probe = sl.probe_tokens(model, PROBE["n_prompts"], PROBE["seq_len"])
    scores = sl.run_census(model, probe, show_progress=False).sink_scores(0)
    assert sel.heads == sorted(sl.sink_specialized_heads(scores, eps=PROBE["eps"], q=PROBE["q"]))
    stats = sl.massive_activations(model, probe, show_progress=False)
    assert set(sel.dims) == {f"{l}.{h}" for l, h in sel.heads if l in sel.settings["candidates"]}
    for key, dims in sel.dims.items():  # bos_top: every head of a layer keeps its layer's top-k BOS dims
        assert dims == sorted(stats.top_dims(int(key.split(".")[0]), K, "normalized").tolist())
    assert sel.settings["calibration_tokens"] is None  # plain bos_top: the probe's BOS vectors, no calibration set
    for row in sel.table.itertuples():
        expected = [(l, h) for l, h in sel.heads if l in _layers(row.layers)]
        assert row.heads == " ".join(f"{l}.{h}" for l, h in expected) and row.n_heads == len(expected)


def test_single_layer_rank_follows_single_layer_retention(setup):
    _, _, sel = setup
    order = [_layers(r["layers"])[0] for r in sorted(sel.single_layer.to_dict("records"), key=_sort_key)]
    path = sel.table[sel.table["strategy"] == "single_layer_rank"].sort_values("step")
    assert [_layers(x) for x in path["layers"]] == [tuple(sorted(order[:i + 1])) for i in range(len(path))]
    assert len(path) == len(order)  # patience 5: the whole path


def test_greedy_adds_the_best_calibration_candidate(setup):
    _, _, sel = setup
    greedy = sel.table[sel.table["strategy"] == "greedy"]
    chosen: set[int] = set()
    for step in sorted(greedy["step"].unique()):
        rows = greedy[(greedy["step"] == step) & (greedy["split"] == "calibration")].to_dict("records")
        assert {_layers(r["layers"]) for r in rows} == {tuple(sorted(chosen | {l})) for l in sel.settings["candidates"]
                                                        if l not in chosen}
        best = min(rows, key=_sort_key)
        confirmed = greedy[(greedy["step"] == step) & (greedy["split"] == "held_out")]
        assert list(confirmed["layers"]) == [best["layers"]]
        chosen = set(_layers(best["layers"]))


def test_exhaustive_confirms_the_best_subset_of_each_size(setup):
    _, _, sel = setup
    ex = sel.table[sel.table["strategy"] == "exhaustive"]
    pool = [_layers(r["layers"])[0] for r in sorted(sel.single_layer.to_dict("records"), key=_sort_key)][:3]
    for size in range(1, len(pool) + 1):
        rows = ex[(ex["step"] == size) & (ex["split"] == "calibration")].to_dict("records")
        assert sorted(_layers(r["layers"]) for r in rows) == sorted(tuple(sorted(c)) for c in
                                                                  itertools.combinations(pool, size))
        confirmed = ex[(ex["step"] == size) & (ex["split"] == "held_out")]
        assert list(confirmed["layers"]) == [min(rows, key=_sort_key)["layers"]]


def test_random_paths_and_removal_baseline(setup):
    _, _, sel = setup
    rnd = sel.table[sel.table["strategy"] == "random"]
    assert sorted(rnd["replicate"].unique()) == [0, 1]
    for _, path in rnd.groupby("replicate"):
        sets = [set(_layers(x)) for x in path.sort_values("step")["layers"]]
        assert all(a < b and len(b) == len(a) + 1 for a, b in zip(sets, sets[1:]))
    expected = set()
    for _, group in sel.confirmed().groupby("strategy"):  # removal="best" (default)
        ok = group[group["retention"] >= TARGET]
        expected.add(ok.loc[ok["n_layers"] == ok["n_layers"].max()].sort_values("retention").iloc[-1]["layers"]
                     if len(ok) else group.sort_values("retention").iloc[-1]["layers"])
    removal = sel.confirmed("remove")
    assert set(removal["layers"]) == expected
    info = sl.model_info(setup[0])
    assert (removal["params_zeroed"] == removal["n_heads"] * info.d_head * info.d_model).all()


def test_table_numbers_match_an_independent_evaluation(setup):
    model, kwargs, sel = setup
    row = sel.confirmed().sort_values("n_heads").iloc[-1]
    heads = [(l, h) for l, h in sel.heads if l in _layers(row["layers"])]
    eval_kwargs = dict(kwargs["eval_kwargs"], split="held_out", show_progress=False)
    dense = evaluate(model, **eval_kwargs)
    probe = sl.probe_tokens(model, PROBE["n_prompts"], PROBE["seq_len"])
    with sl.prune_qk(model, heads, K, dims="bos_top", calibration=probe) as handle:  # dims measured again here
        pruned = evaluate(model, **eval_kwargs)
        zeroed = handle.params_zeroed()["total"]
    assert row["params_zeroed"] == zeroed
    for metric in ("acc/mean", "lm/ppl", "copy/acc", "mc/acc"):
        assert row[f"retention:{metric}"] == pytest.approx(retention_value(dense, pruned, metric), abs=1e-6)
    assert row["retention"] == row[f"retention:{sel.metric}"]


def test_frontier_best_and_summaries(setup):
    _, _, sel = setup
    confirmed, front = sel.confirmed(), sel.frontier()
    for f in front.itertuples():  # nothing strictly dominates a frontier point
        assert not ((confirmed["n_heads"] >= f.n_heads) & (confirmed["retention"] >= f.retention)
                    & ((confirmed["n_heads"] > f.n_heads) | (confirmed["retention"] > f.retention))).any()
    for c in confirmed.itertuples():  # every configuration is matched or beaten by a frontier point
        assert ((front["n_heads"] >= c.n_heads) & (front["retention"] >= c.retention)).any()
    best = sel.best()
    meeting = confirmed[confirmed["retention"] >= TARGET]
    if meeting.empty:
        assert best is None
    else:
        assert best["retention"] >= TARGET and best["n_heads"] == meeting["n_heads"].max()
    largest = sel.largest_meeting([TARGET])
    assert set(largest["strategy"]) == set(confirmed["strategy"])
    assert set(sel.dense_table()["metric"]) == set(sel.dense["held_out"])


def test_rerun_reuses_every_configuration(setup):
    model, kwargs, sel = setup
    again = sl.layer_selection(model, **kwargs)
    assert again.cost["configs_evaluated"] == 0
    assert again.table["cached"].all()
    assert again.table["retention"].tolist() == sel.table["retention"].tolist()


@pytest.mark.parametrize("override, fragment", [
    ({"target_retention": 0}, "target_retention"), ({"target_retention": 1.5}, "target_retention"),
    ({"target_retention": -0.1}, "target_retention"), ({"strategy": "best"}, "Unknown strategy"),
    ({"strategy": []}, "strategy is empty"), ({"layers": []}, "layer set is empty"),
    ({"metric": "nope"}, "Unknown metric"), ({"limit": 0}, "limit"), ({"k": 0}, "k=0"),
    ({"eval_kwargs": {"split": "all"}}, "eval_kwargs"), ({"suite": "pruning-paper"}, "Unknown suite"),
    ({"eval_kwargs": {"n_lm_prompt": 3}}, "Unknown eval_kwargs"), ({"basis": "raw"}, "Unknown basis"),
    ({"gqa": "both"}, "Unknown gqa"), ({"removal": "some"}, "Unknown removal"), ({"q": 2}, "q must"),
    ({"greedy_pool": 0}, "greedy_pool"), ({"policy": "explicit"}, "Unknown policy"),
    ({"policy": "wanda"}, "Unknown policy"), ({"fill": "median"}, "Unknown fill"),
    ({"calibration": "scale"}, "Unknown calibration"), ({"objective": "mse"}, "Unknown objective"),
    ({"pool": 0}, "pool must be an int >= 1"), ({"policy": "optimized", "pool": 2}, "exceeds pool=2"),
    ({"fill": "mean", "calibration_tokens": "probe"}, "calibration_tokens= must be token ids"),
])
def test_bad_input_is_refused_before_any_forward(setup, monkeypatch, override, fragment):
    model, kwargs, _ = setup

    def heavy(*args, **kw):
        raise AssertionError("the census ran before the arguments were checked")

    monkeypatch.setattr(selection, "run_census", heavy)
    with pytest.raises(sl.InputError, match=fragment):
        sl.layer_selection(model, **{**kwargs, "results": None, **override})


def test_results_of_another_model_are_refused_before_any_forward(setup, tmp_path, monkeypatch):
    from helpers import build_tiny_checkpoint

    model, kwargs, _ = setup
    other = sl.load_model(str(build_tiny_checkpoint(tmp_path / "other", 4, 4, seed=3)), device="cpu")
    monkeypatch.setattr(selection, "run_census", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    with pytest.raises(sl.InputError, match="fresh=True"):
        sl.layer_selection(other, **kwargs)  # kwargs["results"] holds the first model's sweep


def test_no_specialized_heads_is_explained(setup):
    model, kwargs, _ = setup
    with pytest.raises(sl.InputError, match="No sink-specialized head"):
        sl.layer_selection(model, **{**kwargs, "results": None, "eps": 1.0})


def test_figures_refuse_what_they_cannot_draw(setup):
    from dataclasses import replace

    from sinklens.report.plots import selection as plots

    _, _, sel = setup
    with pytest.raises(sl.InputError, match="selection must be a LayerSelection"):
        plots.pareto_frontier(sel.table)
    without_removal = replace(sel, table=sel.table[sel.table["method"] != "remove"])
    with pytest.raises(sl.InputError, match='removal="best" or "all"'):
        plots.removal_comparison(without_removal)
    assert plots.removal_comparison(sel).data  # the same selection with its removal rows draws


def test_a_fitted_variant_selects_with_its_own_pruning(setup, tmp_path):
    model, kwargs, plain = setup
    kwargs = {**kwargs, "strategy": "single_layer_rank", "removal": "none", "results": tmp_path / "fitted.sqlite"}
    sel = sl.layer_selection(model, policy="act_weight", fill="mean", **kwargs)
    spec = sl.PruneSpec.from_dict(sel.settings["spec"])
    assert (spec.policy, spec.fill, spec.calibration) == ("act_weight", "mean", "none")
    assert sel.heads == plain.heads and set(sel.dims) == set(plain.dims)
    probe = sl.probe_tokens(model, PROBE["n_prompts"], PROBE["seq_len"], split="probe")
    calibration = sl.CalibrationSet(model, probe)  # the probe prompts, the census's: the same fingerprint
    assert sel.settings["calibration_tokens"] == calibration.describe()
    heads = [(l, h) for l, h in sel.heads if l in sel.settings["candidates"]]
    kept = sl.select_dims(model, spec.replace(heads=heads), calibration=calibration)
    assert sel.dims == {f"{l}.{h}": kept[(l, h)].tolist() for l, h in heads}
    # every confirmed row is the variant's pruning of its layers' heads, evaluated independently
    row = sel.confirmed().sort_values("n_heads").iloc[-1]
    pruned_heads = [(l, h) for l, h in heads if l in _layers(row["layers"])]
    eval_kwargs = dict(kwargs["eval_kwargs"], split="held_out", show_progress=False)
    dense = evaluate(model, **eval_kwargs)
    with sl.prune_qk(model, spec.replace(heads=pruned_heads), calibration=calibration) as handle:
        pruned = evaluate(model, **eval_kwargs)
        assert row["params_zeroed"] == handle.params_zeroed()["total"]
    assert row["retention"] == pytest.approx(retention_value(dense, pruned, sel.metric), abs=1e-6)
    # another variant is another configuration; the dense rows are shared
    assert not set(sel.table["key"]) & set(plain.table[plain.table["method"] == "qk"]["key"])
    again = sl.layer_selection(model, policy="act_weight", fill="mean", calibration_tokens=calibration, **kwargs)
    assert again.cost["configs_evaluated"] == 0  # the same prompts as a CalibrationSet: every row reused
