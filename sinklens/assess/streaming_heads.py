"""Which KV heads can live on sinks + a window (DuoAttention's "streaming heads"), measured rather than trained: a
per-head streaming score and a KV-cache budget at a stated loss.

- :func:`streaming_head_scores`: restrict one KV head (all query heads of its group; one head on MHA) to sink +
  window attention and measure the increase of next-token loss (nats) over the dense model on long probe texts,
  scored only on the positions beyond the window (the positions where the restriction drops keys). Each score is a
  configuration ``("window", heads, split)`` of the shared :class:`~sinklens.assess.sweep.Sweep` with
  :class:`~sinklens.prune.attention_window.WindowOptions`: the layers below the edited one are read from the
  sweep's dense residual cache, not recomputed, and every score is stored in the results file as it finishes (a
  rerun resumes).
- :func:`kv_budget`: restrict KV heads in order of their score (cheapest first) until the loss increase on the
  ``search`` texts reaches each tolerance, confirm the chosen set on the ``held_out`` texts, and report the KV cache
  saved at a context length (bytes from the config and dtype) for the model and for Llama-2-7B's shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..core.errors import InputError
from ..core.loading import model_info
from ..core.validate import check_frame, check_int, check_type
from ..prune.attention_window import WindowOptions, group_heads
from .evaluation.plan import build_plan
from .sweep import Sweep

LLAMA2_7B = {"name": "Llama-2-7B", "n_layers": 32, "n_kv_heads": 32, "d_head": 128, "bytes": 2}  # fp16 cache
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def streaming_sweep(model, *, sink: int = 4, window: int = 64, seq_len: int = 1024, n_texts: int = 2,
                    results: str | Path | None = None, show_progress: bool = False) -> Sweep:
    """The sweep scoring sink + window restrictions on long probe texts: splits ``search`` and ``held_out`` (each
    ``n_texts`` texts of ``seq_len`` tokens, BOS first), LM loss on positions >= sink + window only.

    Args:
        model: a bridge from :func:`sinklens.load_model`, without active edits.
        sink, window: the restriction (:class:`~sinklens.prune.attention_window.WindowOptions`).
        seq_len: tokens per text (BOS included), at most the model's context.
        n_texts: texts per split.
        results: the SQLite results file (None: in memory).
        show_progress: progress bars.
    """
    options = WindowOptions(sink=sink, window=window)
    info = model_info(model)
    seq_len = check_int("seq_len", seq_len, minimum=3)
    if seq_len > info.n_ctx:
        raise InputError(f"seq_len={seq_len} is past the model's {info.n_ctx}-token context.")
    plans = {split: build_plan(model, "lm", split=split, n_lm_prompts=n_texts, lm_seq_len=seq_len,
                               lm_first_target=sink + window, batch_tokens=seq_len)
             for split in ("search", "held_out")}
    return Sweep(model, plans, head_edits=[options], results=results, show_progress=show_progress)


def _loss(record) -> float:
    return math.log(record.metrics["lm/ppl"])


def kv_groups(model) -> list[tuple[int, int]]:
    """Every ``(layer, kv head)`` of the model."""
    info = model_info(model)
    return [(l, g) for l in range(info.n_layers) for g in range(info.n_kv_heads)]


def streaming_head_scores(sweep: Sweep, split: str = "search", *, executor=None) -> pd.DataFrame:
    """Loss increase (nats, restricted minus dense) of each KV head restricted alone.

    The KV heads are one batch of independent configurations (``sweep.run``): each is stored as it finishes, a rerun
    resumes, and an executor may evaluate them elsewhere.

    Args:
        sweep: from :func:`streaming_sweep`.
        split: the texts scored.
        executor: where the configurations run: None or ``"local"`` (here), ``"ray"`` or an executor object
            (:mod:`sinklens.assess.executor`).
    Returns:
        One row per ``(layer, kv_head)``: ``score`` (nats), ``loss`` and ``dense_loss``.
    """
    model = sweep.model
    dense = _loss(sweep.dense(split))
    groups = kv_groups(model)
    records = sweep.run([("window", group_heads(model, [group]), split) for group in groups],
                        desc="streaming scores", executor=executor)
    rows = []
    for (layer, kv), record in zip(groups, records):
        loss = _loss(record)
        rows.append({"layer": layer, "kv_head": kv, "score": loss - dense, "loss": loss, "dense_loss": dense})
    return pd.DataFrame(rows)


def kv_cache_bytes(n_layers: int, n_kv_heads: int, d_head: int, dtype_bytes: int, tokens: int) -> int:
    """Bytes of a KV cache (keys and values) of ``tokens`` tokens."""
    return 2 * n_layers * n_kv_heads * d_head * dtype_bytes * tokens


def kv_budget(sweep: Sweep, scores: pd.DataFrame, tolerances: Sequence[float] = (0.02, 0.05, 0.1), *,
              context: int = 8192, steps: int = 12, executor=None) -> pd.DataFrame:
    """The largest set of cheapest KV heads whose joint restriction stays within each tolerance, confirmed held out.

    KV heads are taken in order of ``score``; prefixes of that order on a grid of ``steps`` sizes are evaluated on the
    ``search`` split, the largest prefix within a tolerance is chosen, then evaluated on ``held_out``.

    Args:
        sweep: from :func:`streaming_sweep`.
        scores: from :func:`streaming_head_scores`.
        tolerances: loss increases (nats).
        context: tokens of the cache whose saving is reported.
        steps: prefix sizes tried.
        executor: where the configurations run (as in :func:`streaming_head_scores`): the search grid is one batch,
            the held-out confirmations another.
    Returns:
        One row per tolerance: KV heads restricted, search and held-out loss increases, bytes saved at ``context``
        for the model and for Llama-2-7B's shape (the same share of its KV heads), and the shares.
    """
    check_type(sweep, Sweep, "sweep")
    if "window" not in sweep.head_edits:
        raise InputError("sweep has no sink + window restriction: pass the sweep of sinklens.streaming_sweep(...).")
    check_frame(scores, ["layer", "kv_head", "score"], "scores", "sinklens.streaming_head_scores(sweep)")
    if isinstance(tolerances, (int, float)):
        tolerances = [tolerances]
    tolerances = list(tolerances)
    if not tolerances or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < math.inf
                             for t in tolerances):
        raise InputError(f"tolerances must be loss increases >= 0 (nats), e.g. [0.02, 0.05, 0.1]; got {tolerances!r}.")
    context = check_int("context", context, minimum=1, meaning="tokens of the cache whose saving is reported")
    steps = check_int("steps", steps, minimum=1, meaning="prefix sizes tried")
    model = sweep.model
    info = model_info(model)
    options = sweep.head_edits["window"]
    order = [tuple(map(int, r)) for r in scores.sort_values("score")[["layer", "kv_head"]].to_numpy()]
    total = len(order)
    sizes = sorted({max(1, round(total * i / steps)) for i in range(1, steps + 1)})
    dense = {split: _loss(sweep.dense(split)) for split in ("search", "held_out")}
    grid = sweep.run([("window", group_heads(model, order[:n]), "search") for n in sizes], desc="kv budget",
                     executor=executor)
    curve = {n: _loss(record) - dense["search"] for n, record in zip(sizes, grid)}
    chosen = {}
    for tol in tolerances:
        within = [n for n in sizes if curve[n] <= tol]
        chosen[tol] = max(within) if within else 0
    confirm = sorted({n for n in chosen.values() if n})
    held_out = sweep.run([("window", group_heads(model, order[:n]), "held_out") for n in confirm],
                         desc="kv budget held out", executor=executor)
    held = {n: _loss(record) - dense["held_out"] for n, record in zip(confirm, held_out)}
    per_token = 2 * info.d_head * DTYPE_BYTES.get(info.dtype.replace("torch.", ""), 4)
    kept_tokens = min(context, options.sink + options.window)
    full = kv_cache_bytes(info.n_layers, info.n_kv_heads, info.d_head, per_token // (2 * info.d_head), context)
    llama_full = kv_cache_bytes(LLAMA2_7B["n_layers"], LLAMA2_7B["n_kv_heads"], LLAMA2_7B["d_head"],
                                LLAMA2_7B["bytes"], context)
    rows = []
    for tol in tolerances:
        n = chosen[tol]
        share = n / total
        saved = n * per_token * (context - kept_tokens)
        rows.append({"tolerance": tol, "kv_heads": n, "share": share, "search_increase": curve.get(n, 0.0),
                     "held_out_increase": held.get(n, 0.0), "saved_bytes": saved, "cache_bytes": full,
                     "llama2_7b_saved_bytes": int(share * llama_full * (context - kept_tokens) / context),
                     "llama2_7b_cache_bytes": llama_full, "context": context})
    out = pd.DataFrame(rows)
    out.attrs["curve"] = pd.DataFrame({"kv_heads": list(curve), "search_increase": list(curve.values())})
    return out


def _spearman(a: pd.Series, b: pd.Series) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""
    if a.nunique() < 2 or b.nunique() < 2:
        return None
    return float(a.rank().corr(b.rank()))


def compare_with_sinks(scores: pd.DataFrame, heads_table: pd.DataFrame, specialized: Sequence[tuple[int, int]], *,
                       group_size: int, cheap_share: float = 0.25) -> dict:
    """How the streaming score relates to the sink measures: rank correlations with alpha_0 and with the count of
    non-first sinks (each a KV group's mean over its query heads and the prompts), and the overlap of the
    sink-specialized KV groups with the cheapest ``cheap_share`` of KV heads ("cheap to stream").

    A KV group counts as sink-specialized when any of its query heads is (restricting the group restricts it).

    Args:
        scores: from :func:`streaming_head_scores` (``layer``, ``kv_head``, ``score``).
        heads_table: rows per ``(layer, head)`` (or per prompt, layer and head: ``Census.to_frame()``) with
            ``alpha0``; ``n_other_sinks`` too when the census was full (else that correlation is None).
        specialized: sink-specialized ``(layer, head)`` query heads.
        group_size: query heads per KV head (1 on MHA).
        cheap_share: share of KV heads, lowest score first, called cheap to stream (0 < share <= 1).
    Returns:
        ``spearman_alpha0``, ``spearman_non_first`` (None when not measured or constant), ``n_kv_heads``,
        ``n_cheap``, ``n_sink_groups``, ``overlap`` (sink groups among the cheap ones), ``jaccard``,
        ``sink_groups_mean_score`` and ``other_groups_mean_score`` (nats; None when empty).
    """
    group_size = check_int("group_size", group_size, minimum=1)
    if not 0 < cheap_share <= 1:
        raise InputError(f"cheap_share must be in (0, 1], got {cheap_share!r}.")
    missing = {"layer", "head", "alpha0"} - set(heads_table.columns)
    if missing:
        raise InputError(f"heads_table lacks the columns {sorted(missing)}: pass Census.to_frame() or a table "
                         "of (layer, head, alpha0).")
    columns = ["alpha0"] + (["n_other_sinks"] if "n_other_sinks" in heads_table
                            and heads_table["n_other_sinks"].notna().all() else [])
    table = heads_table.assign(kv_head=heads_table["head"] // group_size)
    per_group = table.astype({c: float for c in columns}).groupby(["layer", "kv_head"], as_index=False)[columns].mean()
    merged = scores.merge(per_group, on=["layer", "kv_head"], how="inner")
    if len(merged) != len(scores):
        raise InputError(f"heads_table covers {len(merged)} of the {len(scores)} scored KV heads: measure every "
                         "layer.")
    n_cheap = max(1, round(cheap_share * len(scores)))
    order = scores.sort_values(["score", "layer", "kv_head"], kind="stable")
    cheap = {(int(l), int(g)) for l, g in order[["layer", "kv_head"]].to_numpy()[:n_cheap]}
    sink_groups = {(int(l), int(h) // group_size) for l, h in specialized}
    both, either = cheap & sink_groups, cheap | sink_groups
    is_sink = [(int(l), int(g)) in sink_groups for l, g in scores[["layer", "kv_head"]].to_numpy()]
    sink_scores = scores["score"][is_sink]
    other_scores = scores["score"][[not s for s in is_sink]]
    return {"spearman_alpha0": _spearman(merged["score"], merged["alpha0"]),
            "spearman_non_first": (_spearman(merged["score"], merged["n_other_sinks"])
                                   if "n_other_sinks" in merged else None),
            "n_kv_heads": len(scores), "cheap_share": cheap_share, "n_cheap": n_cheap,
            "n_sink_groups": len(sink_groups), "overlap": len(both),
            "jaccard": len(both) / len(either) if either else None,
            "sink_groups_mean_score": float(sink_scores.mean()) if len(sink_scores) else None,
            "other_groups_mean_score": float(other_scores.mean()) if len(other_scores) else None}


__all__ = ["LLAMA2_7B", "compare_with_sinks", "kv_budget", "kv_cache_bytes", "kv_groups",
           "streaming_head_scores", "streaming_sweep"]
