"""Sinks against context length (notebook 06): a sweep of sdpa censuses over prompt lengths, the sink rate and
the sink heads per length (the notebook's summary: :mod:`sinklens.report.summaries.long_context`).

Each length L takes ``n_prompts`` consecutive, non-overlapping chunks of the probe text (BOS + L - 1
text tokens, :func:`sinklens.probe_tokens`) and measures alpha_0..alpha_{m-1} of every head with the
fused engine (``run_census(engine="sdpa")``), so memory stays O(L) up to the model's full context.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..core.errors import InputError
from ..core.loading import model_info
from ..core.probes import probe_tokens
from ..core.validate import as_int, check_fraction, check_frame
from .census import Census, run_census

SWEEP_COLUMNS = ("length", "layer", "head", "alpha_0")  # what the summaries of a sweep read


def _check_lengths(lengths: Sequence[int], n_ctx: int, first_keys: int) -> list[int]:
    """Distinct prompt lengths in first_keys..n_ctx, sorted."""
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) or not lengths:
        raise InputError(f"lengths must be a non-empty list of ints, got {lengths!r}.")
    values = [as_int(v) for v in lengths]
    bad = [v for v, i in zip(lengths, values) if i is None or not max(2, first_keys) <= i <= n_ctx]
    if bad:
        raise InputError(f"lengths {bad} are outside {max(2, first_keys)}..{n_ctx} (the model's context): "
                         "pass token counts, BOS included.")
    if len(set(values)) != len(values):
        raise InputError(f"Duplicate lengths in {list(lengths)}: list each once.")
    return sorted(values)


def length_sweep(model, lengths: Sequence[int], n_prompts: int = 1, first_keys: int = 4,
                 show_progress: bool = False) -> pd.DataFrame:
    """alpha_0..alpha_{first_keys-1} of every head at every length (sdpa engine).

    Args:
        model: a bridge from :func:`sinklens.load_model`.
        lengths: prompt lengths in tokens, BOS included (at most the model's context).
        n_prompts: prompts per length (consecutive chunks of the probe text).
        first_keys: m, the first key positions measured.
        show_progress: progress bars of the censuses.
    Returns:
        One row per (length, prompt, layer, head): ``alpha_0`` ... ``alpha_{m-1}``.
    """
    info = model_info(model)
    lengths = _check_lengths(lengths, info.n_ctx, first_keys)
    frames = []
    for length in lengths:
        census = run_census(model, probe_tokens(model, n_prompts, length, prepend_bos=True), engine="sdpa",
                            first_keys=first_keys, batch_size=1, show_progress=show_progress)
        frame = _census_frame(census)
        frame.insert(0, "length", length)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _census_frame(census: Census) -> pd.DataFrame:
    """One row per (prompt, layer, head) with the census' first measured keys as ``alpha_<k>`` columns."""
    if not isinstance(census, Census):
        raise InputError(f"census must be a Census (from sinklens.run_census), got {type(census).__name__}.")
    n, n_layers, n_heads, width = census.alpha.shape
    keys = min(width, int(census.lengths.min()), 16)
    index = pd.MultiIndex.from_product([range(n), census.layers, range(n_heads)], names=["prompt", "layer", "head"])
    values = census.alpha[..., :keys].reshape(-1, keys).numpy()
    return pd.DataFrame(values, index=index, columns=[f"alpha_{k}" for k in range(keys)]).reset_index()


def sink_rate_by_length(sweep: pd.DataFrame, eps: float = 0.3) -> pd.DataFrame:
    """Sink^eps in % per length and layer (share of heads with alpha_0 > eps, mean over prompts), and over all
    layers (``layer == -1``)."""
    check_fraction("eps", eps)
    check_frame(sweep, SWEEP_COLUMNS, "sweep", "sinklens.measure.long_context.length_sweep")
    flagged = sweep.assign(sink=(sweep["alpha_0"] > eps) * 100.0)
    by_layer = flagged.groupby(["length", "layer"], as_index=False)["sink"].mean().rename(columns={"sink": "sink_rate"})
    overall = flagged.groupby("length", as_index=False)["sink"].mean().rename(columns={"sink": "sink_rate"})
    return pd.concat([by_layer, overall.assign(layer=-1)], ignore_index=True)


def sink_heads_over_length(sweep: pd.DataFrame, eps: float = 0.3) -> pd.DataFrame:
    """The heads whose mean alpha_0 exceeds ``eps`` at the shortest length, followed over every length:
    one row per (length, layer, head) with the mean alpha_0 over prompts."""
    check_fraction("eps", eps)
    check_frame(sweep, SWEEP_COLUMNS, "sweep", "sinklens.measure.long_context.length_sweep")
    mean = sweep.groupby(["length", "layer", "head"], as_index=False)["alpha_0"].mean()
    shortest = mean[mean["length"] == mean["length"].min()]
    heads = shortest[shortest["alpha_0"] > eps][["layer", "head"]]
    return mean.merge(heads, on=["layer", "head"])


def first_keys_share(weights) -> float:
    """Mean over query rows of the weight on the first keys ([query, key], one prompt of
    :func:`sinklens.measure.lse_census.first_key_weights`)."""
    return float(np.asarray(weights, dtype=np.float64).sum(-1).mean())
