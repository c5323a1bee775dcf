"""What both levels of the reconstruction error share: the constants and column names, a configuration, the
per-prompt metrics (``out_rel``, next-token statistics), their fp32 accumulator and the result frame."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import pandas as pd
import torch
from torch import Tensor

from ...core.choices import POLICIES
from ...core.qk import head_rows, weights
from ...core.tokens import TokenBatch
from ...prune.pruning import PruningPlan
from ...prune.spec import Head, PruneSpec

SweepPolicy = Literal["bos_top", "random", "weight_norm", "act_weight", "optimized", "head_removal"]


SWEEP_POLICIES: tuple[str, ...] = get_args(SweepPolicy)  # the kept-dims policies and whole-head removal


assert SWEEP_POLICIES == POLICIES + ("head_removal",)


HEAD_REMOVAL = "head_removal"


DEFAULT_SWEEP_POLICIES = ("bos_top", "random", "weight_norm", HEAD_REMOVAL)  # k_sweep's default: the thesis' controls


Level = Literal["layer", "model"]


LEVELS: tuple[str, ...] = get_args(Level)


Metric = Literal["frob_rel", "kl", "d_alpha0", "out_rel", "alpha0", "next_kl", "loss", "d_loss"]


METRICS = ("frob_rel", "kl", "d_alpha0", "out_rel")


K_GRID = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


COLUMNS = ["level", "policy", "k", "seed", "gqa", "basis", "fill", "temperature", "fit", "layer", "head", "alpha0",
           "frob_rel", "kl", "d_alpha0", "out_rel", "next_kl", "loss", "d_loss", "n_prompts"]


@dataclass
class Config:
    """One configuration: a pruning plan, or whole-head removal (plan None)."""

    policy: str
    plan: PruningPlan | None
    fit: str | None = None  # what the pruning was fitted on: "in_sample", "held_out", "unknown" or None

    @property
    def spec(self) -> PruneSpec | None:
        return None if self.plan is None else self.plan.spec


def out_rel(ref: Tensor, new: Tensor, real: Tensor) -> Tensor:
    """||ref - new||_F / ||ref||_F over real positions; ref/new [b, n, pos, d]."""
    rows = real[:, None, :, None].float()
    return ((ref - new) * rows).square().sum((-1, -2)).sqrt() / (ref * rows).square().sum((-1, -2)).sqrt()


def next_token_stats(ref_logp: Tensor, logp: Tensor, batch: TokenBatch) -> dict[str, Tensor]:
    """Sums over real positions: KL(P || P'), and the next-token losses of both (with their counts)."""
    real = batch.attention_mask.bool().to(ref_logp.device)  # logits sit on the last layer's device
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    has_next = real[:, :-1] & real[:, 1:]
    target = batch.tokens[:, 1:, None].to(ref_logp.device)
    nll_ref = -ref_logp[:, :-1].gather(-1, target).squeeze(-1)
    nll = -logp[:, :-1].gather(-1, target).squeeze(-1)
    return {"kl_sum": (kl * real).sum(), "n_pos": real.sum(), "loss_ref_sum": (nll_ref * has_next).sum(),
            "loss_sum": (nll * has_next).sum(), "n_next": has_next.sum()}


class Accumulator:
    """Sums of per-prompt metrics for [config, head], and model-level sums per config."""

    def __init__(self, n_configs: int, n_heads: int):
        self.sums = {name: torch.zeros(n_configs, n_heads, dtype=torch.float64, device="cpu")
                     for name in METRICS + ("alpha0",)}
        self.next = [dict() for _ in range(n_configs)]
        self.n_prompts = 0

    def add(self, config: int, slots: list[int], values: dict[str, Tensor]) -> None:
        for name, value in values.items():
            self.sums[name][config, slots] += value.double().sum(0).cpu()

    def add_next(self, config: int, stats: dict[str, Tensor]) -> None:
        for name, value in stats.items():
            self.next[config][name] = self.next[config].get(name, 0.0) + float(value)


def heads_by_layer(heads: list[Head]):
    """Per layer: (slots in ``heads``, head indices)."""
    by_layer: dict[int, tuple[list[int], list[int]]] = {}
    for slot, (layer, head) in enumerate(heads):
        slots, hs = by_layer.setdefault(layer, ([], []))
        slots.append(slot)
        hs.append(head)
    return by_layer


def o_columns(model, info, layer: int, hs: list[int]) -> Tensor:
    """W_O^h of the listed heads as [n, d_model, d_head] (a copy of the live weights)."""
    wo = weights(model, layer).o
    return torch.stack([wo[:, head_rows(info, h)] for h in hs]).float().clone()


def result_frame(acc: Accumulator, heads, configs, gqa, level: str, batch: TokenBatch) -> pd.DataFrame:
    rows = []
    n = acc.n_prompts
    for c, config in enumerate(configs):
        nxt = acc.next[c]
        if nxt:
            n_next = nxt["n_next"] or float("nan")  # prompts of one token have no next token
            model_level = {"next_kl": nxt["kl_sum"] / nxt["n_pos"], "loss": nxt["loss_ref_sum"] / n_next,
                           "d_loss": (nxt["loss_sum"] - nxt["loss_ref_sum"]) / n_next}
        else:
            model_level = {"next_kl": float("nan"), "loss": float("nan"), "d_loss": float("nan")}
        spec = config.spec
        fields = ({"k": None, "seed": None, "gqa": gqa, "basis": None, "fill": None, "temperature": None}
                  if spec is None else {"k": spec.k, "seed": spec.seed, "gqa": spec.gqa, "basis": spec.basis,
                                        "fill": spec.fill, "temperature": spec.temperature})
        fields["fit"] = config.fit
        for slot, (layer, head) in enumerate(heads):
            rows.append({"level": level, "policy": config.policy, **fields, "layer": layer, "head": head,
                         **{name: float(acc.sums[name][c, slot] / n) for name in ("alpha0",) + METRICS},
                         **model_level, "n_prompts": n})
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["k"] = frame["k"].astype("Int64")
    frame["seed"] = frame["seed"].astype("Int64")
    frame.attrs.update({"level": level, "prepend_bos": batch.prepend_bos, "n_prompts": n,
                        "seq_len": int(batch.tokens.shape[1]), "metrics": list(METRICS)})
    return frame
