"""sinklens: attention sinks, massive activations and QK column pruning on TransformerLens."""


from .calibration import CalibrationSet
from .census import Census, first_token_comparison, run_census, sink_scores
from .checkpoint import read_manifest, save_pruned
from .dims import select_dims
from .edits import active_edits
from .errors import (
    HubUnreachableError,
    InputError,
    SinklensError,
    UnknownModelError,
    UnsupportedArchitectureError,
    WriteError,
)
from .evaluation import EvalResult, evaluate, retention
from .lm_eval_bridge import evaluate_lm_eval
from .loading import ModelInfo, load_model, model_info
from .massive import MassiveActivations, bos_top_dims, massive_activations
from .massive_tokens import MassiveTokens, massive_tokens
from .probes import probe_provenance, probe_tokens
from .pruning import PruneHandle, PruningPlan, apply_pruning, plan_pruning, prune_qk
from .reconstruction import (
    error_quantiles,
    k_sweep,
    k_sweep_headline,
    reconstruction_error,
    reconstruction_headline,
    smallest_k,
)
from .removal import HeadRemovalHandle, apply_head_removal, remove_heads
from .selection import LayerSelection, layer_selection
from .spec import PruneSpec, layer_heads
from .specialization import sink_specialized_heads, specialization_table
from .tokens import TokenBatch, tokenize
from .version import __version__

__all__ = [
    "__version__",
    # model, tokens, probe set
    "HubUnreachableError", "InputError", "ModelInfo", "SinklensError", "TokenBatch", "UnknownModelError",
    "UnsupportedArchitectureError", "WriteError", "load_model", "model_info", "probe_provenance", "probe_tokens",
    "tokenize",
    # sinks and massive activations
    "Census", "MassiveActivations", "MassiveTokens", "bos_top_dims", "first_token_comparison", "massive_activations",
    "massive_tokens", "run_census", "sink_scores", "sink_specialized_heads", "specialization_table",
    # QK column pruning, reconstruction error, pruned checkpoints
    "CalibrationSet", "HeadRemovalHandle", "PruneHandle", "PruneSpec", "PruningPlan", "active_edits",
    "apply_head_removal", "apply_pruning", "error_quantiles", "k_sweep", "k_sweep_headline", "layer_heads",
    "plan_pruning", "prune_qk", "read_manifest", "reconstruction_error", "reconstruction_headline", "remove_heads",
    "save_pruned", "select_dims", "smallest_k",
    # evaluation and layer selection
    "EvalResult", "LayerSelection", "evaluate", "evaluate_lm_eval", "layer_selection", "retention",
]
