"""Tiny random-init checkpoints of every decoder family sinklens supports, built offline.

Each family is a transformers config (``AutoConfig.for_model``) small enough to build and load in well
under a second, with the family's distinctive structure switched on (GQA, q/k/v biases, q/k norms,
softcaps and sliding windows, fused qkv, Conv1D, partial rotary, parallel attention/MLP). The norm gains
and biases are drawn away from their init values so that a wrong (1 + w) convention, a dropped bias or
a misplaced q/k norm changes the numbers. The tokenizer is byte-level with one token per printable ASCII
character (id 1 is BOS, id 0 unknown): real text tokenizes, and it is the kind of tokenizer.json that
transformers' own tokenizer classes rebuild correctly (for ``qwen2`` it loads ``Qwen2Tokenizer``, which
keeps only a byte-level BPE's vocabulary and merges).
"""

from __future__ import annotations

import torch

TINY_VOCAB = 128
D_MODEL = 48

# model_type -> config overrides (beyond the shared size fields below)
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


def family_config(family: str, n_layers: int = 3, max_positions: int = 96):
    """The transformers config of tiny ``family`` (a key of :data:`FAMILIES`)."""
    from transformers import AutoConfig

    model_type = MODEL_TYPE.get(family, family)
    common = dict(vocab_size=TINY_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    if model_type == "gpt2":
        sizes = dict(n_embd=D_MODEL, n_layer=n_layers, n_positions=max_positions, n_inner=2 * D_MODEL,
                     initializer_range=0.2)
    else:
        sizes = dict(hidden_size=D_MODEL, intermediate_size=2 * D_MODEL, num_hidden_layers=n_layers,
                     max_position_embeddings=max_positions, initializer_range=0.2)
    config = AutoConfig.for_model(model_type, **common, **sizes, **FAMILIES[family])
    if model_type == "gemma2":  # alternate sliding / full attention in a 3-layer model
        config.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    return config


def build_family_checkpoint(folder, family: str, seed: int = 0, n_layers: int = 3, max_positions: int = 96):
    """Write a random ``family`` checkpoint with a WordLevel tokenizer into ``folder``; returns ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

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
    model.save_pretrained(folder)
    characters = [chr(b) for b in range(33, 127)] + ["\u0120", "\u010a"]  # ByteLevel's space and newline
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: 3 + i for i, c in enumerate(characters)}
    tok = Tokenizer(models.BPE(vocab, [], continuing_subword_prefix="", end_of_word_suffix=""))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="</s>").save_pretrained(folder)
    return folder


