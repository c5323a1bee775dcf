"""Random-init Llama checkpoints with the widths of real models, built offline (no hub).

They test the mechanics and the cost of sinklens at a real model's scale (shapes, memory, time,
devices, dtypes), NEVER the phenomenon: random weights have no attention sinks and no massive
activations, so no sink score, head list or dimension measured on them means anything.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .choices import EMBEDDED_MODELS
from .devices import resolve_dtype
from .embedded import embedded_checkpoint
from .errors import InputError
from .validate import check_choice, check_int


@dataclass(frozen=True)
class LlamaShape:
    """The widths of a Llama-family model (as in its published config.json)."""

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_mlp: int
    n_ctx: int
    rope_theta: float
    rms_norm_eps: float


SHAPES = {
    "llama-2-7b": LlamaShape(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_mlp=11008, n_ctx=4096,
                             rope_theta=10000.0, rms_norm_eps=1e-5),
    "llama-2-13b": LlamaShape(d_model=5120, n_layers=40, n_heads=40, n_kv_heads=40, d_mlp=13824, n_ctx=4096,
                              rope_theta=10000.0, rms_norm_eps=1e-5),
    "llama-3-8b": LlamaShape(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_mlp=14336, n_ctx=8192,
                             rope_theta=500000.0, rms_norm_eps=1e-5),
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def random_llama(folder: str | Path, shape: str = "llama-2-7b", n_layers: int | None = None,
                 vocab_from: str | Path | None = None, dtype: torch.dtype | str = torch.bfloat16, seed: int = 0,
                 initializer_range: float = 0.02) -> Path:
    """Write a random-init Llama checkpoint with the widths of ``shape`` into ``folder`` and return it.

    The folder holds ``config.json``, one safetensors shard per layer (plus one for the embeddings and
    one for the final norm and unembedding) with their index, and the tokenizer files of
    ``vocab_from``. Weights are drawn layer by layer, so building a 7B-shape checkpoint needs about one
    layer of memory. For tests of mechanics and scale only: see the module docstring.

    Args:
        folder: where to write; must not exist or be empty.
        shape: one of :data:`SHAPES` (``"llama-2-7b"``: d_model 4096, 32 MHA heads, MLP 11008, 4096 context,
            rope theta 1e4; ``"llama-3-8b"``: 32 query / 8 KV heads (GQA), MLP 14336, 8192 context, rope
            theta 5e5; ``"llama-2-13b"``).
        n_layers: number of decoder layers (default: the real model's), e.g. 2 for a CPU benchmark.
        vocab_from: a folder with a tokenizer. The vocabulary is sized to it (not to the real model's
            32,000 / 128,256 ids) so real text tokenizes into valid ids. Default: the embedded model's
            cached folder (SmolLM2's 49,152 ids).
        dtype: dtype of the stored weights (``torch.bfloat16`` default, or ``torch.float32``/``float16``).
        seed: seed of the weights (the same seed gives the same checkpoint).
        initializer_range: standard deviation of the normal draws of every matrix (norm gains are 1).
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    check_choice("shape", shape, tuple(SHAPES))
    spec = SHAPES[shape]
    if n_layers is None:
        n_layers = spec.n_layers
    n_layers = check_int("n_layers", n_layers, minimum=1, meaning=f"None: the real model's {spec.n_layers}")
    dtype = _weights_dtype(dtype)
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(f"{folder} exists and is not an empty folder: pick a new folder.")
    source = Path(vocab_from) if vocab_from is not None else embedded_checkpoint(next(iter(EMBEDDED_MODELS)))
    tokenizer = AutoTokenizer.from_pretrained(source)
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.d_model, intermediate_size=spec.d_mlp, num_hidden_layers=n_layers,
        num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads, max_position_embeddings=spec.n_ctx,
        rms_norm_eps=spec.rms_norm_eps, rope_theta=spec.rope_theta, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, initializer_range=initializer_range,
        hidden_act="silu", attention_bias=False, mlp_bias=False)
    config.dtype = dtype
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    shards: dict[str, list[str]] = {}
    for name in shapes:  # shard order: embeddings, layers 0..n-1, then the final norm and unembedding
        match = _LAYER.match(name)
        key = f"layer{int(match.group(1)):03d}" if match else ("embed" if "embed_tokens" in name else "head")
        shards.setdefault(key, []).append(name)
    order = ["embed"] + [f"layer{i:03d}" for i in range(n_layers)] + ["head"]
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    weight_map, total = {}, 0
    for i, key in enumerate(order):
        file = f"model-{i + 1:05d}-of-{len(order):05d}.safetensors"
        tensors = {}
        for name in shards[key]:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=dtype, device="cpu")
            else:
                draw = torch.randn(shapes[name], generator=generator, dtype=torch.float32, device="cpu")
                tensors[name] = draw.mul_(initializer_range).to(dtype)
            weight_map[name] = file
            total += tensors[name].numel() * tensors[name].element_size()
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "SINKLENS_RANDOM_WEIGHTS.txt").write_text(
        f"Random-init weights with the widths of {shape} ({n_layers} layers, seed {seed}), written by "
        "sinklens.core.testing.random_llama. For tests of mechanics and scale only: random weights have no attention "
        "sinks or massive activations.\n")
    return folder


def _weights_dtype(dtype) -> torch.dtype:
    return resolve_dtype(dtype, on_cuda=True)  # on_cuda: no CPU-speed warning, nothing runs here
