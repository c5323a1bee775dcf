"""Level ``"layer"``: each layer pruned alone on the dense residual stream; every configuration's pruned scores
are computed during one dense forward by calling the model's own attention again with that layer's edits."""

from __future__ import annotations

import dataclasses

import pandas as pd
import torch
from torch import Tensor

from ...core.errors import SinklensError
from ...core.hooks import batches, run_hooked
from ...core.loading import model_info
from ...core.qk import layout, masked_like
from ...prune.pattern_error import pattern_errors, softmax_pair
from ...prune.pruning import PruningPlan, apply_pruning
from .common import Accumulator, heads_by_layer, o_columns, result_frame


def _changes_layer(plan: PruningPlan, layer: int) -> bool:
    return any(l == layer for l, _ in list(plan.q_edits) + list(plan.k_edits) + list(plan.k_copies))


def _layer_plan(plan: PruningPlan, layer: int) -> PruningPlan:
    """The part of ``plan`` that edits ``layer`` (the same dims and edits, other layers left out)."""
    edits = ("q_edits", "k_edits", "k_copies", "q_bias", "k_bias", "k_copy_bias", "q_scale")
    return dataclasses.replace(plan, **{name: {p: v for p, v in getattr(plan, name).items() if p[0] == layer}
                                        for name in edits})


class _ScoresCaptured(Exception):
    """Raised by the scores hook of a rerun once it holds the pruned scores: the rest of the attention module
    (softmax, pattern x values, output projection) is not needed."""


class _AttentionRerun:
    """Pruned scores of one layer computed by the model's own attention module on the dense input.

    A forward hook on ``blocks[layer].attn`` keeps the arguments of the dense call; :meth:`scores` applies a
    plan's edits of this layer (:func:`apply_pruning`: weights and private-K hooks), calls the module again on
    those arguments (without a KV cache) and returns what its ``hook_attn_scores`` held, then restores the
    edits. Rotary variants, q/k norms, softcaps, sliding windows and fused projections all come from the model.
    The rerun stops at the scores hook (:class:`_ScoresCaptured`): nothing after the scores is computed.
    """

    _CACHE_ARGS = ("past_key_values", "past_key_value", "layer_past")

    def __init__(self, model, layer: int):
        self.model, self.layer = model, layer
        self.module = model.blocks[layer].attn
        self.args = self.kwargs = None
        self.rerunning = False
        self.captured: Tensor | None = None

    def record(self, module, args, kwargs) -> None:
        """Forward pre-hook: keep the dense call's arguments (not during a rerun)."""
        if not self.rerunning:
            self.args = args
            self.kwargs = {name: (None if name in self._CACHE_ARGS else value) for name, value in kwargs.items()}

    def scores(self, plan: PruningPlan) -> Tensor:
        """The scores [b, n_heads, q, k] of this layer with ``plan``'s edits of it applied."""
        edit = apply_pruning(self.model, _layer_plan(plan, self.layer))
        self.rerunning, self.captured = True, None
        try:
            self.module(*self.args, **self.kwargs)
        except _ScoresCaptured:
            pass
        finally:
            self.rerunning = False
            edit.restore()
        if self.captured is None:
            raise SinklensError(f"Layer {self.layer}: rerunning the attention module did not reach its scores hook, so "
                                "the pruned pattern is unknown (is this family's attention supported? see "
                                "docs/families.md).")
        return self.captured


def layer_level_errors(model, batch, heads, configs, gqa, batch_size, show_progress) -> pd.DataFrame:
    info = model_info(model)
    by_layer = heads_by_layer(heads)
    layers = sorted(by_layer)
    gs = info.group_size
    changed = {layer: [c for c, config in enumerate(configs)
                       if config.plan is not None and _changes_layer(config.plan, layer)] for layer in layers}
    whole = [c for c, config in enumerate(configs) if config.plan is None]
    gram = {}
    for layer in layers:  # W_O^h.T W_O^h: ||z W_O^T||^2 = sum_rows z G z^T, without forming c
        wo = o_columns(model, info, layer, by_layer[layer][1])
        gram[layer] = wo.transpose(1, 2) @ wo
    reruns = {layer: _AttentionRerun(model, layer) for layer in layers}
    acc = Accumulator(len(configs), len(heads))
    nan = float("nan")
    for _, sub in batches(batch, batch_size, desc="k sweep", show_progress=show_progress):
        acc.n_prompts += sub.tokens.shape[0]
        mask = sub.attention_mask
        real = mask.bool()
        hooks = []
        for layer in layers:
            slots, hs = by_layer[layer]
            seen: dict[str, Tensor] = {}
            index = torch.tensor(hs, device="cpu")
            kv = torch.tensor([h // gs for h in hs], device="cpu")
            rerun = reruns[layer]

            def keep_v(tensor, hook, seen=seen, rerun=rerun):
                if not rerun.rerunning:
                    seen["v"] = tensor

            def scores_hook(scores, hook, layer=layer, slots=slots, seen=seen, index=index, kv=kv, mask=mask,
                            real=real, rerun=rerun):
                if rerun.rerunning:  # a pruned configuration's scores, computed by the module itself
                    rerun.captured = scores[:, index.to(scores.device)].clone()
                    raise _ScoresCaptured
                device = scores.device
                mask, real = mask.to(device), real.to(device)  # the layer's device under a device_map
                dense = scores[:, index.to(device)]
                masked = masked_like(dense)
                ref, ref_p = softmax_pair(dense)
                v = seen["v"][:, :, kv.to(device)].float().transpose(1, 2)  # [b, n, pos, dh]
                z = ref_p @ v
                g = gram[layer].to(device)
                norm = _gram_norm(z, g, real)
                same = pattern_errors(ref, ref, mask, ref_p, ref_p)
                pruned_here = set(changed[layer])
                for c, config in enumerate(configs):  # nothing pruned in this layer: the dense pattern
                    if config.plan is not None and c not in pruned_here:
                        acc.add(c, slots, {**same, "out_rel": torch.zeros_like(norm)})
                for c in whole:  # head removed: pattern untouched (no pattern error to speak of), output gone
                    acc.add(c, slots, {"alpha0": same["alpha0"], "frob_rel": torch.full_like(norm, nan),
                                       "kl": torch.full_like(norm, nan), "d_alpha0": torch.full_like(norm, nan),
                                       "out_rel": norm / norm})
                seen["dense"] = (ref, ref_p, masked, v, z, g, norm)

            def after_attention(module, args, kwargs, output, layer=layer, slots=slots, seen=seen, mask=mask,
                                real=real, rerun=rerun):
                if rerun.rerunning:
                    return
                ref, ref_p, masked, v, z, g, norm = seen.pop("dense")
                for c in changed[layer]:
                    pruned = rerun.scores(configs[c].plan).masked_fill(masked, torch.finfo(ref.dtype).min)
                    logp, p = softmax_pair(pruned)
                    values = pattern_errors(ref, logp, mask, ref_p, p)
                    values["out_rel"] = _gram_norm(z - p @ v, g, real) / norm
                    acc.add(c, slots, values)
                seen.clear()

            names = layout(model).hooks(layer)
            hooks += [(names.v, keep_v), (names.scores, scores_hook)]
            rerun.handles = [rerun.module.register_forward_pre_hook(rerun.record, with_kwargs=True),
                             rerun.module.register_forward_hook(after_attention, with_kwargs=True)]
        try:
            run_hooked(model, sub, hooks, layers)
        finally:
            for rerun in reruns.values():
                for handle in rerun.handles:
                    handle.remove()
    return result_frame(acc, heads, configs, gqa, "layer", batch)


def _gram_norm(z: Tensor, gram: Tensor, real: Tensor) -> Tensor:
    """sqrt(sum over real rows of z G z^T) per [b, *heads]: the Frobenius norm of z W_O^T (z [b, *heads, pos, dh])."""
    quad = ((z @ gram) * z).sum(-1)  # [b, *heads, pos]
    rows = real.view(real.shape[0], *[1] * (quad.dim() - 2), real.shape[1])
    return (quad * rows).sum(-1).clamp(min=0).sqrt()
