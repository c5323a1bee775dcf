"""Shared fixtures.

- ``tiny_dir`` (parametrized MHA / GQA): a randomly initialised Llama checkpoint folder with a
  small WordLevel tokenizer, built in the test session (no hub, no download).
- ``tiny``: a fresh bridge loaded from that folder with ``sinklens.load_model`` (cheap: ~0.1 s),
  so tests that edit weights cannot leak into each other.
- ``hf_reference``: a separate HF model with eager attention on the same weights, the
  independent computation every metric is checked against.
- ``smollm``: the embedded SmolLM2-135M, loaded once per session (integration tier).
"""

from __future__ import annotations

import os

import pytest
import torch

import sinklens as sl

from helpers import TINY_CONFIGS, build_tiny_checkpoint, hf_eager

# One thread for torch, here and in the notebook kernels (they inherit OMP_NUM_THREADS): the tiny models and small
# batches of this suite run several times faster without OpenMP spin-waits on a busy 2-core machine.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_dir(request, tmp_path_factory):
    n_heads, n_kv = TINY_CONFIGS[request.param]
    return build_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{request.param}"), n_heads, n_kv)


@pytest.fixture
def tiny(tiny_dir):
    return sl.load_model(str(tiny_dir), device="cpu")


@pytest.fixture(scope="session")
def hf_reference_factory():
    cache = {}

    def load(folder):
        key = str(folder)
        if key not in cache:
            cache[key] = hf_eager(key)
        return cache[key]
    return load


@pytest.fixture
def hf_reference(tiny_dir, hf_reference_factory):
    return hf_reference_factory(tiny_dir)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M bridge, loaded once for the whole session."""
    return sl.load_model("smollm2-135m", device="cpu")



def pytest_collection_modifyitems(config, items):
    """A test that uses the embedded model through the ``smollm`` fixture (directly or through another fixture) is
    an integration test: marked here from the fixture name, so that ``-m "not integration"`` leaves every one out."""
    for item in items:
        if "smollm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
