"""Device discipline: every tensor sinklens makes names its device; inputs follow the model; device_map works.

With ``torch.set_default_device("meta")`` in force (here: ``with torch.device("meta")``, the same mode,
scoped), any tensor made without a device lands on ``meta`` and the next operation mixing it with the
CPU model fails, so the README's steps running there with the same numbers proves the package names
its devices. Loading is left outside the meta scope: ``from_pretrained`` under a meta default device
builds meta weights (transformers, not sinklens); everything after loading runs inside it.
"""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

import sinklens as sl
from sinklens.core import loading
from sinklens.core.tokens import as_batch

EVAL = {"limit": 2, "n_lm_prompts": 2, "n_copy": 2, "show_progress": False}


def readme_steps(model, out_dir) -> dict:
    """The README's Python example after loading, at small sizes; returns every number it produces."""
    probe = sl.probe_tokens(model, n_prompts=4, seq_len=16, prepend_bos=True)
    census = sl.run_census(model, probe, show_progress=False)
    scores = sl.sink_scores(model, probe)
    heads = sl.sink_specialized_heads(census.sink_scores(0), eps=0.3, q=0.9)[:4]
    stats = sl.massive_activations(model, probe, show_progress=False)
    dims = sl.select_dims(model, heads, k=10, calibration=probe)
    errors = sl.reconstruction_error(model, probe, heads, k=10, show_progress=False)
    dense = sl.evaluate(model, **EVAL)
    with sl.prune_qk(model, heads, k=10, dims="bos_top", calibration=probe):
        pruned = sl.evaluate(model, **EVAL)
    handle = sl.apply_pruning(model, heads, k=10, calibration=probe)
    sl.save_pruned(model, out_dir)
    handle.restore()
    manifest = json.loads((out_dir / "sinklens_manifest.json").read_text())
    return {"census": census.alpha, "confidence": census.confidence, "scores": scores, "heads": heads,
            "massive": stats.first, "dims": dims, "errors": errors, "dense": dense.metrics, "pruned": pruned.metrics,
            "retention": sl.retention(dense, pruned), "saved_edits": manifest["edits"]}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert x.device.type == "cpu" and torch.equal(x.nan_to_num(-7.0), y.nan_to_num(-7.0)), key
        elif isinstance(x, pd.DataFrame):
            pd.testing.assert_frame_equal(x, y, check_exact=True)
        elif isinstance(x, dict) and x and isinstance(next(iter(x.values())), torch.Tensor):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), key
        else:
            assert x == y, key


@pytest.mark.integration
def test_readme_steps_name_their_devices(smollm, tmp_path):
    """Under a meta default device the README's steps give exactly the numbers they give without it."""
    reference = readme_steps(smollm, tmp_path / "plain")
    assert reference["heads"], "the probe found no sink-specialized head: the comparison would be empty"
    with torch.device("meta"):
        under_meta = readme_steps(smollm, tmp_path / "meta")
    assert torch.empty(1).device.type == "cpu"  # the meta default is scoped to the block
    assert_same(reference, under_meta)
    assert not sl.active_edits(smollm)


def test_tiny_model_loads_and_runs_under_meta_default_once_loaded(tiny_dir, tmp_path):
    """The tiny checkpoint's tokenize / census / pruning / evaluation path, the MHA and GQA cases."""
    model = sl.load_model(str(tiny_dir), device="cpu")
    tokens = sl.tokenize(model, ["w5 w6 w7 w8 w9", "w10 w11"], prepend_bos=True)
    plain = sl.run_census(model, tokens, show_progress=False).alpha
    with torch.device("meta"):
        batch = sl.tokenize(model, ["w5 w6 w7 w8 w9", "w10 w11"], prepend_bos=True)
        assert batch.tokens.device.type == "cpu"
        census = sl.run_census(model, batch, show_progress=False)
        errors = sl.reconstruction_error(model, batch, [(1, 0), (1, 1)], k=4, dims="random", level="layer",
                                         show_progress=False)
    assert torch.equal(plain.nan_to_num(-7.0), census.alpha.nan_to_num(-7.0))
    assert errors["frob_rel"].notna().all()


def test_device_map_gives_the_same_numbers(tiny_dir, monkeypatch):
    """device_map={"": "cpu"} goes through to transformers/accelerate and changes no number."""
    from transformers import AutoModelForCausalLM

    plain = sl.load_model(str(tiny_dir), device="cpu")
    calls, original = [], AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **kw: calls.append(kw) or original(*a, **kw))
    mapped = sl.load_model(str(tiny_dir), device_map={"": "cpu"})
    assert calls and calls[0]["device_map"] == {"": "cpu"}
    assert {p.device.type for p in mapped.parameters()} == {"cpu"}
    tokens = sl.tokenize(plain, ["w5 w6 w7 w8 w9 w3", "w10 w11 w12"], prepend_bos=True)
    a, b = (sl.run_census(m, tokens, show_progress=False) for m in (plain, mapped))
    assert torch.equal(a.alpha.nan_to_num(-7.0), b.alpha.nan_to_num(-7.0))
    heads = [(1, 0), (2, 1)]
    ea, eb = (sl.reconstruction_error(m, tokens, heads, k=5, dims="random", show_progress=False)
              for m in (plain, mapped))
    pd.testing.assert_frame_equal(ea, eb, check_exact=True)
    ma, mb = (sl.massive_activations(m, tokens, show_progress=False).first for m in (plain, mapped))
    assert torch.equal(ma, mb)


def test_a_token_batch_on_another_device_is_moved(tiny, monkeypatch):
    batch = sl.tokenize(tiny, ["w5 w6 w7"], prepend_bos=True)
    if torch.cuda.is_available():  # a real second device: tokens on the GPU, model on the CPU
        moved = as_batch(tiny, sl.TokenBatch(batch.tokens.cuda(), batch.attention_mask.cuda(), True))
        assert moved.tokens.device.type == "cpu" and torch.equal(moved.tokens, batch.tokens)
    # CPU-only stand-in: a model whose embedding sits on "meta" receives the validated ids there
    monkeypatch.setattr("sinklens.core.tokens.input_device", lambda model: torch.device("meta"))
    moved = as_batch(tiny, batch)
    assert moved.tokens.device.type == "meta" and moved.attention_mask.device.type == "meta"
    assert moved.tokens.shape == batch.tokens.shape and moved.prepend_bos is True


# --- bad devices, before any weight is read -------------------------------------------------------

@pytest.fixture
def no_weights_read(monkeypatch):
    def refuse(name):
        raise AssertionError(f"the checkpoint {name!r} was resolved before the device was checked")
    monkeypatch.setattr(loading, "resolve_checkpoint", refuse)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1), 0])
def test_cuda_without_gpu_names_the_visible_devices(no_weights_read, device):
    with pytest.raises(sl.InputError, match=r"torch sees none.*Visible devices: \['cpu'\]"):
        sl.load_model("smollm2-135m", device=device)


@pytest.mark.parametrize("device, message", [
    ("gpu0", "Unknown device 'gpu0'.*visible devices"),
    ("cuda:99", "cuda:99"),
    (3.5, "device must be a string"),
    ("xla", "not usable here"),
])
def test_unknown_devices(no_weights_read, device, message):
    with pytest.raises(sl.InputError, match=message):
        sl.load_model("smollm2-135m", device=device)


@pytest.mark.parametrize("device_map, message", [
    ({"": "cuda:7"}, r"device_map\[''\] = 'cuda:7'"),
    ({"model.layers.0": "tpu"}, r"device_map\['model.layers.0'\]"),
    ("everywhere", "Unknown device_map 'everywhere'"),
    ({}, "non-empty dict"),
    ({0: "cpu"}, "module names"),
])
def test_bad_device_maps(no_weights_read, device_map, message):
    with pytest.raises(sl.InputError, match=message):
        sl.load_model("smollm2-135m", device_map=device_map)


def test_device_and_device_map_together(no_weights_read):
    with pytest.raises(sl.InputError, match="not both"):
        sl.load_model("smollm2-135m", device="cpu", device_map={"": "cpu"})


def test_weights_that_do_not_match_their_config(tiny_dir, tmp_path):
    folder = tmp_path / "wrong"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] += 8  # the MLP weights on disk are narrower
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(sl.InputError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight has shape"):
        sl.load_model(str(folder), device="cpu")
