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

The concerns, one module each: :mod:`.candidates` (how candidates are built and measured: the
builder, the local and RPC runners, their bounds), :mod:`.progress` (trials per task, the
curve, the progress bar, stopping) and :mod:`.seeds` (the hand schedules measured before and
after the search); this module holds the configuration and the run, top to bottom.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import targets
from ..errors import UserError
from ..records import (TARGET_FILE, check_target, has_database, open_database, read_target_json,
                       repair_database_files, write_target_json)
from ..remote import check_rpc, device_count
from ..runtime import ThreadConfig, configure_local_threads
from ..tir_analysis import is_scheduled
from .candidates import make_builder, make_runner, register_cpu_tensor_intrins, shutdown_builder, shutdown_runner
from .progress import CURVE_FILE, TaskStat, Tracker, catch_ctrl_c, existing_records, measure_callbacks  # noqa: F401 - CURVE_FILE: one of the files above
from .seeds import remeasure_hand_seeds, seed_tasks

log = logging.getLogger(__name__)

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
        from .. import schedules

        seed = schedules.check_source(self.seed_schedules or schedules.NONE)
        self.seed_schedules = None if seed == schedules.NONE else seed


@dataclass
class TuneResult:
    records_dir: Path
    trials_run: int  # measured in this run
    trials_total: int  # in the database for this module's tasks, after this run
    tasks: list[TaskStat] = field(default_factory=list)
    est_latency_ms: float | None = None  # sum of weight × best latency (None: a task unmeasured)
    wall_time_s: float = 0.0


# ---------------------------------------------------------------------------------------------
# per-task logs (MetaSchedule's, in records_dir/logs/)


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
            from ..remote import device_threads

            used = device_threads(config.rpc_tracker, config.rpc_key, config.thread_config,
                                  timeout=config.device_wait_sec)
            log.info("candidates are measured with %d threads on %r (%s)", used, config.rpc_key,
                     config.thread_config.describe())
    elif config.thread_config.requested:
        log.info("candidates are measured with %s here", config.thread_config.describe())

    target = targets.tvm_target(preset)
    register_cpu_tensor_intrins()
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
        from .. import duel

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


def _run_tasks(extracted, loggers, database, preset, config: TuneConfig, cross) -> Tracker:
    from tqdm import tqdm

    from .. import schedules
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
             for t, w, (n, best) in zip(extracted, weights, existing_records(database, contexts))]
    tracker = Tracker(stats, records_dir, config.trials)
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
        previous = catch_ctrl_c(tracker)
        try:
            seed_tasks(contexts, stats, seeded, preset, config, database, builder, ms_runner, tracker)
            remaining = config.trials - tracker.total_trials
            if remaining <= 0:
                log.info("trial budget met by the seeds (%d of %d trials in %s)", tracker.total_trials,
                         config.trials, records_dir)
                tracker.add_point()
                return tracker
            # every task gets a first batch even when the budget is small
            per_batch = min(config.trials_per_batch, max(1, math.ceil(remaining / len(contexts))))
            # progress first: it may stop the run before a failed batch is committed
            first, last = measure_callbacks(tracker)
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
                remeasure_hand_seeds(contexts, stats, seeded, preset, config, database, builder, ms_runner,
                                      tracker)
                tracker.add_point()
        except BaseException as err:  # MetaSchedule hands exceptions back wrapped or not
            if tracker.failure is not None:
                where = ""
                if config.rpc_tracker is not None:  # name the device (and its log, for an emulated one)
                    from ..remote import server_log_hint

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
                shutdown_runner(runner)
            shutdown_builder(builder)
    return tracker


