"""Pruned checkpoints: standard HF files that reload with transformers and give the pruned bridge's logits."""

import json

import pytest
import torch
from safetensors import safe_open

import sinklens as sl

from helpers import hf_eager, random_tokens


def max_diff(a, b):
    return float((a - b).abs().max())


def test_exact_partial_group_is_saved_ungrouped_and_reloads_exactly(tiny, tmp_path):
    info = sl.model_info(tiny)
    tokens = random_tokens(3, 12)
    heads = [(0, 0), (1, info.n_heads - 1), (2, 1)]
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    with sl.prune_qk(tiny, heads, 5, dims="random", seed=4, gqa="exact") as handle:
        pruned = tiny(tokens)
        folder = sl.save_pruned(tiny, tmp_path / "ck")
        counts = handle.params_zeroed()
        assert torch.equal(tiny(tokens), pruned)  # saving changed nothing in the live model
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items())
    ref = hf_eager(folder)
    assert max_diff(ref(tokens).logits, pruned) <= 1e-5
    assert max_diff(ref(tokens).logits, tiny(tokens)) > 1e-3  # the checkpoint is not the dense model
    manifest = sl.read_manifest(folder)
    assert manifest["sinklens_version"] == sl.__version__
    assert manifest["source_model"]["name"] == str(tiny.sinklens_name)
    (edit,) = manifest["edits"]
    assert edit["heads"] == [list(p) for p in heads] and edit["k"] == 5 and edit["gqa"] == "exact"
    assert edit["policy"] == "random" and edit["seed"] == 4
    assert edit["dims"] == [{"layer": l, "head": h, "dims": handle.dims[(l, h)].tolist()} for l, h in heads]
    ungrouped = info.group_size > 1
    assert manifest["layout"] == ("ungrouped" if ungrouped else "grouped")
    assert ref.config.num_key_value_heads == (info.n_heads if ungrouped else info.n_kv_heads)
    assert manifest["num_key_value_heads"] == {"source": info.n_kv_heads, "checkpoint": ref.config.num_key_value_heads}
    for key in ("q", "k", "total", "share"):
        assert manifest["params_zeroed"][key] == pytest.approx(counts[key])
    # the counts are what the files hold: zeros in the selected heads' q/k rows
    dh = info.d_head
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        zeros = 0
        for layer, head in heads:
            g = head if ungrouped else head // info.group_size
            q = f.get_tensor(f"model.layers.{layer}.self_attn.q_proj.weight")[head * dh:(head + 1) * dh]
            k = f.get_tensor(f"model.layers.{layer}.self_attn.k_proj.weight")[g * dh:(g + 1) * dh]
            zeros += int((q == 0).sum()) + int((k == 0).sum())
        names = set(f.keys())
    assert zeros == counts["total"]
    assert names == set(ref.state_dict()) - ({"lm_head.weight"} if ref.config.tie_word_embeddings else set())
    assert not any("original_component" in n for n in names)


def test_plan_record_and_counts_equal_the_handle_and_the_manifest(tiny, tmp_path):
    """A plan knows its record and the parameters it zeroes before it is applied; the applied handle and the
    saved checkpoint's manifest say the same, and the zeros in the files are that many."""
    info = sl.model_info(tiny)
    tokens = random_tokens(3, 12, seed=3)
    heads = [(0, 1), (1, 0), (1, info.n_heads - 1), (2, 2)]
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    plan = sl.plan_pruning(tiny, heads, 6, tokens=tokens)
    record, counts = plan.as_dict(), plan.params_zeroed()
    assert all(torch.equal(v, before[k]) for k, v in tiny.state_dict().items()) and not sl.active_edits(tiny)
    handle = sl.apply_pruning(tiny, plan)
    try:
        assert handle.as_dict() == record and handle.params_zeroed() == counts
        folder = sl.save_pruned(tiny, tmp_path / "ck")
    finally:
        handle.restore()
    manifest = sl.read_manifest(folder)
    assert manifest["edits"] == [json.loads(json.dumps(record))]
    assert manifest["params_zeroed"]["layout"] == counts["layout"]
    for key in ("q", "k", "total", "model_params"):
        assert manifest["params_zeroed"][key] == counts[key], key
    assert sl.PruneSpec.from_dict(manifest["edits"][0]) == plan.spec
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        zeros = 0
        for layer in sorted({l for l, _ in heads}):
            q = f.get_tensor(f"model.layers.{layer}.self_attn.q_proj.weight")
            k = f.get_tensor(f"model.layers.{layer}.self_attn.k_proj.weight")
            zeros += int((q == 0).sum()) + int((k == 0).sum())
    assert zeros == counts["total"]


def test_grouped_edits_and_head_removal_keep_the_layout(tiny, tmp_path):
    info = sl.model_info(tiny)
    tokens = random_tokens(2, 10)
    group = [(1, h) for h in range(info.group_size)]
    with sl.prune_qk(tiny, group, 4, dims="bos_top", tokens=tokens), sl.remove_heads(tiny, [(2, 0)]):
        pruned = tiny(tokens)
        folder = sl.save_pruned(tiny, tmp_path / "ck")
    ref = hf_eager(folder)
    assert max_diff(ref(tokens).logits, pruned) <= 1e-5
    manifest = json.loads((folder / "sinklens_manifest.json").read_text())
    assert manifest["layout"] == "grouped" and ref.config.num_key_value_heads == info.n_kv_heads
    assert [e["kind"] for e in manifest["edits"]] == ["qk_pruning", "head_removal"]
    assert manifest["edits"][0]["basis"] == "normalized" and manifest["edits"][0]["policy"] == "bos_top"
    assert manifest["params_zeroed"]["o"] == info.d_head * info.d_model
    # the folder also loads back as a bridge, and its tokenizer is there
    bridge = sl.load_model(str(folder), device="cpu")
    assert max_diff(bridge(tokens), pruned) <= 1e-5


def test_save_refuses_bad_calls(tiny, tmp_path):
    with pytest.raises(sl.InputError, match="no active pruning"):
        sl.save_pruned(tiny, tmp_path / "dense")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("x")
    with sl.prune_qk(tiny, [(0, 0)], 3, dims="random"):
        with pytest.raises(sl.InputError, match="not an empty folder"):
            sl.save_pruned(tiny, busy)
        sl.save_pruned(tiny, busy, overwrite=True)
    assert (busy / "config.json").is_file()
    with pytest.raises(sl.InputError, match="sinklens.save_pruned"):
        sl.read_manifest(tmp_path)


@pytest.mark.integration
def test_smollm_exact_checkpoint_parity(smollm, tmp_path):
    info = sl.model_info(smollm)
    tokens = sl.probe_tokens(smollm, 2, 24)
    layer = info.n_layers // 2
    with sl.prune_qk(smollm, [(layer, 0), (layer + 1, 4)], 10, dims="bos_top", tokens=tokens) as handle:
        pruned = smollm(tokens.tokens)
        folder = sl.save_pruned(smollm, tmp_path / "smollm-pruned")
    assert handle.layout == "ungrouped"
    ref = hf_eager(folder)
    with torch.no_grad():
        diff = max_diff(ref(tokens.tokens).logits, pruned)
    print(f"smollm save/reload max abs logit diff: {diff:.3g}")
    assert diff <= 1e-5
