"""Each notebook's summary (the JSON a run writes, with its ``headline``), built by one function per notebook:

- 01 :func:`sink_discovery_summary` (:mod:`.sink_discovery`, with the census readings notebooks 01, 02 and 06
  show: strongest sink head, first token, non-first sinks by token, the with/without-BOS verdict);
- 06 :func:`long_context_summary` (:mod:`.long_context`).

Notebooks call them through ``sl.summaries``; no summary arithmetic happens in a cell.
"""

from ...measure.census import CASE_AFTER_BOS, CASE_BOS, CASE_NO_BOS
from .long_context import long_context_details, long_context_headline, long_context_summary
from .sink_discovery import (
    first_token_record,
    first_token_verdict,
    non_first_summary,
    sink_discovery_summary,
    strongest_sink_head,
)

__all__ = [
    "CASE_AFTER_BOS", "CASE_BOS", "CASE_NO_BOS", "first_token_record", "first_token_verdict", "long_context_details",
    "long_context_headline", "long_context_summary", "non_first_summary", "sink_discovery_summary",
    "strongest_sink_head",
]
