"""Shared test helpers: tiny random checkpoints, the HF eager reference, item files, token and mask makers, small
series notebooks, the notebook executor and the runner's CI parameters.

Tests import these from here (``from helpers import ...``); tests/conftest.py holds only fixtures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TINY_CONFIGS = {
    # name: (query heads, kv heads)
    "mha": (4, 4),
    "gqa": (6, 2),
}
TINY_VOCAB = 128  # ids 0..127: <unk>, <s> (BOS, 1), </s> (EOS and pad, 2), then the words or characters
D_MODEL = 48

# --- tiny random checkpoints -------------------------------------------------------------------
# Two builders, one module: ``build_tiny_checkpoint`` (the Llama MHA / GQA models of the ``tiny`` fixtures, a
# WordLevel tokenizer whose tokens are "w3 w4 ...") and ``build_family_checkpoint`` (every decoder family sinklens
# supports, a byte-level tokenizer). sinklens.core.testing.random_llama is the package's own builder of real-width
# checkpoints (mechanics and scale at a real model's size), not a test helper.

# model_type -> config overrides (beyond the shared size fields of family_config). Each family has its distinctive
# structure switched on (GQA, q/k/v biases, q/k norms, softcaps and sliding windows, fused qkv, Conv1D, partial
# rotary, parallel attention/MLP).
FAMILIES: dict[str, dict] = {
    "llama": dict(num_attention_heads=4, num_key_value_heads=4),
    # Llama 3: GQA, rope_theta 500000 and the llama3 rotary frequency scaling
    "llama3": dict(num_attention_heads=6, num_key_value_heads=2, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": dict(num_attention_heads=6, num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(num_attention_heads=6, num_key_value_heads=2),
    "qwen3": dict(num_attention_heads=6, num_key_value_heads=2, head_dim=8),
    "gemma2": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=12, sliding_window=6,
                   attn_logit_softcapping=5.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16),
    "phi3": dict(num_attention_heads=6, num_key_value_heads=2),
    "olmo2": dict(num_attention_heads=4, num_key_value_heads=4),
    "gpt2": dict(n_head=4),
    "gpt_neox": dict(num_attention_heads=4, rotary_pct=0.5, use_parallel_residual=True),
}
# families whose HF config type differs from the key
MODEL_TYPE = {"llama3": "llama"}


def family_config(family: str, n_layers: int = 3, max_positions: int = 96, **overrides):
    """The transformers config of tiny ``family`` (a key of :data:`FAMILIES`), ``overrides`` on top of its own."""
    from transformers import AutoConfig

    model_type = MODEL_TYPE.get(family, family)
    common = dict(vocab_size=TINY_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    if model_type == "gpt2":
        sizes = dict(n_embd=D_MODEL, n_layer=n_layers, n_positions=max_positions, n_inner=2 * D_MODEL,
                     initializer_range=0.2)
    else:
        sizes = dict(hidden_size=D_MODEL, intermediate_size=2 * D_MODEL, num_hidden_layers=n_layers,
                     max_position_embeddings=max_positions, initializer_range=0.2)
    config = AutoConfig.for_model(model_type, **common, **sizes, **(FAMILIES[family] | overrides))
    if model_type == "gemma2":  # alternate sliding / full attention in a 3-layer model
        config.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    return config


def _word_tokenizer():
    """WordLevel: "w3 w4 ..." are the tokens 3, 4, ... of the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, TINY_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def _byte_tokenizer():
    """Byte-level, one token per printable ASCII character: real text tokenizes, and it is the kind of tokenizer.json
    that transformers' own tokenizer classes rebuild correctly (for ``qwen2`` it loads ``Qwen2Tokenizer``, which
    keeps only a byte-level BPE's vocabulary and merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    characters = [chr(b) for b in range(33, 127)] + ["\u0120", "\u010a"]  # ByteLevel's space and newline
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: 3 + i for i, c in enumerate(characters)}
    tok = Tokenizer(models.BPE(vocab, [], continuing_subword_prefix="", end_of_word_suffix=""))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _save_checkpoint(model, tokenizer, folder):
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="</s>").save_pretrained(folder)
    return folder


def build_tiny_checkpoint(folder, n_heads: int, n_kv_heads: int, seed: int = 0, n_layers: int = 3,
                          max_positions: int = 96):
    """Write a random Llama checkpoint with a WordLevel tokenizer ("w3 w4 ..." are tokens); returns ``folder``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = family_config("llama", n_layers, max_positions, num_attention_heads=n_heads,
                           num_key_value_heads=n_kv_heads)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # larger norm gains make patterns peaked enough to be interesting
    for layer in model.model.layers:
        layer.input_layernorm.weight.data.uniform_(0.5, 2.0)
    return _save_checkpoint(model, _word_tokenizer(), folder)


def build_family_checkpoint(folder, family: str, seed: int = 0, n_layers: int = 3, max_positions: int = 96):
    """Write a random ``family`` checkpoint (a key of :data:`FAMILIES`) with a byte-level tokenizer; returns ``folder``.

    The norm gains and biases are drawn away from their init values so that a wrong (1 + w) convention, a dropped
    bias or a misplaced q/k norm changes the numbers.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = family_config(family, n_layers, max_positions)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # norm gains (and LayerNorm biases) away from 1 / 0, and every projection bias nonzero, so that a
            # family-specific convention that is got wrong shows in the numbers
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name or ".ln_" in name or "layernorm" in name:
                if leaf == "weight":
                    low, high = (-0.5, 1.0) if config.model_type == "gemma2" else (0.5, 2.0)
                    param.copy_(torch.empty_like(param).uniform_(low, high, generator=generator))
                else:
                    param.copy_(torch.empty_like(param).uniform_(-0.3, 0.3, generator=generator))
            elif leaf == "bias":
                param.copy_(torch.empty_like(param).uniform_(-0.3, 0.3, generator=generator))
    return _save_checkpoint(model, _byte_tokenizer(), folder)


# --- the independent reference ------------------------------------------------------------------

def hf_eager(folder, dtype=torch.float32):
    """A plain transformers model of the checkpoint in ``folder``, eager attention, eval mode, no gradients: the
    independent computation the bridge's numbers are checked against (``dtype="auto"``: the stored dtype)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="eager")
    return model.eval().requires_grad_(False)


# --- multiple-choice item files (the evaluation's "mc" task) ----------------------------------------

# hand-made: contexts and choices of different lengths, a context with a trailing space, a choice without a leading
# space, two tasks, 2 to 4 choices
TINY_ITEMS = [
    {"id": "a", "task": "alpha", "context": "w5 w6 w7", "choices": [" w8", " w9 w10", " w11"], "gold": 0},
    {"id": "b", "task": "alpha", "context": "w12 w13 ", "choices": [" w14 w15 w16", "w17"], "gold": 1},
    {"id": "c", "task": "alpha", "context": "w20", "choices": [" w30", " w31", " w32 w33", " w34"], "gold": 2},
    {"id": "d", "task": "beta", "context": "w40 w41 w42 w43 w44", "choices": [" w50 w51", " w52"], "gold": 1},
    {"id": "e", "task": "beta", "context": "w60 w61", "choices": [" w62", " w63 w64 w65 w66", " w67"], "gold": 0},
]
# contexts and choices long enough that a block-packed choice crosses Gemma 2's sliding window (6)
LONG_ITEMS = [
    {"id": f"i{i}", "task": "t" + str(i % 2), "context": " ".join(f"w{5 + 7 * i + j}" for j in range(3 + i)),
     "choices": [f" w{60 + i}", f" w{70 + i} w{71 + i} w{72 + i}", f" w{90 + i} w{3 + i}"], "gold": i % 3}
    for i in range(5)
]


def mc_items(n: int, n_choices: int = 3) -> list[dict]:
    """``n`` generated items of two tasks, three-word contexts and ``n_choices`` (3 or 4) choices, gold cycling."""
    choices = lambda i: [f" w{20 + i}", f" w{40 + i} w{41 + i}", f" w{60 + i}", f" w{90 + i} w{3 + i}"][:n_choices]
    return [{"id": f"i{i}", "task": "t" + str(i % 2), "context": f"w{5 + i} w{6 + 2 * i} w{7 + 3 * i}",
             "choices": choices(i), "gold": i % n_choices} for i in range(n)]


def write_items(folder, items, name: str = "items.jsonl") -> Path:
    """Write ``items`` as a JSONL item file ``folder/name`` (one item a line) and return its path."""
    path = Path(folder) / name
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


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


def write_notebook(path, parameters: str, body: str):
    """Write a small series notebook: a ``parameters`` cell (source ``parameters``), the check_params cell that every
    notebook of the series starts with (``P``: the checked parameters), then ``body``."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    params = new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    check = new_code_cell("import json, os\nfrom sinklens.series import check_params\nP = check_params(globals())")
    nb = new_notebook(cells=[params, check, new_code_cell(body)],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, str(path))


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


def ci_params(notebook: str, model: str | None = None, **overrides) -> dict:
    """Every parameter ``notebooks/<notebook>`` declares, with the value ``python -m sinklens run --ci [--model MODEL]``
    runs it with (from the runner's own plan: the notebook's default, the series probe, then ``CI_PARAMS``), and
    ``overrides`` on top; ``out_dir`` is left to :func:`execute_notebook`. A test names each value it overrides, with
    the reason, where it calls this."""
    import tempfile

    from sinklens.series.runner import plan_run

    with tempfile.TemporaryDirectory() as out:
        (plan,) = plan_run(NOTEBOOKS, model=model, only=[notebook], ci=True, out=out).notebooks
    unknown = sorted(set(overrides) - set(plan.declared))
    if unknown:
        raise ValueError(f"{notebook} declares no parameter {', '.join(unknown)}")
    return {name: value for name, value in plan.effective.items() if name != "out_dir"} | overrides


# --- layer selections built from rows (no model) --------------------------------------------------------------

def fake_selection(rows, policy="bos_top", fill="zero", temperature=False):
    import pandas as pd

    import sinklens as sl
    from sinklens.assess.selection import LayerSelection

    """A LayerSelection holding only the given table rows (strategy, split, method, layers, n_heads, retention)."""
    table = pd.DataFrame([{"strategy": strategy, "split": split, "method": method, "layers": layers,
                           "n_layers": len(layers), "n_heads": n_heads,
                           "heads": [[l, 0] for l in layers], "params_zeroed": 100 * n_heads,
                           "params_share": n_heads / 1000, "retention": retention, "ci_low": retention - 0.05,
                           "ci_high": retention + 0.05, "key": f"{method}:{layers}:{split}"}
                          for strategy, split, method, layers, n_heads, retention in rows])
    spec = sl.PruneSpec([(1, 0), (3, 0), (5, 0)], 4, policy, fill=fill, temperature=temperature).as_dict()
    return LayerSelection(table=table, single_layer=table.iloc[:0], heads=[(1, 0), (3, 0), (5, 0)], dims={},
                          dense={}, settings={"spec": spec, "k": 4, "metric": "acc/mean", "target_retention": 0.91})
