"""What the report calls things: human labels and units of the headline numbers, captions of the figures.

A headline number is known by its key in a summary's ``headline`` block (``frob_rel_median``) or
by ``outer.inner`` for the entries of a small mapping (``d_loss_at_k.bos_top``: the outer label,
then the inner one in brackets). Keys that are not listed here are still shown, with a label made
from the key itself (underscores as spaces, ``pct`` as %), so a new notebook's summary appears in
the report without an entry here. Captions are keyed by a figure's file name (without ``.html``);
a figure without one is shown without a caption.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Label:
    """How a headline number reads: ``text``, its ``unit`` (shown after the value) and a ``scale`` applied
    to the stored value first (100 turns a stored fraction into the percent the unit says)."""

    text: str
    unit: str = ""
    scale: float = 1.0


_PERCENT_OF_FRACTION = {"unit": "%", "scale": 100.0}
LABELS: dict[str, Label] = {
    # 01 sink discovery
    "prepend_bos": Label("BOS prepended to the probe prompts"),
    "n_prompts": Label("probe prompts"),
    "seq_len": Label("prompt length", "tokens"),
    "eps": Label("sink threshold eps on alpha_0"),
    "q": Label("share of prompts a sink-specialized head must sink on", **_PERCENT_OF_FRACTION),
    "sink_rate_pct": Label("sink rate Sink^eps: heads with alpha_0 > eps", "%"),
    "n_heads": Label("heads in the model"),
    "n_heads_mean_alpha0_above_eps": Label("heads with mean alpha_0 > eps"),
    "strongest_head.layer": Label("strongest sink head: layer"),
    "strongest_head.head": Label("strongest sink head: head"),
    "strongest_head.mean_alpha0": Label("strongest sink head: mean alpha_0"),
    "bos_comparison.verdict": Label("what the sink follows (BOS token or first position)"),
    # 02 sink-specialized heads
    "n_specialized": Label("sink-specialized heads"),
    "specialized_pct": Label("sink-specialized heads, share of all heads", "%"),
    "n_boot": Label("bootstrap resamples"),
    # 03 pruning one layer
    "layer": Label("pruned layer"),
    "n_heads_pruned": Label("heads pruned"),
    "n_sink_heads": Label("sink-specialized heads"),
    "k": Label("kept Q/K input dims per head (k)"),
    "frob_rel_median": Label("median attention error ||A - A'||_F / ||A||_F"),
    "alpha0_dense_mean": Label("mean alpha_0 of the pruned heads, dense"),
    "alpha0_pruned_mean": Label("mean alpha_0 of the pruned heads, pruned"),
    "next_kl": Label("next-token KL(dense || pruned)", "nats"),
    "d_loss": Label("change of next-token loss", "nats"),
    # 04 reconstruction error against k
    "frob_rel_median_at_k": Label("median attention error at k"),
    "smallest_k_median_below_0.2": Label("smallest k with median attention error < 0.2"),
    "smallest_k_median_below_0.1": Label("smallest k with median attention error < 0.1"),
    "d_loss_at_k": Label("change of loss at k, all sink-specialized heads pruned", "nats"),
    "qk_params_zeroed_share": Label("Q/K weights zeroed at k", **_PERCENT_OF_FRACTION),
    # 05 layer selection
    "metric": Label("selection metric"),
    "target_retention": Label("retention target", **_PERCENT_OF_FRACTION),
    "n_configurations": Label("configurations evaluated"),
    "best_layers": Label("largest layer set meeting the target"),
    "best_n_heads": Label("heads QK-pruned in that set"),
    "best_params_zeroed": Label("Q/K parameters zeroed in that set"),
    "best_retention": Label("retention of that set (held-out)", **_PERCENT_OF_FRACTION),
    "best_ci_low": Label("retention, 95 % CI low", **_PERCENT_OF_FRACTION),
    "best_ci_high": Label("retention, 95 % CI high", **_PERCENT_OF_FRACTION),
    "head_removal_retention_same_heads": Label("retention with the same heads removed whole", **_PERCENT_OF_FRACTION),
    # the key of summaries written before the vocabulary change
    "removal_retention_same_heads": Label("retention with the same heads removed whole", **_PERCENT_OF_FRACTION),
    # 06 long context (sink heads: alpha_0 > eps at the shortest length)
    "lengths": Label("prompt lengths", "tokens"),
    "n_sink_heads_at_shortest": Label("heads with alpha_0 > eps at the shortest length", "heads"),
    "sink_rate_pct_shortest": Label("sink rate Sink^eps at the shortest length", "%"),
    "sink_rate_pct_longest": Label("sink rate Sink^eps at the longest length", "%"),
    "sink_heads_alpha0_shortest": Label("mean alpha_0 of those heads at the shortest length"),
    "sink_heads_alpha0_longest": Label("mean alpha_0 of those heads at the longest length"),
    "sink_heads_still_above_eps_pct": Label("those heads still above eps at the longest length", "%"),
    "non_first_sinks": Label("non-first sinks (layer, head, key) in the full census of one long prompt"),
    "non_first_sink_heads": Label("heads with a non-first sink", "heads"),
    "massive_positions": Label("positions carrying massive activations in that prompt"),
    "massive_position_kinds": Label("their kinds (count)"),
    # 07 beyond the BOS dims (variants are policy/fill/temperature or policy/fill/none)
    "best_variant": Label("kept-dims variant with the lowest median attention error at k (every sink-specialized "
                          "head, variants without a search)"),
    "best_frob_rel_median": Label("its median attention error at k"),
    "baseline_frob_rel_median": Label("median attention error at k of bos_top/zero/none"),
    "sample_best_variant": Label("lowest median attention error at k on the compared heads, the optimized search "
                                 "included"),
    "sample_best_frob_rel_median": Label("its median attention error at k (compared heads)"),
    "n_heads_compared": Label("sink-specialized heads compared with the optimized search"),
    "bos_optimized_overlap_mean": Label("kept dims shared by bos_top and optimized at k", **_PERCENT_OF_FRACTION),
    "selection_heads_bos_top": Label("layer selection: heads QK-pruned meeting the target, bos_top/zero/none",
                                     "heads"),
    "selection_heads_best": Label("layer selection: heads QK-pruned meeting the target, best variant", "heads"),
    "selection_params_bos_top": Label("layer selection: Q/K parameters zeroed, bos_top/zero/none", "params"),
    "selection_params_best": Label("layer selection: Q/K parameters zeroed, best variant", "params"),
    # 08 attention calibration (gains: retention - 1 of the search metric, held-out items, calibrated together)
    "n_head_candidates": Label("heads searched one by one for attention calibration", "heads"),
    "n_kept_heads": Label("heads kept (gain's bootstrap lower bound above 0)", "heads"),
    "kept_gain": Label("held-out gain of the kept heads calibrated together", **_PERCENT_OF_FRACTION),
    "kept_gain_low": Label("its bootstrap lower bound", **_PERCENT_OF_FRACTION),
    "act_recipe_gain": Label("held-out gain of ACT's recipe (every head of layers 2 to L-2)", **_PERCENT_OF_FRACTION),
    "act_recipe_gain_low": Label("its bootstrap lower bound", **_PERCENT_OF_FRACTION),
    "alpha0_change": Label("change of alpha_0 of the shown heads under calibration"),
    "non_first_sinks_before": Label("non-first sinks per prompt of the shown heads, dense"),
    "non_first_sinks_after": Label("non-first sinks per prompt of the shown heads, calibrated"),
    "same_heads_qk_retention": Label("best layer set's heads: retention under QK pruning", **_PERCENT_OF_FRACTION),
    "same_heads_removal_retention": Label("the same heads removed whole: retention", **_PERCENT_OF_FRACTION),
    "same_heads_qk_calibration_retention": Label("the same heads QK-pruned and calibrated: retention",
                                                 **_PERCENT_OF_FRACTION),
    # 09 streaming heads (sink + window attention, the KV budget)
    "ppl_past_context_sink_window": Label("perplexity past the trained context, sink + window with position shift"),
    "ppl_past_context_window_only": Label("perplexity past the trained context, window only (no sinks)"),
    "curve_tokens": Label("streamed text", "tokens"),
    "spearman_score_alpha0": Label("rank correlation of the per-KV-head streaming score with alpha_0"),
    "spearman_score_non_first": Label("rank correlation of the streaming score with the non-first sink count"),
    "sink_groups_among_cheap": Label("KV groups with a sink-specialized head among the cheapest to stream"),
    "n_sink_groups": Label("KV groups holding a sink-specialized head"),
    "n_cheap": Label("KV heads called cheap to stream (lowest scores)"),
    "kv_heads_at_tolerance": Label("KV heads on sink + window within the loss tolerance", "KV heads"),
    "held_out_increase_at_tolerance": Label("held-out loss increase of that set", "nats"),
    "ppl_by_sinks": Label("streamed perplexity by sink count"),
    "ppl_by_initial": Label("streamed perplexity by kept initial tokens"),
}
# inner keys of headline mappings: the kept-dims policies of a pruning; the kept initial tokens of notebook 09
INNER_LABELS: dict[str, str] = {
    "bos": "BOS", "newline": "four newlines in place of BOS",
    "bos_top": "BOS top-k dims", "random": "random dims", "weight_norm": "largest weight norms",
    "head_removal": "whole head removed",
    "whole_head": "whole head removed",  # the key of summaries written before the vocabulary change
}


def label(key: str) -> Label:
    """The label of a headline key; ``outer.inner`` keys combine both parts; unknown keys read as words.

    Args:
        key: the key in a summary's headline (``"frob_rel_median"``) or ``"outer.inner"``.
    """
    if key in LABELS:
        return LABELS[key]
    for cut in [i for i, char in enumerate(key) if char == "."][::-1]:  # "outer.inner"; outer may hold a dot
        outer, inner = key[:cut], key[cut + 1:]
        base = LABELS.get(outer)
        if base is not None:
            return Label(f"{base.text} ({INNER_LABELS.get(inner, _words(inner))})", base.unit, base.scale)
    return Label(_words(key))


def _words(key: str) -> str:
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", ": ", key).replace("_", " ")  # a decimal point (0.02) stays
    return text.replace(" pct", " (%)") if text.endswith(" pct") else text


CAPTIONS: dict[str, str] = {
    # 01
    "sink_heatmap": "Mean alpha_0 per layer and head: bright cells are heads that park their attention on the first "
                    "token.",
    "sink_rate_by_layer": "Share of each layer's heads with alpha_0 > eps: look for layers where it drops.",
    "massive_profile_resid": "The first token's largest magnitudes per layer against the median and the other "
                             "tokens (log scale): massive activations stand orders of magnitude above the rest.",
    "first_token_norms": "Norm of the first token's residual vector per layer against the other tokens: where it "
                         "jumps, the sink forms.",
    "norm_share": "Share of the first token's squared norm held by its top-k dims: close to 1 means a few dims "
                  "carry the whole vector.",
    "rank_stability": "How often the top-k dims are the same from prompt to prompt: 1 means fixed dims.",
    "bos_comparison": "Sink rate per layer with BOS, without BOS (first text token) and for that token behind "
                      "BOS: the pattern tells token from position.",
    "attention_strongest_head": "The strongest sink head on one probe prompt: the first column holds the "
                                "attention.",
    # 02
    "specialization": "Mean alpha_0 per head with its bootstrap 95 % interval, sorted: specialized heads sit above "
                      "eps on almost every prompt.",
    "specialization_heatmap": "Sink-specialized heads by layer and head: where the list of heads comes from.",
    "confidence_vs_alpha": "Head confidence against alpha_0: sink heads are confident by construction; confident "
                           "heads with low alpha_0 attend sharply elsewhere.",
    "prompt_consistency": "alpha_0 of the top heads on every prompt: a specialized head is bright on every row.",
    "attention_specialized_layer": "All heads of the layer holding the strongest sink head, on one probe prompt.",
    # 03
    "kept_dims": "The BOS vector's magnitudes at the pruned layer: the kept k dims are the tallest bars.",
    "patterns_before_after": "Each pruned head's attention on one prompt, dense (left) and pruned (right): the "
                             "first column should survive.",
    "attention_views_before_after": "Interactive views of the same heads before and after pruning.",
    "alpha0_before_after": "alpha_0 of each pruned head, dense against pruned: points on the diagonal kept their "
                           "sink.",
    # 04
    "frob_rel_vs_k": "Attention error against k per kept-dims policy: the BOS dims should reach a low error at a "
                     "far smaller k than the controls.",
    "out_rel_vs_k": "Error of the head outputs against k: whole-head removal sits at 1.",
    "frob_rel_vs_k_by_layer": "Attention error against k of the BOS dims, per layer: layers that need a larger k "
                              "stand out.",
    "frob_rel_vs_k_by_head": "Attention error against k of the BOS dims, per head.",
    "frob_rel_heatmap_at_k": "Attention error of every head at k with the BOS dims: sink-specialized heads should be "
                             "dark (low error).",
    "model_level_at_k": "The model with all sink-specialized heads pruned at k: change of next-token loss per "
                        "policy, whole-head removal beside it.",
    # 05
    "single_layer_retention": "Retention of the selection metric when one layer's sink heads are pruned: the "
                              "layers the search starts from.",
    "retention_by_n_layers": "Held-out retention against the number of pruned layers per strategy; crosses: the "
                             "same heads removed whole.",
    "pareto_frontier": "Held-out configurations no other beats on both pruned heads and retention.",
    "head_removal_comparison": "QK pruning against whole-head removal of the same heads, per layer set.",
    # 07
    "beyond_bos_frob_rel_vs_k": "Attention error against k on the compared heads, per policy/fill/calibration "
                                "variant, the optimized search included (dims, means and temperatures fitted on other "
                                "prompts).",
    "beyond_bos_model_level_at_k": "The model with the compared heads pruned at k: change of next-token loss per "
                                   "variant.",
    "frob_rel_vs_k_all_heads": "Attention error against k over every sink-specialized head, per policy/fill/"
                               "calibration variant without a search: the best one at k is the one layer selection "
                               "tries against bos_top.",
    # 08
    "calibration_mass_screen": "Attention each head's calibration moves per query on the screen prompts: the "
                               "candidates (o) are the heads moving most.",
    "calibration_layers_screen": "Gain of the search metric with every head of one layer calibrated: the heads of "
                                 "the red layers are searched one by one.",
    "calibration_gain_heatmap": "Gain of each candidate head calibrated alone (search items): blue helps, red "
                                "hurts; x marks sink-specialized heads, * the kept ones.",
    "calibration_held_out_gains": "Held-out gain per task group, the kept heads and ACT's recipe calibrated "
                                  "together: an interval above 0 is a gain that held.",
    "calibration_sinks_before_after": "alpha_0 and non-first sinks of the shown heads, dense and calibrated: the "
                                      "mass taken off later sinks flows back to the first token.",
    "calibration_patterns_before_after": "One calibrated head's pattern on one probe prompt, dense and calibrated.",
    "calibration_side_by_side": "The same heads QK-pruned, removed, calibrated, and pruned plus calibrated: "
                                "held-out retention of the search metric.",
    # 09
    "streaming_loss_vs_position": "Streamed next-token loss against position: window only breaks once the first "
                                  "tokens leave the cache, sink + window with the position shift stays flat past the "
                                  "trained context (dotted line).",
    "streaming_score_heatmap": "Loss increase when one KV head keeps only sink + window: dark heads are cheap to "
                               "stream; outlined groups hold a sink-specialized head.",
    "kv_saved_vs_loss": "KV heads put on sink + window, cheapest first, against the loss increase: each tolerance's "
                        "set on the search texts and confirmed on held-out text.",
}


def caption(figure_stem: str) -> str | None:
    """The one-line caption of a figure (what to look at), or None.

    Args:
        figure_stem: the figure's file name without ``.html`` (its name in ``RunFolder.save_figure``).
    """
    return CAPTIONS.get(figure_stem)
