"""The findings of a run in a few sentences, written from its JSON summaries.

Every number in a sentence is read from a summary the notebooks wrote; nothing is typed in. Each
known summary (by file name) has a builder; a summary without one is left to the headline tables
(it still shows there), a missing summary gives no sentence, and a summary whose keys a builder
does not find (an older or a failed run) gives no sentence rather than a wrong one. Last, the
counts of sink-specialized heads that the summaries report are compared: a run whose notebooks
worked on different head lists says so.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..measure.census import CASE_AFTER_BOS, CASE_BOS, CASE_NO_BOS
from .head_list import HEAD_LIST_FILE
from .outputs import Summary


def _pct_text(value: float, digits: int = 1) -> str:
    """A percentage as text: ``67.6 %``."""
    return f"{value:.{digits}f} %"


def _share(fraction: float, digits: int = 1) -> str:
    """A fraction as a percentage: ``0.9217`` -> ``92.2 %``."""
    return _pct_text(100 * fraction, digits)


def _heads_share(n: int, total: int) -> str:
    return f"{n} of {total} heads ({100 * n / total:.0f} %)" if total else f"{n} heads"


def _probe_text(probe: Any, n_prompts: Any = None) -> str:
    probe = probe if isinstance(probe, dict) else {}
    n = probe.get("n_prompts", n_prompts)
    seq_len = probe.get("seq_len")
    return f"{n} prompts" + (f" of {seq_len} tokens" if seq_len else "")


def sink_discovery(data: dict) -> list[str]:
    """Sentences of notebook 01's ``sink_discovery.json``: sink rate, strongest head, token or position, massive dims.

    Args:
        data: the summary's content.
    """
    eps, n_heads = data["eps"], data["n_heads"]
    strongest = data["strongest_head"]
    out = [f"Sink^{eps:g} = {_pct_text(data['sink_rate_pct'])} of the {n_heads} heads put alpha_0 > {eps:g} on the "
           f"first "
           f"token (mean over {_probe_text(data.get('probe'), data.get('n_prompts'))}); the strongest sink head is "
           f"L{strongest['layer']}H{strongest['head']} (mean alpha_0 {strongest['mean_alpha0']:.3f})."]
    comparison = data.get("bos_comparison") or {}
    rates = comparison.get("sink_rate_pct") or {}
    if {CASE_BOS, CASE_NO_BOS, CASE_AFTER_BOS} <= set(rates):
        lead = {"position": "The sink is positional", "token": "The sink follows the BOS token",
                "mixed": "Both the BOS token and the first position make the sink",
                "none": "Neither BOS nor the first text token is a sink"}.get(comparison.get("verdict"), "Sink rates")
        out.append(f"{lead}: without BOS the first text token is a sink in {_pct_text(rates[CASE_NO_BOS])} of the "
                   f"heads "
                   f"(BOS itself: {_pct_text(rates[CASE_BOS])}), and the same token behind BOS in "
                   f"{_pct_text(rates[CASE_AFTER_BOS])}.")
    by_layer = data.get("massive_dims_by_layer")
    if isinstance(by_layer, dict):
        n_layers = (data.get("model") or {}).get("n_layers")
        if not by_layer:
            out.append("No massive activation (|x| > 100 and >= 1000 x the median) on the first token in any layer.")
        else:
            layers = sorted(int(layer) for layer in by_layer)
            dims = Counter(d for found in by_layer.values() for d in found).most_common(3)
            where = ", ".join(f"dim {d} in {_plural(n, 'layer')}" for d, n in dims)
            of = f" of {n_layers}" if n_layers else ""
            out.append(f"Massive activations (|x| > 100 and >= 1000 x the median) sit on the first token in "
                       f"{len(layers)}{of} layers (layers {layers[0]}-{layers[-1]}): {where}.")
    return out


def specialized_heads(data: dict) -> list[str]:
    """The sentence of notebook 02's ``specialized_heads.json``: how many heads are sink-specialized, by which rule.

    Args:
        data: the summary's content.
    """
    n, total, eps, q = len(data["heads"]), data["n_heads"], data["eps"], data["q"]
    return [f"{_heads_share(n, total)} are sink-specialized (alpha_0 > {eps:g} on >= {_share(q, 0)} of "
            f"{_probe_text(data.get('probe'))})."]


def topk_pruning(data: dict) -> list[str]:
    """The sentence of notebook 03's ``topk_pruning.json``: one layer's heads pruned to k BOS dims.

    Args:
        data: the summary's content.
    """
    h = data["headline"]
    return [f"Pruning the {h['n_heads_pruned']} sink-specialized heads of layer {h['layer']} to k = {h['k']} BOS "
            f"dims: median attention error ||A - A'||_F / ||A||_F = {h['frob_rel_median']:.2f}, mean alpha_0 "
            f"{h['alpha0_dense_mean']:.2f} -> {h['alpha0_pruned_mean']:.2f}; next-token KL {h['next_kl']:.3f} nats, "
            f"loss {h['d_loss']:+.3f} nats."]


_POLICY_NAMES = {"bos_top": "BOS top-k dims", "random": "random dims", "weight_norm": "largest weight norms",
                 "head_removal": "whole heads removed",
                 "whole_head": "whole heads removed"}  # the key of summaries written before the vocabulary change


def _measured(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _policies(values: dict, fmt: Callable[[Any], str]) -> str:
    """``"0.49 (BOS top-k dims), 0.92 (random dims) and ..."`` for the policies with a measured value, the thesis'
    policy first and whole-head removal last (the order of ``_POLICY_NAMES``; others after, as given)."""
    order = list(_POLICY_NAMES)
    ranked = sorted(values.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))
    parts = [f"{fmt(value)} ({_POLICY_NAMES.get(policy, policy)})" for policy, value in ranked if _measured(value)]
    return ", ".join(parts[:-1]) + f" and {parts[-1]}" if len(parts) > 1 else "".join(parts)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def reconstruction_error(data: dict) -> list[str]:
    """Sentences of notebook 04's ``reconstruction_error.json``: error at k per policy, the smallest k, the loss.

    Args:
        data: the summary's content.
    """
    h = data["headline"]
    k = h["k"]
    out = [f"At k = {k}, over the {h['n_sink_heads']} sink-specialized heads (each layer pruned alone), the median "
           f"attention error is {_policies(h['frob_rel_median_at_k'], lambda v: f'{v:.2f}')}."]
    smallest = next(((key, value) for key, value in h.items() if key.startswith("smallest_k_median_below_")), None)
    if smallest and isinstance(smallest[1], dict):
        threshold, by_policy = smallest[0].rsplit("_", 1)[1], smallest[1]
        never = [_POLICY_NAMES.get(policy, policy) for policy, value in by_policy.items() if not _measured(value)]
        ks = (data.get("parameters") or {}).get("ks")
        tried = f" (k up to {max(ks)})" if isinstance(ks, list) and ks else ""
        if len(never) < len(by_policy):
            out.append(f"The median error falls below {threshold} at k = {_policies(by_policy, lambda v: f'{v:g}')}"
                       + (f"; never with {', '.join(never)}{tried}." if never else "."))
        else:
            out.append(f"No kept-dims policy brings the median error below {threshold} at the k tried{tried}.")
    if h.get("d_loss_at_k"):
        out.append(f"All of them pruned together at k = {k}, the loss changes by "
                   f"{_policies(h['d_loss_at_k'], lambda v: f'{v:+.2f} nats')}.")
    return out


def layer_selection(data: dict) -> list[str]:
    """The sentence of notebook 05's ``layer_selection.json``: the largest layer set meeting the target.

    Args:
        data: the summary's content.
    """
    h = data["headline"]
    k = (data.get("settings") or {}).get("k")
    at_k = f" at k = {k}" if k is not None else ""
    if h.get("best_layers") is None:
        return [f"No layer set{at_k} kept {_share(h['target_retention'], 0)} of {h['metric']} "
                f"({h['n_configurations']} configurations evaluated)."]
    removal = h.get("head_removal_retention_same_heads", h.get("removal_retention_same_heads"))  # new, old key
    tail = f"; removing the same heads whole keeps {_share(removal)}" if removal is not None else ""
    return [f"QK-pruning layers {h['best_layers']} ({h['best_n_heads']} heads, {h['best_params_zeroed']:,} Q/K "
            f"parameters){at_k} keeps {_share(h['best_retention'])} of {h['metric']} on held-out items (95 % CI "
            f"{_share(h['best_ci_low'])} to {_share(h['best_ci_high'])}; target {_share(h['target_retention'], 0)})"
            f"{tail}."]


def long_context(data: dict) -> list[str]:
    """Sentences of notebook 06's ``long_context.json``: the sink from the shortest to the longest prompt, then what
    the full census and the massive-token scan of one long prompt found.

    Args:
        data: the summary's content.
    """
    h = data["headline"]
    short, long = h["lengths"].split("..")
    eps = h["eps"]
    out = [f"From {short} to {long} tokens, Sink^{eps:g} goes from {_pct_text(h['sink_rate_pct_shortest'])} to "
           f"{_pct_text(h['sink_rate_pct_longest'])}; the {h['n_sink_heads_at_shortest']} heads with alpha_0 > "
           f"{eps:g} at "
           f"{short} tokens average alpha_0 {h['sink_heads_alpha0_shortest']:.2f} there and "
           f"{h['sink_heads_alpha0_longest']:.2f} at {long} tokens, "
           f"{_pct_text(h['sink_heads_still_above_eps_pct'])} of "
           f"them still above {eps:g}."]
    if "non_first_sinks" in h:
        length = (data.get("details") or {}).get("detail_length")
        prompt = f"one {length}-token prompt" if length else "one long prompt"
        out.append(f"A full census of {prompt} finds {_plural(h['non_first_sinks'], 'non-first sink')} in "
                   f"{_plural(h['non_first_sink_heads'], 'head')}; massive activations sit at "
                   f"{_plural(h['massive_positions'], 'position')} ({h['massive_position_kinds']}).")
    return out


def beyond_bos_dims(data: dict) -> list[str]:
    """Sentences of notebook 07's ``beyond_bos_dims.json``: the best kept-dims variant against the thesis' choice,
    the optimized search on the sample, and the layer selections at the same retention target.

    Args:
        data: the summary's content.
    """
    h = data["headline"]
    k, baseline = h["k"], data.get("baseline_variant", "bos_top/zero/none")
    out = [f"Beyond the BOS dims at k = {k}, over the {data['n_sink_heads']} sink-specialized heads on held-out "
           f"prompts: the best variant without a search, {h['best_variant']}, has a median attention error of "
           f"{h['best_frob_rel_median']:.2f} against {h['baseline_frob_rel_median']:.2f} for {baseline}."]
    if "sample_best_variant" in h:
        floor = data.get("optimized_in_sample_best_at_k")
        in_sample = (f"; fitted and measured on the same prompts, the optimized search reaches {floor:.2f}"
                     if _measured(floor) else "")
        out.append(f"On {_plural(h['n_heads_compared'], 'head')} with the optimized search, the best is "
                   f"{h['sample_best_variant']} ({h['sample_best_frob_rel_median']:.2f}){in_sample}; bos_top and "
                   f"optimized share {_share(h['bos_optimized_overlap_mean'], 0)} of their kept dims.")
    if "selection_heads_best" in h:
        target = (data.get("selection") or {}).get("target_retention")
        at = f" at {_share(target, 0)} retention" if target is not None else ""
        out.append(f"Layer selection{at}: {h['best_variant']} QK-prunes {h['selection_heads_best']} heads "
                   f"({h['selection_params_best']:,} Q/K parameters), {baseline} {h['selection_heads_bos_top']} "
                   f"heads ({h['selection_params_bos_top']:,}).")
    return out


def _gain_text(gain: Any, low: Any, high: Any = None) -> str:
    """``+1.23 % (lower bound -0.40 %)`` of a gain stored as a fraction."""
    bound = f"{100 * low:+.2f} %" if _measured(low) else "-"
    return f"{100 * gain:+.2f} % (bootstrap lower bound {bound})"


def attention_calibration(data: dict) -> list[str]:
    """Sentences of notebook 08's ``attention_calibration.json``: how many heads the calibration search kept, the
    held-out gain of the kept set against ACT's recipe, what calibration does to the sinks, and the same heads
    pruned, removed and calibrated.

    Args:
        data: the summary's content.
    """
    h = data["headline"]
    metric, cost = data.get("metric", "the metric"), data.get("cost") or {}
    spent = cost.get("total")
    spent_text = f" ({spent:.1f} forward-equivalents)" if _measured(spent) else ""
    out = [f"Attention calibration (ACT): of {_plural(h['n_head_candidates'], 'candidate head')} calibrated one at "
           f"a time{spent_text}, {h['n_kept_heads']} raised {metric} with a bootstrap lower bound above 0."]
    recipe = (f"ACT's recipe (every head of layers 2 to L-2) changes it by "
              f"{_gain_text(h['act_recipe_gain'], h['act_recipe_gain_low'])}" if _measured(h["act_recipe_gain"])
              else "")
    if _measured(h["kept_gain"]):
        out.append(f"On held-out items the kept heads calibrated together change {metric} by "
                   f"{_gain_text(h['kept_gain'], h['kept_gain_low'])}" + (f"; {recipe}." if recipe else "."))
    elif recipe:
        out.append(f"On held-out items {recipe}.")
    if _measured(h["alpha0_change"]):
        out.append(f"Calibrated, the shown heads' alpha_0 changes by {h['alpha0_change']:+.3f} and their non-first "
                   f"sinks per prompt go from {h['non_first_sinks_before']:.2f} to {h['non_first_sinks_after']:.2f}.")
    if _measured(h["same_heads_qk_retention"]):
        layer_set = data.get("layer_set") or {}
        n = layer_set.get("n_heads")
        which = f"the {n} heads of notebook 05's best layer set" if layer_set.get("retention") is not None and n \
            else "the same heads"
        out.append(f"On {which}, {metric} retention is {_share(h['same_heads_qk_retention'])} QK-pruned, "
                   f"{_share(h['same_heads_removal_retention'])} removed whole and "
                   f"{_share(h['same_heads_qk_calibration_retention'])} QK-pruned and calibrated.")
    return out


def streaming_heads(data: dict) -> list[str]:
    """Sentences of notebook 09's ``streaming_heads.json``: the streamed loss past the trained context, the
    per-KV-head streaming score against alpha_0 and the sink-specialized heads, the KV budget and the sink count.

    Args:
        data: the summary's content.
    """
    h = data["headline"]
    settings = data.get("settings") or {}
    sink, n_ctx = settings.get("sink"), (data.get("model") or {}).get("n_ctx")
    out = []
    if "ppl_past_context_sink_window" in h and n_ctx:
        window_only = (f"; window only (no sinks) reaches {h['ppl_past_context_window_only']:.1f}"
                       if "ppl_past_context_window_only" in h else "")
        out.append(f"Streaming {h['curve_tokens']:,} tokens with {sink} sinks + a {settings.get('curve_window')}-token "
                   f"window and StreamingLLM's position shift, the perplexity past the trained {n_ctx:,}-token "
                   f"context is {h['ppl_past_context_sink_window']:.2f}{window_only}.")
    comparison = data.get("comparison") or {}
    if "spearman_score_alpha0" in h and comparison:
        rho = h["spearman_score_alpha0"]
        corr = f"Spearman {rho:+.2f} with alpha_0" if _measured(rho) else "no rank correlation with alpha_0"
        non_first = h.get("spearman_score_non_first")
        corr += f", {non_first:+.2f} with the non-first sink count" if _measured(non_first) else ""
        out.append(f"Per KV head ({sink} sinks + {settings.get('score_window')} keys on "
                   f"{settings.get('score_len')}-token text), the streaming score has {corr}; "
                   f"{h['sink_groups_among_cheap']} of the {_plural(h['n_sink_groups'], 'KV group')} holding a "
                   f"sink-specialized head are among the {comparison.get('n_cheap')} cheapest to stream.")
    budget = data.get("kv_budget") or []
    if budget:
        n_kv = comparison.get("n_kv_heads")
        parts = [f"{row['tolerance']:g} nats: {row['kv_heads']}{f'/{n_kv}' if n_kv else ''} KV heads "
                 f"(held out {row['held_out_increase']:+.3f}, {row['saved_mib']:.0f} of {row['cache_mib']:.0f} MiB; "
                 f"Llama-2-7B shape {row['llama2_7b_saved_gib']:.2f} of {row['llama2_7b_cache_gib']:.0f} GiB)"
                 for row in budget]
        out.append(f"KV budget at {data.get('kv_context') or 8192:,} tokens, per tolerance: {'; '.join(parts)}.")
    by_sinks, by_initial = h.get("ppl_by_sinks") or {}, h.get("ppl_by_initial") or {}
    if by_sinks:
        table = ", ".join(f"{s}: {p:.2f}" for s, p in by_sinks.items())
        tail = (f"; four newlines in place of BOS {by_initial['newline']:.2f} against {by_initial['bos']:.2f}"
                if {"bos", "newline"} <= set(by_initial) else "")
        out.append(f"Perplexity by sink count at a {settings.get('ablation_window')}-token window ({table}){tail}.")
    return out


BUILDERS: dict[str, Callable[[dict], list[str]]] = {
    "sink_discovery.json": sink_discovery, HEAD_LIST_FILE: specialized_heads, "topk_pruning.json": topk_pruning,
    "reconstruction_error.json": reconstruction_error, "layer_selection.json": layer_selection,
    "long_context.json": long_context, "beyond_bos_dims.json": beyond_bos_dims,
    "attention_calibration.json": attention_calibration,
    "streaming_heads.json": streaming_heads,
}


def head_counts(summaries: Sequence[Summary]) -> dict[str, int]:
    """``{file: count}`` of sink-specialized heads each summary reports (its head list, or ``n_sink_heads``).

    Args:
        summaries: the run's summaries (:func:`sinklens.series.outputs.run_summaries`).
    """
    counts = {}
    for summary in summaries:
        data = summary.data if isinstance(summary.data, dict) else {}
        headline = data.get("headline") if isinstance(data.get("headline"), dict) else {}
        if summary.path.name == HEAD_LIST_FILE and isinstance(data.get("heads"), list):
            counts[summary.path.name] = len(data["heads"])
        elif isinstance(headline.get("n_sink_heads", data.get("n_sink_heads")), int):
            counts[summary.path.name] = headline.get("n_sink_heads", data.get("n_sink_heads"))
    return counts


def findings(summaries: Sequence[Summary]) -> list[str]:
    """The run's findings, one or more sentences per known summary, in notebook order.

    Args:
        summaries: the run's summaries (:func:`sinklens.series.outputs.run_summaries`).
    """
    out: list[str] = []
    for summary in summaries:
        builder = BUILDERS.get(Path(summary.path).name)
        if builder is None or not isinstance(summary.data, dict):
            continue
        try:
            out += builder(summary.data)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            continue  # an older or partial summary: its numbers still show in the headline tables
    counts = head_counts(summaries)
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{count} ({name})" for name, count in counts.items())
        out.append(f"The notebooks of this run worked on different lists of sink-specialized heads: {listed}.")
    return out
