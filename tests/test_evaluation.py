"""sinklens.evaluate / retention: every metric against an independent HF eager computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

import sinklens as sl
from sinklens.assess import evaluation
from sinklens.assess.evaluation import (
    EvalResult,
    build_plan,
    compute_metrics,
    encode_pair,
    evaluate,
    load_items,
    retention,
)

from helpers import TINY_ITEMS, write_items


@pytest.fixture
def item_file(tmp_path):
    return write_items(tmp_path, TINY_ITEMS)


def _reference_logp(reference, ids: list[int]) -> torch.Tensor:
    """Plain HF eager logits of one sequence, log_softmax in float32: [pos, vocab]."""
    with torch.no_grad():
        logits = reference(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def _reference_ll(reference, context_ids: list[int], continuation_ids: list[int]) -> float:
    logp = _reference_logp(reference, context_ids + continuation_ids)
    start = len(context_ids)
    return float(sum(logp[start + i - 1, t] for i, t in enumerate(continuation_ids)))


# --- the bundled items ---------------------------------------------------------------------------

def test_bundled_items_schema_and_provenance():
    items = load_items()
    assert len(items) >= 300
    counts = items["task"].value_counts()
    assert len(counts) >= 3 and counts.min() >= 90, counts.to_dict()
    assert items["id"].is_unique
    for row in items.itertuples():
        assert all(c.startswith(" ") and c.strip() for c in row.choices), row.id  # continuation with its space
        assert 0 <= row.gold < len(row.choices) and len(set(row.choices)) == len(row.choices)
        assert (row.context + "".join(row.choices)).isascii()  # acc_norm: characters == UTF-8 bytes
    # the file is exactly what the documented generator writes
    from sinklens.data import generate_items

    regenerated = pd.DataFrame(generate_items.build())
    assert regenerated["id"].tolist() == items["id"].tolist()
    assert regenerated["choices"].tolist() == items["choices"].tolist()
    assert regenerated["gold"].tolist() == items["gold"].tolist()
    # gold positions are shuffled, not always the first choice
    assert items["gold"].value_counts().min() > 0.15 * len(items)


# --- scoring against an independent computation ---------------------------------------------------

def test_mc_scoring_matches_hf_eager(tiny, hf_reference, item_file):
    result = evaluate(tiny, "mc", items=item_file, show_progress=False)
    table = result.per_item.set_index("item")
    tok = tiny.tokenizer
    for item in TINY_ITEMS:
        # independent encoding: lm-eval's rule, written out again
        context, n_spaces = item["context"], len(item["context"]) - len(item["context"].rstrip())
        lls = []
        for choice in item["choices"]:
            cont = (context[-n_spaces:] if n_spaces else "") + choice
            ctx = context[:-n_spaces] if n_spaces else context
            ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
            whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
            lls.append(_reference_ll(hf_reference, [1] + ctx_ids, whole[len(ctx_ids):]))
        lls = np.array(lls)
        chars = np.array([len(c) for c in item["choices"]], dtype=float)
        row = table.loc[item["id"]]
        assert row["acc"] == float(np.argmax(lls) == item["gold"])
        assert row["acc_norm"] == float(np.argmax(lls / chars) == item["gold"])
        assert row["nll"] == pytest.approx(-lls[item["gold"]], abs=1e-4)
        log_norm = np.log(np.exp(lls - lls.max()).sum()) + lls.max()
        assert row["mc_nll"] == pytest.approx(log_norm - lls[item["gold"]], abs=1e-4)
        assert row["n_choices"] == len(item["choices"])
    metrics = result.metrics
    for task in ("alpha", "beta"):
        rows = table[table["task"] == task]
        assert metrics[f"mc/{task}/acc"] == pytest.approx(rows["acc"].mean())
    assert metrics["mc/acc"] == pytest.approx((metrics["mc/alpha/acc"] + metrics["mc/beta/acc"]) / 2)
    assert result.chance["mc/alpha/acc"] == pytest.approx(np.mean([1 / 3, 1 / 2, 1 / 4]))


def test_lm_and_copy_match_hf_eager(tiny, hf_reference):
    result = evaluate(tiny, "default", items=None, limit=2, n_lm_prompts=3, lm_seq_len=12, n_copy=3, copy_len=6,
                      seed=5, show_progress=False)
    items = result.per_item
    # LM: the held-out probe split (not the probe prompts), every text token scored
    batch = sl.probe_tokens(tiny, n_prompts=2, seq_len=12, split="held_out")
    nll, n, hits = 0.0, 0, 0
    for row in batch.tokens:
        ids = row.tolist()
        logp = _reference_logp(hf_reference, ids)
        targets = torch.tensor(ids[1:])
        nll -= float(logp[:-1].gather(1, targets[:, None]).sum())
        hits += int((logp[:-1].argmax(-1) == targets).sum())
        n += len(ids) - 1
    assert result.metrics["lm/ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert result.metrics["lm/acc"] == pytest.approx(hits / n)
    assert items[items["part"] == "lm"]["n_tokens"].sum() == n
    # copy: second half of BOS + r + r, predicting r[1:]
    vocab = evaluation.copy_vocabulary(tiny)
    draws = vocab[torch.randint(0, vocab.numel(), (2, 6), generator=torch.Generator().manual_seed(5))]
    hits = n = 0
    for seq in draws.tolist():
        ids = [1] + seq + seq
        logp = _reference_logp(hf_reference, ids)
        for t in range(1, 6):
            hits += int(logp[7 + t - 1].argmax() == seq[t])  # the copy starts at column 7; r[t-1] predicts r[t]
            n += 1
    assert result.metrics["copy/acc"] == pytest.approx(hits / n)
    present = [result.metrics[k] for k in ("lm/acc", "mc/acc", "copy/acc")]
    assert result.metrics["acc/mean"] == pytest.approx(np.mean(present))


def test_plan_forward_matches_bridge_forward(tiny):
    """The evaluation runner (bridge blocks called directly) equals the bridge's own forward."""
    plan = build_plan(tiny, "lm", n_lm_prompts=2, lm_seq_len=10)
    batch = plan.batches[0]
    logp, _, _ = evaluation.forward_scores(tiny, batch)
    with torch.no_grad():
        logits = tiny(batch.tokens).float().log_softmax(-1)
    expected = logits[batch.rows, batch.cols].gather(1, batch.targets[:, None])[:, 0]
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-5)


def test_encode_pair_moves_trailing_space(smollm):
    context, cont = encode_pair(smollm.tokenizer, "The capital of France is ", "Paris")
    assert context == smollm.tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    assert smollm.tokenizer.decode(cont) == " Paris"


# --- retention -----------------------------------------------------------------------------------

def test_retention_of_unpruned_model_is_exactly_one(tiny, item_file):
    kwargs = dict(items=item_file, n_lm_prompts=2, lm_seq_len=10, n_copy=2, copy_len=5, show_progress=False)
    dense, again = evaluate(tiny, **kwargs), evaluate(tiny, **kwargs)
    table = retention(dense, again, n_boot=200)
    assert (table["retention"] == 1.0).all(), table
    assert (table["ci_low"] == 1.0).all() and (table["ci_high"] == 1.0).all()


def test_retention_directions_and_ratios(tiny, item_file):
    kwargs = dict(items=item_file, n_lm_prompts=2, lm_seq_len=10, n_copy=3, copy_len=6, show_progress=False)
    dense = evaluate(tiny, **kwargs)
    info = sl.model_info(tiny)
    with sl.remove_heads(tiny, [(l, h) for l in range(info.n_layers) for h in range(info.n_heads)]):
        pruned = evaluate(tiny, **kwargs)
    table = retention(dense, pruned, n_boot=100).set_index("metric")
    d, p = dense.metrics, pruned.metrics
    assert d["lm/ppl"] != p["lm/ppl"]  # removing every head changes the model
    assert table.loc["lm/ppl", "retention"] == pytest.approx(d["lm/ppl"] / p["lm/ppl"])  # dense / pruned
    for name in ("lm/acc", "copy/acc"):
        expected = 1.0 if p[name] == d[name] else p[name] / d[name] if d[name] > 0 else np.nan
        assert table.loc[name, "retention"] == pytest.approx(expected, nan_ok=True)


def _synthetic(acc: list[float]) -> EvalResult:
    items = pd.DataFrame({"part": "mc", "task": "t", "item": [f"i{j}" for j in range(len(acc))], "nll": 1.0,
                          "n_tokens": 1.0, "n_correct": acc, "acc": acc, "acc_norm": acc, "mc_nll": 1.0,
                          "n_choices": 2})
    return EvalResult(per_item=items, meta={})


def test_retention_bootstrap_ci_against_binomial():
    """Dense gets all 200 items right, pruned 150: retention 0.75 with a binomial-width CI."""
    n, k = 200, 150
    dense = _synthetic([1.0] * n)
    pruned = _synthetic([1.0] * k + [0.0] * (n - k))
    row = retention(dense, pruned, n_boot=4000, ci=0.95, seed=1).set_index("metric").loc["mc/acc"]
    assert row["retention"] == pytest.approx(k / n)
    half = 1.96 * math.sqrt(0.75 * 0.25 / n)  # normal approximation of the binomial CI
    assert row["ci_low"] == pytest.approx(0.75 - half, abs=0.015)
    assert row["ci_high"] == pytest.approx(0.75 + half, abs=0.015)
    assert compute_metrics(pruned.per_item)["mc/acc"] == pytest.approx(0.75)


def test_retention_refuses_different_items(tiny, item_file):
    a = evaluate(tiny, "mc", items=item_file, show_progress=False)
    b = evaluate(tiny, "mc", items=item_file, limit=1, show_progress=False)
    with pytest.raises(sl.InputError, match="different items"):
        retention(a, b)


# --- the embedded model ----------------------------------------------------------------------------

@pytest.mark.integration
def test_smollm_scores_clearly_above_chance(smollm):
    result = evaluate(smollm, "mc", limit=6, show_progress=False)
    for name, chance in result.chance.items():
        assert result.metrics[name] >= chance + 0.3, (name, result.metrics[name], chance)  # measured: 0.84-0.98


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("suite", ["nope", "pruning-paper", None])
def test_unknown_suite(tiny, suite):
    with pytest.raises(sl.InputError, match="Unknown suite"):
        evaluate(tiny, suite)


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "3"])
def test_bad_limit(tiny, limit):
    with pytest.raises(sl.InputError, match="limit"):
        evaluate(tiny, limit=limit)


def test_bad_split_and_sizes(tiny):
    with pytest.raises(sl.InputError, match="split"):
        evaluate(tiny, split="test")
    with pytest.raises(sl.InputError, match="copy_len"):
        evaluate(tiny, copy_len=1)


@pytest.mark.parametrize("line, fragment", [
    ("{not json", "not valid JSON"),
    ('{"id": "x", "task": "t", "context": "c", "choices": [" a", " b"]}', "missing field"),
    ('{"id": "x", "task": "t", "context": "c", "choices": [" a", " b"], "gold": 2}', "gold"),
    ('{"id": "x", "task": "t", "context": "c", "choices": [" a"], "gold": 0}', "choices"),
    ('{"id": "x", "task": "t", "context": "", "choices": [" a", " b"], "gold": 0}', "context"),
    ('{"id": "a", "task": "t", "context": "c", "choices": [" a", " b"], "gold": 0}', "already used on line 1"),
])
def test_malformed_item_file_names_file_and_line(tiny, tmp_path, line, fragment):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"id": "a", "task": "t", "context": "c", "choices": [" a", " b"], "gold": 0})
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(sl.InputError) as err:
        evaluate(tiny, "mc", items=path, show_progress=False)
    assert f"{path}, line 3" in str(err.value) and fragment in str(err.value)


def test_missing_item_file(tiny, tmp_path):
    with pytest.raises(sl.InputError, match="does not exist"):
        evaluate(tiny, "mc", items=tmp_path / "nope.jsonl")


# --- lm-evaluation-harness -------------------------------------------------------------------------

@pytest.fixture
def harness():
    lm_eval = pytest.importorskip("lm_eval",
                                  reason="lm-evaluation-harness is not installed (pip install lm-eval==0.4.13)")
    return lm_eval


def _harness_lls(result) -> dict[str, list[float]]:
    return {s["doc"]["id"]: [float(r[0][0]) for r in s["resps"]] for s in result.samples["sinklens_items"]}


def test_lm_eval_local_task_matches_evaluate_and_sees_pruning(harness, tiny, item_file, tmp_path):
    from sinklens.assess.lm_eval_bridge import evaluate_lm_eval, write_local_task

    folder = tmp_path / "tasks"
    write_local_task(item_file, folder)
    ours = evaluate(tiny, "mc", items=item_file, show_progress=False).per_item.set_index("item")
    theirs = evaluate_lm_eval(tiny, ["sinklens_items"], include_path=folder, batch_size=4, log_samples=True)
    dense_lls = _harness_lls(theirs)
    for sample in theirs.samples["sinklens_items"]:
        row, lls = ours.loc[sample["doc"]["id"]], np.array(dense_lls[sample["doc"]["id"]])
        assert sample["acc"] == row["acc"] and sample["acc_norm"] == row["acc_norm"]
        assert -lls[sample["doc"]["gold"]] == pytest.approx(row["nll"], abs=1e-4)
    assert theirs.metrics["sinklens_items/acc"] == pytest.approx(ours["acc"].mean())
    # in-place pruning (weights and GQA hooks) is what the harness evaluates
    info = sl.model_info(tiny)
    heads = [(layer, 0) for layer in range(info.n_layers)]  # one head of a KV group: private K copies under GQA
    probe = sl.probe_tokens(tiny, 4, 16)
    with sl.prune_qk(tiny, heads, 3, dims="bos_top", calibration=probe):
        pruned_ours = evaluate(tiny, "mc", items=item_file, show_progress=False).per_item.set_index("item")
        pruned = _harness_lls(evaluate_lm_eval(tiny, ["sinklens_items"], include_path=folder, batch_size=4,
                                               log_samples=True))
    changed = 0
    for item in TINY_ITEMS:
        lls = np.array(pruned[item["id"]])
        changed += not np.allclose(lls, dense_lls[item["id"]], atol=1e-4)
        assert -lls[item["gold"]] == pytest.approx(pruned_ours.loc[item["id"], "nll"], abs=1e-4)
    assert changed == len(TINY_ITEMS)


def test_lm_eval_names_the_data_it_cannot_fetch(harness, tiny, tmp_path):
    from sinklens.assess.lm_eval_bridge import TaskDataUnavailableError, evaluate_lm_eval

    (tmp_path / "remote.yaml").write_text(
        "task: remote_only\ndataset_path: sinklens-tests/never-cached\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\n")
    with pytest.raises(TaskDataUnavailableError, match="'remote_only' \\(dataset 'sinklens-tests/never-cached'\\)"):
        evaluate_lm_eval(tiny, "remote_only", include_path=tmp_path)


def test_lm_eval_bad_input(harness, tiny, tmp_path, monkeypatch):
    from sinklens.assess import lm_eval_bridge
    from sinklens.assess.lm_eval_bridge import evaluate_lm_eval, write_local_task

    with pytest.raises(sl.InputError, match="limit"):
        evaluate_lm_eval(tiny, "piqa", limit=0)
    with pytest.raises(sl.InputError, match="tasks"):
        evaluate_lm_eval(tiny, [])
    write_local_task(None, tmp_path)
    local = harness.tasks.TaskManager(include_path=str(tmp_path), include_defaults=False)
    monkeypatch.setattr(lm_eval_bridge, "_task_manager", lambda *args: local)  # skip indexing ~15k built-in tasks
    with pytest.raises(sl.InputError, match="Unknown lm-eval task.*sinklens_itemz.*sinklens_items"):
        evaluate_lm_eval(tiny, "sinklens_itemz", include_path=tmp_path)


def test_lm_eval_missing_dependency_message(tiny, monkeypatch):
    import sys

    from sinklens.assess.lm_eval_bridge import MissingDependencyError, evaluate_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(MissingDependencyError, match="pip install lm-eval==0.4.13"):
        evaluate_lm_eval(tiny, "piqa")


def test_attention_mask_matches_transformers_for_plain_batches(tiny):
    """The runner's mask builder gives what transformers' create_causal_mask gives eager attention."""
    from transformers.masking_utils import create_causal_mask

    plan = build_plan(tiny, "lm", n_lm_prompts=3, lm_seq_len=9)
    batch = plan.batches[0]
    width = batch.tokens.shape[1]
    mask = torch.ones_like(batch.tokens)
    mask[1, width - 2:] = 0  # a right-padded row
    allowed = torch.ones(width, width, dtype=torch.bool).tril()[None].repeat(len(mask), 1, 1) & mask.bool()[:, None, :]
    embeds = torch.zeros(len(mask), width, sl.model_info(tiny).d_model)
    expected = create_causal_mask(config=tiny.original_model.config, inputs_embeds=embeds, attention_mask=mask,
                                  past_key_values=None, position_ids=torch.arange(width)[None])
    torch.testing.assert_close(evaluation.additive_mask(allowed, torch.float32), expected, rtol=0, atol=0)
    unpadded = create_causal_mask(config=tiny.original_model.config, inputs_embeds=embeds,
                                  attention_mask=torch.ones_like(mask), past_key_values=None,
                                  position_ids=torch.arange(width)[None])
    torch.testing.assert_close(evaluation.additive_mask(batch.allowed, torch.float32), unpadded, rtol=0, atol=0)


@pytest.mark.integration
def test_lm_eval_agrees_on_bundled_items_with_smollm(harness, smollm, tmp_path):
    from sinklens.assess.lm_eval_bridge import evaluate_lm_eval, write_local_task

    write_local_task(None, tmp_path)
    theirs = evaluate_lm_eval(smollm, "sinklens_items", limit=8, include_path=tmp_path, batch_size=8, log_samples=True)
    ours = evaluate(smollm, "mc", limit=8, show_progress=False).per_item.set_index("item")  # the file's first 8 = facts
    samples = theirs.samples["sinklens_items"]
    assert len(samples) == 8
    for sample in samples:
        row = ours.loc[sample["doc"]["id"]]
        assert (sample["acc"], sample["acc_norm"]) == (row["acc"], row["acc_norm"])
        assert -float(sample["resps"][sample["doc"]["gold"]][0][0]) == pytest.approx(row["nll"], abs=2e-3)


def test_search_and_held_out_splits_are_disjoint_halves(tiny, item_file):
    kwargs = dict(items=item_file, n_lm_prompts=3, lm_seq_len=8, n_copy=3, copy_len=4, show_progress=False)
    cal = evaluate(tiny, split="search", **kwargs).per_item
    held = evaluate(tiny, split="held_out", **kwargs).per_item
    every = evaluate(tiny, split="all", n_lm_prompts=6, lm_seq_len=8, n_copy=6, copy_len=4, items=item_file,
                     show_progress=False).per_item
    assert not set(cal["item"]) & set(held["item"])
    assert set(cal["item"]) | set(held["item"]) == set(every["item"])
    assert sorted(cal[cal["part"] == "lm"]["item"]) == ["lm-0000", "lm-0002", "lm-0004"]
    assert sorted(cal[cal["part"] == "mc"]["item"]) == ["a", "c", "d"]  # even positions within each task
    # the same copy sequence gets the same score whichever split holds it
    merged = held.merge(every, on=["part", "item"], suffixes=("", "_all"))
    assert (merged["n_correct"] == merged["n_correct_all"]).all() and len(merged) == len(held)


# --- the result is a read-only mapping of metric -> value ----------------------------------------------

def test_result_is_a_read_only_mapping_of_metrics(tiny, item_file):
    result = evaluate(tiny, "mc", items=item_file, show_progress=False)
    per_item = result.per_item
    expected = {}  # recomputed from the per-item table with plain pandas
    for task in ("alpha", "beta"):
        rows = per_item[per_item["task"] == task]
        expected[f"mc/{task}/acc"], expected[f"mc/{task}/acc_norm"] = rows["acc"].mean(), rows["acc_norm"].mean()
    expected["mc/acc"] = (expected["mc/alpha/acc"] + expected["mc/beta/acc"]) / 2
    expected["mc/acc_norm"] = (expected["mc/alpha/acc_norm"] + expected["mc/beta/acc_norm"]) / 2
    expected["acc/mean"] = expected["mc/acc"]
    assert set(result) == set(expected) and len(result) == len(expected)
    for name, value in result.items():  # the loop a new user writes first
        assert value == pytest.approx(expected[name]) and isinstance(value, float)
    assert dict(result) == result.metrics and json.loads(json.dumps(dict(result))) == dict(result)
    assert result["mc/acc"] == pytest.approx(expected["mc/acc"]) and "lm/ppl" not in result
    assert result.get("lm/ppl") is None
    with pytest.raises(KeyError, match="lm/ppl.*mc/acc"):
        result["lm/ppl"]
    with pytest.raises(TypeError):
        result["mc/acc"] = 1.0
    result.metrics["mc/acc"] = -1.0  # a copy: the result does not change
    assert result["mc/acc"] == pytest.approx(expected["mc/acc"])


# --- integer arguments: one check, one message ------------------------------------------------------

INT_ARGUMENTS = {  # name -> a call that passes the value as that argument
    "limit": lambda model, v: evaluate(model, "copy", limit=v, show_progress=False),
    "n_copy": lambda model, v: evaluate(model, "copy", n_copy=v, show_progress=False),
    "copy_len": lambda model, v: evaluate(model, "copy", copy_len=v, show_progress=False),
    "n_lm_prompts": lambda model, v: evaluate(model, "lm", n_lm_prompts=v, show_progress=False),
    "lm_seq_len": lambda model, v: evaluate(model, "lm", lm_seq_len=v, show_progress=False),
    "batch_tokens": lambda model, v: build_plan(model, "copy", batch_tokens=v),
    "seed": lambda model, v: build_plan(model, "copy", seed=v),
    "start_layer": lambda model, v: build_plan(model, "copy", n_copy=2, copy_len=4).run(model, start_layer=v),
    "n_prompts": lambda model, v: sl.probe_tokens(model, v, 8),
    "seq_len": lambda model, v: sl.probe_tokens(model, 2, v),
    "n_boot": lambda model, v: retention(_synthetic([1.0]), _synthetic([1.0]), n_boot=v),
    "batch_size": lambda model, v: sl.evaluate_lm_eval(model, "piqa", batch_size=v),
    "num_fewshot": lambda model, v: sl.evaluate_lm_eval(model, "piqa", num_fewshot=v),
}
NONE_MEANS_DEFAULT = {"limit", "lm_seq_len", "num_fewshot"}


BAD_INT_CASES = [(name, value) for name in sorted(INT_ARGUMENTS) for value in (2.0, "2", None, True)
                 if not (value is None and name in NONE_MEANS_DEFAULT)]


@pytest.mark.parametrize("name, value", BAD_INT_CASES)
def test_integer_arguments_refuse_other_types_with_one_message(tiny, name, value):
    """Floats, strings, None and bools get the one check's message naming the argument, never a TypeError."""
    with pytest.raises(sl.InputError, match=f"^{name} must be an int"):
        INT_ARGUMENTS[name](tiny, value)


def test_limit_accepts_numpy_ints(tiny, item_file):
    result = evaluate(tiny, "mc", limit=np.int64(1), items=item_file, show_progress=False)
    assert result.meta["limit"] == 1 and type(result.meta["limit"]) is int  # JSON-ready
    assert len(result.per_item) == 2  # one item per task


# --- lm-eval offline: the missing data is named before the harness is imported -----------------------

@pytest.fixture
def offline_empty_caches(monkeypatch, tmp_path):
    """Offline (as HF_HUB_OFFLINE=1 says) with empty hub and datasets caches, whatever this machine holds."""
    from sinklens.assess import lm_eval_bridge

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(lm_eval_bridge.hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


def _refuse_harness_import(monkeypatch):
    from sinklens.assess import lm_eval_bridge

    def refuse():
        raise AssertionError("the harness was imported before the missing data was named")

    monkeypatch.setattr(lm_eval_bridge, "_import_harness", refuse)


def test_lm_eval_offline_names_missing_suite_data_before_importing_the_harness(harness, tiny, offline_empty_caches,
                                                                               monkeypatch):
    from sinklens.assess.lm_eval_bridge import PRUNING_PAPER_TASKS, TaskDataUnavailableError

    _refuse_harness_import(monkeypatch)
    with pytest.raises(TaskDataUnavailableError, match="hub cannot be reached") as err:
        sl.evaluate_lm_eval(tiny, "pruning-paper")
    for task in PRUNING_PAPER_TASKS:
        assert f"task {task!r} (dataset '" in str(err.value)


def test_lm_eval_offline_fast_and_harness_paths_name_the_same_dataset(harness, tiny, tmp_path, offline_empty_caches,
                                                                      monkeypatch):
    from sinklens.assess import lm_eval_bridge
    from sinklens.assess.lm_eval_bridge import TaskDataUnavailableError

    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "remote.yaml").write_text(
        "task: remote_only\ndataset_path: sinklens-tests/never-cached\ndataset_name: sub\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\n")
    named = "task 'remote_only' (dataset 'sinklens-tests/never-cached', subset 'sub')"
    with monkeypatch.context() as patch:
        _refuse_harness_import(patch)
        with pytest.raises(TaskDataUnavailableError) as fast:
            sl.evaluate_lm_eval(tiny, "remote_only", include_path=folder)
    monkeypatch.setattr(lm_eval_bridge, "_check_data_offline", lambda *args: None)  # the harness's own loading
    with pytest.raises(TaskDataUnavailableError) as slow:
        sl.evaluate_lm_eval(tiny, "remote_only", include_path=folder)
    assert named in str(fast.value) and named in str(slow.value)


def test_lm_eval_offline_leaves_cached_and_local_data_to_the_harness(harness, tiny, tmp_path, offline_empty_caches,
                                                                     item_file):
    from sinklens.assess.lm_eval_bridge import TaskDataUnavailableError, write_local_task

    folder = tmp_path / "tasks"
    write_local_task(item_file, folder)
    result = sl.evaluate_lm_eval(tiny, "sinklens_items", include_path=folder, batch_size=4)  # json: runs offline
    ours = evaluate(tiny, "mc", items=item_file, show_progress=False).per_item
    assert result.metrics["sinklens_items/acc"] == pytest.approx(ours["acc"].mean())
    (folder / "remote.yaml").write_text(
        "task: remote_only\ndataset_path: sinklens-tests/never-cached\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\n")
    (offline_empty_caches / "datasets" / "sinklens-tests___never-cached").mkdir(parents=True)  # looks cached
    with pytest.raises(TaskDataUnavailableError, match="'remote_only'") as err:
        sl.evaluate_lm_eval(tiny, "remote_only", include_path=folder)
    assert err.value.__cause__ is not None  # raised by the harness's own loading, not by the text scan
