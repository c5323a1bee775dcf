"""One list of sink-specialized heads per run.

Notebook 02 measures the sink-specialized heads and writes them, with the probe and the
definition (eps, q) it used, as ``specialized_heads.json`` (:func:`head_list_record`).
Notebooks 03-05 take that list through their ``heads_from`` parameter: the runner passes this
run's file to them, so one run reports one count. Opened alone (``heads_from = ""``) they
measure the heads themselves, as notebook 02 does (:func:`specialized_heads`).

A ``heads_from`` file is checked before any heavy work: it must exist, be a head list, belong
to the loaded model (name and shape), list heads inside the model, and use the notebook's eps
and q. Each failure names the file and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import InputError
from ..core.loading import model_info
from ..core.tokens import TokenBatch
from ..measure.census import run_census
from ..measure.specialization import sink_specialized_heads
from ..prune.spec import check_heads, layer_heads

HEAD_LIST_FILE = "specialized_heads.json"
MEASURED = "measured"
_MEASURE_HINT = "or leave heads_from empty to measure the heads in this notebook"


@dataclass(frozen=True)
class HeadList:
    """Sink-specialized heads and where they come from.

    ``heads``: sorted ``(layer, head)`` pairs; ``eps``/``q``: their definition (alpha_0 > eps on
    at least a fraction q of the probe prompts); ``model``: ``model_info(...).as_dict()`` of the
    model they were measured on; ``probe``: the probe prompts (at least ``n_prompts`` and
    ``seq_len``); ``source``: the file they were read from, or ``"measured"``.
    """

    heads: list[tuple[int, int]]
    eps: float
    q: float
    model: dict
    probe: dict
    source: str

    @property
    def layers(self) -> list[int]:
        """The layers that hold at least one of the heads, sorted."""
        return sorted({layer for layer, _ in self.heads})

    def as_dict(self) -> dict:
        """What a notebook summary stores about its heads: source, count, definition and probe."""
        return {"heads_from": self.source, "n_sink_heads": len(self.heads), "eps": self.eps, "q": self.q,
                "probe": self.probe}


def head_list_record(model, heads: Sequence[tuple[int, int]], *, eps: float, q: float, probe: dict,
                     prepend_bos: bool, n_boot: int | None = None, parameters: dict | None = None) -> dict:
    """The JSON notebook 02 writes as ``specialized_heads.json``: the heads with the definition, probe and model.

    Args:
        model: the bridge the heads were measured on (its ``model_info`` is stored, to refuse another model).
        heads: the sink-specialized ``(layer, head)`` pairs (``sinklens.sink_specialized_heads``).
        eps: the sink threshold on alpha_0 used.
        q: the fraction of prompts on which a head had to exceed ``eps``.
        probe: the probe set, at least ``n_prompts`` and ``seq_len`` (e.g. ``probe_provenance()`` plus sizes).
        prepend_bos: whether the probe prompts started with BOS.
        n_boot: bootstrap resamples of the confidence intervals shown beside the list, if any.
        parameters: the notebook parameters, stored for provenance.
    """
    for key in ("n_prompts", "seq_len"):
        if not isinstance(probe, dict) or key not in probe:
            raise InputError(f"probe must be a dict with n_prompts and seq_len (the probe the heads were measured "
                             f"on), got {probe!r}.")
    info = model_info(model)
    try:
        listed = _check_pairs(heads, info.n_layers, info.n_heads, "heads")
    except ValueError as err:
        raise InputError(f"{err}: pass the pairs sinklens.sink_specialized_heads returns for this model.") from None
    n_heads = info.n_layers * info.n_heads
    return {"heads": [list(pair) for pair in listed], "n_specialized": len(listed), "n_heads": n_heads,
            "eps": eps, "q": q, "n_boot": n_boot, "model": info.as_dict(), "prepend_bos": prepend_bos,
            "probe": probe, "parameters": parameters,
            "headline": {"n_specialized": len(listed), "n_heads": n_heads,
                         "specialized_pct": 100 * len(listed) / n_heads, "eps": eps, "q": q,
                         "n_prompts": probe["n_prompts"], "seq_len": probe["seq_len"]}}


def _check_pairs(heads: Any, n_layers: int, n_heads: int, where: str) -> list[tuple[int, int]]:
    """Sorted distinct (layer, head) int pairs inside an n_layers x n_heads model; else ValueError."""
    if not isinstance(heads, (list, tuple)):
        raise ValueError(f"{where} must be a list of [layer, head] pairs, got {type(heads).__name__}")
    pairs = []
    for pair in heads:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
            raise ValueError(f"{where} holds {pair!r}, not a [layer, head] pair of ints")
        layer, head = pair
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"{where} lists head ({layer}, {head}), outside a model of {n_layers} layers x "
                             f"{n_heads} heads")
        pairs.append((layer, head))
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"{where} lists a head twice")
    return sorted(pairs)


def read_head_list(path: str | os.PathLike) -> HeadList:
    """Read a ``specialized_heads.json`` and check it is a consistent head list (no model needed).

    Args:
        path: the file, e.g. ``runs/latest/specialized_heads.json``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"heads_from {path}: no such file. In a series notebook 02 writes it into the run folder "
                         f"(run it before this notebook); otherwise pass the {HEAD_LIST_FILE} of an earlier run of "
                         f"this model, {_MEASURE_HINT}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise ValueError("no 'model' record")
        model = data["model"]
        shape = model.get("n_layers"), model.get("n_heads")
        if not all(isinstance(v, int) and v > 0 for v in shape):
            raise ValueError("its model record has no n_layers/n_heads")
        heads = _check_pairs(data.get("heads"), *shape, "its 'heads'")
        eps, q, probe = data.get("eps"), data.get("q"), data.get("probe")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (eps, q)):
            raise ValueError("no eps/q")
        if not isinstance(probe, dict):
            raise ValueError("no probe record")
    except (OSError, ValueError) as err:
        raise InputError(f"heads_from {path} is not a head list written by notebook 02 ({err}): pass a "
                         f"{HEAD_LIST_FILE} from a run folder, {_MEASURE_HINT}.") from None
    return HeadList(heads=heads, eps=float(eps), q=float(q), model=model, probe=probe, source=str(path))


def same_model_name(a: str, b: str) -> bool:
    """Whether two model names given to ``load_model`` mean the same model: equal text, or the same folder.

    Args:
        a: one name (bundled name, checkpoint folder or hub id).
        b: the other.
    """
    if a == b:
        return True
    first, second = Path(str(a)).expanduser(), Path(str(b)).expanduser()
    return first.is_dir() and second.is_dir() and first.resolve() == second.resolve()


def check_model_name(listed: HeadList, model_name: str) -> HeadList:
    """Refuse a head list measured on another model than ``model_name`` (by name, before any model is loaded).

    Args:
        listed: a head list from :func:`read_head_list`.
        model_name: the model the notebooks will load (e.g. the runner's ``--model``).
    """
    if not same_model_name(str(listed.model.get("name")), model_name):
        raise InputError(f"heads_from {listed.source} holds the heads of model {listed.model.get('name')!r}, not of "
                         f"{model_name!r}: pass the {HEAD_LIST_FILE} of a run of {model_name}, {_MEASURE_HINT}.")
    return listed


def check_head_list(listed: HeadList, model, *, eps: float, q: float) -> HeadList:
    """Check a head list against the loaded model and the notebook's definition; return it.

    Args:
        listed: a head list from :func:`read_head_list`.
        model: the loaded bridge the notebook works on.
        eps: the notebook's sink threshold: must be the one the list was measured with.
        q: the notebook's fraction of prompts: must be the one the list was measured with.
    """
    info = model_info(model)
    check_model_name(listed, info.name)
    shape = {key: listed.model.get(key) for key in ("n_layers", "n_heads", "d_model")}
    if shape != {key: getattr(info, key) for key in shape}:
        raise InputError(f"heads_from {listed.source} was measured on a model of shape {shape}, but {info.name!r} has "
                         f"{info.n_layers} layers, {info.n_heads} heads and d_model {info.d_model}: pass the "
                         f"{HEAD_LIST_FILE} of a run of this model, {_MEASURE_HINT}.")
    if (listed.eps, listed.q) != (eps, q):
        raise InputError(f"heads_from {listed.source} was measured with eps={listed.eps}, q={listed.q}, but this "
                         f"notebook has eps={eps}, q={q}: pass the same eps and q (a series run does), "
                         f"{_MEASURE_HINT}.")
    return listed


def series_head_list(heads_from: str, model, *, eps: float, q: float) -> HeadList | None:
    """The run's head list named by a notebook's ``heads_from`` parameter, checked; None when it is empty.

    Args:
        heads_from: path of a ``specialized_heads.json``; ``""`` when the notebook measures its own heads.
        model: the loaded bridge.
        eps: the notebook's sink threshold on alpha_0.
        q: the notebook's fraction of prompts.
    """
    if not isinstance(heads_from, str):
        raise InputError(f"heads_from must be a path (str), got {heads_from!r}.")
    if not heads_from:
        return None
    return check_head_list(read_head_list(heads_from), model, eps=eps, q=q)


def specialized_heads(model, probe: TokenBatch, *, heads_from: str = "", eps: float = 0.3, q: float = 0.9,
                      batch_size: int = 8) -> HeadList:
    """The sink-specialized heads a notebook works on: the run's list when ``heads_from`` names one, else
    measured here on ``probe`` (a census, then alpha_0 > eps on at least a fraction q of its prompts).

    Args:
        model: the loaded bridge.
        probe: the probe prompts (BOS prepended) to measure on when ``heads_from`` is empty.
        heads_from: path of this run's ``specialized_heads.json``, or ``""`` to measure.
        eps: sink threshold on alpha_0.
        q: fraction of prompts on which a head must exceed ``eps``.
        batch_size: prompts per forward of the census.
    """
    listed = series_head_list(heads_from, model, eps=eps, q=q)
    if listed is not None:
        return listed
    if not isinstance(probe, TokenBatch):
        raise InputError(f"probe must be a TokenBatch (sinklens.probe_tokens), got {type(probe).__name__}.")
    census = run_census(model, probe, batch_size=batch_size)
    heads = sink_specialized_heads(census.sink_scores(0), eps=eps, q=q, layers=census.layers)
    n_prompts, seq_len = probe.tokens.shape
    return HeadList(heads=sorted(heads), eps=eps, q=q, model=model_info(model).as_dict(),
                    probe={"n_prompts": int(n_prompts), "seq_len": int(seq_len), "prepend_bos": probe.prepend_bos},
                    source=MEASURED)



# --- the best layer set of notebook 05 (notebook 08 compares pruning and calibration on its heads) ------------------

SELECTION_FILE = "layer_selection.json"


@dataclass(frozen=True)
class LayerSet:
    """Heads that a later notebook edits together: notebook 05's best layer set, or a stated fallback.

    ``heads``: sorted ``(layer, head)`` pairs; ``k``: the kept dims of the selection's pruning (None for the fallback);
    ``retention``: its held-out retention (None for the fallback); ``source``: the file read, or the fallback's
    description.
    """

    heads: list[tuple[int, int]]
    k: int | None
    retention: float | None
    source: str

    @property
    def layers(self) -> list[int]:
        """The layers that hold the heads, sorted."""
        return sorted({layer for layer, _ in self.heads})

    def as_dict(self) -> dict:
        """What a notebook summary stores about the set."""
        return {"source": self.source, "layers": self.layers, "n_heads": len(self.heads), "k": self.k,
                "retention": self.retention}


def best_layer_set(model, sink: HeadList, *, selection_from: str = "") -> LayerSet:
    """The sink-specialized heads of notebook 05's best layer set (``selection_from``: the run's
    ``layer_selection.json``, checked against the model), or, when it is empty or its selection met no target,
    the fallback: the sink-specialized heads of the layer holding most of them (notebook 03's default layer).

    Args:
        model: the loaded bridge.
        sink: the run's sink-specialized heads (:func:`specialized_heads`), for the fallback.
        selection_from: path of this run's ``layer_selection.json``, or ``""``.
    """
    if not isinstance(selection_from, str):
        raise InputError(f"selection_from must be a path (str), got {selection_from!r}.")
    info = model_info(model)
    fallback = "the sink-specialized heads of the layer holding most of them"
    if selection_from:
        path = Path(selection_from).expanduser()
        if not path.is_file():
            raise InputError(f"selection_from {path}: no such file. In a series notebook 05 writes it into the run "
                             "folder; or leave selection_from empty for the fallback (the layer with most "
                             "sink-specialized heads).")
        try:
            data = json.loads(path.read_text())
            settings, best = data["settings"], data["best"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(f"selection_from {path} is not a layer_selection.json written by notebook 05 ({err}).")
        if settings.get("model") != info.name:
            raise InputError(f"selection_from {path} holds the selection of model {settings.get('model')!r}, not of "
                             f"{info.name!r}: pass this run's file, or leave selection_from empty.")
        if best is not None:
            heads = check_heads([tuple(h) for h in best["heads"]], info)
            return LayerSet(heads=sorted(heads), k=int(settings["k"]), retention=float(best["retention"]),
                            source=str(path))
        fallback += f" ({path} met no retention target)"
    _, heads = layer_heads(sink.heads, -1)
    return LayerSet(heads=heads, k=None, retention=None, source=fallback)
