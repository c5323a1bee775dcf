"""One vocabulary: the former spellings still work for one release (a DeprecationWarning naming the new one, the same
numbers), two spellings of one input in one call are refused, and files written before the change are read or refused
with the file named and what to do."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
import torch

import sinklens as sl
from sinklens.assess import beyond_bos
from sinklens.assess.evaluation import build_plan, plan_fingerprint
from sinklens.assess.selection import LayerSelection
from sinklens.assess.sweep import SCHEMA, Sweep, open_results
from sinklens.prune.calibration import calibration_need, resolve_calibration
from sinklens.report import summaries
from sinklens.series import findings

from helpers import random_tokens

# The README's "same steps in Python" block before the vocabulary change, verbatim: researchers' scripts look like it.
PREVIOUS_README = '''
import sinklens as sl

model = sl.load_model("smollm2-135m")                 # or a hub id / local folder of a supported family
probe = sl.probe_tokens(model, n_prompts=64, seq_len=64, prepend_bos=True)
census = sl.run_census(model, probe)                   # alpha_k, Sink^eps, confidence, non-first sinks
heads = sl.sink_specialized_heads(census.sink_scores(0), eps=0.3, q=0.9)
errors = sl.reconstruction_error(model, probe, heads, k=10)   # per head: frob_rel, kl, d_alpha0 (dense model in)
dense = sl.evaluate(model)                             # offline suite: held-out LM, zero-shot MC, copying
with sl.prune_qk(model, heads, k=10, dims="bos_top", tokens=probe):   # every forward inside sees the pruned model
    pruned = sl.evaluate(model)                        # restored bitwise on exit
print(sl.retention(dense, pruned))                     # pruned / dense per metric, bootstrap CI
handle = sl.apply_pruning(model, heads, k=10, tokens=probe)                      # persistent form
sl.save_pruned(model, "pruned-k10")                    # HF checkpoint + sinklens_manifest.json
handle.restore()
'''
SMALLER = {"n_prompts=64": "n_prompts=8",
           "sl.evaluate(model)": "sl.evaluate(model, limit=4, n_lm_prompts=2, n_copy=2, show_progress=False)",
           '"pruned-k10"': "str(OUT)"}
K = 4
README = Path(__file__).resolve().parents[1] / "README.md"


def _run(code: str, model, out, monkeypatch) -> dict:
    for text, smaller in SMALLER.items():
        assert text in code
        code = code.replace(text, smaller)
    monkeypatch.setattr(sl, "load_model", lambda *args, **kwargs: model)
    names = {"OUT": out}
    exec(compile(code, "README", "exec"), names)
    return names


@pytest.mark.integration
def test_the_previous_readme_example_warns_and_gives_the_same_numbers(smollm, tmp_path, monkeypatch):
    current = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert "tokens=probe" not in current and "calibration=probe" in current
    with pytest.warns(DeprecationWarning, match=r"prune_qk\(tokens=\.\.\.\) is deprecated: use calibration="):
        old = _run(PREVIOUS_README, smollm, tmp_path / "old", monkeypatch)
    new = _run(current, smollm, tmp_path / "new", monkeypatch)
    pd.testing.assert_frame_equal(old["errors"], new["errors"])
    assert dict(old["pruned"]) == dict(new["pruned"])
    manifests = [sl.read_manifest(tmp_path / name)["edits"] for name in ("old", "new")]
    assert manifests[0] == manifests[1]
    assert not sl.active_edits(smollm)


# --- the former keywords: a DeprecationWarning naming the new one, the same numbers ---------------------------

def test_former_calibration_keywords_warn_and_prune_the_same(tiny):
    info = sl.model_info(tiny)
    cal, ev = random_tokens(4, 12, seed=21), random_tokens(3, 12, seed=22)
    heads = [(1, 0), (2, info.n_heads - 1)]
    spec = sl.PruneSpec(heads, K, "act_weight", fill="mean", temperature=True)
    with pytest.warns(DeprecationWarning, match=r"select_dims\(tokens=\.\.\.\) is deprecated: use calibration="):
        old = sl.select_dims(tiny, spec, tokens=cal)
    new = sl.select_dims(tiny, spec, calibration=cal)
    assert all(torch.equal(old[p], new[p]) for p in heads)
    with pytest.warns(DeprecationWarning, match=r"plan_pruning\(tokens=.*use calibration="):
        old_plan = sl.plan_pruning(tiny, spec, tokens=cal)
    assert old_plan.as_dict() == sl.plan_pruning(tiny, spec, calibration=cal).as_dict()
    with pytest.warns(DeprecationWarning, match=r"reconstruction_error\(dims_tokens=.*use calibration="):
        old_errors = sl.reconstruction_error(tiny, ev, spec, dims_tokens=cal, level="layer", show_progress=False)
    new_errors = sl.reconstruction_error(tiny, ev, spec, calibration=cal, level="layer", show_progress=False)
    pd.testing.assert_frame_equal(old_errors, new_errors)
    with pytest.warns(DeprecationWarning, match=r"k_sweep\(dims_tokens=.*use calibration="):
        old_sweep = sl.k_sweep(tiny, ev, heads, ks=[K], policies=["act_weight", "whole_head"],
                               calibrations=["none", "temperature"], dims_tokens=cal, show_progress=False)
    new_sweep = sl.k_sweep(tiny, ev, heads, ks=[K], policies=["act_weight", "head_removal"],
                           temperatures=[False, True], calibration=cal, show_progress=False)
    pd.testing.assert_frame_equal(old_sweep, new_sweep)
    assert set(new_sweep["policy"]) == {"act_weight", "head_removal"} and "calibration" not in new_sweep


def test_the_former_temperature_option_warns_and_means_temperature(tiny):
    cal, heads = random_tokens(4, 12, seed=23), [(1, 0)]
    with pytest.warns(DeprecationWarning, match=r"use temperature=True"):
        spec = sl.PruneSpec(heads, K, "act_weight", calibration="temperature")
    assert spec == sl.PruneSpec(heads, K, "act_weight", temperature=True)
    with pytest.warns(DeprecationWarning, match=r'calibration="temperature"\) is deprecated.*temperature=True'):
        with sl.prune_qk(tiny, heads, K, "act_weight", calibration="temperature", tokens=cal) as handle:
            record = handle.as_dict()
    assert record["temperature"] is True and len(record["q_scale"]) == 1
    assert sl.PruneSpec.from_dict(record) == spec
    assert spec.variant_label == "act_weight/zero/temperature" == beyond_bos.variant_label(
        {"policy": "act_weight", "fill": "zero", "calibration": "temperature"})  # a former variant mapping
    assert sl.PruneSpec(heads, K).variant_label == "bos_top/zero/none"


def test_former_split_names_warn_and_pick_the_same_items(tiny):
    with pytest.warns(DeprecationWarning, match='use split="search"'):
        old = build_plan(tiny, "copy", n_copy=4, copy_len=4, split="calibration")
    assert plan_fingerprint(old) == plan_fingerprint(build_plan(tiny, "copy", n_copy=4, copy_len=4, split="search"))
    with pytest.warns(DeprecationWarning, match='use split="held_out"'):
        held = sl.probe_tokens(tiny, 2, 8, split="heldout")
    assert torch.equal(held.tokens, sl.probe_tokens(tiny, 2, 8, split="held_out").tokens)


# --- two spellings of one input in one call ---------------------------------------------------------------------

@pytest.mark.parametrize("call", ["prune_qk", "apply_pruning", "plan_pruning", "select_dims", "reconstruction_error",
                                  "k_sweep", "Sweep", "temperature twice"])
def test_two_spellings_of_one_input_are_refused_naming_both(tiny, call):
    cal = random_tokens(3, 10, seed=24)
    spec = sl.PruneSpec([(1, 0)], K, "act_weight")
    calls = {
        "prune_qk": (lambda: sl.prune_qk(tiny, spec, tokens=cal, calibration=cal).__enter__(), "tokens="),
        "apply_pruning": (lambda: sl.apply_pruning(tiny, spec, tokens=cal, calibration=cal), "tokens="),
        "plan_pruning": (lambda: sl.plan_pruning(tiny, spec, tokens=cal, calibration=cal), "tokens="),
        "select_dims": (lambda: sl.select_dims(tiny, spec, tokens=cal, calibration=cal), "tokens="),
        "reconstruction_error": (lambda: sl.reconstruction_error(tiny, cal, spec, dims_tokens=cal, calibration=cal),
                                 "dims_tokens="),
        "k_sweep": (lambda: sl.k_sweep(tiny, cal, [(1, 0)], dims_tokens=cal, calibration=cal), "dims_tokens="),
        "Sweep": (lambda: Sweep(tiny, {"all": build_plan(tiny, "copy", n_copy=2, copy_len=4)}, spec, tokens=cal,
                                calibration=cal), "tokens="),
        "temperature twice": (lambda: sl.apply_pruning(tiny, spec, calibration="temperature", temperature=True),
                              "temperature="),
    }
    run, old = calls[call]
    with pytest.raises(sl.InputError, match=rf"both .*{old}.* (and )?(calibration|temperature)="):
        run()
    assert not sl.active_edits(tiny)


# --- one resolver says what a spec needs ----------------------------------------------------------------------------

def test_the_resolver_gives_each_spec_what_it_needs(tiny):
    cal = random_tokens(3, 10, seed=25)
    massive = sl.massive_activations(tiny, cal, show_progress=False)
    needs = {sl.PruneSpec([(1, 0)], K, "random"): "nothing", sl.PruneSpec([(1, 0)], K): "bos",
             sl.PruneSpec([(1, 0)], K, fill="mean"): "inputs", sl.PruneSpec([(1, 0)], K, temperature=True): "inputs",
             sl.PruneSpec([(1, 0)], K, "weight_norm", fill="mean"): "inputs"}
    for spec, need in needs.items():
        assert calibration_need(spec) == need
    plain = sl.PruneSpec([(1, 0)], K)
    bos_only = resolve_calibration(tiny, plain, massive)
    assert bos_only.bos_only and bos_only.as_dict()["kind"] == "bos_vectors"
    from_ids = resolve_calibration(tiny, plain, cal)
    assert torch.equal(bos_only.massive([1]).top_dims(1, K), from_ids.massive([1]).top_dims(1, K))
    assert resolve_calibration(tiny, sl.PruneSpec([(1, 0)], K, "random"), None) is None
    with pytest.raises(sl.InputError, match="holds only BOS vectors"):
        resolve_calibration(tiny, sl.PruneSpec([(1, 0)], K, fill="mean"), massive)
    with pytest.raises(sl.InputError, match="pass BOS-prepended probe prompts as calibration="):
        resolve_calibration(tiny, plain, None)
    with pytest.raises(sl.InputError, match="is a template"):
        sl.apply_pruning(tiny, sl.PruneSpec.template(K), calibration=cal)


# --- files written before the change ------------------------------------------------------------------------------

def test_a_results_file_written_before_the_change_is_refused_naming_it(tiny, tmp_path):
    path = tmp_path / "layer_selection.sqlite"
    open_results(tiny, path).close()  # this model's file, then rewritten as today's code wrote it: schema 2 rows
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '2' WHERE name = 'schema'")
        config = {"method": "remove", "layers": [1], "heads": [[1, 0]], "split": "heldout",
                  "spec": {"heads": [[1, 0]], "k": 4, "policy": "bos_top", "basis": "normalized", "calibration": "none",
                           "fill": "zero"}}
        conn.execute("INSERT INTO results VALUES (?, ?, ?, ?, ?, ?)",
                     ("k" * 24, json.dumps(config), "{}", "{}", b"", 0.0))
    assert SCHEMA == 3
    with pytest.raises(sl.InputError, match=rf"{re.escape(str(path))} was written with results-file schema '2'.*"
                                            r"fresh=True"):
        open_results(tiny, path)
    spec = sl.PruneSpec.from_dict(config["spec"])  # its rows' specs still read
    assert spec == sl.PruneSpec([(1, 0)], 4) and spec.temperature is False


def test_records_and_summaries_written_before_the_change_are_read():
    old_manifest_edit = {"kind": "qk_pruning", "heads": [[1, 0], [2, 3]], "k": 3, "policy": "explicit", "basis": None,
                         "gqa": "exact", "seed": None, "force": False, "dims": {"1.0": [0, 4, 7], "2.3": [1, 2, 5]},
                         "fill": "mean", "calibration": "temperature", "objective": None, "pool": None}
    spec = sl.PruneSpec.from_dict(old_manifest_edit)
    assert spec.dims == ((0, 4, 7), (1, 2, 5)) and spec.temperature is True and spec.fill == "mean"
    assert sl.PruneSpec.from_dict(spec.as_dict()) == spec  # and the new form reads back the same
    with pytest.raises(sl.InputError, match="temperature=True"):
        sl.PruneSpec.from_dict({**old_manifest_edit, "calibration": "platt"})
    old_summary = {"headline": {"metric": "acc/mean", "target_retention": 0.91, "n_configurations": 3,
                                "best_layers": "1,3", "best_n_heads": 4, "best_params_zeroed": 400,
                                "best_retention": 0.95, "best_ci_low": 0.9, "best_ci_high": 0.99,
                                "removal_retention_same_heads": 0.8}, "settings": {"k": 10}}
    (sentence,) = findings.layer_selection(old_summary)
    assert "removing the same heads whole keeps 80.0 %" in sentence
    new_summary = {**old_summary, "headline": {**{k: v for k, v in old_summary["headline"].items()
                                                  if k != "removal_retention_same_heads"},
                                               "head_removal_retention_same_heads": 0.8}}
    assert findings.layer_selection(new_summary) == [sentence]


def test_a_k_sweep_frame_saved_before_the_change_is_read():
    rows = [{"policy": p, "fill": "zero", "calibration": c, "k": 5, "frob_rel": v, "kl": v}
            for p, c, v in (("bos_top", "none", 0.5), ("act_weight", "temperature", 0.3))]
    table = beyond_bos.variant_table(pd.DataFrame(rows), [5])
    assert list(table["temperature"]) == [True, False]  # act_weight/zero/temperature sorts first
    assert beyond_bos.best_variant(table, 5) == {"policy": "act_weight", "fill": "zero", "temperature": True}
    assert summaries.beyond_bos_headline(table, 5)["best_variant"] == "act_weight/zero/temperature"


def test_a_configurations_table_saved_before_the_change_is_read():
    old = pd.DataFrame([{"strategy": "greedy", "split": "heldout", "method": "qk", "layers": "1,3",
                         "heads": "1.0 3.2", "removal_retention": 0.8},
                        {"strategy": "removal", "split": "calibration", "method": "remove", "layers": "5",
                         "heads": "5.1", "removal_retention": None}])
    read = LayerSelection.read_table(old)
    assert read["layers"].tolist() == [[1, 3], [5]] and read["heads"].tolist() == [[[1, 0], [3, 2]], [[5, 1]]]
    assert read["method"].tolist() == ["qk", "head_removal"] and read["split"].tolist() == ["held_out", "search"]
    assert "head_removal_retention" in read and "removal_retention" not in read
