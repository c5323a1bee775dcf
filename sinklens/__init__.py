"""sinklens: attention sinks, massive activations and QK column pruning on TransformerLens."""

from .census import Census, first_token_comparison, run_census, sink_scores
from .errors import HubUnreachableError, InputError, SinklensError, UnknownModelError, UnsupportedArchitectureError
from .loading import ModelInfo, load_model, model_info
from .massive import MassiveActivations, bos_top_dims, massive_activations
from .probes import probe_provenance, probe_tokens
from .specialization import sink_specialized_heads, specialization_table
from .tokens import TokenBatch, tokenize

__version__ = "0.1.0"

__all__ = [
    "Census", "HubUnreachableError", "InputError", "MassiveActivations", "ModelInfo", "SinklensError", "TokenBatch",
    "UnknownModelError", "UnsupportedArchitectureError", "bos_top_dims", "first_token_comparison", "load_model",
    "massive_activations", "model_info", "probe_provenance", "probe_tokens", "run_census", "sink_scores",
    "sink_specialized_heads", "specialization_table", "tokenize",
]
