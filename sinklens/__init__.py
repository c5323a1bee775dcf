"""sinklens: attention sinks, massive activations and QK column pruning on TransformerLens."""

from .census import Census, first_token_comparison, run_census, sink_scores
from .checkpoint import read_manifest, save_pruned
from .errors import HubUnreachableError, InputError, SinklensError, UnknownModelError, UnsupportedArchitectureError
from .evaluation import EvalResult, evaluate, retention
from .lm_eval_bridge import evaluate_lm_eval
from .loading import ModelInfo, load_model, model_info
from .massive import MassiveActivations, bos_top_dims, massive_activations
from .massive_tokens import MassiveTokens, massive_tokens
from .probes import probe_provenance, probe_tokens
from .pruning import (
    HeadRemovalHandle, PruneHandle, active_edits, apply_head_removal, apply_pruning, layer_heads, prune_qk,
    remove_heads, select_dims,
)
from .reconstruction import (
    error_quantiles, k_sweep, k_sweep_headline, reconstruction_error, reconstruction_headline, smallest_k,
)
from .selection import LayerSelection, layer_selection
from .specialization import sink_specialized_heads, specialization_table
from .tokens import TokenBatch, tokenize

__version__ = "0.1.0"

__all__ = [
    # model, tokens, probe set
    "HubUnreachableError", "InputError", "ModelInfo", "SinklensError", "TokenBatch", "UnknownModelError",
    "UnsupportedArchitectureError", "load_model", "model_info", "probe_provenance", "probe_tokens", "tokenize",
    # sinks and massive activations
    "Census", "MassiveActivations", "MassiveTokens", "bos_top_dims", "first_token_comparison", "massive_activations",
    "massive_tokens", "run_census", "sink_scores", "sink_specialized_heads", "specialization_table",
    # QK column pruning, reconstruction error, pruned checkpoints
    "HeadRemovalHandle", "PruneHandle", "active_edits", "apply_head_removal", "apply_pruning", "error_quantiles",
    "k_sweep", "k_sweep_headline", "layer_heads", "prune_qk", "read_manifest", "reconstruction_error",
    "reconstruction_headline", "remove_heads", "save_pruned", "select_dims", "smallest_k",
    # evaluation and layer selection
    "EvalResult", "LayerSelection", "evaluate", "evaluate_lm_eval", "layer_selection", "retention",
]
