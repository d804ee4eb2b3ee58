"""What a tuning run knows of its progress: trials and best latencies per task
(:class:`TaskStat`, read back from the database on resume by :func:`existing_records`), the
network estimate and ``curve.json`` (:class:`Tracker`), the progress bar, and stopping —
on a batch that failed entirely (:class:`Stop`) or on Ctrl-C (:func:`catch_ctrl_c`)."""

from __future__ import annotations

import json
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from ..records import atomic_write
from .candidates import worker_message

log = logging.getLogger(__name__)

CURVE_FILE = "curve.json"

#: run_secs at or above this mark a candidate that failed (MetaSchedule stores 1e10)
FAILED_SECS = 1e9


@dataclass
class TaskStat:
    """One tuning task (a fused PrimFunc) and its state in the database."""

    name: str
    weight: float
    trials: int  # records in the database for this task (all runs)
    best_us: float | None  # best measured latency, None if nothing ran yet


class Stop(Exception):
    """Raised inside MetaSchedule's loop to end it (a failed batch, Ctrl-C);
    :func:`tvmshuffle.tuning.tune` turns it into a UserError / KeyboardInterrupt."""


def mean_secs(run_secs) -> float | None:
    if run_secs is None:
        return None
    secs = [float(s) for s in run_secs]
    if not secs or max(secs) >= FAILED_SECS:
        return None
    return sum(secs) / len(secs)


class Tracker:
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
            raise Stop("interrupted")
        if build_errors or run_errors:
            kinds: dict[str, int] = {}
            for msg in build_errors + run_errors:
                kinds[worker_message(msg)] = kinds.get(worker_message(msg), 0) + 1
            for msg, count in kinds.items():
                log.debug("task %s: %d× %s", stat.name, count, msg)
        # A batch that failed entirely is the builder's or the device's fault, not the
        # schedules': stop with the worker's message, and spend no budget on it.
        if n and len(build_errors) == n:
            log.error("every build failed for task %s; first error:\n%s", stat.name, build_errors[0])
            self.failure = (f"tuning stopped: all {n} builds of a batch for task {stat.name} "
                            f"failed: {worker_message(build_errors[0])}")
        elif n and len(build_errors) + len(run_errors) == n:
            log.error("every run failed for task %s; first error:\n%s", stat.name, run_errors[0])
            self.failure = (f"tuning stopped: all {len(run_errors)} runs of a batch for task "
                            f"{stat.name} failed: {worker_message(run_errors[0])}")
        if self.failure:
            raise Stop(self.failure)
        for r in runner_results:
            secs = mean_secs(r.run_secs) if r.error_msg is None else None
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


def measure_callbacks(tracker: Tracker) -> tuple:
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
                raise Stop("interrupted")

    return Progress(), StopIfInterrupted()


def existing_records(database, contexts) -> list[tuple[int, float | None]]:
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
        secs = mean_secs(rec.run_secs)
        if secs is not None and (best[task] is None or secs * 1e6 < best[task]):
            best[task] = secs * 1e6
    return list(zip(counts, best))


def catch_ctrl_c(tracker: Tracker):
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
