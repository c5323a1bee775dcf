"""Executors: where a sweep's independent configurations are evaluated (here, or on a Ray cluster).

A :class:`~sinklens.assess.sweep.Sweep` hands the configurations it does not know yet to an executor
(``Sweep.run(configs, executor=...)``; :func:`~sinklens.assess.selection.layer_selection` passes each batch of
independent configurations: the single-layer ranking, each greedy step's candidates, each exhaustive size, the
whole-head removals). Every executor has one method, ``map(sweep, configs, *, desc, prefix)``, after which every
configuration is known to the sweep, and ``close()``.

- :class:`LocalExecutor` (the default): the sweep evaluates them itself, in order, as before.
- :class:`RayExecutor`: Ray actors (workers), each holding its own copy of the model and of the sweep, rebuilt
  from a picklable :class:`SweepRecipe` (model source, plans, spec, calibration source, sweep options). Each worker
  loads the model once (a bundled name, a hub id in every node's cache, or a folder every node can read: checked
  on every worker before any configuration is sent), receives configurations one at a time and returns their
  records; the driver is the only writer of the results file and stores each record as it arrives
  (``Sweep.store``), so a restarted driver resumes after them. A worker that dies is restarted by Ray
  (``max_restarts``) and its configuration retried (``max_task_retries``; then once more on another worker).
  Ctrl-C on the driver kills the workers; every stored row is whole (one SQLite transaction each).

Numbers: a worker runs the same code on the same weights, plans and kept dims, so its results equal a serial run's
(its residual cache may start a configuration at another layer than the serial run did; the difference is
float rounding, measured by the tests). Records are checked by key: a worker whose model, plan or spec differ
from the driver's is refused.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..core.errors import InputError, SinklensError
from ..core.loading import load_model, model_info
from ..core.progress import progress
from ..core.sources import resolve_checkpoint
from ..core.validate import check_int
from ..measure.massive import MassiveActivations
from ..prune.calibration import CalibrationSet
from .evaluation import EvalPlan
from .sweep import Record, Sweep

RAY_INSTALL = 'pip install "sinklens[ray]"'
Config = tuple[str, tuple, str]  # (method, units: layers or (layer, head) pairs, split)


class Executor(Protocol):
    """Evaluates a sweep's configurations somewhere; afterwards the sweep knows every one of them."""

    def map(self, sweep: Sweep, configs: Sequence[Config], *, desc: str = "sweep",
            prefix: Config | None = None) -> None: ...

    def close(self) -> None: ...


class LocalExecutor:
    """The sweep evaluates its configurations itself, in order, in this process (the default)."""

    def map(self, sweep: Sweep, configs: Sequence[Config], *, desc: str = "sweep",
            prefix: Config | None = None) -> None:
        """Evaluate ``configs`` on ``sweep`` here.

        Args:
            sweep: the driver's sweep.
            configs: ``(method, layers, split)`` triples not known to it yet.
            desc: the progress bar's label.
            prefix: a configuration the others extend (cached first, for its residuals).
        """
        if prefix is not None and configs:
            sweep.evaluate(*prefix, keep_prefix=True)
        for config in progress(configs, desc=desc, enabled=sweep.show_progress):
            sweep.evaluate(*config)

    def close(self) -> None:
        """Nothing to release."""


def ray_module():
    """``import ray``, or an InputError saying how to install it (Ray is an optional extra)."""
    try:
        import ray
    except ImportError:
        raise InputError(f"Ray is not installed, but executor='ray' needs it: {RAY_INSTALL} (or pip install "
                         "ray), or use the local executor (executor=None).") from None
    return ray


def resolve_executor(executor) -> Executor:
    """An executor object from ``Sweep.run``'s ``executor=``: None or ``"local"``, ``"ray"`` (a
    :class:`RayExecutor` with its defaults: a local cluster, or the one Ray is connected to), or an executor.

    Args:
        executor: None, ``"local"``, ``"ray"`` or an object with ``map`` and ``close``.
    """
    if executor is None or executor == "local":
        return LocalExecutor()
    if executor == "ray":
        return RayExecutor()
    if callable(getattr(executor, "map", None)) and callable(getattr(executor, "close", None)):
        return executor
    raise InputError(f"executor must be None or 'local', 'ray', or an executor object (sinklens.RayExecutor(address=..."
                     f")), got {executor!r}.")


# --- what a worker rebuilds --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepRecipe:
    """Everything a worker needs to rebuild a driver's sweep in memory; it pickles.

    Args:
        model: what ``load_model`` loads: a bundled name, a hub id, or an absolute checkpoint folder.
        dtype: the driver's dtype (``"float32"``...), so keys and numbers match.
        device_type: ``"cpu"`` or ``"cuda"`` (a worker loads on its own device of that type).
        plans: the evaluation plans by split.
        spec: the sweep's pruning of every candidate head of its layer configurations (None: head configurations
            only).
        calibration: the calibration set's :attr:`~sinklens.prune.calibration.CalibrationSet.source` (prompts or
            BOS vectors), or None.
        calibration_batch_size: its prompts per forward.
        options: further keyword arguments of :class:`~sinklens.assess.sweep.Sweep`: ``max_cached`` and
            ``head_edits`` (the head-edit option objects, frozen dataclasses: they pickle).
        is_path: ``model`` is a folder (checked on every worker before any configuration is sent).
    """

    model: str
    dtype: str
    device_type: str
    plans: Mapping[str, EvalPlan]
    spec: Any
    calibration: Any = None
    calibration_batch_size: int = 8
    options: Mapping[str, Any] = field(default_factory=dict)
    is_path: bool = False

    @classmethod
    def of(cls, sweep: Sweep, model: str | os.PathLike | None = None) -> SweepRecipe:
        """The recipe of ``sweep``.

        Args:
            sweep: the driver's sweep.
            model: the model source for the workers (None: the name the driver's model was loaded with; a
                relative folder is made absolute).
        """
        source = model if model is not None else getattr(sweep.model, "sinklens_name", None)
        if source is None:
            raise InputError("The sweep's model was not loaded with sinklens.load_model, so its workers cannot load "
                             "it: pass the model's name, hub id or folder as RayExecutor(model=...).")
        source = str(source)
        path = Path(source).expanduser()
        is_path = path.is_dir() or path.is_absolute() or source.startswith(".")  # a folder (maybe gone since)
        if is_path:
            source = str(Path(source).expanduser().resolve())
        info = model_info(sweep.model)
        calibration = sweep.calibration
        return cls(model=source, dtype=info.dtype, device_type=info.device.split(":")[0], plans=dict(sweep.plans),
                   spec=sweep.spec,
                   calibration=None if calibration is None else calibration.source,
                   calibration_batch_size=8 if calibration is None else calibration.batch_size,
                   options={"max_cached": sweep.max_cached, "head_edits": tuple(sweep.head_edits.values())},
                   is_path=is_path)

    def check_source(self, where: str) -> None:
        """Refuse, naming ``where`` and the model, a model this process cannot load (a folder it cannot read, a
        hub id not in its cache): before any weight is read.

        Args:
            where: this process, e.g. ``"Ray worker on node 10.0.0.3"``.
        """
        if self.is_path:
            folder = Path(self.model)
            readable = folder.is_dir() and os.access(folder, os.R_OK | os.X_OK)
            if not readable or not (folder / "config.json").is_file():
                raise InputError(f"{where} cannot read the model path {self.model} (missing or unreadable there): "
                                 "put the checkpoint where every node reads it at the same path (a shared file "
                                 "system), or pass a hub id every node has in its cache.")
        try:
            resolve_checkpoint(self.model)
        except SinklensError as err:
            raise InputError(f"{where} cannot load model {self.model!r}: {err}") from None

    def build(self) -> Sweep:
        """Load the model and rebuild the sweep in memory (no results file)."""
        import torch

        device = self.device_type if self.device_type != "cuda" else None  # a worker's own GPU
        model = load_model(self.model, device=device, dtype=getattr(torch, self.dtype))
        calibration = self.calibration
        if isinstance(calibration, MassiveActivations):
            calibration = CalibrationSet.from_massive(model, calibration)
        elif calibration is not None:
            calibration = CalibrationSet.from_tokens(model, calibration, batch_size=self.calibration_batch_size)
        return Sweep(model, dict(self.plans), self.spec, calibration=calibration, results=None, show_progress=False,
                     **dict(self.options))


class SweepWorker:
    """One worker's copy of the sweep (a Ray actor's class; usable in-process too). The model is loaded on the first
    call that needs it, so an actor restarted by Ray reloads it by itself.

    Args:
        recipe: the driver's sweep.
        threads: torch threads (one per CPU the worker holds).
    """

    def __init__(self, recipe: SweepRecipe, threads: int = 1):
        import torch

        torch.set_num_threads(threads)
        self.recipe, self.sweep, self.warm = recipe, None, None

    def where(self) -> str:
        """This worker's node and process, for error messages."""
        try:
            import ray

            node = ray.util.get_node_ip_address()
        except Exception:  # not in Ray
            node = socket.gethostname()
        return f"Ray worker on node {node} (pid {os.getpid()})"

    def check(self) -> dict:
        """Check that the model can be loaded here, then load it; this worker's node, pid and load time."""
        start = time.perf_counter()
        self.recipe.check_source(self.where())
        self.load()
        return {"where": self.where(), "pid": os.getpid(), "load_s": time.perf_counter() - start}

    def load(self) -> Sweep:
        if self.sweep is None:
            self.sweep = self.recipe.build()
        return self.sweep

    def evaluate(self, config: Config, prefix: Config | None = None) -> tuple[Record, dict]:
        """One configuration's record and what the sweep stored beside it (plus where it ran).

        Args:
            config: ``(method, layers, split)``.
            prefix: a configuration it extends, cached first (once per prefix).
        """
        sweep = self.load()
        if prefix is not None and prefix != self.warm:
            sweep.evaluate(*prefix, keep_prefix=True)
            self.warm = prefix
        record = sweep.evaluate(*config)
        record.result.resid = {}
        extra = dict(sweep.file.get(record.key)["extra"]) | {"worker": self.where()}
        return record, extra

    def pid(self) -> int:
        return os.getpid()


# --- Ray -------------------------------------------------------------------------------------------------------------

GRPC_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS frame


def check_address(address: str, timeout: float) -> None:
    """Refuse, within ``timeout`` seconds and naming it, a cluster address ``host:port`` that does not answer as a
    Ray head does: Ray's GCS (and its client server) speak gRPC, whose server answers the HTTP/2 preface with a
    SETTINGS frame at once. A TCP connection alone proves nothing (a firewall or proxy may accept it and then say
    nothing), and ``ray.init`` itself would wait a minute or more.

    Args:
        address: ``host:port`` or ``ray://host:port`` (``"auto"`` and ``"local"`` are left to Ray).
        timeout: seconds to wait for the answer.
    """
    if address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise InputError(f"Ray cluster address {address!r} is not host:port (e.g. 10.0.0.1:6379 or "
                         "ray://10.0.0.1:10001), 'auto' or None (a local cluster).")
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as conn:
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            conn.sendall(GRPC_PREFACE)
            answer = conn.recv(9)
        if len(answer) < 9 or answer[3] != 4:  # not an HTTP/2 SETTINGS frame
            raise OSError("it answered, but not as a Ray head node (gRPC)")
    except OSError as err:
        why = "no answer" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise InputError(f"The Ray cluster at {address} does not answer ({why}; waited up to {timeout:g} s): start "
                         "it (ray start --head on that node) or pass the head node's address.") from None


def connect_ray(address: str | None = None, *, timeout: float = 30.0, log_to_driver: bool = False) -> bool:
    """Connect to the Ray cluster at ``address`` (None: the one Ray is connected to already, else a new local
    one); True when this call started the connection (and should shut it down).

    Args:
        address: ``host:port``, ``ray://host:port``, ``"auto"`` or None.
        timeout: seconds an address may take to answer.
        log_to_driver: show the workers' output here.
    """
    ray = ray_module()
    if address is not None:  # also when connected already: a wrong address is reported, not silently replaced
        check_address(str(address), timeout)
    if ray.is_initialized():
        connected = ray.get_runtime_context().gcs_address
        if address not in (None, "auto") and address.removeprefix("ray://") != connected:
            raise InputError(f"This process is connected to the Ray cluster at {connected}, not {address}: pass "
                             "that address (or None), or ray.shutdown() first.")
        return False
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver, logging_level="ERROR")
    except (ConnectionError, TimeoutError, RuntimeError) as err:
        raise InputError(f"Cannot connect to the Ray cluster at {address or 'a new local cluster'}: {err}") from None
    return True


class RayExecutor:
    """Evaluate a sweep's configurations on Ray workers (module docstring).

    Args:
        address: the cluster (``host:port``, ``ray://host:port``, ``"auto"``); None: the cluster Ray is connected to
            in this process, else a new local one.
        workers: how many workers (None: as many as the cluster's CPUs (GPUs when the model is on CUDA) allow, at
            most one per configuration).
        num_cpus: CPUs per worker; each worker runs that many torch threads.
        num_gpus: GPUs per worker (None: 1 when the driver's model is on CUDA, else 0).
        model: the model source workers load (None: the name the driver's model was loaded with).
        max_restarts: restarts of a worker that dies (Ray restarts it and reloads the model).
        max_task_retries: retries of a configuration whose worker died (then once more on another worker).
        connect_timeout: seconds a cluster address may take to answer.
        on_result: called as ``on_result(executor, config, n_done)`` after each stored result (progress, tests).
    """

    def __init__(self, address: str | None = None, *, workers: int | None = None, num_cpus: int = 1,
                 num_gpus: float | None = None, model: str | os.PathLike | None = None, max_restarts: int = 3,
                 max_task_retries: int = 3, connect_timeout: float = 30.0,
                 on_result: Callable[[RayExecutor, Config, int], None] | None = None):
        ray_module()  # Ray missing: refused here, before any model is loaded or configuration evaluated
        if address is not None and not isinstance(address, str):
            raise InputError(f"address must be a Ray cluster address string (host:port) or None, got {address!r}.")
        self.address = address
        self.workers = check_int("workers", workers, minimum=1, allow_none=True)
        self.num_cpus = check_int("num_cpus", num_cpus, minimum=1, meaning="CPUs per worker")
        if num_gpus is not None and not (isinstance(num_gpus, (int, float)) and num_gpus >= 0):
            raise InputError(f"num_gpus must be a number >= 0 (GPUs per worker) or None, got {num_gpus!r}.")
        self.num_gpus = num_gpus
        self.model = model
        self.max_restarts = check_int("max_restarts", max_restarts, minimum=0)
        self.max_task_retries = check_int("max_task_retries", max_task_retries, minimum=0)
        if not isinstance(connect_timeout, (int, float)) or connect_timeout <= 0:
            raise InputError(f"connect_timeout must be a number of seconds > 0, got {connect_timeout!r}.")
        self.connect_timeout = float(connect_timeout)
        self.on_result = on_result
        self.actors: list = []
        self.workers_info: list[dict] = []
        self._sweep_id: int | None = None
        self._started_ray = False

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r}, workers={self.workers}, num_cpus={self.num_cpus})"

    def _gpus(self, recipe: SweepRecipe) -> float:
        return (1 if recipe.device_type == "cuda" else 0) if self.num_gpus is None else self.num_gpus

    def _start(self, sweep: Sweep, n_configs: int) -> None:
        """The workers of ``sweep`` (kept for its next batches), each checked and loaded before any configuration."""
        if self._sweep_id == id(sweep) and self.actors:
            return
        self.release()
        ray = ray_module()
        self._started_ray = connect_ray(self.address, timeout=self.connect_timeout) or self._started_ray
        recipe = SweepRecipe.of(sweep, self.model)
        gpus = self._gpus(recipe)
        resources = ray.cluster_resources()
        capacity = int(resources.get("GPU", 0) // gpus) if gpus else int(resources.get("CPU", 1) // self.num_cpus)
        n = self.workers or max(1, min(capacity, n_configs))
        if capacity < 1:
            raise InputError(f"The Ray cluster ({dict(resources)}) cannot hold one worker of {self.num_cpus} CPUs and "
                             f"{gpus} GPUs: lower num_cpus/num_gpus or add nodes.")
        remote = ray.remote(SweepWorker).options(num_cpus=self.num_cpus, num_gpus=gpus,
                                                 max_restarts=self.max_restarts,
                                                 max_task_retries=self.max_task_retries)
        # the recipe goes inline with each actor's creation: Ray keeps it for the actor's restarts
        self.actors = [remote.remote(recipe, self.num_cpus) for _ in range(n)]
        self._sweep_id = id(sweep)
        try:
            self.workers_info = ray.get([actor.check.remote() for actor in self.actors])
        except BaseException as err:
            self.release()
            cause = getattr(err, "cause", None)
            if isinstance(cause, SinklensError):
                raise InputError(str(cause)) from None
            raise

    def map(self, sweep: Sweep, configs: Sequence[Config], *, desc: str = "sweep",
            prefix: Config | None = None) -> None:
        """Evaluate ``configs`` on the workers; the driver's ``sweep`` stores each result as it arrives.

        Args:
            sweep: the driver's sweep (the only writer of its results file).
            configs: ``(method, layers, split)`` triples not known to it yet.
            desc: the progress bar's label.
            prefix: a configuration the others extend (each worker caches its residuals first).
        """
        configs = list(configs)
        if not configs:
            return
        ray = ray_module()
        from ray.exceptions import RayActorError, RayTaskError

        self._start(sweep, len(configs))
        queue = deque(configs)
        retried: dict[Config, int] = {}
        running: dict = {}  # object ref -> (actor, config)
        bar = progress(range(len(configs)), desc=f"{desc} (ray x{len(self.actors)})", enabled=sweep.show_progress)
        done = 0

        def submit(actor) -> None:
            if queue:
                config = queue.popleft()
                running[actor.evaluate.remote(config, prefix)] = (actor, config)

        try:
            for actor in self.actors:
                submit(actor)
            while running:
                (ref,), _ = ray.wait(list(running), num_returns=1)
                actor, config = running.pop(ref)
                try:
                    record, extra = ray.get(ref)
                except RayActorError:  # died beyond its restarts: once more on another worker
                    retried[config] = retried.get(config, 0) + 1
                    self.actors = [a for a in self.actors if a is not actor]
                    if retried[config] > 1 or not self.actors:
                        raise
                    queue.appendleft(config)
                    idle = [a for a in self.actors if all(a is not b for b, _ in running.values())]
                    if idle:
                        submit(idle[0])
                    continue
                except RayTaskError as err:
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, SinklensError):
                        raise type(cause)(str(cause)) from None
                    raise
                sweep.store(record, extra)
                done += 1
                bar.update(1)
                if self.on_result is not None:
                    self.on_result(self, config, done)
                submit(actor)
        except BaseException:  # Ctrl-C included: the stored rows are whole; stop the workers
            self.release()  # killing an actor ends its running configuration
            raise
        finally:
            bar.close()

    def release(self) -> None:
        """Kill this executor's workers (their models are freed); the Ray connection stays."""
        if self.actors:
            ray = ray_module()
            for actor in self.actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # already dead
                    pass
        self.actors, self.workers_info, self._sweep_id = [], [], None

    def close(self) -> None:
        """Kill the workers, and shut Ray down when this executor started it (it can be used again: it
        reconnects)."""
        self.release()
        if self._started_ray:
            ray_module().shutdown()
            self._started_ray = False


__all__ = ["Executor", "LocalExecutor", "RayExecutor", "SweepRecipe", "SweepWorker", "connect_ray",
           "resolve_executor"]
