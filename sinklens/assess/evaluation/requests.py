"""Scoring requests of the three suite parts, and their batching into padded forwards.

A request is one sequence (:class:`Row`) with the positions whose next-token log-probability is
scored. ``lm`` rows are held-out probe text (every text token scored); ``mc`` rows hold an item's
context once, then each choice, encoded as lm-evaluation-harness encodes a pair (:func:`encode_pair`),
with a block mask (a choice sees the context and itself) and position ids that restart after the
context, so each choice is scored exactly as in its own sequence; ``copy`` rows are a random token
sequence r followed by r again, scoring r[1:] in the second copy. :func:`batch_rows` groups rows of
similar length into right-padded :class:`Batch` es of about ``batch_tokens`` tokens.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal, get_args

import pandas as pd
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from ...core.errors import InputError
from ...core.loading import model_info
from ...core.probes import probe_tokens
from ...core.validate import check_choice

Split = Literal["all", "search", "held_out"]
SPLITS: tuple[str, ...] = get_args(Split)
OLD_SPLITS = {"calibration": "search", "heldout": "held_out"}  # the names before the vocabulary change


def check_split(split: str) -> str:
    """``split`` checked against :data:`SPLITS`; a former name (``"calibration"``, ``"heldout"``) is read as the new
    one (``"search"``, ``"held_out"``) with a DeprecationWarning.

    Args:
        split: ``"all"``, ``"search"`` or ``"held_out"``.
    """
    if split in OLD_SPLITS:
        warnings.warn(f'split="{split}" is deprecated: use split="{OLD_SPLITS[split]}" (the same items).',
                      DeprecationWarning, stacklevel=3)
        split = OLD_SPLITS[split]
    check_choice("split", split, SPLITS)
    return split


@dataclass
class Row:
    """One sequence: tokens, position ids, segment of each token (-1 = shared prefix), and targets."""

    part: str
    tokens: list[int]
    positions: list[int]
    segments: list[int]
    targets: list[tuple[int, int, int]] = field(default_factory=list)  # (predicting column, target id, unit)


@dataclass
class Batch:
    """Rows of one forward: tokens, position ids, allowed attention, and the scored targets."""

    tokens: Int[Tensor, "batch pos"]
    positions: Int[Tensor, "batch pos"]
    allowed: Bool[Tensor, "batch query key"]
    rows: Int[Tensor, " n"]  # target i is predicted at (rows[i], cols[i])
    cols: Int[Tensor, " n"]
    targets: Int[Tensor, " n"]
    units: Int[Tensor, " n"]  # the scoring unit (LM prompt, copy sequence, MC choice) target i adds to

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.numel())


def split_indices(n_total: int, split: Split, limit: int | None) -> list[int]:
    """Item positions of a split: all, even (search) or odd (held_out), then the first ``limit``.

    Args:
        n_total: number of items of the task.
        split: ``"all"``, ``"search"`` (even positions: the split decisions are made on) or ``"held_out"`` (odd
            positions: the split that confirms them).
        limit: keep at most this many, or None for all.
    """
    if split == "all":
        picked = list(range(n_total))
    else:
        picked = list(range(0 if split == "search" else 1, n_total, 2))
    return picked if limit is None else picked[:limit]


def lm_rows(model, units: list[dict], picked: list[int], seq_len: int, prepend_bos: bool,
            first_target: int = 0) -> list[Row]:
    """Language-modelling rows: the held-out probe prompts ``picked``, every text token a target.

    Args:
        model: the bridge (its tokenizer reads the probe text).
        units: the plan's unit list; one unit per prompt is appended.
        picked: indices of the held-out prompts to use.
        seq_len: tokens per prompt (BOS included when prepended).
        prepend_bos: start each prompt with BOS.
        first_target: the first predicting position scored (0: every text token is a target; e.g. ``sink + window``
            for a loss on the positions beyond a restricted head's window).
    """
    if not picked:
        return []
    batch = probe_tokens(model, max(picked) + 1, seq_len, prepend_bos=prepend_bos, split="held_out")
    rows = []
    for i in picked:
        tokens = batch.tokens[i][batch.attention_mask[i].bool()].tolist()
        unit = len(units)
        units.append({"part": "lm", "task": "held_out_text", "item": f"lm-{i:04d}"})
        # every text token is a target; with BOS the first text token is predicted from BOS
        targets = [(col, tokens[col + 1], unit) for col in range(first_target, len(tokens) - 1)]
        rows.append(Row("lm", tokens, list(range(len(tokens))), [-1] * len(tokens), targets))
    return rows


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness ``_encode_pair`` for a causal model: (context ids, continuation ids).

    Trailing spaces of the context move to the continuation; the continuation's tokens are the tokens
    of context+continuation after the context's own tokens. No special tokens are added.

    Args:
        tokenizer: a Hugging Face tokenizer.
        context: the item's context.
        continuation: one choice, with its leading space.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids):]


def mc_rows(model, units: list[dict], frame: pd.DataFrame, split: Split, limit: int | None,
            prepend_bos: bool, share_context: bool = True) -> list[Row]:
    """Multiple-choice rows, one per item: the context once, then each choice (a unit per choice); with
    ``share_context=False`` one row per choice (the context, then that choice), the plain sequence a per-sequence
    pattern edit (attention calibration) needs.

    Args:
        model: the bridge (its tokenizer encodes the items).
        units: the plan's unit list; one unit per choice is appended.
        frame: the items (:func:`~sinklens.assess.evaluation.load_items`).
        split: which items of each task (see :func:`split_indices`).
        limit: at most this many items per task, or None.
        prepend_bos: start each row with BOS.
        share_context: pack the choices of an item behind one copy of its context (block mask), or give each
            choice its own row.
    """
    prefix = [model.tokenizer.bos_token_id] if prepend_bos else []
    rows = []
    for task, group in frame.groupby("task", sort=True):
        for pos in split_indices(len(group), split, limit):
            item = group.iloc[pos]
            context_ids = None
            tokens, positions, segments, targets = [], [], [], []
            for j, choice in enumerate(item["choices"]):
                ctx, cont = encode_pair(model.tokenizer, item["context"], choice)
                ctx = prefix + ctx
                if not ctx:
                    raise InputError(f"Item {item['id']}: the context encodes to no tokens and prepend_bos=False; "
                                     "use prepend_bos=True or a non-empty context.")
                if not cont:
                    raise InputError(f"Item {item['id']}: choice {choice!r} encodes to no tokens; fix the item.")
                if context_ids is None:
                    context_ids = ctx
                    tokens, positions, segments = list(ctx), list(range(len(ctx))), [-1] * len(ctx)
                elif ctx != context_ids:  # cannot happen: the context is encoded alone each time
                    raise AssertionError("context encoding changed between choices")
                unit = len(units)
                units.append({"part": "mc", "task": task, "item": item["id"], "choice": j,
                              "choice_chars": len(choice), "gold": int(item["gold"]),
                              "n_choices": len(item["choices"])})
                # the first continuation token is predicted from the context's last token
                start = len(tokens)
                predicting = [len(ctx) - 1] + [start + t for t in range(len(cont) - 1)]
                targets += [(col, tok, unit) for col, tok in zip(predicting, cont)]
                tokens += cont
                positions += list(range(len(ctx), len(ctx) + len(cont)))
                segments += [j] * len(cont)
                if not share_context:  # this choice's own sequence: the context, then the choice
                    rows.append(Row("mc", tokens, positions, [-1] * len(tokens), targets))
                    context_ids = None
                    tokens, positions, segments, targets = [], [], [], []
            if share_context:
                rows.append(Row("mc", tokens, positions, segments, targets))
    return rows


def copy_vocabulary(model) -> Int[Tensor, " n"]:
    """Token ids the copying task draws from: the whole vocabulary except special tokens.

    Args:
        model: the bridge.
    """
    info = model_info(model)
    special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    ids = torch.tensor([i for i in range(min(info.d_vocab, len(model.tokenizer))) if i not in special],
                       dtype=torch.long, device="cpu")
    if ids.numel() < 2:
        raise InputError("The tokenizer has fewer than 2 ordinary tokens: the copying task cannot run.")
    return ids


def copy_rows(model, units: list[dict], picked: list[int], length: int, prepend_bos: bool, seed: int) -> list[Row]:
    """In-context copying rows: r then r again (r: ``length`` random ordinary tokens), scoring r[1:] in the copy.

    Args:
        model: the bridge.
        units: the plan's unit list; one unit per sequence is appended.
        picked: indices of the sequences (the same index draws the same r whatever the split).
        length: tokens of r.
        prepend_bos: start each row with BOS.
        seed: seed of the draw.
    """
    if not picked:
        return []
    vocab = copy_vocabulary(model)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    draws = vocab[torch.randint(0, vocab.numel(), (max(picked) + 1, length), generator=generator, device="cpu")]
    prefix = [model.tokenizer.bos_token_id] if prepend_bos else []
    rows = []
    for i in picked:
        seq = draws[i].tolist()
        tokens = prefix + seq + seq
        unit = len(units)
        units.append({"part": "copy", "task": "copy", "item": f"copy-{i:04d}"})
        second = len(prefix) + length  # column of the second copy's first token
        targets = [(second + t - 1, seq[t], unit) for t in range(1, length)]
        rows.append(Row("copy", tokens, list(range(len(tokens))), [-1] * len(tokens), targets))
    return rows


def batch_rows(rows: list[Row], batch_tokens: int, device: torch.device | str) -> list[Batch]:
    """Group rows of similar length (longest first) into right-padded batches of ~``batch_tokens`` tokens.

    Args:
        rows: the requests.
        batch_tokens: tokens per batch (rows x padded width); a longer row gets a batch of its own.
        device: where the batches' tensors live (the model's device).
    """
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * len(rows[current[0]].tokens) > batch_tokens:
            batches.append(_make_batch([rows[j] for j in current], device))
            current = []
        current.append(i)
    if current:
        batches.append(_make_batch([rows[j] for j in current], device))
    return batches


def _make_batch(rows: list[Row], device) -> Batch:
    width = max(len(r.tokens) for r in rows)
    n = len(rows)
    cpu = torch.device("cpu")  # built on the CPU, moved once
    tokens = torch.zeros((n, width), dtype=torch.long, device=cpu)
    positions = torch.zeros((n, width), dtype=torch.long, device=cpu)
    segments = torch.full((n, width), -2, dtype=torch.long, device=cpu)  # -2: padding
    for b, row in enumerate(rows):
        length = len(row.tokens)
        tokens[b, :length] = torch.tensor(row.tokens, dtype=torch.long, device=cpu)
        positions[b, :length] = torch.tensor(row.positions, dtype=torch.long, device=cpu)
        positions[b, length:] = torch.arange(length, width, device=cpu)  # padded positions: never attended to
        segments[b, :length] = torch.tensor(row.segments, dtype=torch.long, device=cpu)
    causal = torch.ones(width, width, dtype=torch.bool, device=cpu).tril()
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    allowed = causal & (seg_k != -2) & ((seg_k == -1) | (seg_k == seg_q))
    # padded query rows attend to the first token only (never scored; keeps softmax finite)
    allowed |= (seg_q == -2) & (torch.arange(width, device=cpu) == 0)[None, None, :]
    rows_i, cols, targets, units = [], [], [], []
    for b, row in enumerate(rows):
        for col, target, unit in row.targets:
            rows_i.append(b)
            cols.append(col)
            targets.append(target)
            units.append(unit)

    def as_long(values: list[int], where) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=where)

    return Batch(tokens.to(device), positions.to(device), allowed.to(device), as_long(rows_i, device),
                 as_long(cols, device), as_long(targets, device), as_long(units, cpu))
