"""Accuracy of a (pruned) model on an offline suite, and retention against the dense model.

Three parts, each scored from next-token log-probabilities in float32:

- ``lm``: language modelling on the probe text's ``"heldout"`` split (never the probe prompts):
  perplexity ``exp(sum NLL / n_tokens)`` and next-token top-1 accuracy over every text token.
- ``mc``: zero-shot multiple choice on the bundled items (``sinklens/data``, see its README), scored
  as lm-evaluation-harness scores ``output_type: multiple_choice``: the context and each choice are
  encoded like ``LM._encode_pair`` (trailing context spaces move to the continuation; continuation
  tokens = tokens of context+choice after the context's tokens), ``acc`` = argmax of the summed
  continuation log-likelihood, ``acc_norm`` = argmax of that sum divided by the choice string's
  length in characters (the harness's ``completion_len``: ``len(choice)``, here with its leading
  space; the bundled items are ASCII, so this is also their length in UTF-8 bytes). Per task type,
  and ``mc/acc``, ``mc/acc_norm`` = mean over task types.
- ``copy``: in-context copying: a random token sequence r of length m, then r again; accuracy of
  next-token prediction of r[1:] in the second copy (r[0] of the copy is not predictable).

``acc/mean`` is the mean of the parts' accuracies (lm/acc, mc/acc, copy/acc) the suite has.

With ``prepend_bos=True`` (default) every sequence starts with BOS, the setting the sink study uses.
The choices of an item share one row: the context once, then each choice, with a block attention
mask (a choice sees the context and itself) and position ids that restart after the context, so
every choice is scored exactly as in its own sequence, at about half the tokens.

Retention = metric(pruned) / metric(dense) on the same items; for perplexity (lower is better) the
direction-consistent form dense_ppl / pruned_ppl is used, so 1 means unchanged and < 1 worse for
every metric. Confidence intervals: paired percentile bootstrap over items (per task group).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .errors import InputError, UnsupportedArchitectureError
from .loading import input_device, model_info
from .probes import probe_tokens
from .progress import progress
from .validate import check_choice, check_fraction

PARTS = ("lm", "mc", "copy")
SUITES: dict[str, tuple[str, ...]] = {"default": PARTS, "lm": ("lm",), "mc": ("mc",), "copy": ("copy",)}
SPLITS = ("all", "calibration", "heldout")
ITEMS_FILE = "zero_shot_items.jsonl"
MEAN_ACC = "acc/mean"  # mean of the parts' accuracies (lm/acc, mc/acc, copy/acc) present in the suite
ITEM_COLUMNS = ["part", "task", "item", "nll", "n_tokens", "n_correct", "acc", "acc_norm", "mc_nll", "n_choices"]


# --- items ---------------------------------------------------------------------------------------

def bundled_items_path() -> Path:
    """Path of the bundled multiple-choice item file."""
    return Path(str(resources.files("sinklens") / "data" / ITEMS_FILE))


def load_items(path: str | Path | None = None) -> pd.DataFrame:
    """Read and validate a JSONL item file (default: the bundled one).

    One JSON object per line: ``id`` (unique str), ``task`` (str), ``context`` (non-empty str),
    ``choices`` (list of >= 2 distinct non-empty str, each with its leading space), ``gold``
    (index into choices); optional ``family`` (str). Errors name the file and line.
    """
    path = bundled_items_path() if path is None else Path(path)
    if not path.is_file():
        raise InputError(f"Item file {path} does not exist: pass the path of a JSONL item file (schema in "
                         "sinklens/data/README.md) or None for the bundled items.")
    rows, seen = [], {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{where}: not valid JSON ({err.msg}). Fix: one JSON object per line.") from err
            rows.append(_check_item(item, where, seen, number))
    if not rows:
        raise InputError(f"{path} holds no items: add at least one JSON object per line.")
    frame = pd.DataFrame(rows)
    if "family" not in frame:
        frame["family"] = ""
    frame["family"] = frame["family"].fillna("")
    return frame[["id", "task", "family", "context", "choices", "gold"]]


def _check_item(item, where: str, seen: dict, number: int) -> dict:
    fix = "Fix the item (schema: id, task, context, choices, gold; see sinklens/data/README.md)."
    if not isinstance(item, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(item).__name__}. {fix}")
    missing = [key for key in ("id", "task", "context", "choices", "gold") if key not in item]
    if missing:
        raise InputError(f"{where}: missing field(s) {missing}. {fix}")
    for key in ("id", "task", "context"):
        if not isinstance(item[key], str) or not item[key].strip():
            raise InputError(f"{where}: {key} must be a non-empty string, got {item[key]!r}. {fix}")
    if item["id"] in seen:
        raise InputError(f"{where}: id {item['id']!r} already used on line {seen[item['id']]}. "
                         "Give every item a unique id.")
    seen[item["id"]] = number
    choices = item["choices"]
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise InputError(f"{where}: choices must be a list of at least 2 non-empty strings, got {choices!r}. {fix}")
    if len(set(choices)) != len(choices):
        raise InputError(f"{where}: choices {choices!r} hold duplicates. {fix}")
    gold = item["gold"]
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise InputError(f"{where}: gold must be an int index into choices (0..{len(choices) - 1}), "
                         f"got {gold!r}. {fix}")
    if "family" in item and not isinstance(item["family"], str):
        raise InputError(f"{where}: family must be a string, got {item['family']!r}. {fix}")
    return {key: item[key] for key in ("id", "task", "family", "context", "choices", "gold") if key in item}


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# --- the evaluation plan -------------------------------------------------------------------------

@dataclass
class _Batch:
    """Rows of one forward: tokens, position ids, allowed attention, and the scored targets."""

    tokens: Int[Tensor, "batch pos"]
    positions: Int[Tensor, "batch pos"]
    allowed: Tensor  # [batch, query, key] bool
    rows: Int[Tensor, " n"]  # target i is predicted at (rows[i], cols[i])
    cols: Int[Tensor, " n"]
    targets: Int[Tensor, " n"]
    units: Int[Tensor, " n"]  # the scoring unit (LM prompt, copy sequence, MC choice) target i adds to

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.numel())


@dataclass
class EvalPlan:
    """Tokenized requests of a suite, ready to run on any edit of the same model.

    ``units`` has one row per scoring unit: part, task, item id and (for MC) the choice, its
    length in characters, the gold index and the number of choices.
    """

    batches: list[_Batch]
    units: pd.DataFrame
    meta: dict

    @property
    def n_tokens(self) -> int:
        return sum(b.n_tokens for b in self.batches)

    def run(self, model, start_layer: int = 0, resid: Sequence[Tensor] | None = None,
            capture: Sequence[int] = (), show_progress: bool = False) -> EvalResult:
        """Score the plan on ``model`` as it is now (edits included).

        With ``resid`` (one tensor per batch: the residual stream entering ``start_layer``, as
        captured by an earlier run of a model that is identical below that layer), layers below
        ``start_layer`` are skipped. ``capture`` lists layers whose entering residual is stored in
        ``result.resid[layer]`` (one tensor per batch) for later runs.
        """
        info = model_info(model)
        if resid is None and start_layer != 0:
            raise InputError(f"start_layer={start_layer} needs resid= (the residual entering that layer).")
        if resid is not None and len(resid) != len(self.batches):
            raise InputError(f"resid holds {len(resid)} tensors but the plan has {len(self.batches)} batches.")
        if not 0 <= start_layer < info.n_layers:
            raise InputError(f"start_layer={start_layer} is out of range: the model has {info.n_layers} layers.")
        n_units = len(self.units)
        ll = torch.zeros(n_units, dtype=torch.float64, device="cpu")
        correct = torch.zeros(n_units, dtype=torch.float64, device="cpu")
        count = torch.zeros(n_units, dtype=torch.float64, device="cpu")
        captured: dict[int, list[Tensor]] = {layer: [] for layer in capture}
        for i, batch in enumerate(progress(self.batches, desc="evaluate", enabled=show_progress)):
            start = None if resid is None else resid[i]
            logp, top, store = forward_scores(model, batch, start_layer, start, capture)
            for layer, tensor in store.items():
                captured[layer].append(tensor)
            units = batch.units.cpu()
            ll.index_add_(0, units, logp.double().cpu())
            correct.index_add_(0, units, top.double().cpu())
            count.index_add_(0, units, torch.ones_like(units, dtype=torch.float64))
        items = _items_table(self.units, ll.numpy(), correct.numpy(), count.numpy())
        layers_run = info.n_layers - start_layer
        return EvalResult(items=items, meta=dict(self.meta), resid=captured,
                          cost={"tokens": self.n_tokens, "layers_run": layers_run, "n_layers": info.n_layers,
                                "forward_equivalents": layers_run / info.n_layers})


def _check_limit(limit) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InputError(f"limit must be a positive int (items per task) or None for all, got {limit!r}.")
    return limit


def _check_positive(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value


def _split_indices(n_total: int, split: str, limit: int | None) -> list[int]:
    """Item positions of a split: all, even (calibration) or odd (heldout), then the first ``limit``."""
    if split == "all":
        picked = list(range(n_total))
    else:
        picked = list(range(0 if split == "calibration" else 1, n_total, 2))
    return picked if limit is None else picked[:limit]


def build_plan(model, suite: str = "default", limit: int | None = None, split: str = "all",
               items: str | Path | None = None, n_lm_prompts: int = 16, lm_seq_len: int | None = None,
               n_copy: int = 16, copy_len: int = 24, prepend_bos: bool = True, seed: int = 0,
               batch_tokens: int = 2048) -> EvalPlan:
    """Tokenize a suite into batches (see :func:`evaluate` for the arguments)."""
    parts = check_suite(suite)
    limit = _check_limit(limit)
    check_choice("split", split, SPLITS)
    for name, value, low in (("n_lm_prompts", n_lm_prompts, 1), ("n_copy", n_copy, 1), ("copy_len", copy_len, 2),
                             ("batch_tokens", batch_tokens, 1)):
        _check_positive(name, value, low)
    if not isinstance(prepend_bos, bool):
        raise InputError(f"prepend_bos must be True or False, got {prepend_bos!r}.")
    info = model_info(model)
    if prepend_bos and info.bos_id is None:
        raise InputError(f"{info.name} has no BOS token: call with prepend_bos=False.")
    if lm_seq_len is None:
        lm_seq_len = min(128, info.n_ctx)
    _check_positive("lm_seq_len", lm_seq_len, 3)
    item_frame = load_items(items) if "mc" in parts else None  # validate the file before any heavy work
    rows: list[_Row] = []
    units: list[dict] = []
    meta = {"suite": suite, "parts": list(parts), "limit": limit, "split": split, "prepend_bos": prepend_bos,
            "model": info.name, "seed": seed}
    if "lm" in parts:
        meta.update(n_lm_prompts=n_lm_prompts, lm_seq_len=lm_seq_len)
        _lm_rows(model, rows, units, _split_indices(2 * n_lm_prompts if split != "all" else n_lm_prompts,
                                                     split, limit), lm_seq_len, prepend_bos)
    if "mc" in parts:
        path = bundled_items_path() if items is None else Path(items)
        meta.update(items=str(path) if items is not None else "bundled:" + ITEMS_FILE, items_sha=_file_digest(path))
        _mc_rows(model, rows, units, item_frame, split, limit, prepend_bos)
    if "copy" in parts:
        meta.update(n_copy=n_copy, copy_len=copy_len)
        total = 2 * n_copy if split != "all" else n_copy
        _copy_rows(model, rows, units, _split_indices(total, split, limit), copy_len, prepend_bos, seed)
    for row in rows:
        if len(row.tokens) > info.n_ctx:
            raise InputError(f"A {row.part} request has {len(row.tokens)} tokens, longer than the model's context "
                             f"of {info.n_ctx}: use shorter items or lm_seq_len/copy_len.")
    device = input_device(model)
    return EvalPlan(batches=_batch_rows(rows, batch_tokens, device), units=pd.DataFrame(units), meta=meta)


def check_suite(suite) -> tuple[str, ...]:
    if not isinstance(suite, str) or suite not in SUITES:
        hint = (" ('pruning-paper' is an lm-evaluation-harness suite: use sinklens.evaluate_lm_eval)"
                if suite == "pruning-paper" else "")
        raise InputError(f"Unknown suite {suite!r}: use one of {sorted(SUITES)}{hint}.")
    return SUITES[suite]


@dataclass
class _Row:
    """One sequence: tokens, position ids, segment of each token (-1 = shared prefix), and targets."""

    part: str
    tokens: list[int]
    positions: list[int]
    segments: list[int]
    targets: list[tuple[int, int, int]] = field(default_factory=list)  # (predicting column, target id, unit)


def _lm_rows(model, rows, units, picked: list[int], seq_len: int, prepend_bos: bool) -> None:
    if not picked:
        return
    batch = probe_tokens(model, n_prompts=max(picked) + 1, seq_len=seq_len, prepend_bos=prepend_bos, split="heldout")
    for i in picked:
        tokens = batch.tokens[i][batch.attention_mask[i].bool()].tolist()
        unit = len(units)
        units.append({"part": "lm", "task": "heldout_text", "item": f"lm-{i:04d}"})
        # every text token is a target; with BOS the first text token is predicted from BOS
        targets = [(col, tokens[col + 1], unit) for col in range(len(tokens) - 1)]
        rows.append(_Row("lm", tokens, list(range(len(tokens))), [-1] * len(tokens), targets))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness ``_encode_pair`` for a causal model: trailing spaces of the context move
    to the continuation; continuation tokens are the tokens of context+continuation after the
    context's own tokens. No special tokens are added."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids):]


def _mc_rows(model, rows, units, frame: pd.DataFrame, split: str, limit: int | None, prepend_bos: bool) -> None:
    prefix = [model.tokenizer.bos_token_id] if prepend_bos else []
    for task, group in frame.groupby("task", sort=True):
        for pos in _split_indices(len(group), split, limit):
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
            rows.append(_Row("mc", tokens, positions, segments, targets))


def copy_vocabulary(model) -> Int[Tensor, " n"]:
    """Token ids the copying task draws from: the whole vocabulary except special tokens."""
    info = model_info(model)
    special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    ids = torch.tensor([i for i in range(min(info.d_vocab, len(model.tokenizer))) if i not in special], device="cpu")
    if ids.numel() < 2:
        raise InputError("The tokenizer has fewer than 2 ordinary tokens: the copying task cannot run.")
    return ids


def _copy_rows(model, rows, units, picked: list[int], length: int, prepend_bos: bool, seed: int) -> None:
    if not picked:
        return
    vocab = copy_vocabulary(model)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    draws = vocab[torch.randint(0, vocab.numel(), (max(picked) + 1, length), generator=generator, device="cpu")]
    prefix = [model.tokenizer.bos_token_id] if prepend_bos else []
    for i in picked:
        seq = draws[i].tolist()
        tokens = prefix + seq + seq
        unit = len(units)
        units.append({"part": "copy", "task": "copy", "item": f"copy-{i:04d}"})
        second = len(prefix) + length  # column of the second copy's first token
        targets = [(second + t - 1, seq[t], unit) for t in range(1, length)]
        rows.append(_Row("copy", tokens, list(range(len(tokens))), [-1] * len(tokens), targets))


def _batch_rows(rows: list[_Row], batch_tokens: int, device) -> list[_Batch]:
    """Group rows of similar length (longest first) into right-padded batches of ~``batch_tokens``."""
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


def _make_batch(rows: list[_Row], device) -> _Batch:
    width = max(len(r.tokens) for r in rows)
    n = len(rows)
    tokens = torch.zeros((n, width), dtype=torch.long, device="cpu")
    positions = torch.zeros((n, width), dtype=torch.long, device="cpu")
    segments = torch.full((n, width), -2, dtype=torch.long, device="cpu")  # -2: padding
    for b, row in enumerate(rows):
        length = len(row.tokens)
        tokens[b, :length] = torch.tensor(row.tokens, device="cpu")
        positions[b, :length] = torch.tensor(row.positions, device="cpu")
        positions[b, length:] = torch.arange(length, width, device="cpu")  # padded positions: never attended to
        segments[b, :length] = torch.tensor(row.segments, device="cpu")
    causal = torch.ones(width, width, dtype=torch.bool, device="cpu").tril()
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    allowed = causal & (seg_k != -2) & ((seg_k == -1) | (seg_k == seg_q))
    # padded query rows attend to the first token only (never scored; keeps softmax finite)
    allowed |= (seg_q == -2) & (torch.arange(width, device="cpu") == 0)[None, None, :]
    rows_i, cols, targets, units = [], [], [], []
    for b, row in enumerate(rows):
        for col, target, unit in row.targets:
            rows_i.append(b)
            cols.append(col)
            targets.append(target)
            units.append(unit)
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device="cpu")  # noqa: E731
    return _Batch(tokens.to(device), positions.to(device), allowed.to(device), as_long(rows_i).to(device),
                  as_long(cols).to(device), as_long(targets).to(device), as_long(units))


# --- the forward ---------------------------------------------------------------------------------

def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Float[Tensor, "batch 1 query key"]:
    """The eager-attention additive mask of a [batch, query, key] bool mask: 0 where allowed, the
    dtype's minimum elsewhere (what transformers' ``create_causal_mask`` returns for eager attention)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def forward_scores(model, batch: _Batch, start_layer: int = 0, resid: Float[Tensor, "batch pos d_model"] | None = None,
                   capture: Sequence[int] = ()) -> tuple[Float[Tensor, " n"], Bool[Tensor, " n"], dict[int, Tensor]]:
    """Log-probability of each target (float32) and whether it is the top-1 prediction.

    Runs the bridge's own blocks (the HF decoder layers, hooks and edits included) from
    ``start_layer`` on ``resid`` (or from the embeddings), then the final norm and unembedding on
    the scored positions only.
    """
    hf = getattr(model, "original_model", None)
    inner = getattr(hf, "model", None)
    if not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        raise UnsupportedArchitectureError("Evaluation runs the decoder layers of a Llama-family model (model.layers, "
                                           "norm, rotary_emb): load the model with sinklens.load_model.")
    n_layers = len(inner.layers)
    with torch.inference_mode():
        hidden = inner.embed_tokens(batch.tokens) if resid is None else resid
        mask = additive_mask(batch.allowed, hidden.dtype)
        rotary = inner.rotary_emb(hidden, position_ids=batch.positions)
        store = {}
        for layer in range(start_layer, n_layers):
            if layer in capture:
                store[layer] = hidden
            hidden = inner.layers[layer](hidden, attention_mask=mask, position_embeddings=rotary,
                                         position_ids=batch.positions)
        picked = hidden[batch.rows.to(hidden.device), batch.cols.to(hidden.device)].unsqueeze(0)
        logits = hf.lm_head(inner.norm(picked))[0].float()
        logp = logits.log_softmax(-1)
        targets = batch.targets.to(logits.device)  # the last layer's device under a device_map
        target_logp = logp.gather(1, targets[:, None])[:, 0]
        top = logits.argmax(-1) == targets
    return target_logp, top, store


# --- results -------------------------------------------------------------------------------------

def _items_table(units: pd.DataFrame, ll: np.ndarray, correct: np.ndarray, count: np.ndarray) -> pd.DataFrame:
    """One row per item: summed NLL, scored tokens, top-1 hits; for MC items acc/acc_norm/mc_nll."""
    frames = []
    plain = units["part"] != "mc"
    if plain.any():
        sub = units[plain]
        idx = sub.index.to_numpy()
        frames.append(pd.DataFrame({
            "part": sub["part"].to_numpy(), "task": sub["task"].to_numpy(), "item": sub["item"].to_numpy(),
            "nll": -ll[idx], "n_tokens": count[idx], "n_correct": correct[idx], "acc": correct[idx] / count[idx],
            "acc_norm": np.nan, "mc_nll": np.nan, "n_choices": 0}))
    mc = units[~plain]
    if len(mc):
        idx = mc.index.to_numpy()
        item_ids = mc["item"].to_numpy()
        starts = np.flatnonzero(np.r_[True, item_ids[1:] != item_ids[:-1]])  # choices of an item are contiguous
        ends = np.r_[starts[1:], len(idx)]
        lls_all, chars_all = ll[idx], mc["choice_chars"].to_numpy().astype(float)
        gold_all, tasks = mc["gold"].to_numpy().astype(int), mc["task"].to_numpy()
        acc, acc_norm, mc_nll, gold_ll, gold_n, n_choices = [], [], [], [], [], []
        for a, b in zip(starts, ends):
            lls, gold = lls_all[a:b], gold_all[a]
            acc.append(float(np.argmax(lls) == gold))
            acc_norm.append(float(np.argmax(lls / chars_all[a:b]) == gold))
            shifted = lls - lls.max()
            mc_nll.append(float(np.log(np.exp(shifted).sum()) - shifted[gold]))
            gold_ll.append(lls[gold])
            gold_n.append(count[idx[a + gold]])
            n_choices.append(b - a)
        frames.append(pd.DataFrame({
            "part": "mc", "task": tasks[starts], "item": item_ids[starts], "nll": -np.asarray(gold_ll),
            "n_tokens": gold_n, "n_correct": acc, "acc": acc, "acc_norm": acc_norm, "mc_nll": mc_nll,
            "n_choices": n_choices}))
    table = pd.concat(frames, ignore_index=True)
    table["n_choices"] = table["n_choices"].astype(int)
    return table[ITEM_COLUMNS]


@dataclass
class EvalResult:
    """Metrics of one evaluation and the per-item table they are computed from.

    ``metrics`` maps names to values: ``lm/ppl``, ``lm/acc``, ``mc/<task>/acc``, ``mc/<task>/acc_norm``,
    ``mc/acc``, ``mc/acc_norm`` (mean over task types), ``copy/acc``, and ``acc/mean`` (the mean of
    the accuracies lm/acc, mc/acc, copy/acc that the suite has). ``items`` has one row per item
    (columns ``part, task, item, nll, n_tokens, n_correct, acc, acc_norm, mc_nll, n_choices``);
    :func:`retention` bootstraps over its rows.
    """

    items: pd.DataFrame
    meta: dict
    resid: dict = field(default_factory=dict, repr=False)
    cost: dict = field(default_factory=dict)

    @cached_property
    def metrics(self) -> dict[str, float]:
        return compute_metrics(self.items)

    @property
    def chance(self) -> dict[str, float]:
        """Chance level of each MC task type (mean of 1 / number of choices) and of ``mc/acc``."""
        mc = self.items[self.items["part"] == "mc"]
        per_task = {f"mc/{task}/acc": float((1.0 / g["n_choices"]).mean()) for task, g in mc.groupby("task")}
        if per_task:
            per_task["mc/acc"] = float(np.mean(list(per_task.values())))
        return per_task

    def __getitem__(self, name: str) -> float:
        return self.metrics[name]

    def summary(self) -> pd.DataFrame:
        """One row per metric with its chance level where defined."""
        chance = self.chance
        return pd.DataFrame([{"metric": k, "value": v, "chance": chance.get(k, chance.get(k.replace("_norm", "")))}
                             for k, v in self.metrics.items()])


def _groups(items: pd.DataFrame) -> list[tuple[str, str, np.ndarray]]:
    """(part, task, row positions) of every task group, sorted by part and task."""
    parts, tasks = items["part"].to_numpy().astype(str), items["task"].to_numpy().astype(str)
    pairs = sorted(set(zip(parts, tasks)))
    return [(part, task, np.flatnonzero((parts == part) & (tasks == task))) for part, task in pairs]


def _metric_arrays(items: pd.DataFrame, weights: dict[tuple[str, str], np.ndarray]) -> dict[str, np.ndarray]:
    """Every metric for each weighting of the items (weights[(part, task)]: [n_draws, n_items])."""
    cols = {c: items[c].to_numpy(dtype=float) for c in ("nll", "n_tokens", "n_correct", "acc", "acc_norm")}
    out: dict[str, np.ndarray] = {}
    mc_acc, mc_norm = [], []
    for part, task, idx in _groups(items):
        w = weights[(part, task)]
        col = {c: v[idx] for c, v in cols.items()}
        if part == "lm":
            n = w @ col["n_tokens"]
            out["lm/ppl"] = np.exp((w @ col["nll"]) / n)
            out["lm/acc"] = (w @ col["n_correct"]) / n
        elif part == "copy":
            out["copy/acc"] = (w @ col["n_correct"]) / (w @ col["n_tokens"])
        else:
            total = w.sum(1)
            acc, norm = (w @ col["acc"]) / total, (w @ col["acc_norm"]) / total
            out[f"mc/{task}/acc"], out[f"mc/{task}/acc_norm"] = acc, norm
            mc_acc.append(acc)
            mc_norm.append(norm)
    if mc_acc:
        out["mc/acc"] = np.mean(mc_acc, axis=0)
        out["mc/acc_norm"] = np.mean(mc_norm, axis=0)
    parts = [out[name] for name in ("lm/acc", "mc/acc", "copy/acc") if name in out]
    if parts:
        out[MEAN_ACC] = np.mean(parts, axis=0)
    return out


def compute_metrics(items: pd.DataFrame) -> dict[str, float]:
    """The metrics of a per-item table (see :class:`EvalResult`)."""
    weights = {(part, task): np.ones((1, len(idx))) for part, task, idx in _groups(items)}
    return {name: float(values[0]) for name, values in _metric_arrays(items, weights).items()}


def lower_is_better(metric: str) -> bool:
    """Perplexity-like metrics, whose retention is dense / pruned."""
    return metric.endswith("ppl")


def _ratio(dense: np.ndarray, pruned: np.ndarray, metric: str) -> np.ndarray:
    """pruned / dense (dense / pruned for perplexity); exactly 1 where the two are equal (0 / 0
    included), NaN where the denominator is 0 and the numerator is not."""
    num, den = (dense, pruned) if lower_is_better(metric) else (pruned, dense)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return np.where(num == den, 1.0, ratio)


def retention(dense: EvalResult, pruned: EvalResult, n_boot: int = 1000, ci: float = 0.95,
              seed: int = 0) -> pd.DataFrame:
    """Retention of every metric, pruned against dense on the same items, with a paired bootstrap CI.

    retention = pruned / dense (dense / pruned for perplexity): 1 = unchanged, < 1 = worse.
    The CI resamples items with replacement within each task group (the same draw for both
    results) and takes percentiles of the recomputed ratio. Equal metrics give exactly 1 (0 / 0
    included); NaN where the dense metric is 0 and the pruned one is not.
    """
    _check_same_items(dense, pruned)
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise InputError(f"n_boot must be a positive int, got {n_boot!r}.")
    check_fraction("ci", ci, open_low=True)
    rng = np.random.default_rng(seed)
    weights = {}
    for part, task, idx in _groups(dense.items):
        draws = rng.integers(0, len(idx), size=(n_boot, len(idx)))
        counts = np.zeros((n_boot, len(idx)))
        np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
        weights[(part, task)] = counts
    point_d, point_p = dict(dense.metrics), dict(pruned.metrics)
    boot_d = _metric_arrays(dense.items, weights)
    boot_p = _metric_arrays(pruned.items, weights)
    tail = (1 - ci) / 2 * 100
    rows = []
    for name in point_d:
        ratio = float(_ratio(np.array([point_d[name]]), np.array([point_p[name]]), name)[0])
        draws = _ratio(boot_d[name], boot_p[name], name)
        low, high = (np.nanpercentile(draws, [tail, 100 - tail]) if np.isfinite(draws).any() else (np.nan, np.nan))
        rows.append({"metric": name, "dense": point_d[name], "pruned": point_p[name], "retention": ratio,
                     "ci_low": float(low), "ci_high": float(high)})
    return pd.DataFrame(rows)


def _check_same_items(dense: EvalResult, pruned: EvalResult) -> None:
    for name, value in (("dense", dense), ("pruned", pruned)):
        if not isinstance(value, EvalResult):
            raise InputError(f"{name} must be an EvalResult from sinklens.evaluate, got {type(value).__name__}.")
    keys = ["part", "task", "item"]
    if not dense.items[keys].equals(pruned.items[keys]):
        raise InputError("The two results were computed on different items (suite, limit, split or item file differ): "
                         "evaluate both with the same arguments.")


def retention_value(dense: EvalResult, pruned: EvalResult, metric: str = MEAN_ACC) -> float:
    """Point retention of one metric (no bootstrap)."""
    _check_same_items(dense, pruned)
    d, p = dense.metrics, pruned.metrics
    if metric not in d:
        raise InputError(f"Unknown metric {metric!r}: this evaluation has {sorted(d)}.")
    return float(_ratio(np.array([d[metric]]), np.array([p[metric]]), metric)[0])


# --- entry point ---------------------------------------------------------------------------------

def evaluate(model, suite: str = "default", limit: int | None = None, *, split: str = "all",
             items: str | Path | None = None, n_lm_prompts: int = 16, lm_seq_len: int | None = None,
             n_copy: int = 16, copy_len: int = 24, prepend_bos: bool = True, seed: int = 0,
             batch_tokens: int = 2048, show_progress: bool = True) -> EvalResult:
    """Evaluate ``model`` as it is now (pruning edits included) on an offline suite.

    ``suite``: ``"default"`` (lm + mc + copy) or one part (``"lm"``, ``"mc"``, ``"copy"``).
    ``limit``: at most this many items per task (LM prompts, MC items per task type, copy
    sequences); None = all. ``split``: ``"all"``, or the even (``"calibration"``) / odd
    (``"heldout"``) items of each task, for selecting on one and confirming on the other.
    ``items``: a JSONL item file (default: the bundled items). LM prompts have ``lm_seq_len``
    tokens (default min(128, context)); copy rows repeat ``copy_len`` random tokens.
    Returns an :class:`EvalResult` (``.metrics``, per-item ``.items``).
    """
    plan = build_plan(model, suite, limit, split, items, n_lm_prompts, lm_seq_len, n_copy, copy_len, prepend_bos,
                      seed, batch_tokens)
    return plan.run(model, show_progress=show_progress)


def plan_fingerprint(plan: EvalPlan) -> str:
    """A short hash of what a plan evaluates (suite, split, limit, item file, settings)."""
    payload = json.dumps({k: v for k, v in plan.meta.items() if k not in ("model", "items")}, sort_keys=True,
                         default=str)  # the item file by content (items_sha), not by path
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


__all__ = ["EvalPlan", "EvalResult", "MEAN_ACC", "SUITES", "build_plan", "bundled_items_path", "compute_metrics",
           "encode_pair", "evaluate", "load_items", "lower_is_better", "retention", "retention_value"]
