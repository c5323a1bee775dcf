"""Judging a pruning: reconstruction error (layer and model level), the offline evaluation suite and the
lm-eval bridge, resumable sweeps, layer selection and the kept-dims comparisons. Imports ``core``,
``measure`` and ``prune``."""
