"""Model loading: sources, clear errors, and the embedded model's verified cache."""

import json
import time

import pytest
import torch

import sinklens as sl
from sinklens import loading


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
    (torch.float16, "on CPU is refused"),
    ("bfloat16", "on CPU is refused"),
    ("int8", "Unknown dtype"),
    (torch.int64, "not supported"),
])
def test_bad_dtype(tiny_dir, dtype, message):
    with pytest.raises(sl.InputError, match=message):
        sl.load_model(str(tiny_dir), device="cpu", dtype=dtype)


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

    monkeypatch.setattr(loading, "_dequantize_gguf", fake_dequantize)
    folder = loading.embedded_checkpoint("smollm2-135m")
    assert loading.embedded_checkpoint("smollm2-135m") == folder and len(builds) == 1
    blob = folder / "model.safetensors"
    blob.write_bytes(blob.read_bytes()[:-1] + b"X")  # one corrupt byte
    assert loading.embedded_checkpoint("smollm2-135m") == folder and len(builds) == 2
    assert (folder / "model.safetensors").read_bytes() == b"weights" * 100
    (folder / "sinklens_cache.json").unlink()  # an incomplete folder: no manifest
    with pytest.raises(RuntimeError, match="killed"):
        loading.embedded_checkpoint("smollm2-135m")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".smollm2-135m-")]  # no partial leftovers
    assert loading.embedded_checkpoint("smollm2-135m") == folder and len(builds) == 4
