"""Accuracy of a (pruned) model on an offline suite, and retention against the dense model.

Three parts, each scored from next-token log-probabilities in float32:

- ``lm``: language modelling on the probe text's ``"held_out"`` split (never the probe prompts):
  perplexity ``exp(sum NLL / n_tokens)`` and next-token top-1 accuracy over every text token.
- ``mc``: zero-shot multiple choice on the bundled items (``sinklens/data``, see its README), scored
  as lm-evaluation-harness scores ``output_type: multiple_choice``: the context and each choice are
  encoded like ``LM._encode_pair`` (trailing context spaces move to the continuation; continuation
  tokens = tokens of context+choice after the context's tokens), ``acc`` = argmax of the summed
  continuation log-likelihood, ``acc_norm`` = argmax of that sum divided by the choice string's
  length in characters (the harness's ``completion_len``: ``len(choice)``, here with its leading
  space; the bundled items are ASCII, so this is also their length in UTF-8 bytes). Per task type,
  and ``mc/acc``, ``mc/acc_norm`` = mean over task types.
- ``copy``: in-context copying: a random token sequence r of length m, then r again; accuracy of
  next-token prediction of r[1:] in the second copy (r[0] of the copy is not predictable).

``acc/mean`` is the mean of the parts' accuracies (lm/acc, mc/acc, copy/acc) the suite has. With
``prepend_bos=True`` (default) every sequence starts with BOS, the setting the sink study uses.

Modules, one concept each:

- :mod:`.items`: the JSONL item file (bundled or a user's), read and validated;
- :mod:`.requests`: the scoring requests of each part and their batching;
- :mod:`.forward`: the forward that scores a batch (the bridge's own layers, a block mask);
- :mod:`.metrics`: the per-item table, :class:`EvalResult` (a read-only mapping of metric -> value),
  retention with its paired bootstrap CI;
- :mod:`.plan`: :class:`EvalPlan` (requests built once, run on any edit), :func:`build_plan`, :func:`evaluate`.
"""

from .forward import additive_mask, forward_scores
from .items import ITEMS_FILE, bundled_items_path, items_digest, load_items
from .metrics import (
    ITEM_COLUMNS,
    MEAN_ACC,
    EvalResult,
    compute_metrics,
    lower_is_better,
    per_item_table,
    retention,
    retention_value,
)
from .plan import PARTS, SUITES, EvalPlan, Suite, build_plan, check_suite, evaluate, plan_fingerprint
from .requests import SPLITS, Batch, Split, copy_vocabulary, encode_pair

__all__ = [
    "ITEMS_FILE", "ITEM_COLUMNS", "MEAN_ACC", "PARTS", "SPLITS", "SUITES", "Batch", "EvalPlan", "EvalResult", "Split",
    "Suite", "additive_mask", "build_plan", "bundled_items_path", "check_suite", "compute_metrics", "copy_vocabulary",
    "encode_pair", "evaluate", "forward_scores", "items_digest", "load_items", "lower_is_better", "per_item_table",
    "plan_fingerprint", "retention", "retention_value",
]
