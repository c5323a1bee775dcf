"""layer_selection: each strategy on a tiny model, checked against independent recomputation."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

import sinklens as sl
from sinklens.assess import selection
from sinklens.assess.evaluation import build_plan, evaluate, retention_value

from helpers import mc_items, write_items

ITEMS = mc_items(12, n_choices=4)
PROBE = dict(n_prompts=8, seq_len=16, eps=0.05, q=0.5)
EVAL = dict(n_lm_prompts=2, lm_seq_len=12, n_copy=3, copy_len=6)
K, TARGET = 4, 0.9



@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("selection")
    items = write_items(folder, ITEMS)
    model = sl.load_model(str(tiny_dir), device="cpu")
    kwargs = dict(target_retention=TARGET, **PROBE, evaluation=sl.EvalOptions(items=str(items), **EVAL),
                  search=sl.SearchOptions(strategy=list(selection.STRATEGIES), exhaustive_pool=3, exhaustive_size=3,
                                          n_random=2, patience=5),
                  n_boot=50, results=folder / "sweep.sqlite", show_progress=False)
    return model, kwargs, sl.layer_selection(model, sl.PruneSpec.template(K), **kwargs)


def _layers(value) -> tuple[int, ...]:
    assert isinstance(value, list), f"layer sets are lists of ints in results, got {value!r}"
    return tuple(value)


def _sort_key(row):
    return (-row["retention"], row["loss"], _layers(row["layers"]))


def _eval_kwargs(kwargs) -> dict:
    return dict(kwargs["evaluation"].as_dict(), split="held_out", show_progress=False)


def test_heads_and_dims_are_measured(setup):
    model, _, sel = setup
    probe = sl.probe_tokens(model, PROBE["n_prompts"], PROBE["seq_len"])
    scores = sl.run_census(model, probe, show_progress=False).sink_scores(0)
    assert sel.heads == sorted(sl.sink_specialized_heads(scores, eps=PROBE["eps"], q=PROBE["q"]))
    stats = sl.massive_activations(model, probe, show_progress=False)
    assert [(d["layer"], d["head"]) for d in sel.dims] == [(l, h) for l, h in sel.heads
                                                           if l in sel.settings["candidates"]]
    for row in sel.dims:  # bos_top: every head of a layer keeps its layer's top-k BOS dims
        assert row["dims"] == sorted(stats.top_dims(row["layer"], K, "normalized").tolist())
    assert sel.settings["calibration"] is None  # plain bos_top: the probe's BOS vectors, no calibration set
    for row in sel.table.itertuples():
        expected = [[l, h] for l, h in sel.heads if l in _layers(row.layers)]
        assert row.heads == expected and row.n_heads == len(expected)


def test_single_layer_rank_follows_single_layer_retention(setup):
    _, _, sel = setup
    order = [_layers(r["layers"])[0] for r in sorted(sel.single_layer.to_dict("records"), key=_sort_key)]
    path = sel.table[sel.table["strategy"] == "single_layer_rank"].sort_values("step")
    assert [_layers(x) for x in path["layers"]] == [tuple(sorted(order[:i + 1])) for i in range(len(path))]
    assert len(path) == len(order)  # patience 5: the whole path


def test_greedy_adds_the_best_search_candidate(setup):
    _, _, sel = setup
    greedy = sel.table[sel.table["strategy"] == "greedy"]
    chosen: set[int] = set()
    for step in sorted(greedy["step"].unique()):
        rows = greedy[(greedy["step"] == step) & (greedy["split"] == "search")].to_dict("records")
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
        rows = ex[(ex["step"] == size) & (ex["split"] == "search")].to_dict("records")
        assert sorted(_layers(r["layers"]) for r in rows) == sorted(tuple(sorted(c)) for c in
                                                                  itertools.combinations(pool, size))
        confirmed = ex[(ex["step"] == size) & (ex["split"] == "held_out")]
        assert list(confirmed["layers"]) == [min(rows, key=_sort_key)["layers"]]


def test_random_paths_and_head_removal_baseline(setup):
    _, _, sel = setup
    rnd = sel.table[sel.table["strategy"] == "random"]
    assert sorted(rnd["replicate"].unique()) == [0, 1]
    for _, path in rnd.groupby("replicate"):
        sets = [set(_layers(x)) for x in path.sort_values("step")["layers"]]
        assert all(a < b and len(b) == len(a) + 1 for a, b in zip(sets, sets[1:]))
    removal = sel.confirmed("head_removal")
    groups = [group for _, group in sel.confirmed().groupby("strategy")]  # head_removal="best" (default)
    # each removed set is some strategy's pick and each strategy's pick is removed, the pick checked as a property
    assert all(any(_is_removal_pick(group, layers) for group in groups) for layers in removal["layers"])
    assert all(any(_is_removal_pick(group, layers) for layers in removal["layers"]) for group in groups)
    assert set(removal["strategy"]) == {"head_removal"}
    info = sl.model_info(setup[0])
    assert (removal["params_zeroed"] == removal["n_heads"] * info.d_head * info.d_model).all()


def _is_removal_pick(group, layers) -> bool:
    """Whether ``layers`` is what removal="best" may pick among one strategy's confirmed sets ``group``: no set
    meeting the target has more layers, or as many and a higher retention; when none meets it, no set retains more."""
    row = group[[list(v) == list(layers) for v in group["layers"]]]
    if row.empty:
        return False
    n_layers, kept = row["n_layers"].iloc[0], row["retention"].iloc[0]
    ok = group[group["retention"] >= TARGET]
    if ok.empty:
        return not (group["retention"] > kept).any()
    better = (ok["n_layers"] > n_layers) | ((ok["n_layers"] == n_layers) & (ok["retention"] > kept))
    return kept >= TARGET and not better.any()


def test_table_numbers_match_an_independent_evaluation(setup):
    model, kwargs, sel = setup
    row = sel.confirmed().sort_values("n_heads").iloc[-1]
    heads = [(l, h) for l, h in sel.heads if l in _layers(row["layers"])]
    eval_kwargs = _eval_kwargs(kwargs)
    dense = evaluate(model, **eval_kwargs)
    probe = sl.probe_tokens(model, PROBE["n_prompts"], PROBE["seq_len"])
    with sl.prune_qk(model, heads, K, dims="bos_top", calibration=probe) as handle:  # dims measured again here
        pruned = evaluate(model, **eval_kwargs)
        zeroed = handle.params_zeroed()["total"]
    assert row["params_zeroed"] == zeroed
    for metric in ("acc/mean", "lm/ppl", "copy/acc", "mc/acc"):
        assert row[f"retention:{metric}"] == pytest.approx(retention_value(dense, pruned, metric=metric), abs=1e-6)
    assert row["retention"] == row[f"retention:{sel.metric}"]


def test_frontier_best_and_summaries(setup):
    _, _, sel = setup
    confirmed, front = sel.confirmed(), sel.frontier()
    for f in front.itertuples():  # nothing strictly dominates a frontier point
        assert not ((confirmed["n_heads"] >= f.n_heads) & (confirmed["retention"] >= f.retention)
                    & ((confirmed["n_heads"] > f.n_heads) | (confirmed["retention"] > f.retention))).any()
    for c in confirmed.itertuples():  # every configuration is matched or beaten by a frontier point
        assert ((front["n_heads"] >= c.n_heads) & (front["retention"] >= c.retention)).any()
    best, meeting = sel.best(), confirmed[confirmed["retention"] >= TARGET]
    assert (best is None) == meeting.empty
    if best is not None:
        assert best["retention"] >= TARGET and best["n_heads"] == meeting["n_heads"].max()
    # both outcomes of best() on constructed retentions: the fewest-heads configuration alone meets the target, or
    # none does
    fewest = confirmed["n_heads"].idxmin()
    only = replace(sel, table=sel.table.assign(retention=(sel.table.index == fewest).astype(float))).best()
    assert only is not None and only["layers"] == confirmed.loc[fewest, "layers"]
    assert replace(sel, table=sel.table.assign(retention=0.0)).best() is None
    largest = sel.largest_meeting([TARGET])
    assert set(largest["strategy"]) == set(confirmed["strategy"])
    assert set(sel.dense_table()["metric"]) == set(sel.dense["held_out"])


def test_rerun_reuses_every_configuration(setup):
    model, kwargs, sel = setup
    plans = kwargs["evaluation"].plans(model)  # the same evaluation as built plans: the same configurations
    again = sl.layer_selection(model, sl.PruneSpec.template(K), **{**kwargs, "evaluation": plans})
    assert again.cost["configs_evaluated"] == 0
    assert again.table["cached"].all()
    assert again.table["retention"].tolist() == sel.table["retention"].tolist()
    assert list(sel.dense) == ["search", "held_out"]


def test_previous_tables_are_read_in_the_current_vocabulary(setup):
    _, _, sel = setup
    old = sel.table.assign(layers=[",".join(map(str, v)) for v in sel.table["layers"]],
                           heads=[" ".join(f"{l}.{h}" for l, h in v) for v in sel.table["heads"]],
                           method=sel.table["method"].replace({"head_removal": "remove"}),
                           split=sel.table["split"].replace({"search": "calibration", "held_out": "heldout"}))
    read = selection.LayerSelection.read_table(old)
    for column in ("layers", "heads", "method", "split"):
        assert read[column].tolist() == sel.table[column].tolist(), column
    with pytest.warns(DeprecationWarning, match='"head_removal"'):
        assert sel.confirmed("remove").equals(sel.confirmed("head_removal"))


T = sl.PruneSpec.template
BAD = {  # name: (the call's arguments from the setup's, what the error says)
    "target 0": (lambda a: {**a, "target_retention": 0}, "target_retention"),
    "target 1.5": (lambda a: {**a, "target_retention": 1.5}, "target_retention"),
    "target < 0": (lambda a: {**a, "target_retention": -0.1}, "target_retention"),
    "strategy": (lambda a: {**a, "search": sl.SearchOptions(strategy="best")}, "Unknown strategy"),
    "no strategy": (lambda a: {**a, "search": sl.SearchOptions(strategy=[])}, "strategy is empty"),
    "no layers": (lambda a: {**a, "layers": []}, "layer set is empty"),
    "metric": (lambda a: {**a, "metric": "nope"}, "Unknown metric"),
    "metric of the plans": (lambda a: {**a, "metric": "mc/acc", "evaluation": {
        "search": a["plans"]["copy"], "held_out": a["plans"]["copy"]}}, "Unknown metric"),
    "plans keyed by old split names": (lambda a: {**a, "evaluation": {"calibration": a["plans"]["copy"],
                                                                      "heldout": a["plans"]["copy"]}}, "'search'"),
    "evaluation dict": (lambda a: {**a, "evaluation": {"limit": 2}}, "keyed 'search'"),
    "limit": (lambda a: {**a, "evaluation": sl.EvalOptions(limit=0)}, "limit"),
    "suite": (lambda a: {**a, "evaluation": sl.EvalOptions(suite="pruning-paper")}, "Unknown suite"),
    "k": (lambda a: {**a, "template": T(0)}, "k=0"),
    "template with heads": (lambda a: {**a, "template": sl.PruneSpec([(0, 0)], K)}, "template holds heads"),
    "template not a spec": (lambda a: {**a, "template": K}, "template must be a sinklens.PruneSpec"),
    "basis": (lambda a: {**a, "template": T(K, basis="raw")}, "Unknown basis"),
    "gqa": (lambda a: {**a, "template": T(K, gqa="both")}, "Unknown gqa"),
    "head_removal": (lambda a: {**a, "search": sl.SearchOptions(head_removal="some")}, "Unknown head_removal"),
    "q": (lambda a: {**a, "q": 2}, "q must"),
    "greedy_pool": (lambda a: {**a, "search": sl.SearchOptions(greedy_pool=0)}, "greedy_pool"),
    "explicit": (lambda a: {**a, "template": T(K, policy="explicit")}, "explicit"),
    "policy": (lambda a: {**a, "template": T(K, policy="wanda")}, "Unknown dims policy"),
    "fill": (lambda a: {**a, "template": T(K, fill="median")}, "Unknown fill"),
    "temperature": (lambda a: {**a, "template": T(K, temperature="scale")}, "temperature must be True or False"),
    "objective": (lambda a: {**a, "template": T(K, policy="optimized", objective="mse")}, "Unknown objective"),
    "pool": (lambda a: {**a, "template": T(K, policy="optimized", pool=0)}, "pool must be an int >= 1"),
    "k over pool": (lambda a: {**a, "template": T(K, policy="optimized", pool=2)}, "exceeds pool=2"),
    "calibration": (lambda a: {**a, "template": T(K, fill="mean"), "calibration": "probe"},
                    "calibration= must be token ids"),
    "both spellings": (lambda a: {**a, "calibration": a["probe"], "calibration_tokens": a["probe"]},
                       "both calibration_tokens= and calibration="),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_before_any_forward(setup, monkeypatch, case):
    model, kwargs, _ = setup
    build, fragment = BAD[case]

    def heavy(*args, **kw):
        raise AssertionError("the census ran before the arguments were checked")

    plans = {"copy": build_plan(model, "copy", n_copy=2, copy_len=4)}
    probe = sl.probe_tokens(model, 2, 8)
    monkeypatch.setattr(selection, "run_census", heavy)
    with pytest.raises(sl.InputError, match=fragment):
        args = build({**kwargs, "results": None, "template": T(K), "plans": plans, "probe": probe})
        args.pop("plans"), args.pop("probe")
        sl.layer_selection(model, args.pop("template"), **args)


def test_results_of_another_model_are_refused_before_any_forward(setup, tmp_path, monkeypatch):
    from helpers import build_tiny_checkpoint

    model, kwargs, _ = setup
    other = sl.load_model(str(build_tiny_checkpoint(tmp_path / "other", 4, 4, seed=3)), device="cpu")
    monkeypatch.setattr(selection, "run_census", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    with pytest.raises(sl.InputError, match="fresh=True"):
        sl.layer_selection(other, sl.PruneSpec.template(K), **kwargs)  # kwargs["results"]: the first model's sweep


def test_no_specialized_heads_is_explained(setup):
    model, kwargs, _ = setup
    with pytest.raises(sl.InputError, match="No sink-specialized head"):
        sl.layer_selection(model, sl.PruneSpec.template(K), **{**kwargs, "results": None, "eps": 1.0})


def test_figures_refuse_what_they_cannot_draw(setup):
    from dataclasses import replace

    from sinklens.report.plots import selection as plots

    _, _, sel = setup
    with pytest.raises(sl.InputError, match="selection must be a LayerSelection"):
        plots.pareto_frontier(sel.table)
    without_removal = replace(sel, table=sel.table[sel.table["method"] != "head_removal"])
    with pytest.raises(sl.InputError, match='head_removal="best"'):
        plots.head_removal_comparison(without_removal)
    assert plots.head_removal_comparison(sel).data  # the same selection with its removal rows draws
    for figure in (plots.single_layer_retention, plots.retention_by_n_layers, plots.pareto_frontier):
        assert figure(sel).data


def test_a_fitted_variant_selects_with_its_own_pruning(setup, tmp_path):
    model, kwargs, plain = setup
    kwargs = {**kwargs, "search": sl.SearchOptions(strategy="single_layer_rank", head_removal="none"),
              "results": tmp_path / "fitted.sqlite"}
    template = sl.PruneSpec.template(K, policy="act_weight", fill="mean")
    sel = sl.layer_selection(model, template, **kwargs)
    spec = sl.PruneSpec.from_dict(sel.settings["spec"])
    assert (spec.policy, spec.fill, spec.temperature) == ("act_weight", "mean", False)
    assert spec.replace(heads=()) == template
    assert sel.heads == plain.heads and [(d["layer"], d["head"]) for d in sel.dims] == [
        (d["layer"], d["head"]) for d in plain.dims]
    probe = sl.probe_tokens(model, PROBE["n_prompts"], PROBE["seq_len"], split="probe")
    calibration = sl.CalibrationSet(model, probe)  # the probe prompts, the census's: the same fingerprint
    assert sel.settings["calibration"] == calibration.as_dict()
    heads = [(l, h) for l, h in sel.heads if l in sel.settings["candidates"]]
    kept = sl.select_dims(model, spec.replace(heads=heads), calibration=calibration)
    assert sel.dims == [{"layer": l, "head": h, "dims": kept[(l, h)].tolist()} for l, h in heads]
    # every confirmed row is the variant's pruning of its layers' heads, evaluated independently
    row = sel.confirmed().sort_values("n_heads").iloc[-1]
    pruned_heads = [(l, h) for l, h in heads if l in _layers(row["layers"])]
    eval_kwargs = _eval_kwargs(kwargs)
    dense = evaluate(model, **eval_kwargs)
    with sl.prune_qk(model, spec.replace(heads=pruned_heads), calibration=calibration) as handle:
        pruned = evaluate(model, **eval_kwargs)
        assert row["params_zeroed"] == handle.params_zeroed()["total"]
    assert row["retention"] == pytest.approx(retention_value(dense, pruned, metric=sel.metric), abs=1e-6)
    # another variant is another configuration; the dense rows are shared
    assert not set(sel.table["key"]) & set(plain.table[plain.table["method"] == "qk"]["key"])
    again = sl.layer_selection(model, template, calibration=calibration, **kwargs)
    assert again.cost["configs_evaluated"] == 0  # the same prompts as a CalibrationSet: every row reused
    with pytest.warns(DeprecationWarning, match="use calibration="):
        old = sl.layer_selection(model, template, calibration_tokens=calibration, **kwargs)
    assert old.table["retention"].tolist() == again.table["retention"].tolist()
