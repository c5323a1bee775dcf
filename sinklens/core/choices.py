"""The package's named choices (the values a string argument or notebook parameter may take), in a module that
imports nothing heavy.

Each choice is a ``Literal`` type (for annotations) and the tuple of its values (for checks and error messages).
They are defined here, not beside the code that uses them, so that the command line checks a run's parameters
(:mod:`sinklens.series.params`) without importing torch, transformers or pandas; the modules that use them
re-export them under their old names (``sinklens.prune.spec.POLICIES`` is this ``POLICIES``).
"""

from __future__ import annotations

from typing import Literal, get_args

# the bundled models: name -> GGUF file of the embedded cache (sinklens.core.embedded)
EMBEDDED_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf"}

# where the first token's activations are measured (sinklens.measure.massive)
Basis = Literal["resid", "normalized"]
BASES: tuple[str, ...] = get_args(Basis)

# a pruning's kept-dims policy, fill of dropped dims and GQA handling (sinklens.prune.spec)
Policy = Literal["bos_top", "random", "weight_norm", "act_weight", "optimized"]
POLICIES: tuple[str, ...] = get_args(Policy)
Fill = Literal["zero", "mean"]  # the value a dropped input dim takes: 0, or its mean over calibration tokens
FILLS: tuple[str, ...] = get_args(Fill)
GQAPolicy = Literal["exact", "shared", "q_only"]
GQA_POLICIES: tuple[str, ...] = get_args(GQAPolicy)

# layer selection's search strategies and whole-head removal of the selected heads (sinklens.assess.selection)
Strategy = Literal["single_layer_rank", "greedy", "exhaustive", "random"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
HeadRemoval = Literal["best", "all", "none"]
HEAD_REMOVAL_CHOICES: tuple[str, ...] = get_args(HeadRemoval)

# the candidate heads of an attention-calibration head search (sinklens.assess.calibration_search): the heads that
# move the most attention mass, the heads of the best layers of a whole-layer screen, or every head
CalibrationCandidates = Literal["mass", "layers", "all"]
CALIBRATION_CANDIDATES: tuple[str, ...] = get_args(CalibrationCandidates)
