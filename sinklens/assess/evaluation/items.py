"""The multiple-choice item file: the bundled JSONL (``sinklens/data``) or a user's own, read and validated.

One JSON object per line: ``id`` (unique str), ``task`` (str), ``context`` (non-empty str), ``choices``
(list of >= 2 distinct non-empty str, each with its leading space), ``gold`` (index into choices);
optional ``family`` (str). The schema and the items' provenance are in ``sinklens/data/README.md``.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import pandas as pd

from ...core.errors import InputError

ITEMS_FILE = "zero_shot_items.jsonl"
ITEM_FIELDS = ("id", "task", "family", "context", "choices", "gold")
_REQUIRED = ("id", "task", "context", "choices", "gold")


def bundled_items_path() -> Path:
    """Path of the bundled multiple-choice item file (package data, found wherever sinklens is installed)."""
    return Path(str(resources.files("sinklens") / "data" / ITEMS_FILE))


def load_items(path: str | Path | None = None) -> pd.DataFrame:
    """Read and validate a JSONL item file; one row per item (columns id, task, family, context, choices, gold).

    Every line is checked before anything is tokenized, and an error names the file and line and says
    how to fix the item.

    Args:
        path: a JSONL item file (schema above), or None for the bundled items.
    """
    path = bundled_items_path() if path is None else Path(path)
    if not path.is_file():
        raise InputError(f"Item file {path} does not exist: pass the path of a JSONL item file (schema in "
                         "sinklens/data/README.md) or None for the bundled items.")
    rows, seen = [], {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{where}: not valid JSON ({err.msg}). Fix: one JSON object per line.") from err
            rows.append(_check_item(item, where, seen, number))
    if not rows:
        raise InputError(f"{path} holds no items: add at least one JSON object per line.")
    frame = pd.DataFrame(rows)
    if "family" not in frame:
        frame["family"] = ""
    frame["family"] = frame["family"].fillna("")
    return frame[list(ITEM_FIELDS)]


def items_digest(path: str | Path | None = None) -> str:
    """A short hash of an item file's bytes, so results record which items they were computed on.

    Args:
        path: the item file, or None for the bundled items.
    """
    path = bundled_items_path() if path is None else Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _check_item(item, where: str, seen: dict, number: int) -> dict:
    fix = "Fix the item (schema: id, task, context, choices, gold; see sinklens/data/README.md)."
    if not isinstance(item, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(item).__name__}. {fix}")
    missing = [key for key in _REQUIRED if key not in item]
    if missing:
        raise InputError(f"{where}: missing field(s) {missing}. {fix}")
    for key in ("id", "task", "context"):
        if not isinstance(item[key], str) or not item[key].strip():
            raise InputError(f"{where}: {key} must be a non-empty string, got {item[key]!r}. {fix}")
    if item["id"] in seen:
        raise InputError(f"{where}: id {item['id']!r} already used on line {seen[item['id']]}. "
                         "Give every item a unique id.")
    seen[item["id"]] = number
    choices = item["choices"]
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise InputError(f"{where}: choices must be a list of at least 2 non-empty strings, got {choices!r}. {fix}")
    if len(set(choices)) != len(choices):
        raise InputError(f"{where}: choices {choices!r} hold duplicates. {fix}")
    gold = item["gold"]
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise InputError(f"{where}: gold must be an int index into choices (0..{len(choices) - 1}), "
                         f"got {gold!r}. {fix}")
    if "family" in item and not isinstance(item["family"], str):
        raise InputError(f"{where}: family must be a string, got {item['family']!r}. {fix}")
    return {key: item[key] for key in ITEM_FIELDS if key in item}
