"""Regression tests of the hardening cases (issue 13): each bad input or fault ends in a sinklens error that names
the argument or file, raised before heavy work, and no fault leaves a silent wrong result or half-written files."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch
import transformers

import sinklens as sl
from sinklens.assess.beyond_bos import spread_heads
from sinklens.core import embedded
from sinklens.core.errors import SinklensError
from sinklens.prune import checkpoint
from sinklens.report.views import attention_view

from helpers import random_tokens

# --- silent failure: hook resets under an active edit ---------------------------------------------------------


def _edits(model):
    """One active edit of every kind, as (name, apply) pairs; apply returns the handle."""
    info = sl.model_info(model)
    gs = info.group_size
    tokens = random_tokens(4, 12, seed=3)
    last = info.n_heads - 1
    return {
        # weights only: q rows edited (q_only), or the whole KV group's shared k rows (every head of group 0)
        "weights_q_only": lambda: sl.apply_pruning(model, [(1, 0)], 5, dims="random", gqa="q_only"),
        "weights_shared_group": lambda: sl.apply_pruning(model, [(1, h) for h in range(gs)], 5, dims="random"),
        # a private K copy (hooks) under gqa="exact" when only part of a group is pruned (GQA), else shared rows
        "k_copy": lambda: sl.apply_pruning(model, [(2, last)], 5, dims="random", gqa="exact"),
        # mean fill: bias hooks at the q / k projections
        "mean_fill": lambda: sl.apply_pruning(model, [(0, 0)], 5, dims="random", fill="mean", tokens=tokens),
        "head_removal": lambda: sl.apply_head_removal(model, [(1, 1), (2, 0)]),
    }


@pytest.mark.parametrize("kind", ["weights_q_only", "weights_shared_group", "k_copy", "mean_fill", "head_removal"])
def test_hook_reset_under_an_active_edit_never_goes_silent(tiny, kind):
    tokens = random_tokens(2, 10, seed=5)
    handle = _edits(tiny)[kind]()
    edited = tiny(tokens)
    hooked = bool(handle._hooks)
    if kind == "mean_fill" or (kind == "k_copy" and sl.model_info(tiny).group_size > 1):
        assert hooked  # the case this test is about
    tiny.reset_hooks(including_permanent=True)
    if hooked:  # the hooks the edit relies on are gone: the next forward refuses instead of computing another model
        with pytest.raises(SinklensError, match=r"reset_hooks\(including_permanent=True\).*restore\(\)"):
            tiny(tokens)
    else:  # an edit of the weights alone survives every reset
        assert torch.equal(tiny(tokens), edited)
    handle.restore()
    assert not any(point._forward_pre_hooks or point.fwd_hooks for point in tiny.hook_points())
    dense = tiny(tokens)
    again = _edits(tiny)[kind]()  # applied again after the restore, it computes the same edit
    assert torch.equal(tiny(tokens), edited)
    again.restore()
    assert torch.equal(tiny(tokens), dense)


def test_plain_reset_keeps_hooked_edits(tiny):
    tokens = random_tokens(2, 10, seed=5)
    with sl.prune_qk(tiny, [(0, 0)], 5, dims="random", fill="mean", calibration=random_tokens(4, 12, seed=3)):
        edited = tiny(tokens)
        tiny.reset_hooks()
        assert torch.equal(tiny(tokens), edited)


# --- arguments: one "must be an int" message naming the argument ------------------------------------------------

INT_CASES = {
    "run_census batch_size": (lambda m, v: sl.run_census(m, random_tokens(2, 8), batch_size=v, show_progress=False),
                              "batch_size"),
    "sink_scores key_pos": (lambda m, v: sl.sink_scores(m, random_tokens(2, 8), key_pos=v), "key_pos"),
    "Census.sink_rate key_pos": (lambda m, v: sl.run_census(m, random_tokens(2, 8), show_progress=False)
                                 .sink_rate(key_pos=v), "key_pos"),
    "non_first_sinks min_queries": (lambda m, v: sl.run_census(m, random_tokens(2, 8), show_progress=False)
                                    .non_first_sinks(min_queries=v), "min_queries"),
    "massive_activations batch_size": (lambda m, v: sl.massive_activations(m, random_tokens(2, 8), batch_size=v,
                                                                           show_progress=False), "batch_size"),
    "bos_top_dims k": (lambda m, v: sl.bos_top_dims(m, random_tokens(2, 8), 1, v), "k"),
    "bos_top_dims layer": (lambda m, v: sl.bos_top_dims(m, random_tokens(2, 8), v, 3), "layer"),
    "MassiveActivations.top_dims k": (lambda m, v: sl.massive_activations(m, random_tokens(2, 8), show_progress=False)
                                      .top_dims(0, v), "k"),
    "tokenize seq_len": (lambda m, v: sl.tokenize(m, ["w3 w4 w5"], seq_len=v), "seq_len"),
    "reconstruction_error batch_size": (lambda m, v: sl.reconstruction_error(m, random_tokens(2, 8), [(0, 0)], 3,
                                                                             dims="random", batch_size=v),
                                        "batch_size"),
    "CalibrationSet batch_size": (lambda m, v: sl.CalibrationSet(m, random_tokens(2, 8), batch_size=v),
                                  "batch_size"),
    "PruneSpec k": (lambda m, v: sl.PruneSpec([(0, 0)], v), "k"),
    "PruneSpec seed": (lambda m, v: sl.PruneSpec([(0, 0)], 3, "random", seed=v), "seed"),
    "attention_view layer": (lambda m, v: attention_view(m, random_tokens(1, 8)[0], layer=v), "layer"),
    "spread_heads n": (lambda m, v: spread_heads([(0, 0), (1, 1)], v), "n"),
}


ALLOW_NONE = {"tokenize seq_len", "attention_view layer"}  # None: not given (heads= instead)


@pytest.mark.parametrize("bad", [2.0, "2", None, True])
@pytest.mark.parametrize("case", sorted(INT_CASES))
def test_integer_arguments_name_themselves(tiny_dir, case, bad):
    call, name = INT_CASES[case]
    if bad is None and case in ALLOW_NONE:
        pytest.skip("None is a valid value here")
    model = _shared_tiny(tiny_dir)
    with pytest.raises(sl.InputError, match=rf"^{name} must be an int") as err:
        call(model, bad)
    assert "outside the sequence" not in str(err.value)
    assert not sl.active_edits(model)


_TINY_CACHE: dict = {}


def _shared_tiny(folder):
    """One read-only tiny bridge per checkpoint for the argument checks (nothing here edits it)."""
    if folder not in _TINY_CACHE:
        _TINY_CACHE[folder] = sl.load_model(str(folder), device="cpu")
    return _TINY_CACHE[folder]


def test_int_hint_names_the_number(tiny):
    with pytest.raises(sl.InputError, match=r"batch_size must be an int >= 1.*Pass 4, not 4\.0"):
        sl.run_census(tiny, random_tokens(2, 8), batch_size=4.0, show_progress=False)


# --- tokens ------------------------------------------------------------------------------------------------------

def test_census_refuses_prompts_of_one_real_token(tiny):
    tokens = random_tokens(3, 8)
    mask = torch.ones_like(tokens)
    mask[1, 1:] = 0  # row 1: BOS only (right padding)
    with pytest.raises(sl.InputError, match=r"Prompts \[1\] have fewer than two real tokens.*inflate the sink rate"):
        sl.run_census(tiny, tokens, attention_mask=mask, show_progress=False)
    with pytest.raises(sl.InputError, match="fewer than two real tokens"):
        sl.sink_scores(tiny, tokens[:, :1])


@pytest.mark.parametrize("texts, fragment", [
    ([3, 4, 5], r"texts\[0\] is a int, not a string.*torch.tensor\(ids\)"),
    ([[1, 3, 4]], r"texts\[0\] is a list, not a string.*torch.tensor\(ids\)"),
    (torch.tensor([1, 3, 4]), "texts must be a string or a list of strings, got Tensor: token ids need no tokenize"),
    (7, "texts must be a string or a list of strings, got int"),
])
def test_tokenize_points_token_ids_elsewhere(tiny, texts, fragment):
    with pytest.raises(sl.InputError, match=fragment):
        sl.tokenize(tiny, texts)


def test_id_lists_point_at_a_tensor(tiny):
    with pytest.raises(sl.InputError, match=r"tokens must be a torch.Tensor.*got list: token ids go in as a tensor"):
        sl.run_census(tiny, [[1, 3, 4], [1, 5, 6]], show_progress=False)
    with pytest.raises(sl.InputError, match=r"got str: use sinklens.tokenize"):
        sl.run_census(tiny, "w3 w4", show_progress=False)


@pytest.mark.parametrize("measure", ["bos_top_dims", "calibration", "apply_pruning"])
def test_bos_dims_need_bos(tiny, measure):
    no_bos = random_tokens(3, 8, bos=False)
    calls = {
        "bos_top_dims": lambda: sl.bos_top_dims(tiny, no_bos, 1, 3),
        "calibration": lambda: sl.CalibrationSet(tiny, no_bos),
        "apply_pruning": lambda: sl.apply_pruning(tiny, [(1, 0)], 3, calibration=no_bos),
    }
    with pytest.raises(sl.InputError, match=r"needs every prompt to start with BOS \(id 1\).*prepend_bos=True"):
        calls[measure]()
    assert not sl.active_edits(tiny)


# --- loading (what tests/test_loading.py does not cover yet) ------------------------------------------------------

def _copy_checkpoint(tiny_dir, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(tiny_dir, folder)
    return folder


@pytest.mark.parametrize("case", ["tokenizer_not_json", "tokenizer_config_list", "config_unreadable", "bin_truncated"])
def test_broken_checkpoint_files_are_named_before_weights_are_read(tiny_dir, tmp_path, monkeypatch, case):
    folder = _copy_checkpoint(tiny_dir, tmp_path, case)
    if case == "tokenizer_not_json":
        (folder / "tokenizer.json").write_text('{"version": "1.0", "trunc')
        file, message = "tokenizer.json", "is not valid JSON"
    elif case == "tokenizer_config_list":
        (folder / "tokenizer_config.json").write_text("[]")
        file, message = "tokenizer_config.json", "not a JSON object"
    elif case == "config_unreadable":  # a JSON object transformers cannot turn into a config
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "rope_scaling": "linear"}))
        file, message = "config.json", "is not a configuration transformers can read"
    else:  # a torch.save checkpoint cut short while copying
        from safetensors.torch import load_file
        state = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        torch.save(state, folder / "pytorch_model.bin")
        data = (folder / "pytorch_model.bin").read_bytes()
        (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
        file, message = "pytorch_model.bin", "is truncated or not a PyTorch weights file"

    def no_weights_read(*args, **kwargs):
        raise AssertionError("weights were read before the check")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights_read)
    with pytest.raises(sl.InputError, match=message) as err:
        sl.load_model(str(folder), device="cpu")
    assert str(folder / file) in str(err.value)


def test_a_killed_cache_build_leaves_no_orphan_after_the_next_load(monkeypatch, tmp_path):
    monkeypatch.setenv("SINKLENS_CACHE", str(tmp_path))

    def fake_dequantize(alias, out):
        (out / "model.safetensors").write_bytes(b"weights" * 100)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(embedded, "_dequantize_gguf", fake_dequantize)
    # what a SIGKILL mid-build leaves: a temporary folder the finally clause never removed
    orphan = tmp_path / ".smollm2-135m-killed"
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"half")
    folder = embedded.embedded_checkpoint("smollm2-135m")
    assert not orphan.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [folder.name]
    orphan.mkdir()  # also when the cache is already valid
    assert embedded.embedded_checkpoint("smollm2-135m") == folder and not orphan.exists()


# --- saving: atomic, clean overwrite -------------------------------------------------------------------------------

def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_save_into_a_read_only_place_fails_clearly(tiny, tmp_path, monkeypatch):
    target = tmp_path / "ro" / "ckpt"

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint.tempfile, "mkdtemp", read_only)  # as a read-only parent folder answers (root too)
    with sl.prune_qk(tiny, [(0, 0)], 3, dims="random"):
        with pytest.raises(sl.WriteError, match=r"Cannot write a checkpoint into .*ro.*read-only") as err:
            sl.save_pruned(tiny, target)
    assert str(target.parent) in str(err.value)
    assert not target.exists()


def test_a_full_disk_leaves_nothing_half_written(tiny, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    real_save = transformers.PreTrainedModel.save_pretrained

    def disk_full(self, folder, *args, **kwargs):
        real_save(self, folder, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    with sl.prune_qk(tiny, [(0, 0)], 3, dims="random"):
        sl.save_pruned(tiny, target)
        before = {p.name: p.read_bytes() for p in target.iterdir()}
        monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", disk_full)
        with pytest.raises(sl.WriteError, match=r"No space left.*nothing was written"):
            sl.save_pruned(tiny, target, overwrite=True)
        with pytest.raises(sl.WriteError, match=str(tmp_path / "new")):
            sl.save_pruned(tiny, tmp_path / "new")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the earlier checkpoint is intact
    assert not (tmp_path / "new").exists()
    assert _leftovers(tmp_path, "ckpt") == [] and _leftovers(tmp_path, "new") == []


def test_overwrite_removes_an_older_checkpoints_files(tiny, tmp_path):
    target = tmp_path / "ckpt"
    with sl.prune_qk(tiny, [(0, 0)], 3, dims="random"):
        sl.save_pruned(tiny, target)
        written = sorted(p.name for p in target.iterdir())
    (target / "model.safetensors.index.json").write_text('{"weight_map": {}}')  # a stale shard index
    (target / "model-00002-of-00002.safetensors").write_bytes(b"old shard")
    with sl.prune_qk(tiny, [(1, 0)], 4, dims="random"):
        sl.save_pruned(tiny, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == written
    assert [(d["layer"], d["head"]) for d in sl.read_manifest(target)["edits"][0]["dims"]] == [(1, 0)]
    assert _leftovers(tmp_path, "ckpt") == []
    reloaded = sl.load_model(str(target), device="cpu")  # a valid checkpoint, with no trace of the old shards
    assert sl.model_info(reloaded).n_layers == sl.model_info(tiny).n_layers


def test_overwrite_refuses_a_folder_that_is_no_checkpoint(tiny, tmp_path):
    (tmp_path / "project" / "notes").mkdir(parents=True)
    (tmp_path / "afile").write_text("x")
    with sl.prune_qk(tiny, [(0, 0)], 3, dims="random"):
        with pytest.raises(sl.InputError, match=r"holds folders \(notes\)"):
            sl.save_pruned(tiny, tmp_path / "project", overwrite=True)
        with pytest.raises(sl.InputError, match="is a file"):
            sl.save_pruned(tiny, tmp_path / "afile", overwrite=True)
    assert (tmp_path / "project" / "notes").is_dir()
