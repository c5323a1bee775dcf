"""Level ``"model"``: the pruned model runs (every head pruned together); a dense pass and one pass per
configuration, batch by batch, the dense reference held for one batch only."""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor

from ...core.hooks import batches
from ...core.loading import model_info
from ...core.qk import layout
from ...core.tokens import TokenBatch
from ...prune.pattern_error import pattern_errors
from ...prune.pruning import apply_pruning
from ...prune.removal import apply_head_removal
from .common import Accumulator, heads_by_layer, next_token_stats, o_columns, out_rel, result_frame


def model_level_errors(model, batch, heads, configs, gqa, batch_size, show_progress) -> pd.DataFrame:
    info = model_info(model)
    by_layer = heads_by_layer(heads)
    acc = Accumulator(len(configs), len(heads))
    dense_wo = {layer: o_columns(model, info, layer, hs) for layer, (_, hs) in by_layer.items()}
    for _, sub in batches(batch, batch_size, desc="reconstruction error", show_progress=show_progress):
        ref: dict[tuple[str, int], Tensor] = {}
        logits = _run_full(model, sub, _capture_hooks(model, by_layer, ref, dense_wo))
        ref_logp = torch.log_softmax(logits.float(), -1)
        acc.n_prompts += sub.tokens.shape[0]
        for c, config in enumerate(configs):
            edit = apply_head_removal(model, heads) if config.plan is None else apply_pruning(model, config.plan)
            try:
                hooks = _compare_hooks(model, info, by_layer, ref, dense_wo, sub.attention_mask, acc, c)
                logp = torch.log_softmax(_run_full(model, sub, hooks).float(), -1)
            finally:
                edit.restore()
            acc.add_next(c, next_token_stats(ref_logp, logp, sub))
    return result_frame(acc, heads, configs, gqa, "model", batch)


def _run_full(model, batch: TokenBatch, hooks) -> Tensor:
    with torch.inference_mode():
        return model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=hooks)


def _capture_hooks(model, by_layer, ref: dict, dense_wo: dict):
    hooks = []
    for layer, (_, hs) in by_layer.items():
        names = layout(model).hooks(layer)
        index = torch.tensor(hs, device="cpu")

        def scores_hook(scores, hook, layer=layer, index=index):
            ref[("logp", layer)] = torch.log_softmax(scores[:, index.to(scores.device)].float(), -1)

        def z_hook(z, hook, layer=layer, index=index):
            ref[("z", layer)] = z[:, :, index.to(z.device)].float().transpose(1, 2)  # [b, n, pos, dh]

        hooks += [(names.scores, scores_hook), (f"blocks.{layer}.attn.hook_z", z_hook)]
    return hooks


def _compare_hooks(model, info, by_layer, ref, dense_wo, mask, acc: Accumulator, config: int):
    hooks = []
    for layer, (slots, hs) in by_layer.items():
        index = torch.tensor(hs, device="cpu")
        names = layout(model).hooks(layer)

        def scores_hook(scores, hook, layer=layer, index=index, slots=slots):
            logp = torch.log_softmax(scores[:, index.to(scores.device)].float(), -1)
            values = pattern_errors(ref[("logp", layer)], logp, mask.to(scores.device))
            acc.add(config, slots, values)

        def z_hook(z, hook, layer=layer, index=index, slots=slots, hs=hs):
            z = z[:, :, index.to(z.device)].float().transpose(1, 2)
            wo = o_columns(model, info, layer, hs).to(z.device)  # live: zero for removed heads
            c = torch.einsum("bnpe,nde->bnpd", z, wo)
            c_ref = torch.einsum("bnpe,nde->bnpd", ref[("z", layer)], dense_wo[layer].to(z.device))
            acc.add(config, slots, {"out_rel": out_rel(c_ref, c, mask.to(z.device).bool())})

        hooks += [(names.scores, scores_hook), (f"blocks.{layer}.attn.hook_z", z_hook)]
    return hooks
