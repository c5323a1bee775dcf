"""Each notebook's summary (the JSON a run writes, with its ``headline``), built by one function per notebook:

- 01 :func:`sink_discovery_summary` (:mod:`.sink_discovery`, with the census readings notebooks 01, 02 and 06
  show: strongest sink head, first token, non-first sinks by token, the with/without-BOS verdict);
- 03 :func:`topk_pruning_summary` (:mod:`.topk_pruning`);
- 04 :func:`reconstruction_error_summary` (:mod:`.reconstruction_error`);
- 05 :func:`layer_selection_summary` (:mod:`.layer_selection`);
- 06 :func:`long_context_summary` (:mod:`.long_context`);
- 07 :func:`beyond_bos_summary` (:mod:`.beyond_bos_dims`);
- 08 :func:`attention_calibration_summary` (:mod:`.attention_calibration`);
- 09 :func:`streaming_heads_summary` (:mod:`.streaming_heads`).

Notebook 02's summary is the run's head list (``sinklens.series.head_list``), which notebooks 03-05 read back.

Notebooks call them through ``sl.summaries``; no summary arithmetic happens in a cell.
"""

from ...measure.census import CASE_AFTER_BOS, CASE_BOS, CASE_NO_BOS
from .attention_calibration import attention_calibration_headline, attention_calibration_summary
from .beyond_bos_dims import beyond_bos_headline, beyond_bos_summary, selection_headline
from .layer_selection import layer_selection_headline, layer_selection_summary
from .long_context import long_context_details, long_context_headline, long_context_summary
from .reconstruction_error import k_sweep_headline, reconstruction_error_summary
from .sink_discovery import (
    first_token_record,
    first_token_verdict,
    non_first_summary,
    sink_discovery_summary,
    strongest_sink_head,
)
from .streaming_heads import curve_record, streaming_heads_headline, streaming_heads_summary
from .topk_pruning import reconstruction_headline, topk_pruning_summary

__all__ = [
    "CASE_AFTER_BOS", "CASE_BOS", "CASE_NO_BOS", "attention_calibration_headline", "attention_calibration_summary",
    "beyond_bos_headline", "beyond_bos_summary", "first_token_record",
    "first_token_verdict", "k_sweep_headline", "layer_selection_headline", "layer_selection_summary",
    "long_context_details", "long_context_headline", "long_context_summary", "non_first_summary",
    "reconstruction_error_summary", "reconstruction_headline", "selection_headline", "sink_discovery_summary",
    "strongest_sink_head", "topk_pruning_summary",
    "curve_record", "streaming_heads_headline", "streaming_heads_summary",
]
