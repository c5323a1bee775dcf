"""Headline numbers of a run: the key numbers of each summary, with labels and units, and the README's block.

A summary chooses its headline numbers with a top-level ``"headline"`` mapping; otherwise they
are its top-level scalars and the scalars of its small mappings. The README block between
``<!-- headline:start -->`` and ``<!-- headline:end -->`` is rewritten only on request
(``python -m sinklens headline``, ``make headline``), from a successful default run of the
embedded model: a run never writes into the checkout.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..core.choices import EMBEDDED_MODELS
from ..core.errors import InputError
from ..core.files import atomic_write_text
from .findings import findings
from .outputs import Summary, attribute_outputs, read_run_manifest, run_summaries
from .wording import label

HEADLINE_START = "<!-- headline:start -->"
HEADLINE_END = "<!-- headline:end -->"
# keys of a JSON summary that describe the setting, not results: shown in full, never as headline numbers
CONTEXT_KEYS = frozenset({"model", "parameters", "probe", "first_token", "versions"})
MAX_HEADLINE = 12  # headline numbers per summary


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 80)


def headline_numbers(summary: Any, limit: int = MAX_HEADLINE) -> list[tuple[str, Any]]:
    """The key numbers of one JSON summary, as ``(key, value)``.

    A summary may choose them itself with a top-level ``"headline"`` mapping; otherwise they are its
    top-level scalars (numbers, flags, short strings) and the scalars of its small mappings (at most
    6 entries, named ``outer.inner``), skipping the setting (``model``, ``parameters``, ``probe``,
    ``first_token``, ``versions``).

    Args:
        summary: the content of a JSON summary.
        limit: the most numbers returned.
    """
    if not isinstance(summary, dict):
        return []
    if isinstance(summary.get("headline"), dict):
        summary = summary["headline"]
    items: list[tuple[str, Any]] = []
    for key, value in summary.items():
        if key in CONTEXT_KEYS:
            continue
        if _is_scalar(value):
            items.append((key, value))
        elif isinstance(value, dict) and len(value) <= 6:
            items += [(f"{key}.{inner}", v) for inner, v in value.items() if _is_scalar(v)]
    return items[:limit]


def format_value(value: Any) -> str:
    """A number or flag as text: floats to 4 significant digits, None as a dash.

    Args:
        value: a scalar from a summary.
    """
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def labelled(key: str, value: Any) -> tuple[str, str]:
    """``(label, value with its unit)`` of one headline number, e.g. ``("sink rate ...", "67.6 %")``.

    Args:
        key: the number's key in its summary (``outer.inner`` for a mapping's entry).
        value: the stored value.
    """
    name = label(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name.scale != 1:
        value = float(value) * name.scale
    text = format_value(value)
    return name.text, f"{text} {name.unit}" if name.unit and value is not None else text


def provenance(manifest: dict) -> str:
    """Which commit made a run, e.g. ``"commit abc1234def with uncommitted changes"``.

    Args:
        manifest: the run's manifest.
    """
    git = manifest.get("git") or {}
    commit = git.get("commit")
    text = f"commit {commit[:10]}" if commit else "no git commit recorded"
    if git.get("dirty"):
        text += " with uncommitted changes"
    return text


def summaries_of(run_dir: str | os.PathLike, manifest: dict | None = None) -> list[Summary]:
    """The JSON summaries of a run folder, in notebook order.

    Args:
        run_dir: the run folder.
        manifest: its manifest (read from the folder when None).
    """
    run_dir = Path(run_dir)
    return run_summaries(run_dir, *attribute_outputs(run_dir, manifest if manifest is not None
                                                      else read_run_manifest(run_dir)))


def headline_markdown(run_dir: str | os.PathLike, manifest: dict | None = None) -> str:
    """The README block: which run and commit produced the numbers, its findings, then one table per summary.

    Args:
        run_dir: the run folder.
        manifest: its manifest (read from the folder when None).
    """
    run_dir = Path(run_dir)
    manifest = manifest if manifest is not None else read_run_manifest(run_dir)
    name = Path(manifest.get("run_dir") or run_dir).name
    command = " ".join(["python -m sinklens", *map(str, manifest.get("argv") or ["run"])])
    lines = [f"Run `{name}`: `{command}`, model `{manifest.get('model')}`, {provenance(manifest)}, "
             f"started {manifest.get('started', '?')}, status {manifest.get('status', '?')}."]
    summaries = summaries_of(run_dir, manifest)
    if not summaries:
        return "\n".join([*lines, "", "(This run wrote no JSON summaries.)"])
    lines += ["", "Findings:", ""] + [f"- {sentence}" for sentence in findings(summaries)]
    for summary in summaries:
        source = f" ({summary.notebook})" if summary.notebook else ""
        lines += ["", f"`{summary.path.name}`{source}:", "", "| number | value |", "| --- | --- |"]
        rows = [labelled(key, value) for key, value in headline_numbers(summary.data)]
        lines += [f"| {text} | {value.replace('|', '/')} |" for text, value in rows] or ["| - | - |"]
    return "\n".join(lines)


def check_reference_run(manifest: dict, run_dir: str | os.PathLike) -> None:
    """Refuse a run whose numbers must not stand in the README: not a successful default run of the embedded model.

    Args:
        manifest: the run's manifest.
        run_dir: the run folder (named in the error).
    """
    why = []
    if manifest.get("status") != "ok":
        why.append(f"its status is {manifest.get('status')!r}")
    if not manifest.get("default_run"):
        why.append("it is not a default run (the whole series, no --ci, --only, -p or --params)")
    if manifest.get("model") not in EMBEDDED_MODELS:
        why.append(f"its model {manifest.get('model')!r} is not the embedded one")
    if why:
        raise InputError(f"{run_dir} cannot give the README's headline numbers: {'; '.join(why)}. Run `make run` "
                         "(no ARGS) first, then `make headline`.")


def update_readme_headline(readme: str | os.PathLike, run_dir: str | os.PathLike,
                           manifest: dict | None = None) -> bool:
    """Rewrite the README text between ``<!-- headline:start -->`` and ``<!-- headline:end -->`` with the
    run's headline numbers; nothing else changes. Returns whether the file changed (False when it
    already held the same block).

    Args:
        readme: the README file.
        run_dir: the run folder the numbers come from.
        manifest: its manifest (read from the folder when None).
    """
    readme = Path(readme)
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"Cannot read {readme}: {err.strerror or err}. Pass the project's README.md.") from None
    starts, ends = text.count(HEADLINE_START), text.count(HEADLINE_END)
    if starts != 1 or ends != 1 or text.index(HEADLINE_START) > text.index(HEADLINE_END):
        raise InputError(f"{readme} needs exactly one `{HEADLINE_START}` line followed by one `{HEADLINE_END}` line "
                         f"(found {starts} and {ends}): add both where the headline numbers should go.")
    head, rest = text.split(HEADLINE_START)
    _, tail = rest.split(HEADLINE_END)
    new = f"{head}{HEADLINE_START}\n{headline_markdown(run_dir, manifest)}\n{HEADLINE_END}{tail}"
    if new == text:
        return False
    atomic_write_text(readme, new, what="README")
    return True
