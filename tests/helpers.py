"""Shared test helpers: tiny random checkpoints, token and mask makers, the notebook executor.

Tests import these from here (``from helpers import ...``); tests/conftest.py holds only fixtures.
"""

from __future__ import annotations

import os

import torch

TINY_CONFIGS = {
    # name: (query heads, kv heads)
    "mha": (4, 4),
    "gqa": (6, 2),
}


TINY_VOCAB = 128


def build_tiny_checkpoint(folder, n_heads: int, n_kv_heads: int, seed: int = 0, n_layers: int = 3,
                          d_model: int = 48, max_positions: int = 96):
    """Write a random Llama checkpoint with a WordLevel tokenizer ("w3 w4 ..." are tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=d_model, intermediate_size=2 * d_model,
                         num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                         max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         initializer_range=0.2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    # larger norm gains make patterns peaked enough to be interesting
    for layer in model.model.layers:
        layer.input_layernorm.weight.data.uniform_(0.5, 2.0)
    model.save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, TINY_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="</s>").save_pretrained(folder)
    return folder


def random_tokens(n: int, length: int, seed: int = 0, bos: bool = True) -> torch.Tensor:
    """Random ids of the tiny vocabulary (3..127), BOS (id 1) first when ``bos``."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, TINY_VOCAB, (n, length), generator=generator)
    if bos:
        tokens[:, 0] = 1
    return tokens


def padded_mask(n: int, length: int, side: str, seed: int = 0) -> torch.Tensor:
    """A 0/1 mask with random prompt lengths (>= length // 2), padded on ``side``."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (n,), generator=generator)
    lengths[0] = length
    pos = torch.arange(length)[None, :]
    if side == "right":
        return (pos < lengths[:, None]).long()
    return (pos >= (length - lengths)[:, None]).long()


NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


def execute_notebook(name: str, out_dir, **params):
    """Run ``notebooks/<name>`` headless with papermill (kernel python3) and return the executed copy's path.

    ``out_dir`` receives the executed notebook and is passed to the notebook as its ``out_dir``.
    """
    import papermill

    from sinklens.series.runner import kernel_config

    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    output = os.path.join(out_dir, name)
    with kernel_config() as config:
        papermill.execute_notebook(os.path.join(NOTEBOOKS, name), output, parameters={"out_dir": out_dir, **params},
                                   kernel_name="python3", progress_bar=False, cwd=os.path.dirname(NOTEBOOKS),
                                   config=config)
    return output
