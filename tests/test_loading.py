"""Model loading: sources, clear errors, and the embedded model's verified cache."""

import json
import shutil
import time

import pytest
import torch

import sinklens as sl
from sinklens.core import embedded


def test_local_folder_loads_raw_mode(tiny_dir, hf_reference):
    model = sl.load_model(str(tiny_dir), device="cpu")
    info = sl.model_info(model)
    assert (info.n_layers, info.d_model, info.bos_id, info.dtype) == (3, 48, 1, "float32")
    assert info.n_heads % info.n_kv_heads == 0 and info.group_size == info.n_heads // info.n_kv_heads
    tokens = torch.tensor([[1, 5, 9, 30, 7]])
    assert torch.allclose(model(tokens), hf_reference(tokens).logits, atol=1e-5)


def test_unknown_names():
    with pytest.raises(sl.UnknownModelError, match="bundled name"):
        sl.load_model("not-a-model")
    with pytest.raises(sl.UnknownModelError, match="no such folder"):
        sl.load_model("./missing/folder")


def test_folder_without_config(tmp_path):
    with pytest.raises(sl.UnknownModelError, match="config.json"):
        sl.load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(sl.UnsupportedArchitectureError, match="supports the decoder families"):
        sl.load_model(str(tmp_path))


def test_hub_id_offline_fails_fast_with_a_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # and nothing is cached
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(sl.HubUnreachableError, match=r"cannot be reached.*load_model\('DIR'\)"):
        sl.load_model("meta-llama/Llama-2-7b-hf")
    assert time.monotonic() - start < 10
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(sl.HubUnreachableError, match="HF_HUB_OFFLINE"):
        sl.load_model("meta-llama/Llama-2-7b-hf")


@pytest.mark.parametrize("dtype, message", [
    ("int8", "Unknown dtype"),
    (torch.int64, "not a floating dtype"),
    (torch.bool, "not a floating dtype"),
    (torch.float64, "not supported"),
    (3, "must be a torch floating dtype"),
])
def test_bad_dtype(tiny_dir, dtype, message):
    with pytest.raises(sl.InputError, match=message):
        sl.load_model(str(tiny_dir), device="cpu", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "fp16"])
def test_half_precision_on_cpu_warns_and_works(tiny_dir, hf_reference, dtype):
    with pytest.warns(UserWarning, match="slower than float32"):
        model = sl.load_model(str(tiny_dir), device="cpu", dtype=dtype)
    expected = torch.bfloat16 if dtype is torch.bfloat16 else torch.float16
    assert sl.model_info(model).dtype == str(expected).replace("torch.", "")
    assert all(p.dtype == expected for p in model.original_model.parameters())
    tokens = torch.tensor([[1, 5, 9, 30, 7]])
    logits = model(tokens)
    reference = hf_reference(tokens).logits
    assert logits.dtype == expected  # half precision is not an fp32 model in disguise
    assert (logits.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_load_model_leaves_autograd_as_it_found_it(tiny_dir):
    assert torch.is_grad_enabled()
    model = sl.load_model(str(tiny_dir), device="cpu")
    assert torch.is_grad_enabled(), "load_model switched autograd off for the whole process"
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in model.original_model.parameters())
    with torch.no_grad():
        pass
    assert torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        sl.load_model(str(tiny_dir), device="cpu")
        assert not torch.is_grad_enabled()  # nor switches it on
    finally:
        torch.set_grad_enabled(True)
    # with autograd on, forwards build no graph and the in-place weight edits still run and restore bitwise
    tokens = torch.tensor([[1, 5, 9, 30, 7, 8]])
    logits = model(tokens)
    assert not logits.requires_grad and logits.grad_fn is None
    weight = model.blocks[1].attn.q.original_component.weight
    before = weight.clone()
    with sl.prune_qk(model, [(1, 0)], k=3, dims="random"):
        assert not torch.equal(weight, before)
        assert not model(tokens).requires_grad
    assert torch.equal(weight, before)
    census = sl.run_census(model, tokens, show_progress=False)
    assert not census.alpha.requires_grad


def test_bad_checkpoint_folders(tiny_dir, tmp_path):
    """Broken folders fail before weights are read, naming the file (or tensor) and the fix."""
    def copy(name):
        folder = tmp_path / name
        shutil.copytree(tiny_dir, folder)
        return folder

    folder = copy("not-json")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(sl.InputError, match=r"config\.json is not valid JSON"):
        sl.load_model(str(folder), device="cpu")
    folder = copy("list")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(sl.InputError, match="not a JSON object"):
        sl.load_model(str(folder), device="cpu")
    folder = copy("no-weights")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(sl.InputError, match="holds no weights"):
        sl.load_model(str(folder), device="cpu")
    folder = copy("no-tokenizer")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(sl.InputError, match="holds no tokenizer"):
        sl.load_model(str(folder), device="cpu")
    folder = copy("truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(sl.InputError, match=r"model\.safetensors is truncated"):
        sl.load_model(str(folder), device="cpu")


def test_embedded_cache_is_built_once_verified_and_rebuilt(monkeypatch, tmp_path):
    """The cache logic on a fake dequantizer: atomic build, reuse, rebuild when corrupt or partial."""
    monkeypatch.setenv("SINKLENS_CACHE", str(tmp_path))
    builds = []

    def fake_dequantize(alias, out):
        builds.append(alias)
        if len(builds) == 3:
            raise RuntimeError("killed mid-build")
        (out / "model.safetensors").write_bytes(b"weights" * 100)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(embedded, "_dequantize_gguf", fake_dequantize)
    folder = embedded.embedded_checkpoint("smollm2-135m")
    assert embedded.embedded_checkpoint("smollm2-135m") == folder and len(builds) == 1
    blob = folder / "model.safetensors"
    blob.write_bytes(blob.read_bytes()[:-1] + b"X")  # one corrupt byte
    assert embedded.embedded_checkpoint("smollm2-135m") == folder and len(builds) == 2
    assert (folder / "model.safetensors").read_bytes() == b"weights" * 100
    (folder / "sinklens_cache.json").unlink()  # an incomplete folder: no manifest
    with pytest.raises(RuntimeError, match="killed"):
        embedded.embedded_checkpoint("smollm2-135m")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".smollm2-135m-")]  # no partial leftovers
    assert embedded.embedded_checkpoint("smollm2-135m") == folder and len(builds) == 4
