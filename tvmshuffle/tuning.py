"""MetaSchedule tuning: the search loop (builder, runners, progress, curve), resumable, bounded in
time. The records it writes are :mod:`tvmshuffle.records`' concern (paths, target.json, torn-line
repair, applying them at build time).

``tune(mod, preset, TuneConfig(...))`` tunes the fused PrimFuncs of a lowered Relax module
(after LegalizeOps → AnnotateTIROpPattern → FoldConstant → FuseOps → FuseTIR, see
:func:`tvmshuffle.pipeline.lower`) and writes, under ``records_dir``
(``tuning_logs/<target>/<model>/`` by :func:`tvmshuffle.records.records_dir_for`):

``database_workload.json`` / ``database_tuning_record.json``
    MetaSchedule's ``JSONDatabase``: one JSON line per workload / measured candidate,
    appended (and flushed) as each batch is committed, so a killed run keeps what it measured.
``target.json``
    the exact target the records were tuned for; :func:`tvmshuffle.records.apply_records` refuses records of
    another target (upstream's database is not target-aware, apache/tvm#15549).
``hand_schedules.json``
    the hand schedule measured for each kernel (:func:`tvmshuffle.records.note_hand_measured`):
    a build lets the records go first for the kernels whose hand schedule they measured,
``hand_wins.json``
    except where the hand schedule won the duel at the end of the run (:mod:`tvmshuffle.duel`:
    each kernel's best record and its hand schedule timed again side by side, here).
``curve.json``
    estimated network latency (sum over tasks of weight × best latency) against trials.
``logs/``
    MetaSchedule's own logs (one per task, plus the scheduler's).

**Resume.** ``TuneConfig.trials`` is the budget for the records dir, not for one run: the
records already in the database for the module's tasks count against it, and a rerun tunes
only what is left (nothing, with a log line, if the budget is already met; the last batch may
overshoot by less than one batch). MetaSchedule's evolutionary search seeds itself from the
best records in the database. A torn last line (a run killed mid-append) is dropped with a
warning when the database is loaded.

**Stopping.** Ctrl-C stops after the batch being measured (a second one at once) and keeps
every record; SIGKILL keeps every record committed before it (each is appended and flushed).

**Many devices, one key.** Over RPC the runner measures as many candidates at once as there are
devices registered under the key (each in its own session; TVM's tracker hands each session to a
free device), read from the tracker at the start and again before each batch; builds run in
parallel here (``builder_workers``). **Threads.** ``threads``/``affinity`` configure the thread
pool of every measuring session (:func:`tvmshuffle.runtime.configure_threads`) before anything
is timed, and ``threads`` is the target's ``num-cores``.

**Never a silent hang.** Builds and runs have timeouts; an RPC tracker that cannot be reached
or a key with no free device is a :class:`~tvmshuffle.errors.UserError` within a bounded
time; a device that leaves the tracker fails the rest of its batch at once; a batch in which
every build or every run fails stops tuning with the worker's own message (and is not
committed: it is the builder's or the device's fault, and should not spend the budget).

The builder does not use MetaSchedule's ``default_build``: that imports
``tvm.s_tir.tensor_intrin`` (~30 s here, mostly CUDA) in every fresh builder process, and the
builder's process pool is restarted for every batch, so builds timed out in a cascade.
:func:`_build` does the same without that import (fp32 CPU schedules tensorize nothing), and
:func:`_export` writes a ``.so`` linked by the target's linker (the cross compiler for ARM
presets), which a device's RPC server can load without a compiler of its own. The main
process registers only the CPU tensor intrinsics (:func:`_register_cpu_tensor_intrins`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import targets
from .errors import UserError
from .records import (TARGET_FILE, atomic_write, check_target, has_database, note_hand_measured, open_database,
                      read_hand_measured, read_target_json, repair_database_files, write_target_json)
from .remote import check_rpc, device_count, key_counts, parse_tracker
from .runtime import ThreadConfig, apart_from_pool_workers, configure_local_threads, configure_threads
from .tir_analysis import is_scheduled

log = logging.getLogger(__name__)

CURVE_FILE = "curve.json"

#: run_secs at or above this mark a candidate that failed (MetaSchedule stores 1e10)
_FAILED_SECS = 1e9


#: ``--number``, ``--repeat``, ``--min-repeat-ms`` by ``--cache``: a cold sample is one call
#: (the flush runs before each sample, so only one call a sample is cold)
MEASURE_DEFAULTS = {
    "cold": {"number": 1, "repeat": 10, "min_repeat_ms": 0},
    "warm": {"number": 3, "repeat": 1, "min_repeat_ms": 100},
}


@dataclass
class TuneConfig:
    """What to tune, where the records go, and how to measure."""

    #: trial budget for the records dir (records already there count against it)
    trials: int
    records_dir: Path
    #: "HOST:PORT" of an RPC tracker; None: measure on this machine
    rpc_tracker: str | None = None
    #: device key registered with the tracker
    rpc_key: str | None = None
    #: candidates per batch (MetaSchedule's ``num_trials_per_iter``); smaller when the
    #: budget is small, so every task gets a batch
    trials_per_batch: int = 64
    #: per candidate: compile + link (``tvmshuffle tune --timeout``)
    builder_timeout_sec: float = 60.0
    #: per candidate: load + measure (over RPC: connect, upload, measure) (``--timeout``)
    runner_timeout_sec: float = 60.0
    #: RPC: the server ends a session after this long; also the bound to reach the tracker
    session_timeout_sec: float = 60.0
    #: RPC: how long a device may answer nothing, or be busy, before it counts as gone
    #: (``--rpc-timeout``): a batch measured on it fails, its records so far are kept
    device_wait_sec: float = 300.0
    #: how a candidate is timed (``--cache``): ``"cold"`` (the default) as the model runs it —
    #: before each call every argument but the first (the activation the previous kernel just
    #: wrote) is evicted from the caches (TVM's ``cache_flush_cpu_non_first_arg``), so the
    #: weights and the output come from memory; ``"warm"``: MetaSchedule's default, the same
    #: call repeated on hot caches. Measured on a Xeon: a model's kernels timed cold sum to
    #: within 5% of the whole model, timed warm to ~70% of it (``tvmshuffle profile``)
    cache: str = "cold"
    #: measurement (MetaSchedule's ``EvaluatorConfig``; ``--number``, ``--repeat``,
    #: ``--min-repeat-ms``): mean of ``number`` runs, ``repeat`` times, each repeat ≥
    #: ``min_repeat_ms`` (``number`` is raised until it is); the record keeps the median of the
    #: ``repeat`` samples (:func:`candidate_time`). None: the default of ``cache``
    #: (:data:`MEASURE_DEFAULTS`: cold one call per sample, 10 samples; warm 3 runs ≥ 100 ms)
    number: int | None = None
    repeat: int | None = None
    min_repeat_ms: int | None = None
    seed: int | None = 0
    #: evolutionary search population per round (MetaSchedule's default 512; smaller is
    #: faster per batch and fine for small budgets) (``--search-population``)
    search_population: int = 512
    #: parallel builds (None: this machine's cores)
    builder_workers: int | None = None
    #: tqdm progress bar on stderr (shown on a terminal only)
    progress: bool = True
    #: "hand" (the default) or a schedules directory: their schedules (tile sizes sampled) join
    #: MetaSchedule's design space for the kernels they fit, and each is measured and committed
    #: first, so the best record is never slower than it; "none" or None: MetaSchedule's own
    #: space only (``tvmshuffle tune --schedules``)
    seed_schedules: str | None = "hand"
    #: TVM's thread pool where candidates are measured (``--threads``, ``--affinity``): set in
    #: each measuring session before timing, so candidates run with the threads the model will
    #: run with; ``threads`` is also the target's ``num-cores``. None: left as it is
    threads: int | None = None
    affinity: str | None = None
    #: at the end, time each kernel's best record against its hand schedule side by side, here
    #: (not over RPC), and note where the hand schedule wins (:mod:`tvmshuffle.duel`; ``--no-duel``)
    duel: bool = True

    @property
    def thread_config(self) -> ThreadConfig:
        return ThreadConfig(self.threads, self.affinity)

    def __post_init__(self) -> None:
        self.records_dir = Path(self.records_dir)
        self.thread_config  # noqa: B018 - validates --threads and --affinity
        if self.cache not in MEASURE_DEFAULTS:
            raise UserError(f"--cache must be cold or warm, got {self.cache!r}")
        for name, value in MEASURE_DEFAULTS[self.cache].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.trials < 0:
            raise UserError(f"--trials must be ≥ 0, got {self.trials}")
        if self.trials_per_batch < 1:
            raise UserError(f"trials per batch must be ≥ 1, got {self.trials_per_batch}")
        if (self.rpc_tracker is None) != (self.rpc_key is None):
            raise UserError("--rpc-tracker and --rpc-key go together (give both or neither)")
        for flag, value in (("--number", self.number), ("--repeat", self.repeat),
                            ("--search-population", self.search_population)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{flag} must be an integer ≥ 1, got {value!r}")
        if isinstance(self.min_repeat_ms, bool) or not isinstance(self.min_repeat_ms, (int, float)) \
                or not math.isfinite(self.min_repeat_ms) or self.min_repeat_ms < 0:
            raise UserError(f"--min-repeat-ms must be ≥ 0, got {self.min_repeat_ms!r}")
        for name in ("builder_timeout_sec", "runner_timeout_sec"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise UserError(f"--timeout ({name}) must be > 0 seconds, got {value!r}")
        if not self.device_wait_sec > 0:
            raise UserError(f"--rpc-timeout must be > 0 seconds, got {self.device_wait_sec:g}")
        from . import schedules

        seed = schedules.check_source(self.seed_schedules or schedules.NONE)
        self.seed_schedules = None if seed == schedules.NONE else seed


@dataclass
class TaskStat:
    """One tuning task (a fused PrimFunc) and its state in the database."""

    name: str
    weight: float
    trials: int  # records in the database for this task (all runs)
    best_us: float | None  # best measured latency, None if nothing ran yet


@dataclass
class TuneResult:
    records_dir: Path
    trials_run: int  # measured in this run
    trials_total: int  # in the database for this module's tasks, after this run
    tasks: list[TaskStat] = field(default_factory=list)
    est_latency_ms: float | None = None  # sum of weight × best latency (None: a task unmeasured)
    wall_time_s: float = 0.0


def _register_cpu_tensor_intrins() -> None:
    """Register the CPU tensor intrinsics without importing the GPU ones.

    ``TuneContext()`` does ``import tvm.s_tir.tensor_intrin``, whose ``__init__`` imports the
    CUDA, ROCm and Hexagon intrinsics too: 30-50 s on this machine, of which the CPU ones
    (x86, arm_cpu, riscv_cpu — what the ``llvm`` schedule rules may name) take ~4 s. This
    puts the package into ``sys.modules`` without running its ``__init__`` and imports only the
    CPU submodules; a later explicit ``import tvm.s_tir.tensor_intrin.cuda`` still works.
    """
    import importlib
    import sys
    import types

    import tvm.s_tir

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        pkg = types.ModuleType(name, "Tensor intrinsics (CPU ones only, see tvmshuffle.tuning)")
        pkg.__path__ = [os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")]
        pkg.__package__ = name
        sys.modules[name] = pkg
        tvm.s_tir.tensor_intrin = pkg
    for sub in ("x86", "arm_cpu", "riscv_cpu"):
        importlib.import_module(f"{name}.{sub}")


# ---------------------------------------------------------------------------------------------
# builder / runner functions (module level: pickled by reference into popen workers)


def _build(mod, target, _params):
    """MetaSchedule's ``default_build`` without ``import tvm.s_tir.tensor_intrin``."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def _export(rt_mod, cross_compiler: str | None = None) -> str:
    """A ``.so`` in a fresh temp dir (MetaSchedule's RemoveBuildArtifact deletes the dir)."""
    path = os.path.join(tempfile.mkdtemp(prefix="tvmshuffle-ms-"), "tvm_tmp_mod.so")
    if cross_compiler is None:
        rt_mod.export_library(path)
    else:
        from tvm.support import cc as tvm_cc

        rt_mod.export_library(path, fcompile=tvm_cc.cross_compiler(cross_compiler))
    return path


#: error texts that mean the device is gone or unusable (the rest of a batch is skipped)
_DEVICE_GONE = ("no free device with key", "is gone from RPC tracker", "Timeout, killed after")


def _request_session(rpc_config, device_wait_sec: float, threads: ThreadConfig | None = None):
    """RPCConfig.connect_server, but a device that left the tracker is an error at once and
    the wait for a busy one is bounded (upstream waits forever); with ``threads``, the
    session's thread pool on the device is configured before anything is measured in it
    (MetaSchedule's RPC runner calls this first in each candidate's session)."""
    key = rpc_config.tracker_key
    where = f"{rpc_config.tracker_host}:{rpc_config.tracker_port}"
    tracker = rpc_config.connect_tracker()  # bounded by session_timeout_sec
    total, _ = key_counts(tracker.summary(), key)
    if total == 0:
        tracker.close()
        raise RuntimeError(f"the device with key {key!r} is gone from RPC tracker {where}")
    box: dict = {}

    def request():
        try:
            box["session"] = tracker.request(
                key=key,
                priority=rpc_config.session_priority,
                session_timeout=rpc_config.session_timeout_sec,
            )
        except Exception as err:  # noqa: BLE001 - reported below
            box["error"] = err

    thread = threading.Thread(target=request, daemon=True)
    thread.start()
    thread.join(device_wait_sec)
    if thread.is_alive():
        tracker.close()
        raise TimeoutError(
            f"no free device with key {key!r} on RPC tracker {where} within {device_wait_sec:g} s"
        )
    if "error" in box:
        raise box["error"]
    session = box["session"]
    if threads is not None and threads.requested:
        configure_threads(session.get_function, threads, where=f"device {key!r}", quiet=True)
    return session


def candidate_time(samples: list[float]) -> list[float]:
    """A candidate's time, as MetaSchedule records it: the median of its samples, as the only one.

    MetaSchedule ranks candidates (and trains its cost model) by the mean of their ``run_secs``.
    On a 2-core machine a sample during which anything else ran (the tuner itself, the OS) takes
    2-14x as long — kernels of 85 us measured 1145 us in 1 of 10 cold samples with the machine
    otherwise idle — so the mean ranked candidates by their luck. The median of 10 does not move.
    """
    return [float(statistics.median(samples))] if samples else samples


def _run_evaluator(rt_mod, device, evaluator_config, repeated_args, threads: ThreadConfig | None = None):
    """LocalRunner's evaluator: this (the runner worker's) thread pool configured as the model
    will run (``threads``), MetaSchedule's timing with the calling thread off the pool workers'
    cores (:func:`~tvmshuffle.runtime.apart_from_pool_workers`), then :func:`candidate_time`."""
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    if threads is not None:
        configure_local_threads(threads, quiet=True)
    with apart_from_pool_workers():
        return candidate_time(run_evaluator_common(rt_mod, device, evaluator_config, repeated_args))


def _rpc_run_evaluator(_session, rt_mod, device, evaluator_config, repeated_args):
    """RPCRunner's evaluator: MetaSchedule's timing on the device, then :func:`candidate_time`
    (the session's thread pool was configured when it was opened: :func:`_request_session`)."""
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    return candidate_time(run_evaluator_common(rt_mod, device, evaluator_config, repeated_args))


def _runner_pool(workers: int, config: TuneConfig):
    """The RPC runner's process pool: ``workers`` candidates measured at once (one session each,
    the tracker handing each to a free device of the key); each bounded (RPCRunner's own pool
    has no timeout: a device that hangs or drops would block it forever)."""
    from tvm.support.popen_pool import PopenPoolExecutor

    return PopenPoolExecutor(max_workers=workers, timeout=config.runner_timeout_sec + config.device_wait_sec)


def _resize_runner(rpc_runner, config: TuneConfig) -> None:
    """Between batches: one runner worker per device registered under the key now (devices
    come and go). The old pool is retired, not shut down: candidates of a batch still being
    measured finish in it (:func:`_shutdown_runner` ends it)."""
    inst = rpc_runner._inst  # noqa: SLF001 - the Python RPCRunner
    try:
        devices = device_count(config.rpc_tracker, config.rpc_key)
    except UserError as err:  # the tracker did not answer this time: keep the pool as it is
        log.debug("devices not re-read: %s", err)
        return
    if devices < 1 or devices == inst.workers:
        return  # none registered: the sessions say so (the device is gone)
    log.info("%d device(s) with key %r now: measuring %d candidates at once (was %d)", devices,
             config.rpc_key, devices, inst.workers)
    inst.retired_pools.append(inst.pool)
    inst.pool = _runner_pool(devices, config)
    inst.workers = devices


def _shutdown_runner(rpc_runner) -> None:
    inst = rpc_runner._inst  # noqa: SLF001
    for pool in [*inst.retired_pools, inst.pool]:
        pool.shutdown(wait=False)
    inst.retired_pools.clear()


def _fail_fast(rpc_runner, config: TuneConfig | None = None):
    """Wrap an RPCRunner: once a candidate finds the device gone (left the tracker, busy past
    the wait, or hung past the timeout), the rest of its batch is skipped instead of each
    waiting out the same timeouts; the batch then counts as failed. With ``config``, the
    runner's workers follow the devices registered under the key, re-read before each batch
    (:func:`_resize_runner`)."""
    from types import SimpleNamespace

    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class FailFastFuture(ms.runner.PyRunnerFuture):
        def __init__(self, inner, state) -> None:
            super().__init__()
            self.inner = inner
            self.state = state

        def done(self) -> bool:
            return self.state.dead is not None or self.inner.done()

        def result(self):
            if self.state.dead is not None and self.inner.future.cancel():
                return ms.runner.RunnerResult(None, f"skipped, device unusable: {self.state.dead}")
            res = self.inner.result()
            if res.error_msg is not None and any(m in str(res.error_msg) for m in _DEVICE_GONE):
                self.state.dead = _worker_message(res.error_msg)
            return res

    @derived_object
    class FailFastRPCRunner(ms.runner.PyRunner):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def run(self, runner_inputs):
            if config is not None:
                _resize_runner(self.inner, config)
            state = SimpleNamespace(dead=None)
            # ``_inst``: the Python RPCRunner (its FFI ``run`` would return plain RunnerFutures)
            return [FailFastFuture(f, state) for f in self.inner._inst.run(runner_inputs)]

    return FailFastRPCRunner(rpc_runner)


# ---------------------------------------------------------------------------------------------
# progress, curve, stopping on all-failed batches


class _Stop(Exception):
    """Raised inside MetaSchedule's loop to end it (a failed batch, Ctrl-C); :func:`tune` turns
    it into a UserError / KeyboardInterrupt."""


def _worker_message(msg: str) -> str:
    """One line from a builder/runner error: its headline and the exception line."""
    lines = [ln.strip() for ln in str(msg).strip().splitlines() if ln.strip()]
    if not lines:
        return "(no message)"
    head = lines[0]
    tail = next((ln for ln in reversed(lines)
                 if not ln.startswith(("File ", "^", "~", "Traceback"))), lines[-1])
    return head if tail == head else f"{head} {tail}"


def _mean_secs(run_secs) -> float | None:
    if run_secs is None:
        return None
    secs = [float(s) for s in run_secs]
    if not secs or max(secs) >= _FAILED_SECS:
        return None
    return sum(secs) / len(secs)


class _Tracker:
    """Trials and best latencies per task, the network estimate, ``curve.json``."""

    def __init__(self, stats: list[TaskStat], records_dir: Path, budget: int) -> None:
        self.stats = stats
        self.curve_path = records_dir / CURVE_FILE
        self.budget = budget
        self.curve = self._load_curve()
        self.run_trials = 0
        self.failure: str | None = None
        self.interrupted = threading.Event()
        self.bar = None

    @property
    def total_trials(self) -> int:
        return sum(s.trials for s in self.stats)

    def est_latency_ms(self) -> float | None:
        if any(s.best_us is None for s in self.stats):
            return None
        return sum(s.weight * s.best_us for s in self.stats) / 1e3

    def _load_curve(self) -> list[dict]:
        if not self.curve_path.exists():
            return []
        try:
            curve = json.loads(self.curve_path.read_text())
            return [p for p in curve if isinstance(p, dict) and "trials" in p]
        except (OSError, ValueError):
            log.warning("%s: unreadable, starting a new curve", self.curve_path)
            return []

    def add_point(self) -> None:
        point = {"trials": self.total_trials, "est_latency_ms": self.est_latency_ms(),
                 "tasks_measured": sum(s.best_us is not None for s in self.stats),
                 "tasks": len(self.stats)}
        if self.curve and self.curve[-1]["trials"] == point["trials"]:
            self.curve[-1] = point
        else:
            self.curve.append(point)
        try:
            atomic_write(self.curve_path, json.dumps(self.curve, indent=1) + "\n")
        except OSError as err:
            log.warning("cannot write %s: %s", self.curve_path, err)

    def update(self, task_id: int, builder_results, runner_results) -> None:
        """After a batch is measured, before MetaSchedule commits it to the database (this
        callback runs first): count it, or stop the run without committing it."""
        stat = self.stats[task_id]
        n = len(runner_results)
        build_errors = [b.error_msg for b in builder_results if b.error_msg is not None]
        run_errors = [r.error_msg for b, r in zip(builder_results, runner_results)
                      if b.error_msg is None and r.error_msg is not None]
        if self.interrupted.is_set() and (build_errors or run_errors):
            # a terminal's Ctrl-C also kills the builder/runner workers: not the schedules' fault
            raise _Stop("interrupted")
        if build_errors or run_errors:
            kinds: dict[str, int] = {}
            for msg in build_errors + run_errors:
                kinds[_worker_message(msg)] = kinds.get(_worker_message(msg), 0) + 1
            for msg, count in kinds.items():
                log.debug("task %s: %d× %s", stat.name, count, msg)
        # A batch that failed entirely is the builder's or the device's fault, not the
        # schedules': stop with the worker's message, and spend no budget on it.
        if n and len(build_errors) == n:
            log.error("every build failed for task %s; first error:\n%s", stat.name, build_errors[0])
            self.failure = (f"tuning stopped: all {n} builds of a batch for task {stat.name} "
                            f"failed: {_worker_message(build_errors[0])}")
        elif n and len(build_errors) + len(run_errors) == n:
            log.error("every run failed for task %s; first error:\n%s", stat.name, run_errors[0])
            self.failure = (f"tuning stopped: all {len(run_errors)} runs of a batch for task "
                            f"{stat.name} failed: {_worker_message(run_errors[0])}")
        if self.failure:
            raise _Stop(self.failure)
        for r in runner_results:
            secs = _mean_secs(r.run_secs) if r.error_msg is None else None
            if secs is not None and (stat.best_us is None or secs * 1e6 < stat.best_us):
                stat.best_us = secs * 1e6
        stat.trials += n
        self.run_trials += n
        self.add_point()
        est = self.est_latency_ms()
        best = f"{stat.best_us:.1f} us" if stat.best_us is not None else "n/a"
        est_text = f"{est:.3f} ms" if est is not None else "n/a"
        log.info(
            "task %d/%d %s: +%d trials (%d build / %d run errors), best %s; "
            "total %d/%d trials, est. network latency %s",
            task_id + 1, len(self.stats), stat.name, n, len(build_errors), len(run_errors), best,
            self.total_trials, self.budget, est_text,
        )
        if self.bar is not None:
            if self.bar.total is not None and self.bar.n + n > self.bar.total:
                self.bar.total = self.bar.n + n  # the last batch may overshoot the budget
            self.bar.update(n)
            self.bar.set_postfix_str(f"{stat.name[:24]} best {best}, net {est_text}")


def _callbacks(tracker: _Tracker) -> tuple:
    """(first callback: progress and stopping on failed batches, last one: stopping after a
    Ctrl-C once the batch is committed)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results) -> None:
            tracker.update(int(task_id), list(builder_results), list(runner_results))

    @derived_object
    class StopIfInterrupted(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results) -> None:
            if tracker.interrupted.is_set():
                raise _Stop("interrupted")

    return Progress(), StopIfInterrupted()


# ---------------------------------------------------------------------------------------------
# tasks and existing records


def _task_logger(records_dir: Path, index: int, name: str) -> logging.Logger:
    logger = logging.getLogger(f"{__name__}.task.{abs(hash(str(records_dir.resolve())))}.{index}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    if not logger.handlers:
        (records_dir / "logs").mkdir(exist_ok=True)
        handler = logging.FileHandler(records_dir / "logs" / f"task_{index:02d}_{name}.log")
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
        logger.addHandler(handler)
    return logger


def _close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def _existing(database, contexts) -> list[tuple[int, float | None]]:
    """Per task: (records in the database, best mean latency in us)."""
    import tvm_ffi

    counts = [0] * len(contexts)
    best: list[float | None] = [None] * len(contexts)
    records = database.get_all_tuning_records()
    if not records:
        return list(zip(counts, best))
    hashes = [tvm_ffi.structural_hash(ctx.mod) for ctx in contexts]
    owner: dict[int, int | None] = {}  # id of workload object → task index
    workloads: list = []
    for rec in records:
        wl = rec.workload
        idx = next((i for i, w in enumerate(workloads) if w.same_as(wl)), None)
        if idx is None:
            workloads.append(wl)
            idx = len(workloads) - 1
            h = tvm_ffi.structural_hash(wl.mod)
            owner[idx] = next(
                (t for t, ctx in enumerate(contexts)
                 if hashes[t] == h and tvm_ffi.structural_equal(wl.mod, ctx.mod)),
                None,
            )
        task = owner[idx]
        if task is None:
            continue
        counts[task] += 1
        secs = _mean_secs(rec.run_secs)
        if secs is not None and (best[task] is None or secs * 1e6 < best[task]):
            best[task] = secs * 1e6
    return list(zip(counts, best))


def _as_lowered(sch) -> None:
    """The design space of one schedule: the kernel as LegalizeOps lowered it (an empty trace)."""


def _seed_record(context, preset, source: str | None, database, builder, runner, stat: TaskStat,
                 again: bool = False, records_dir: Path | None = None) -> int:
    """Build, measure and commit a task's first record, so that its best record is never slower
    than what a build without records would run: its hand schedule (``source``: the hand design
    space with its own tile choices), or, where no hand schedule fits (``source`` None), TVM's
    default — the kernel as lowered, an empty trace. Without that, a short run can leave a task
    with only a random candidate, which a build applies first whether or not it beats the
    default (seen in ``make demo`` on a busy machine: concatenate and avg_pool2d recorded at
    3.5-6.5 ms after one trial; whether the candidates or the machine were slow is not known).
    Returns the trials it committed (1, or 0 when the schedule did not build or run); a run
    that timed out is the device's fault and stops the tune (:class:`_Stop`). ``again``: the
    seed measured a second time, after the search (:func:`_remeasure_hand_seeds`): the task's
    best time is then the lower of the two. A measured hand schedule is noted in
    ``records_dir``'s ``hand_schedules.json`` (:func:`~tvmshuffle.records.note_hand_measured`)."""
    import shutil

    from tvm.s_tir import meta_schedule as ms

    from . import schedules

    what = f"the {source} schedule" if source else "TVM's default schedule (as lowered)"
    space = schedules.space_fn(preset, source) if source else _as_lowered
    hand_context = ms.TuneContext(
        mod=context.mod, target=context.target, task_name=context.task_name,
        space_generator=ms.space_generator.ScheduleFn(space),
    ).clone()
    spaces = hand_context.generate_design_space()
    if not spaces:
        return 0
    sch = spaces[0]
    for postproc in hand_context.space_generator.postprocs:
        if not postproc.apply(sch):
            log.warning("%s: %s fails MetaSchedule's %s check; not seeded",
                        stat.name, what, type(postproc).__name__)
            return 0
    # the arguments as built: a weight the schedule repacks (layout_rewrite_preproc) is passed
    # repacked, as MetaSchedule does for its own candidates
    args_info = ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)
    built = builder.build([ms.builder.BuilderInput(sch.mod, context.target)])[0]
    if built.error_msg:
        log.warning("%s: %s did not build: %s", stat.name, what, _worker_message(built.error_msg))
        return 0
    try:
        result = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu",
                                                   args_info)])[0].result()
    finally:
        shutil.rmtree(os.path.dirname(built.artifact_path), ignore_errors=True)
    if result.error_msg:
        message = _worker_message(result.error_msg)
        if "Timeout" in message:  # the device's fault (frozen, gone): stop, as a failed batch does
            raise _Stop(f"tuning stopped: measuring {what} of task {stat.name} failed: {message}")
        log.warning("%s: %s did not run: %s", stat.name, what, message)
        return 0
    workload = database.commit_workload(context.mod)
    database.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, workload, result.run_secs, context.target, args_info))
    if source and records_dir is not None:  # a build lets these records go first for this kernel
        note_hand_measured(records_dir, schedules.workload_key(context.mod),
                           schedules.hand_fingerprint(context.mod, preset, source))
    secs = _mean_secs(result.run_secs)
    us = secs * 1e6 if secs is not None else None
    before = stat.best_us
    stat.trials += 1
    if us is not None:
        stat.best_us = min(before, us) if again and before is not None else us
    if again:
        log.info("%s: %s measured again after the search: %.1f us (best record before: %s)", stat.name, what,
                 us if us is not None else float("nan"), f"{before:.1f} us" if before is not None else "none")
    else:
        log.info("%s: seeded with %s: %.1f us", stat.name, what, us if us is not None else float("nan"))
    return 1


def make_builder(config: TuneConfig, cross_compiler: str | None = None):
    """MetaSchedule's builder for ``config``: parallel local builds bounded by
    ``builder_timeout_sec`` (``--timeout``), linked by ``cross_compiler`` (None: the host's)."""
    from tvm.s_tir import meta_schedule as ms

    return ms.builder.LocalBuilder(
        max_workers=config.builder_workers,
        timeout_sec=config.builder_timeout_sec,
        f_build=_build,
        f_export=functools.partial(_export, cross_compiler=cross_compiler),
    )


def make_runner(config: TuneConfig, workers: int = 1, follow_devices: bool = False):
    """MetaSchedule's runner for ``config``: local, or over RPC. Measures as ``config`` says
    (``EvaluatorConfig(number, repeat, min_repeat_ms, enable_cpu_cache_flush)``: ``--cache``), each
    candidate bounded by ``runner_timeout_sec`` (``--timeout``; over RPC plus the wait for a
    free device).

    Over RPC, ``workers`` candidates are measured at once, each in its own session (the
    tracker hands each session to a free device of the key: one worker per device); with
    ``follow_devices`` the number is re-read from the tracker before each batch.

    Returns (the runner, what to hand MetaSchedule: the same, or the RPC one made to fail fast).
    """
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(
        number=config.number,
        repeat=config.repeat,
        min_repeat_ms=config.min_repeat_ms,
        enable_cpu_cache_flush=config.cache == "cold",
    )
    threads = config.thread_config
    if config.rpc_tracker is None:
        runner = ms.runner.LocalRunner(
            timeout_sec=config.runner_timeout_sec, evaluator_config=evaluator,
            f_run_evaluator=functools.partial(_run_evaluator, threads=threads if threads.requested else None))
        return runner, runner
    host, port = parse_tracker(config.rpc_tracker)
    rpc_config = ms.runner.RPCConfig(
        tracker_host=host,
        tracker_port=port,
        tracker_key=config.rpc_key,
        session_timeout_sec=config.session_timeout_sec,
    )
    workers = max(1, int(workers))
    runner = ms.runner.RPCRunner(
        rpc_config,
        evaluator,
        f_create_session=functools.partial(_request_session, device_wait_sec=config.device_wait_sec,
                                           threads=threads if threads.requested else None),
        f_run_evaluator=_rpc_run_evaluator,
        max_workers=workers,
    )
    runner.pool.shutdown()  # its pool has no timeout
    runner.pool = _runner_pool(workers, config)
    runner.workers = workers
    runner.retired_pools = []
    return runner, _fail_fast(runner, config if follow_devices else None)


# ---------------------------------------------------------------------------------------------
# tune


def tune(mod, preset: targets.TargetPreset, config: TuneConfig) -> TuneResult:
    """Tune the PrimFuncs of a lowered, fused Relax module; see the module docstring."""
    start = time.perf_counter()
    records_dir = Path(config.records_dir)

    if preset.is_cross and config.rpc_tracker is None:
        raise UserError(
            f"--target {preset.name}: code for this target cannot run here; tuning needs a "
            "device: give --rpc-tracker HOST:PORT and --rpc-key KEY"
        )
    cross = targets.cross_compiler_command(preset)  # UserError if the linker is missing
    preset = targets.with_threads(preset, config.threads)  # num-cores = --threads
    if config.rpc_tracker is not None:
        check_rpc(config.rpc_tracker, config.rpc_key, config.device_wait_sec)
        if config.thread_config.requested:  # what the device's pool gives (it may have fewer cores)
            from .remote import device_threads

            used = device_threads(config.rpc_tracker, config.rpc_key, config.thread_config,
                                  timeout=config.device_wait_sec)
            log.info("candidates are measured with %d threads on %r (%s)", used, config.rpc_key,
                     config.thread_config.describe())
    elif config.thread_config.requested:
        log.info("candidates are measured with %s here", config.thread_config.describe())

    target = targets.tvm_target(preset)
    _register_cpu_tensor_intrins()
    records_dir.mkdir(parents=True, exist_ok=True)
    if (records_dir / TARGET_FILE).exists() or has_database(records_dir):
        check_target(records_dir, preset, "add to")
        if has_database(records_dir):  # records timed another way do not compare with these
            theirs = (read_target_json(records_dir) or {}).get("cache", "warm")  # older records: warm
            if theirs != config.cache:
                raise UserError(f"--cache {config.cache}: the records in {records_dir} were timed {theirs}; "
                                f"give --cache {theirs} to add to them, or another --tuning-records")
    write_target_json(records_dir, preset, cache=config.cache)
    repair_database_files(records_dir, in_place=True)
    database = open_database(records_dir, records_dir)

    extracted = [t for t in _extract_tasks(mod, target) if not is_scheduled(t.mod)]
    if not extracted:
        raise UserError("nothing to tune: the module has no unscheduled PrimFuncs")

    loggers = [_task_logger(records_dir, i, t.task_name) for i, t in enumerate(extracted)]
    try:
        tracker = _run_tasks(extracted, loggers, database, preset, config, cross)
    finally:
        for lg in loggers:
            _close_logger(lg)
    if config.duel and config.rpc_tracker is None and config.seed_schedules is not None:
        from . import duel

        configure_local_threads(config.thread_config, quiet=True)  # the kernels as candidates ran
        duel.duel(mod, preset, records_dir, config.seed_schedules)
    res = TuneResult(records_dir, tracker.run_trials, tracker.total_trials, tracker.stats,
                     tracker.est_latency_ms(), time.perf_counter() - start)
    est = f"{res.est_latency_ms:.3f} ms" if res.est_latency_ms is not None else "n/a"
    log.info("tuned %d trials in %.1f s (%d in %s); est. network latency %s",
             res.trials_run, res.wall_time_s, res.trials_total, records_dir, est)
    return res


def _extract_tasks(mod, target):
    """One task per distinct PrimFunc: from a Relax module's calls, or (a module of PrimFuncs
    only, as ``tvmshuffle study`` tunes single layers) from the PrimFuncs themselves."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    if any(isinstance(f, relax.Function) for f in mod.functions.values()):
        return ms.relax_integration.extract_tasks(mod, target)
    tasks = []
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            task_mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
            tasks.append(ms.ExtractedTask(gv.name_hint, task_mod, target, [task_mod], 1))
    return tasks


@contextlib.contextmanager
def _meta_schedule_log(records_dir: Path):
    """MetaSchedule's Python loggers → ``records_dir/logs/meta_schedule.log`` only (its
    per-batch tables would flood the console)."""
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    handler = logging.FileHandler(records_dir / "logs" / "meta_schedule.log")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
    saved = (ms_logger.propagate, ms_logger.level)
    ms_logger.addHandler(handler)
    ms_logger.propagate = False
    ms_logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        ms_logger.removeHandler(handler)
        handler.close()
        ms_logger.propagate, level = saved
        ms_logger.setLevel(level)


def _run_tasks(extracted, loggers, database, preset, config: TuneConfig, cross) -> _Tracker:
    from tqdm import tqdm

    from . import schedules
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.utils import fork_seed

    records_dir = Path(config.records_dir)
    seeds = schedules.load(config.seed_schedules) if config.seed_schedules is not None else []
    # the tasks a hand schedule fits: it joins their design space and is measured first
    seeded = [i for i, t in enumerate(extracted)
              if seeds and schedules.schedule_for(t.dispatched[0]["main"], preset, seeds) is not None]

    contexts = [
        ms.TuneContext(
            mod=t.dispatched[0],
            target=t.target,
            space_generator=(schedules.space_generator(preset, config.seed_schedules) if i in seeded
                             else "post-order-apply"),
            search_strategy=ms.search_strategy.EvolutionarySearch(
                population_size=config.search_population,
                init_min_unmeasured=min(50, config.search_population),
            ),
            task_name=t.task_name,
            logger=lg,
            rand_state=rs,
            num_threads="physical",
        ).clone()
        for i, (t, lg, rs) in enumerate(zip(extracted, loggers, fork_seed(config.seed, n=len(extracted))))
    ]
    weights = [float(t.weight) for t in extracted]
    stats = [TaskStat(t.task_name, w, n, best)
             for t, w, (n, best) in zip(extracted, weights, _existing(database, contexts))]
    tracker = _Tracker(stats, records_dir, config.trials)
    done = tracker.total_trials
    remaining = config.trials - done
    log.info("%d tasks; %d trials already in %s, budget %d", len(contexts), done, records_dir,
             config.trials)
    if remaining <= 0:
        log.info("trial budget already met (%d of %d trials in %s): nothing to do",
                 done, config.trials, records_dir)
        if not tracker.curve:
            tracker.add_point()
        return tracker
    if not tracker.curve and done:
        tracker.add_point()  # the state found on disk

    from tqdm.contrib.logging import logging_redirect_tqdm

    with _meta_schedule_log(records_dir), logging_redirect_tqdm():  # log lines above the bar
        builder = make_builder(config, cross)
        devices = 1
        if config.rpc_tracker is not None:  # one runner worker per device under the key
            devices = max(1, device_count(config.rpc_tracker, config.rpc_key))
            log.info("%d device(s) with key %r at %s: measuring up to %d candidates at once",
                     devices, config.rpc_key, config.rpc_tracker, devices)
        runner, ms_runner = make_runner(config, devices, follow_devices=True)
        previous = _catch_ctrl_c(tracker)
        try:
            _seed_tasks(contexts, stats, seeded, preset, config, database, builder, ms_runner, tracker)
            remaining = config.trials - tracker.total_trials
            if remaining <= 0:
                log.info("trial budget met by the seeds (%d of %d trials in %s)", tracker.total_trials,
                         config.trials, records_dir)
                tracker.add_point()
                return tracker
            # every task gets a first batch even when the budget is small
            per_batch = min(config.trials_per_batch, max(1, math.ceil(remaining / len(contexts))))
            # progress first: it may stop the run before a failed batch is committed
            first, last = _callbacks(tracker)
            callbacks = [first, *ms.measure_callback.MeasureCallback.create("default"), last]
            log.info("tuning %d tasks for %s: %d new trials (batches of %d), records in %s",
                     len(contexts), preset.name, remaining, per_batch, records_dir)
            tracker.bar = tqdm(total=config.trials, initial=tracker.total_trials, unit="trial", desc="tuning",
                               disable=None if config.progress else True, dynamic_ncols=True)
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=str(records_dir),
                max_trials_global=remaining,
                num_trials_per_iter=per_batch,
                builder=builder,
                runner=ms_runner,
                database=database,
                cost_model="xgb",
                measure_callbacks=callbacks,
                task_scheduler=ms.task_scheduler.GradientBased(
                    seed=-1 if config.seed is None else config.seed
                ),
            )
            if config.seed_schedules is not None:
                _remeasure_hand_seeds(contexts, stats, seeded, preset, config, database, builder, ms_runner,
                                      tracker)
                tracker.add_point()
        except BaseException as err:  # MetaSchedule hands exceptions back wrapped or not
            if tracker.failure is not None:
                where = ""
                if config.rpc_tracker is not None:  # name the device (and its log, for an emulated one)
                    from .remote import server_log_hint

                    where = (f" on device {config.rpc_key!r} via {config.rpc_tracker} (--rpc-timeout "
                             f"{config.device_wait_sec:g}; {server_log_hint(config.rpc_key, config.rpc_tracker)})")
                raise UserError(f"{tracker.failure}{where} (records so far kept in {records_dir}; "
                                "rerun to resume)") from None
            if tracker.interrupted.is_set() or isinstance(err, KeyboardInterrupt):
                log.warning("interrupted: the %d trials measured are kept in %s; rerun to resume",
                            len(database), records_dir)
                raise KeyboardInterrupt from None
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            if tracker.bar is not None:
                tracker.bar.close()
                tracker.bar = None
            if runner is not ms_runner:  # RPC: the pools we made (LocalRunner's dies with it)
                _shutdown_runner(runner)
    return tracker


def _catch_ctrl_c(tracker: _Tracker):
    """Ctrl-C: the first stops after the trial being measured (raising inside MetaSchedule's
    C++ loop can crash it), a second one at once. Returns the handler to restore (None: not
    the main thread, nothing installed)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        if tracker.interrupted.is_set():
            raise KeyboardInterrupt
        tracker.interrupted.set()
        log.warning("Ctrl-C: stopping after the current batch (Ctrl-C again: now)")

    signal.signal(signal.SIGINT, on_sigint)
    return previous


def _remeasure_hand_seeds(contexts, stats, seeded, preset, config: TuneConfig, database, builder, runner,
                          tracker: _Tracker) -> None:
    """After the search, measure each task's hand schedule once more and commit it, so that one
    unlucky measurement does not lose it to a searched candidate: the build takes the fastest
    record, and the hand schedule's first (only) record can be timed while the machine is busy.
    Seen in a 400-trial tune of V2 on a Xeon: the hand seeds measured 1.5-3x their time
    (``fused_conv2d7_add4_relu3`` 108 us, 55 us timed again alone, 59 us for the search's best),
    and the tuned build ran 3.63 ms against the hand build's 3.35 ms. Extra measurements, one
    per task with a hand schedule, beyond the trial budget (logged)."""
    measured = 0
    for i in seeded:
        if tracker.interrupted.is_set():
            raise KeyboardInterrupt
        try:
            measured += _seed_record(contexts[i], preset, config.seed_schedules, database, builder, runner,
                                     stats[i], again=True, records_dir=Path(config.records_dir))
        except _Stop as stop:
            tracker.failure = str(stop)
            raise
    tracker.run_trials += measured
    if measured:
        log.info("the hand schedules of %d tasks measured again after the search (%d records beyond the "
                 "budget of %d)", measured, measured, config.trials)


def _seed_tasks(contexts, stats, seeded, preset, config: TuneConfig, database, builder, runner,
                tracker: _Tracker) -> None:
    """Measure each task's seed before the search (:func:`_seed_record`): the hand schedule
    first where one fits — the search starts from its record, and the records then hold its
    time, so their best is never slower than it (``hand_schedules.json`` notes it, and a build
    lets these records go first for that kernel); records that never measured the hand schedule
    as it is now get it now — and TVM's default schedule for a
    new task no hand schedule fits. A seed is a trial: it counts as run and against the budget,
    and seeding stops when the budget is spent (the search, which alone makes random records,
    then does not run: a task is never left with only a random record). Ctrl-C stops between
    seeds."""
    from . import schedules

    records_dir = Path(config.records_dir)
    seed_key = schedules.source_key(config.seed_schedules) if config.seed_schedules else None
    # tasks whose records never measured their hand schedule as it is now (tuned without it,
    # with another ISA's, or before its schedule file changed) first, then new tasks with a
    # hand schedule, then new tasks without one
    measured = read_hand_measured(records_dir)
    unmeasured = {i for i in seeded if stats[i].trials > 0 and measured.get(schedules.workload_key(contexts[i].mod))
                  != schedules.hand_fingerprint(contexts[i].mod, preset, config.seed_schedules)}
    todo = sorted((i for i, stat in enumerate(stats) if i in unmeasured or stat.trials == 0),
                  key=lambda i: (i not in unmeasured, i not in seeded))
    done = set()
    for i in todo:
        if tracker.interrupted.is_set():
            raise KeyboardInterrupt
        if tracker.total_trials >= config.trials:
            log.info("the trial budget (%d) is spent on seeds: the search does not run", config.trials)
            break
        source = config.seed_schedules if i in seeded else None
        try:
            tracker.run_trials += _seed_record(contexts[i], preset, source, database, builder, runner, stats[i],
                                               records_dir=records_dir)
        except _Stop as stop:
            tracker.failure = str(stop)
            raise
        done.add(i)
    if tracker.interrupted.is_set():
        raise KeyboardInterrupt
    if seed_key and unmeasured <= done:
        write_target_json(records_dir, preset, seed_key)
