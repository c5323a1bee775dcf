"""sinklens: attention sinks, massive activations and QK column pruning on TransformerLens.

``import sinklens as sl`` is cheap: every public name below is imported from its stage on first use
(``sl.run_census`` imports ``sinklens.measure.census`` then), so the command line answers a bad argument
without loading torch's model stack. The stages, imports flowing one way (``tests/test_layout.py``):

- ``core``: errors, argument checks, loading, tokens and probes, hooks, reversible edits, the Q/K layout;
- ``measure``: census engines, massive activations, sink-specialized heads, long context;
- ``prune``: ``PruneSpec``, kept dims and the search, calibration sets, temperature, pruning, removal,
  checkpoints;
- ``assess``: reconstruction error, evaluation, lm-eval, sweeps, layer selection, kept-dims comparisons, the
  attention-calibration head search and its effects;
- ``report``: attention views, notebook summaries, figures (``sl.plots``);
- ``series``: the notebook series, its run folders and report (``python -m sinklens``).
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it (one table: __all__, dir() and the lazy import read it)
_EXPORTS: dict[str, tuple[str, ...]] = {
    "sinklens.core.version": ("__version__",),
    "sinklens.core.errors": ("HandleUsageError", "HubUnreachableError", "InputError", "SinklensError",
                             "UnknownModelError", "UnsupportedArchitectureError", "WriteError"),
    "sinklens.core.loading": ("ModelInfo", "load_model", "model_info"),
    "sinklens.core.tokens": ("TokenBatch", "token_strings", "tokenize"),
    "sinklens.core.probes": ("probe_provenance", "probe_stream", "probe_tokens"),
    "sinklens.core.edits": ("active_edits",),
    "sinklens.measure.census": ("Census", "first_token_comparison", "run_census", "sink_scores"),
    "sinklens.measure.massive": ("MassiveActivations", "bos_top_dims", "massive_activations"),
    "sinklens.measure.massive_tokens": ("MassiveTokens", "carrier_summary", "massive_tokens"),
    "sinklens.measure.long_context": ("length_sweep", "sink_heads_over_length", "sink_rate_by_length"),
    "sinklens.measure.lse_census": ("first_key_weights",),
    "sinklens.measure.specialization": ("sink_specialized_heads", "specialization_table"),
    "sinklens.prune.calibration": ("CalibrationSet",),
    "sinklens.prune.spec": ("PruneSpec", "layer_heads"),
    "sinklens.prune.dims": ("select_dims",),
    "sinklens.prune.pruning": ("PruneHandle", "PruningPlan", "apply_pruning", "plan_pruning", "prune_qk"),
    "sinklens.prune.removal": ("HeadRemovalHandle", "apply_head_removal", "remove_heads"),
    "sinklens.prune.attention_calibration": ("AttentionCalibrationHandle", "CalibrationOptions",
                                             "apply_attention_calibration", "calibrate_attention"),
    "sinklens.prune.attention_window": ("AttentionWindowHandle", "WindowOptions", "apply_attention_restriction",
                                        "restrict_attention"),
    "sinklens.prune.checkpoint": ("read_manifest", "save_pruned"),
    "sinklens.assess.reconstruction": ("error_quantiles", "k_sweep", "reconstruction_error", "smallest_k"),
    "sinklens.assess.evaluation": ("EvalResult", "evaluate", "retention"),
    "sinklens.assess.lm_eval_bridge": ("evaluate_lm_eval",),
    "sinklens.assess.streaming": ("StreamingResult", "streaming_perplexity"),
    "sinklens.assess.streaming_ablation": ("streaming_ablation",),
    "sinklens.assess.streaming_heads": ("compare_with_sinks", "kv_budget", "streaming_head_scores",
                                        "streaming_sweep"),
    "sinklens.assess.selection": ("EvalOptions", "LayerSelection", "SearchOptions", "layer_selection"),
    "sinklens.assess.calibration_search": ("CalibrationSearch", "calibration_head_search"),
    "sinklens.assess.calibration_effects": ("calibration_census", "calibration_comparison"),
    "sinklens.assess.executor": ("LocalExecutor", "RayExecutor"),
}
# modules reached as attributes (sl.plots.census, sl.views): the figure helpers and views notebooks call
_MODULES: dict[str, str] = {
    "plots": "sinklens.report.plots",
    "views": "sinklens.report.views",
    "summaries": "sinklens.report.summaries",
    "beyond_bos": "sinklens.assess.beyond_bos",  # notebook 07: the kept-dims variants compared
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE) + sorted(_MODULES)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'sinklens' has no attribute {name!r}")
    globals()[name] = value  # resolved once: later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
