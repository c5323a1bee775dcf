"""Sweep engine: evaluate edit configurations once, store each result as it finishes, resume.

Two kinds of configuration share one engine, one results file and one residual cache:

- layer configurations: the sweep's :class:`~sinklens.prune.spec.PruneSpec` holds every candidate head; a
  configuration prunes (``"qk"``: the spec restricted to the heads of a set of layers) or removes
  (``"head_removal"``) the spec's heads of a set of layers;
- head configurations: each option object of ``head_edits`` (e.g. :class:`~sinklens.prune.attention_calibration.
  CalibrationOptions`, method ``"calibration"``) edits a set of ``(layer, head)`` pairs (its ``apply(model, heads)``
  returns the persistent edit, restored after the configuration). Per-head searches (calibration, streaming scores)
  are batches of such configurations.

Every configuration evaluates an :class:`~sinklens.assess.evaluation.EvalPlan`. Results go to a
SQLite file, one row per configuration, committed in its own transaction as soon as it is computed,
keyed by a hash of the configuration, the evaluation plan, the pruning spec (the kept dims it
measured and, for a pruning fitted on a :class:`~sinklens.prune.calibration.CalibrationSet`, that set's fingerprint)
and the model's fingerprint. Each row's config holds the spec it pruned with
(``PruneSpec.from_dict`` reads it back). A rerun skips finished
rows; a sweep killed at any point (SIGKILL included) resumes without lost or duplicated rows.
A file written for another model, another sinklens version or another file schema is refused, naming the file
and what to do (schema 2 files, written before the vocabulary change: ``"remove"``, ``calibration``, are such).

Speed: pruning layer l cannot change anything below l. The residual stream entering every layer
is cached from one dense pass over the plan, and a configuration whose first edited layer is l
runs only layers l..L-1 from that cache. More generally the cache is keyed by the edits below
the layer, so a configuration extending a cached one (greedy selection) starts at its new layer.
(TransformerLens 4.3's ``forward(resid, start_at_layer=l)`` is no shortcut: it still executes
blocks 0..l-1 and discards their output, and for a float input it skips the mask-derived position
ids. :meth:`EvalPlan.run` calls the bridge's blocks itself from layer l, with explicit position
ids and attention mask; a test checks it against full forwards.)
Memory: the dense cache holds plan tokens x d_model x n_layers values per split (about 0.2 GB for
SmolLM2-135M and 3k tokens), on the model's device.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Protocol, get_args, runtime_checkable

import pandas as pd
import torch

from ..core.edits import active_edits, applied
from ..core.errors import InputError
from ..core.files import write_error
from ..core.loading import model_info
from ..core.validate import check_choice, check_index, check_int
from ..core.version import __version__
from ..prune.calibration import CalibrationSet, calibration_argument, calibration_need, resolve_calibration
from ..prune.dims import dims_of
from ..prune.pruning import prune_qk
from ..prune.removal import remove_heads
from ..prune.spec import Head, PruneSpec, check_heads, dims_records
from .evaluation import EvalPlan, EvalResult, plan_fingerprint

_WRITE_FIX = "free disk space, make the file and its folder writable, or close the program holding it"
SCHEMA = 3  # 2: configurations keyed and recorded by their PruneSpec; 3: the vocabulary (head_removal, temperature)
Method = Literal["dense", "qk", "head_removal"]
METHODS: tuple[str, ...] = get_args(Method)  # the layer methods; head-edit methods come from a sweep's head_edits


@runtime_checkable
class HeadEditOptions(Protocol):
    """What a sweep needs of a head edit's options (a frozen dataclass next to its edit in ``prune/``).

    ``method`` names the configurations it makes; ``apply(model, heads)`` applies the edit persistently (the sweep
    restores it); ``as_dict()`` describes the settings (part of every key: rows of other settings are not reused).
    ``per_sequence_pattern`` (optional, default False): the edit computes something per sequence, so the plans may
    not pack several MC choices behind one context.
    """

    method: ClassVar[str]

    def apply(self, model, heads: Sequence[Head]): ...

    def as_dict(self) -> dict: ...


def model_fingerprint(model) -> str:
    """A short hash of the model's shapes, dtype, device and a strided sample of every parameter's values.

    Computed on the unedited model (refused while pruning edits are active).

    Args:
        model: a bridge from :func:`sinklens.load_model`.
    """
    if active_edits(model):
        raise InputError("The model has active pruning edits: fingerprint (and sweep) the dense model; "
                         "restore the edits first.")
    shape = {k: v for k, v in model_info(model).as_dict().items() if k != "name"}  # the weights, not the path
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in model.original_model.named_parameters():
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            digest.update(name.encode())
            digest.update(str(tuple(param.shape)).encode())
            digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


# --- the results file ----------------------------------------------------------------------------

_LOCKS: dict[str, list] = {}  # results file -> [open lock file, users in this process]


def lock_results(path: Path) -> str | None:
    """Take the one-driver lock of a results file: an exclusive ``flock`` on ``<file>.lock`` beside it, held by this
    process (shared by its own sweeps) until :func:`unlock_results`. Another process holding it (a second driver,
    e.g. a second ``layer_selection`` on the same file) is refused naming the file: two writers would evaluate the
    same configurations twice. The lock dies with its process, so a killed driver leaves nothing to clean up.
    None when no lock file can be made beside it (a read-only folder: the results file cannot be written either,
    and opening it reports that).

    Args:
        path: the results file.
    """
    name = os.path.realpath(path)
    if name in _LOCKS:
        _LOCKS[name][1] += 1
        return name
    try:
        handle = open(name + ".lock", "a")
    except OSError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise InputError(f"Results file {path} is in use by another driver (another process holds {name}.lock): "
                         "one driver writes a results file. Wait for it to finish (or stop it), or pass another "
                         "results path.") from None
    _LOCKS[name] = [handle, 1]
    return name


def unlock_results(name: str | None) -> None:
    """Release one use of the lock taken by :func:`lock_results` (the lock itself when none is left).

    Args:
        name: what :func:`lock_results` returned.
    """
    entry = _LOCKS.get(name)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _LOCKS[name]
        entry[0].close()  # closing the file releases the flock


class ResultsFile:
    """SQLite results of one model and sinklens version; ``":memory:"`` (or None) keeps them in memory. A file on
    disk is locked for this process while open (:func:`lock_results`): a second driver is refused."""

    def __init__(self, path: str | Path | None, meta: Mapping[str, str], fresh: bool = False):
        self.path = ":memory:" if path is None or str(path) == ":memory:" else Path(path)
        self.lock = None
        if isinstance(self.path, Path):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise InputError(f"Cannot create the folder of results file {self.path}: {err}. "
                                 "Pass a writable path.") from err
            self.lock = lock_results(self.path)
        try:
            self._open(meta, fresh)
        except BaseException:
            if self.lock is not None:
                unlock_results(self.lock)
                self.lock = None
            raise

    def _open(self, meta: Mapping[str, str], fresh: bool) -> None:
        if isinstance(self.path, Path) and fresh and self.path.exists():
            self.path.unlink()
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=30)
            self.conn.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.conn.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, config TEXT NOT NULL, "
                              "metrics TEXT NOT NULL, extra TEXT NOT NULL, items BLOB NOT NULL, created REAL NOT NULL)")
            self.conn.commit()
            stored = dict(self.conn.execute("SELECT name, value FROM meta").fetchall())
        except sqlite3.OperationalError as err:  # read-only folder, full disk, locked by another process
            raise write_error(self.path, err, "results file", "Nothing was written", _WRITE_FIX) from err
        except sqlite3.DatabaseError as err:
            raise InputError(f"{self.path} is not a sinklens results file ({err}): pass another path, or fresh=True "
                             "to replace it.") from err
        if stored:
            self._check(stored, dict(meta))
        else:
            try:
                with self.conn:
                    self.conn.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
            except sqlite3.OperationalError as err:
                raise write_error(self.path, err, "results file", "Nothing was written", _WRITE_FIX) from err

    def _check(self, stored: dict, meta: dict) -> None:
        def describe(values: dict, name: str) -> str:
            if name == "fingerprint":
                return f"model {values.get('model')!r} (fingerprint {values.get('fingerprint')})"
            return repr(values.get(name))

        labels = {"schema": "results-file schema", "sinklens": "sinklens version", "fingerprint": "model"}
        for name, label in labels.items():
            if stored.get(name) != meta.get(name):
                raise InputError(
                    f"Results file {self.path} was written with {label} {describe(stored, name)}, but this sweep "
                    f"uses {describe(meta, name)}: its rows cannot be reused. Start fresh: delete the file, pass "
                    "another results path, or pass fresh=True (which deletes it).")

    def get(self, key: str) -> dict | None:
        """The stored configuration ``key`` (config, metrics, extra, items), or None.

        Args:
            key: the configuration's key (:meth:`Sweep.key`).
        """
        row = self.conn.execute("SELECT config, metrics, extra, items FROM results WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        config, metrics, extra, items = row
        table = pd.read_parquet(io.BytesIO(items))
        return {"config": json.loads(config), "metrics": json.loads(metrics), "extra": json.loads(extra),
                "items": table}

    def put(self, key: str, config: dict, result: EvalResult, extra: dict) -> None:
        """Append one finished configuration (its own transaction: durable once this returns).

        Args:
            key: the configuration's key (:meth:`Sweep.key`).
            config: its description (method, layers, heads, split, spec).
            result: its evaluation.
            extra: anything else worth keeping (parameters zeroed, start layer).
        """
        buffer = io.BytesIO()
        result.per_item.to_parquet(buffer, index=False)  # exact float64 round trip
        blob = buffer.getvalue()
        try:
            with self.conn:  # one transaction: the row is written whole or not at all
                self.conn.execute("INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?)",
                                  (key, json.dumps(config, sort_keys=True), json.dumps(result.metrics),
                                   json.dumps(extra, default=str), blob, time.time()))
        except sqlite3.OperationalError as err:  # full disk, read-only file or folder, locked by another process
            raise write_error(self.path, err, "results file", "This row was not written (its transaction was rolled "
                              "back); the rows before it are intact and a rerun resumes after them",
                              _WRITE_FIX) from err

    def __contains__(self, key: str) -> bool:
        return self.conn.execute("SELECT 1 FROM results WHERE key = ?", (key,)).fetchone() is not None

    def keys(self) -> list[str]:
        return [k for (k,) in self.conn.execute("SELECT key FROM results ORDER BY rowid")]

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def close(self) -> None:
        self.conn.close()
        if self.lock is not None:
            unlock_results(self.lock)
            self.lock = None


def open_results(model, path: str | Path | None, *, fresh: bool = False) -> ResultsFile:
    """Open (or create) the results file of ``model``, refusing one written for another model,
    sinklens version or schema.

    Args:
        model: a bridge from :func:`sinklens.load_model`, without active edits.
        path: the SQLite file (None or ``":memory:"``: in memory).
        fresh: delete an existing file first.
    """
    if not isinstance(fresh, bool):
        raise InputError(f"fresh must be True or False, got {fresh!r}.")
    meta = {"schema": str(SCHEMA), "sinklens": __version__, "model": model_info(model).name,
            "fingerprint": model_fingerprint(model)}
    return ResultsFile(path, meta, fresh=fresh)


# --- configurations ------------------------------------------------------------------------------

def _check_head_edits(head_edits: Sequence[HeadEditOptions], plans: Mapping[str, EvalPlan]) -> dict:
    """The head edits by method, checked before any forward: option objects, one per method, none taking a layer
    method's name, none computing per sequence while a plan packs MC choices behind one context."""
    if isinstance(head_edits, HeadEditOptions):
        head_edits = (head_edits,)
    out: dict[str, HeadEditOptions] = {}
    for options in head_edits:
        if not isinstance(options, HeadEditOptions):
            raise InputError(f"head_edits takes option objects of head edits (e.g. sinklens.CalibrationOptions()), "
                             f"got {type(options).__name__}.")
        if options.method in METHODS or options.method in out:
            raise InputError(f"head_edits: method {options.method!r} is "
                             f"{'a layer method' if options.method in METHODS else 'given twice'}: one option object "
                             "per head-edit method.")
        if getattr(options, "per_sequence_pattern", False):
            for name, plan in plans.items():
                if plan.shares_context:
                    raise InputError(f"Plan {name!r} packs each MC item's choices behind one shared context, but "
                                     f"{options.method!r} computes its edit per sequence, which a packed row cannot "
                                     "honour: build the plans with share_context=False.")
        out[options.method] = options
    return out


@dataclass
class Record:
    """One evaluated configuration."""

    method: str
    layers: tuple[int, ...]
    heads: tuple[Head, ...]
    split: str
    key: str
    result: EvalResult
    params: dict = field(default_factory=dict)
    cached: bool = False  # read from the results file
    spec: PruneSpec | None = None  # the pruning of a "qk" configuration

    @property
    def metrics(self) -> dict[str, float]:
        return self.result.metrics


class Sweep:
    """Evaluate edit configurations of one model on named evaluation plans, with a results file.

    Args:
        model: a bridge from :func:`sinklens.load_model`, without active edits.
        plans: evaluation plans by split name (:func:`sinklens.assess.evaluation.build_plan`).
        spec: the pruning of every candidate head of the layer configurations; selecting a layer prunes the spec's
            heads of that layer (``spec.replace(heads=...)``), removing it removes them. None: a sweep of head
            configurations (and dense) only.
        head_edits: option objects of head edits (:class:`HeadEditOptions`, e.g.
            ``sinklens.CalibrationOptions()``), one per method: configurations ``(method, heads, split)``.
        calibration: what the spec's fitted parts (data-driven kept dims, fill means, temperatures) are measured
            on: a :class:`~sinklens.prune.calibration.CalibrationSet` (BOS-prepended ids or a TokenBatch are made into
            one), or, for a plain ``bos_top`` spec (zero fill, no temperature), the MassiveActivations of
            BOS-prepended probe prompts; None for a spec fitted on nothing (``random``, ``weight_norm`` with zero
            fill and no temperature). See :func:`~sinklens.prune.calibration.resolve_calibration`.
        results: the SQLite results file (None: in memory).
        fresh: delete an existing results file first.
        show_progress: show progress bars.
        max_cached: how many recent configurations keep their residuals (for extensions, e.g. greedy).
        tokens: deprecated spelling of ``calibration``.
    """

    def __init__(self, model, plans: Mapping[str, EvalPlan], spec: PruneSpec | None = None, *,
                 head_edits: Sequence[HeadEditOptions] = (), calibration=None, results: str | Path | None = None,
                 fresh: bool = False, show_progress: bool = True, max_cached: int = 2, tokens=None):
        calibration = calibration_argument(calibration, where="Sweep", tokens=tokens)
        if not plans:
            raise InputError("plans is empty: pass at least one evaluation plan "
                             "(sinklens.assess.evaluation.build_plan).")
        if spec is not None and not isinstance(spec, PruneSpec):
            raise InputError(f"spec must be a sinklens.PruneSpec (every candidate head, k, policy...) or None, got "
                             f"{type(spec).__name__}.")
        self.head_edits = _check_head_edits(head_edits, plans)
        if spec is None and not self.head_edits:
            raise InputError("A sweep needs spec= (layer configurations) or head_edits= (head configurations), "
                             "or both.")
        if spec is None and calibration is not None:
            raise InputError("calibration= fits a pruning spec's kept dims: pass spec= with it, or drop it.")
        self.model = model
        self.info = model_info(model)
        self.plans = dict(plans)
        self.spec = None if spec is None else spec.check(self.info)
        self.calibration = None if spec is None else resolve_calibration(model, spec, calibration)  # before forwards
        self.heads_by_layer: dict[int, tuple[int, ...]] = {}
        for layer, head in (spec.heads if spec is not None else ()):
            self.heads_by_layer[layer] = self.heads_by_layer.get(layer, ()) + (head,)
        self.show_progress = show_progress
        self.file = open_results(model, results, fresh=fresh)
        self.fingerprint = dict(self.file.conn.execute("SELECT name, value FROM meta"))["fingerprint"]
        self.settings = {"heads": [[l, list(h)] for l, h in sorted(self.heads_by_layer.items())]}
        self.dims = {}
        if spec is not None:
            if calibration_need(spec) == "inputs":
                self.calibration.inputs(spec.layers())  # every layer's attention input in one forward
            # the kept dims are part of every key: rows measured on another probe are not reused
            self.dims = dims_of(model, spec, self.calibration)
            self.settings = {"spec": {**spec.as_dict(), "heads": None}, "dims": dims_records(self.dims),
                             **self.settings}
        if isinstance(self.calibration, CalibrationSet) and not self.calibration.bos_only:
            # fill means and temperatures are fitted on these prompts: rows fitted on other prompts are not reused
            described = self.calibration.as_dict()
            self.settings["calibration"] = {"fingerprint": described["fingerprint"],
                                            "n_tokens": described["n_tokens"]}
        self.plan_ids = {name: plan_fingerprint(plan) for name, plan in self.plans.items()}
        self._cache: dict[tuple, list[torch.Tensor]] = {}  # (split, layer, edits below it) -> resid per batch
        self._pinned: set[tuple] = set()  # dense entries, kept for the whole sweep
        self._owners: OrderedDict[tuple, list[tuple]] = OrderedDict()  # recent configurations' entries
        self._records: dict[str, Record] = {}  # this session's records by key
        self.max_cached = max_cached
        self.forward_equivalents = 0.0  # sum over runs of layers run / n_layers
        self.n_evaluated = 0  # configurations computed (not read back), dense excluded
        self.n_dense_runs = 0

    # keys ------------------------------------------------------------------------------------
    @property
    def methods(self) -> tuple[str, ...]:
        """The methods this sweep evaluates: ``"dense"``, the layer methods when it has a spec, and its head edits'."""
        layer_methods = METHODS[1:] if self.spec is not None else ()
        return ("dense", *layer_methods, *self.head_edits)

    def heads_of(self, layers: Iterable[int]) -> tuple[Head, ...]:
        """The spec's heads in ``layers``.

        Args:
            layers: layers of the sweep.
        """
        out = []
        for layer in layers:
            if layer not in self.heads_by_layer or not self.heads_by_layer[layer]:
                raise InputError(f"Layer {layer} has no heads to prune in this sweep (layers with heads: "
                                 f"{sorted(l for l, h in self.heads_by_layer.items() if h)}).")
            out += [(layer, h) for h in self.heads_by_layer[layer]]
        return tuple(out)

    def spec_of(self, layers: Iterable[int]) -> PruneSpec:
        """The pruning of a ``"qk"`` configuration: the sweep's spec restricted to the heads of ``layers``.

        Args:
            layers: layers of the sweep.
        """
        return self.spec.replace(heads=self.heads_of(layers))

    def _normalize(self, method: str, units: Iterable, split: str) -> tuple[str, tuple]:
        """(method, units): units are sorted layers for the layer methods, sorted (layer, head) pairs for a head
        edit's method, empty for dense."""
        check_choice("method", method, self.methods)
        if split not in self.plans:
            raise InputError(f"Unknown split {split!r}: this sweep has plans {sorted(self.plans)}.")
        if method in self.head_edits:
            units = tuple(units)
            if not units:
                raise InputError(f"The head set is empty: pass at least one (layer, head) pair to edit with "
                                 f"{method!r} (or method='dense').")
            return method, tuple(tuple(h) for h in check_heads(units, self.info))
        units = tuple(sorted({check_int("layer", l) for l in units}))
        if method == "dense" and units:
            raise InputError("A dense configuration has no layers.")
        if method != "dense" and not units:
            raise InputError("The layer set is empty: pass at least one layer to prune (or method='dense').")
        for layer in units:
            check_index("layer", layer, self.info.n_layers, "layers")
        return method, units

    def key(self, method: str, units: Iterable, split: str) -> str:
        """The results-file key of a configuration (model, evaluation plan, method, its units and settings: the
        spec and kept dims of ``"qk"``, the options of a head edit).

        Args:
            method: ``"dense"``, ``"qk"``, ``"head_removal"`` or a head edit's method (see :attr:`methods`).
            units: the layers pruned or removed, or the ``(layer, head)`` pairs a head edit edits (none for dense).
            split: the evaluation plan's name.
        """
        method, units = self._normalize(method, units, split)
        payload = {"schema": SCHEMA, "model": self.fingerprint, "plan": self.plan_ids[split], "method": method}
        if method in self.head_edits:
            payload |= {"settings": self.head_edits[method].as_dict(), "heads": [list(h) for h in units]}
        else:
            payload |= {"settings": self.settings if method == "qk" else {"heads": self.settings["heads"]},
                        "layers": list(units)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]

    def _heads_and_layers(self, method: str, units: tuple) -> tuple[tuple[Head, ...], tuple[int, ...]]:
        if method in self.head_edits:
            return units, tuple(sorted({l for l, _ in units}))
        return (self.heads_of(units) if method != "dense" else ()), units

    def _prefix(self, method: str, units: tuple, below: int) -> tuple:
        """The edits of a configuration below layer ``below`` (the cache key of the residual entering it)."""
        if method in self.head_edits:
            return tuple((method, l, h) for l, h in units if l < below)
        return tuple((method, l) for l in units if l < below)

    # evaluation ------------------------------------------------------------------------------
    def has(self, method: str, units: Iterable, split: str) -> bool:
        """Whether this configuration's result is already known (this session or the results file).

        Args:
            method, units, split: as in :meth:`key`.
        """
        key = self.key(method, units, split)
        return key in self._records or key in self.file

    def dense(self, split: str) -> Record:
        """The unedited model on ``split`` (computed once; also fills the residual cache).

        Args:
            split: the evaluation plan's name.
        """
        return self.evaluate("dense", (), split)

    def evaluate(self, method: str, units: Iterable, split: str, keep_prefix: bool = False) -> Record:
        """One configuration: read back from the results file, or computed and appended to it.

        ``keep_prefix`` caches this configuration's residuals (for extensions of it, as in greedy
        selection); the dense residuals of each split are always cached.

        Args:
            method, units, split: as in :meth:`key`.
            keep_prefix: cache this configuration's residuals.
        """
        method, units = self._normalize(method, units, split)
        heads, layers = self._heads_and_layers(method, units)
        spec = self.spec_of(layers) if method == "qk" else None
        key = self.key(method, units, split)
        if key in self._records and not keep_prefix:
            return self._records[key]
        stored = self.file.get(key)
        if stored is not None and not keep_prefix:
            result = EvalResult(per_item=stored["items"], meta=dict(self.plans[split].meta))
            written = stored["config"].get("spec")
            record = Record(method, layers, heads, split, key, result, stored["extra"].get("params", {}), cached=True,
                            spec=None if written is None else PruneSpec.from_dict(written))
            self._records[key] = record
            return record
        if active_edits(self.model):
            raise InputError("The model has active pruning edits: run the sweep on the dense model.")
        plan = self.plans[split]
        n_layers = self.info.n_layers
        start, resid = self._lookup(split, method, units) if method != "dense" else (0, None)
        if method != "dense" and resid is None:  # the dense pass fills the cache first
            self._ensure_dense_cache(split)
            start, resid = self._lookup(split, method, units)
        capture = range(start, n_layers) if (method == "dense" or keep_prefix) else ()
        params = {}
        with self._edit(method, heads, spec) as handle:
            result = plan.run(self.model, start_layer=start, resid=resid, capture=capture)
            if handle is not None and hasattr(handle, "params_zeroed"):
                params = handle.params_zeroed()
        self.forward_equivalents += (n_layers - start) / n_layers
        if method == "dense":
            self.n_dense_runs += 1
        elif stored is None:
            self.n_evaluated += 1
        self._store_prefix(split, method, units, result.resid, pin=method == "dense")
        result.resid = {}
        if stored is None:
            self.file.put(key, self._config(method, layers, heads, split, spec), result,
                          {"params": params, "start_layer": start})
        record = Record(method, layers, heads, split, key, result, params, cached=stored is not None, spec=spec)
        self._records[key] = record
        return record

    def run(self, configs: Sequence[tuple[str, Iterable, str]], desc: str = "sweep", *, executor=None,
            prefix: tuple[str, Iterable, str] | None = None) -> list[Record]:
        """Evaluate ``(method, units, split)`` configurations, with a progress bar; the records in their order.

        The configurations are independent: an executor may evaluate them elsewhere (Ray workers, each holding
        its own copy of the model and of this sweep) in any order. This sweep stays the only writer of the results
        file and stores each result as it arrives (:meth:`store`), so a rerun resumes after them.

        Args:
            configs: ``(method, units, split)`` triples (units: layers, or (layer, head) pairs for a head edit);
                every one is checked before any is evaluated.
            desc: the progress bar's label.
            executor: where to evaluate those not known yet: None or ``"local"`` (here, in order), ``"ray"`` or an
                executor object (:mod:`sinklens.assess.executor`).
            prefix: a configuration that the others extend (greedy selection's chosen set): its residuals are
                cached first where the work is done, so each extension runs from its new layer.
        """
        from .executor import resolve_executor  # the executor module imports this one

        configs = [(m, tuple(units), s) for m, units, s in configs]
        for method, units, split in configs:  # validate every configuration before any work
            method, units = self._normalize(method, units, split)
            if method in METHODS[1:]:
                self.heads_of(units)
        pending = list(dict.fromkeys(c for c in configs if not self.has(*c)))
        if pending:
            runner = resolve_executor(executor)
            try:
                runner.map(self, pending, desc=desc, prefix=prefix)
            finally:
                if runner is not executor:  # made here from a name ("ray"): its workers end with this batch
                    runner.close()
        return [self.evaluate(*config) for config in configs]

    def store(self, record: Record, extra: Mapping | None = None) -> Record:
        """Add a configuration evaluated elsewhere (by a copy of this sweep on another process or node) to this
        session and to the results file; a configuration already known is not written again.

        Args:
            record: the other sweep's record; its key must be this sweep's key of the configuration (the same
                model weights, plan, spec and kept dims, or head-edit options), else it is refused.
            extra: what the other sweep stored beside it (parameters zeroed, start layer, where it ran).
        """
        units = record.heads if record.method in self.head_edits else record.layers
        key = self.key(record.method, units, record.split)
        if record.key != key:
            raise InputError(f"A worker evaluated {record.method} {list(units)} on {record.split!r} under key "
                             f"{record.key}, but this sweep's key is {key}: the worker's model, plan, spec, kept "
                             "dims or head-edit options differ from the driver's (another checkpoint at the same "
                             "path, another device or dtype?). Give every worker the same model files and settings.")
        if key in self._records or key in self.file:
            return self.evaluate(record.method, units, record.split)
        extra = dict(extra or {"params": record.params})
        self.file.put(key, self._config(record.method, record.layers, record.heads, record.split, record.spec),
                      record.result, extra)
        self.n_evaluated += record.method != "dense"
        stored = Record(record.method, tuple(record.layers), tuple(record.heads), record.split, key, record.result,
                        dict(record.params), cached=False, spec=record.spec)
        self._records[key] = stored
        return stored

    def _config(self, method: str, layers: tuple[int, ...], heads: tuple[Head, ...], split: str,
                spec: PruneSpec | None) -> dict:
        config = {"method": method, "layers": list(layers), "heads": [list(h) for h in heads], "split": split,
                  "spec": None if spec is None else spec.as_dict()}
        if method in self.head_edits:
            config["options"] = self.head_edits[method].as_dict()
        return config

    def _edit(self, method: str, heads: tuple[Head, ...], spec: PruneSpec | None):
        if method == "qk":
            return prune_qk(self.model, spec, calibration=self.calibration)
        if method == "head_removal":
            return remove_heads(self.model, list(heads))
        if method in self.head_edits:
            return applied(self.head_edits[method].apply, self.model, heads)
        return nullcontext(None)

    # the residual cache ----------------------------------------------------------------------
    def _ensure_dense_cache(self, split: str) -> None:
        if (split, 0, ()) not in self._cache:
            if self.key("dense", (), split) not in self.file:
                self.dense(split)
            else:  # the dense row exists (resumed sweep): recompute only to fill the cache
                self._run_dense_capture(split)

    def _run_dense_capture(self, split: str) -> None:
        plan = self.plans[split]
        result = plan.run(self.model, capture=range(self.info.n_layers))
        self.forward_equivalents += 1.0
        self.n_dense_runs += 1
        self._store_prefix(split, "dense", (), result.resid, pin=True)

    def _store_prefix(self, split: str, method: str, units: tuple, resid: dict, pin: bool) -> None:
        """Cache the residuals a run captured, keyed by (split, layer, edits below the layer).

        Dense residuals are kept for the whole sweep; those of other configurations only for the
        ``max_cached`` most recent ones.
        """
        if not resid:
            return
        keys = [(split, layer, self._prefix(method, units, layer)) for layer in resid]
        for key, layer in zip(keys, resid):
            self._cache[key] = resid[layer]
        if pin:
            self._pinned.update(keys)
            return
        owner = (split, method, units)
        self._owners[owner] = [k for k in keys if k not in self._pinned]
        self._owners.move_to_end(owner)
        while len(self._owners) > self.max_cached:
            _, stale = self._owners.popitem(last=False)
            in_use = {k for ks in self._owners.values() for k in ks}
            for key in stale:
                if key not in in_use and key not in self._pinned:
                    self._cache.pop(key, None)

    def _lookup(self, split: str, method: str, units: tuple) -> tuple[int, list | None]:
        """The highest layer whose entering residual is cached for this configuration's edits below it."""
        top = max(u[0] if isinstance(u, tuple) else u for u in units)
        for layer in range(top, -1, -1):  # nothing above the last edited layer can be reused
            hit = self._cache.get((split, layer, self._prefix(method, units, layer)))
            if hit is not None:
                return layer, hit
        return 0, None

    # reporting -------------------------------------------------------------------------------
    def cost(self) -> dict:
        """Forward-equivalents spent (layers run / n_layers, summed), per evaluated configuration."""
        n = max(self.n_evaluated, 1)
        return {"configs_evaluated": self.n_evaluated, "dense_runs": self.n_dense_runs,
                "forward_equivalents": self.forward_equivalents,
                "forward_equivalents_per_config": self.forward_equivalents / n}

    def close(self) -> None:
        self.file.close()
