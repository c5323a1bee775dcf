"""Attention reconstruction error of pruned heads, and sweeps over k with controls.

Per head and prompt, on the real tokens only (padding-aware), with A the dense pattern and A' the
pruned one (RESEARCH.md):
- ``frob_rel`` = ||A - A'||_F / ||A||_F;
- ``kl`` = mean over real query rows i of KL(A_i || A'_i), from log-softmaxed scores (fp32);
- ``d_alpha0`` = alpha_0(A') - alpha_0(A), alpha_0 the BOS sink score (mean of key column 0 over the
  rows that see it, positions counted from the first real token); ``alpha0`` is the dense value;
- ``out_rel`` = ||c - c'||_F / ||c||_F, c = A V W_O^h the head's contribution to the residual stream
  (whole-head removal gives c' = 0, hence 1: it puts QK pruning and head removal on one axis). Removal
  leaves the head's own pattern as it is: at the layer level its pattern metrics are NaN (alpha0 is
  the dense value); at the model level they measure the changes that removed heads upstream cause.
Each is computed per prompt and averaged over prompts. Model level (``level="model"`` only):
``next_kl`` = KL(P || P') of the final next-token distributions, mean over real positions, ``loss``
(dense next-token cross-entropy, mean over real positions with a real next token) and ``d_loss`` =
loss' - loss; these are per configuration, repeated on its rows.

Two levels:
- ``"model"``: the pruned model runs (all ``heads`` pruned together, through :func:`apply_pruning`);
  a head's error includes the effect of pruned heads in earlier layers. One dense pass and one pass per
  configuration, batch by batch, so the dense reference (patterns of the selected heads, final
  log-probs) is held for one batch only and reused by every configuration.
- ``"layer"``: each layer is pruned alone on the dense residual stream. Pruning layer l cannot change
  layer l's inputs, so every configuration's pruned scores are computed during ONE dense forward: after
  the layer's attention ran, the model's own attention module is called again on the same input with
  the configuration's edits of that layer applied (the same plans as :func:`apply_pruning`), so rotary
  variants, q/k norms, softcaps and windows come from the model, never from a copy of its maths. This
  is the thesis' per-head reconstruction error. Tests check it against the pruned model itself.
Patterns are reduced inside the hooks; only the layers involved are hooked.
"""

from .api import default_ks, k_sweep, reconstruction_error
from .common import (
    COLUMNS,
    DEFAULT_SWEEP_POLICIES,
    HEAD_REMOVAL,
    K_GRID,
    LEVELS,
    METRICS,
    SWEEP_POLICIES,
    Level,
    Metric,
    SweepPolicy,
)
from .quantiles import error_quantiles, smallest_k

__all__ = [
    "COLUMNS", "DEFAULT_SWEEP_POLICIES", "HEAD_REMOVAL", "K_GRID", "LEVELS", "METRICS", "SWEEP_POLICIES", "Level",
    "Metric", "SweepPolicy", "default_ks", "error_quantiles", "k_sweep", "reconstruction_error", "smallest_k",
]
