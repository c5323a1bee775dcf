"""Describing and applying a pruning: ``PruneSpec``, kept-dims policies and the optimized search, the
calibration set a pruning is fitted on, the score temperature, QK column pruning, whole-head removal and
pruned checkpoints. Imports ``core`` and ``measure``."""
