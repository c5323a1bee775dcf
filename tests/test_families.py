"""Every supported decoder family on a tiny random-init checkpoint, against plain transformers.

For each family (tests/helpers.py FAMILIES): the census and massive activations equal HF eager
``output_attentions`` / ``output_hidden_states`` and the input the HF q/k projection actually receives;
a pruned head's pattern equals that of the checkpoint written by ``save_pruned`` and reloaded with plain
transformers, with sibling heads untouched; the layer-level reconstruction error equals the model-level
one when a single layer is pruned. Refusals are checked where a family's structure makes a pruning
inexact. ``evaluate`` scores every target as a plain HF forward of the sequence the target sees (block
mask, position ids, sliding windows and final softcaps included), also when it resumes from a stored
residual; the attention view and the specialization table read the model's own patterns.
"""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch

import sinklens as sl
from sinklens.assess import evaluation
from sinklens.assess.evaluation import build_plan, evaluate, forward_scores
from sinklens.core.qk import LAYOUTS
from sinklens.report.views import attention_view

from helpers import FAMILIES, LONG_ITEMS, MODEL_TYPE, build_family_checkpoint, hf_eager, random_tokens, write_items

TOL = 1e-5
PROJECTIONS = ("q_proj", "qkv_proj", "c_attn", "query_key_value")  # the module that multiplies the attention input


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    folder = build_family_checkpoint(tmp_path_factory.mktemp(f"family-{name}"), name)
    return name, folder


def _tokens(n=3, length=14, seed=0):
    return random_tokens(n, length, seed)


def _attention_inputs(reference, tokens):
    """The tensor each layer's HF q (or fused qkv) projection multiplies, captured by forward pre-hooks."""
    seen, handles = {}, []
    layers = [m for name, m in reference.named_modules() if name.rsplit(".", 1)[-1] in PROJECTIONS]
    for layer, module in enumerate(layers):
        handles.append(module.register_forward_pre_hook(lambda m, args, layer=layer: seen.__setitem__(layer, args[0])))
    try:
        with torch.no_grad():
            out = reference(tokens, output_attentions=True, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


def _patterns(model, tokens, layer):
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.attn.hook_pattern")
    return cache[f"blocks.{layer}.attn.hook_pattern"]


def test_census_and_massive_match_hf_eager(family):
    name, folder = family
    model = sl.load_model(str(folder), device="cpu")
    assert sl.model_info(model).model_type == MODEL_TYPE.get(name, name)
    tokens = _tokens()
    out, inputs = _attention_inputs(hf_eager(folder), tokens)
    census = sl.run_census(model, tokens, show_progress=False)
    length = tokens.shape[1]
    n_queries = torch.arange(length, 0, -1, dtype=torch.float64)
    for layer, pattern in enumerate(out.attentions):  # alpha_k = column sum over rows i >= k, / (T - k)
        alpha = pattern.double().sum(2) / n_queries
        assert (census.alpha[:, layer].double() - alpha).abs().max() <= TOL
        confidence = pattern.double().amax(-1).mean(-1)
        assert (census.confidence[:, layer].double() - confidence).abs().max() <= TOL
    stats = sl.massive_activations(model, tokens, show_progress=False)
    for layer in range(len(out.attentions)):
        assert (stats.layer_values(layer, "resid") - out.hidden_states[layer][:, 0]).abs().max() <= TOL
        assert (stats.layer_values(layer, "normalized") - inputs[layer][:, 0]).abs().max() <= TOL


def _pruning_cases(name: str, info):
    """(heads, kwargs) per family: a whole KV group (or whole layer) with shared dims, one head q_only, and a
    partial group with private K copies where the family supports them."""
    layer, full = 1, info.d_model
    dims = torch.randperm(full, generator=torch.Generator().manual_seed(3))[:5]
    group = [(layer, h) for h in range(info.group_size)]
    if LAYOUTS[MODEL_TYPE.get(name, name)].qk_norm == "full_width":
        group = [(layer, h) for h in range(info.n_heads)]
    cases = [(group, dict(k=5, dims=dims, gqa="exact"))]
    if LAYOUTS[MODEL_TYPE.get(name, name)].qk_norm != "full_width":
        cases.append(([(layer, info.n_heads - 1)], dict(k=4, dims="random", gqa="q_only")))
    if info.group_size > 1 and LAYOUTS[MODEL_TYPE.get(name, name)].private_k_copies:
        cases.append(([(layer, 0)], dict(k=3, dims="random", gqa="exact")))
    return cases


def test_pruned_pattern_equals_reloaded_checkpoint(family, tmp_path):
    name, folder = family
    model = sl.load_model(str(folder), device="cpu")
    info = sl.model_info(model)
    tokens = _tokens(2, 12, seed=1)
    layer = 1
    dense = _patterns(model, tokens, layer)
    for i, (heads, kwargs) in enumerate(_pruning_cases(name, info)):
        handle = sl.apply_pruning(model, heads, **kwargs)
        pruned = _patterns(model, tokens, layer)
        out = sl.save_pruned(model, tmp_path / f"case{i}")
        handle.restore()
        reloaded = hf_eager(out)
        with torch.no_grad():
            reference = reloaded(tokens, output_attentions=True).attentions[layer]
        assert (pruned - reference).abs().max() <= TOL, (name, kwargs)
        chosen = [h for _, h in heads]
        siblings = [h for h in range(info.n_heads) if h not in chosen]
        assert torch.equal(pruned[:, siblings], dense[:, siblings]), (name, kwargs)
        assert (pruned[:, chosen] - dense[:, chosen]).abs().max() > 1e-3, (name, kwargs)
        assert torch.equal(_patterns(model, tokens, layer), dense)  # restored bitwise


def test_layer_level_equals_model_level_for_one_layer(family):
    name, folder = family
    model = sl.load_model(str(folder), device="cpu")
    info = sl.model_info(model)
    tokens = _tokens(3, 12, seed=2)
    for heads, kwargs in _pruning_cases(name, info):
        frames = {level: sl.reconstruction_error(model, tokens, heads, level=level, show_progress=False, **kwargs)
                  for level in ("layer", "model")}
        for metric in ("frob_rel", "kl", "d_alpha0", "out_rel", "alpha0"):
            diff = (frames["layer"][metric] - frames["model"][metric]).abs().max()
            assert diff <= TOL, (name, kwargs, metric, diff)
        assert (frames["model"]["frob_rel"] > 1e-3).all()


def test_family_refusals(tmp_path_factory):
    folders = {name: build_family_checkpoint(tmp_path_factory.mktemp(name), name)
               for name in ("olmo2", "qwen3", "gpt2")}
    olmo = sl.load_model(str(folders["olmo2"]), device="cpu")
    with pytest.raises(sl.InputError, match="full width.*Prune every head of the layer"):
        sl.apply_pruning(olmo, [(1, 0)], 4, dims="random")
    qwen3 = sl.load_model(str(folders["qwen3"]), device="cpu")
    with pytest.raises(sl.InputError, match='private pruned K copies.*per_head q/k norm.*gqa="shared"'):
        sl.apply_pruning(qwen3, [(1, 0)], 4, dims="random")
    assert not sl.active_edits(qwen3)
    gpt2 = sl.load_model(str(folders["gpt2"]), device="cpu")
    with pytest.warns(UserWarning, match='gqa="shared" changes nothing'):
        sl.plan_pruning(gpt2, [(1, 0)], 4, dims="random", gqa="shared")


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(sl.UnsupportedArchitectureError, match="gpt2, gpt_neox"):
        sl.load_model(str(tmp_path))  # refused from config.json alone: there are no weights to read


@pytest.fixture(scope="module")
def item_file(tmp_path_factory):
    return write_items(tmp_path_factory.mktemp("items"), LONG_ITEMS)


def test_evaluate_scores_equal_plain_hf_forward(family, item_file):
    """Every target of every batch against a plain HF eager forward of the tokens its query may see."""
    name, folder = family
    model = sl.load_model(str(folder), device="cpu")
    reference = hf_eager(folder)
    plan = build_plan(model, "default", items=item_file, n_lm_prompts=2, lm_seq_len=12, n_copy=2, copy_len=6)
    n_layers = sl.model_info(model).n_layers
    seen_logp: dict[tuple[int, ...], torch.Tensor] = {}
    worst, n_checked = 0.0, 0
    for batch in plan.batches:
        logp, top, store = forward_scores(model, batch, capture=range(n_layers))
        for i in range(len(batch.targets)):
            row, col, target = int(batch.rows[i]), int(batch.cols[i]), int(batch.targets[i])
            keys = batch.allowed[row, col].nonzero()[:, 0]
            assert torch.equal(batch.positions[row, keys], torch.arange(len(keys)))  # the sequence it sees
            ids = tuple(batch.tokens[row, keys].tolist())
            if ids not in seen_logp:
                with torch.no_grad():
                    seen_logp[ids] = reference(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
            expected = seen_logp[ids]
            worst = max(worst, abs(float(logp[i]) - float(expected[target])))
            assert bool(top[i]) == (int(expected.argmax()) == target)
            n_checked += 1
        for start in range(1, n_layers):  # resuming from the captured residual gives the full forward's scores
            resumed, _, _ = forward_scores(model, batch, start_layer=start, resid=store[start])
            assert (resumed - logp).abs().max() <= 1e-6, (name, start)
    assert worst <= TOL, (name, worst)
    assert n_checked > 60
    # evaluate's per-item log-likelihoods: the gold choice's nll against the same reference
    table = evaluate(model, "mc", items=item_file, show_progress=False).per_item.set_index("item")
    for item in LONG_ITEMS:
        ctx = model.tokenizer(item["context"], add_special_tokens=False)["input_ids"]
        gold = model.tokenizer(item["choices"][item["gold"]], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = reference(torch.tensor([[1] + ctx + gold])).logits[0].float().log_softmax(-1)
        ll = sum(float(logits[len(ctx) + j, t]) for j, t in enumerate(gold))
        assert abs(table.loc[item["id"], "nll"] + ll) <= TOL * len(gold), (name, item["id"])


def test_attention_view_and_specialization_table(family):
    name, folder = family
    model = sl.load_model(str(folder), device="cpu")
    tokens = _tokens(4, 10, seed=4)
    with torch.no_grad():
        attentions = hf_eager(folder)(tokens, output_attentions=True).attentions
    view = attention_view(model, tokens[0], heads=[(1, 0), (1, 2)])
    assert view.token_ids == tokens[0].tolist()
    assert (view.pattern - attentions[1][0, [0, 2]]).abs().max() <= TOL
    scores = sl.sink_scores(model, tokens)
    table = sl.specialization_table(scores, eps=0.1, q=0.5, n_boot=20)
    alpha0 = torch.stack([a[:, :, :, 0].double().mean(-1) for a in attentions], dim=1)  # [batch, layer, head]
    for row in table.itertuples():
        assert abs(row.mean - float(alpha0[:, row.layer, row.head].mean())) <= TOL, (name, row)
        assert row.frac_above_eps == pytest.approx(float((alpha0[:, row.layer, row.head] > 0.1).double().mean()))


def test_layer_selection_on_a_non_llama_family(tmp_path, item_file):
    """GPT-NeoX (fused per-head qkv split into copies, partial rotary, parallel attention/MLP): the sweep resumes
    from stored residuals, and its retentions equal full forwards of the same pruning."""
    folder = build_family_checkpoint(tmp_path / "neox", "gpt_neox")
    model = sl.load_model(str(folder), device="cpu")
    heads = [(0, 1), (1, 0), (1, 2), (2, 3)]
    eval_kwargs = dict(items=str(item_file), n_lm_prompts=2, lm_seq_len=12, n_copy=2, copy_len=6)
    sel = sl.layer_selection(model, sl.PruneSpec.template(4), target_retention=0.5, heads=heads, n_prompts=4,
                             seq_len=16, evaluation=sl.EvalOptions(**eval_kwargs),
                             search=sl.SearchOptions(strategy=["single_layer_rank", "greedy"]), n_boot=20,
                             results=tmp_path / "sweep.sqlite", show_progress=False)
    with sqlite3.connect(tmp_path / "sweep.sqlite") as conn:
        starts = [json.loads(extra)["start_layer"] for (extra,) in
                  conn.execute("SELECT extra FROM results WHERE config LIKE '%qk%'")]
    assert max(starts) > 0  # configurations resumed from stored residuals
    assert not sl.active_edits(model)
    probe = sl.probe_tokens(model, 4, 16)
    dense = evaluate(model, **eval_kwargs, split="held_out", show_progress=False)
    checked = 0
    for row in sel.confirmed().to_dict("records"):
        layers = tuple(row["layers"])
        chosen = [(l, h) for l, h in heads if l in layers]
        with sl.prune_qk(model, chosen, 4, dims="bos_top", calibration=probe):
            pruned = evaluate(model, **eval_kwargs, split="held_out", show_progress=False)
        for metric in ("lm/ppl", "copy/acc", "mc/acc"):
            assert row[f"retention:{metric}"] == pytest.approx(
                evaluation.retention_value(dense, pruned, metric=metric), abs=1e-6, nan_ok=True)
        checked += 1
    assert checked >= 1


def test_optimized_dims_search_per_family(family):
    """dims="optimized" picks, at each greedy step, the pool dim whose addition gives the lowest layer-level frob_rel
    (the model's own attention recomputes it); families whose score path the search does not reproduce (q/k norms,
    softcaps) are refused."""
    name, folder = family
    model = sl.load_model(str(folder), device="cpu")
    cal = _tokens(4, 12, seed=10)
    head, pool = (1, 1), 8
    calibration = sl.CalibrationSet(model, cal)
    spec = sl.PruneSpec([head], 2, "optimized", pool=pool, gqa="q_only")
    family_layout = LAYOUTS[MODEL_TYPE.get(name, name)]
    if family_layout.qk_norm or family_layout.softcap:
        with pytest.raises(sl.InputError, match=f'dims="optimized".*{family_layout.name}'):
            sl.select_dims(model, spec, calibration=calibration)
        return
    sl.select_dims(model, spec, calibration=calibration)
    (order,) = [list(ranking) for ranking in calibration.rankings.values()]
    candidates = sl.select_dims(model, [head], pool, dims="act_weight", calibration=calibration)[head].tolist()
    for step in range(2):
        errors = {}
        for d in candidates:
            if d not in order[:step]:
                frame = sl.reconstruction_error(model, cal, [head], step + 1, dims=order[:step] + [d], gqa="q_only",
                                                level="layer", show_progress=False)
                errors[d] = float(frame["frob_rel"].iloc[0])
        assert errors[order[step]] == pytest.approx(min(errors.values()), abs=1e-6), (name, step)
