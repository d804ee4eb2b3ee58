"""The first records of a tuning run: each task's hand schedule (or TVM's default where none
fits) built, measured and committed before the search (:func:`seed_tasks`), and the hand
schedules measured once more after it (:func:`remeasure_hand_seeds`), so that the best record
of a task is never slower than what a build without records runs."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..records import note_hand_measured, read_hand_measured, write_target_json
from .candidates import worker_message
from .progress import Stop, TaskStat, Tracker, mean_secs

if TYPE_CHECKING:
    from . import TuneConfig

log = logging.getLogger(__name__)


def _as_lowered(sch) -> None:
    """The design space of one schedule: the kernel as LegalizeOps lowered it (an empty trace)."""


def seed_record(context, preset, source: str | None, database, builder, runner, stat: TaskStat,
                 again: bool = False, records_dir: Path | None = None) -> int:
    """Build, measure and commit a task's first record, so that its best record is never slower
    than what a build without records would run: its hand schedule (``source``: the hand design
    space with its own tile choices), or, where no hand schedule fits (``source`` None), TVM's
    default — the kernel as lowered, an empty trace. Without that, a short run can leave a task
    with only a random candidate, which a build applies first whether or not it beats the
    default (seen in ``make demo`` on a busy machine: concatenate and avg_pool2d recorded at
    3.5-6.5 ms after one trial; whether the candidates or the machine were slow is not known).
    Returns the trials it committed (1, or 0 when the schedule did not build or run); a run
    that timed out is the device's fault and stops the tune (:class:`Stop`). ``again``: the
    seed measured a second time, after the search (:func:`remeasure_hand_seeds`): the task's
    best time is then the lower of the two. A measured hand schedule is noted in
    ``records_dir``'s ``hand_schedules.json`` (:func:`~tvmshuffle.records.note_hand_measured`)."""
    import shutil

    from tvm.s_tir import meta_schedule as ms

    from .. import schedules

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
        log.warning("%s: %s did not build: %s", stat.name, what, worker_message(built.error_msg))
        return 0
    try:
        result = runner.run([ms.runner.RunnerInput(built.artifact_path, "cpu",
                                                   args_info)])[0].result()
    finally:
        shutil.rmtree(os.path.dirname(built.artifact_path), ignore_errors=True)
    if result.error_msg:
        message = worker_message(result.error_msg)
        if "Timeout" in message:  # the device's fault (frozen, gone): stop, as a failed batch does
            raise Stop(f"tuning stopped: measuring {what} of task {stat.name} failed: {message}")
        log.warning("%s: %s did not run: %s", stat.name, what, message)
        return 0
    workload = database.commit_workload(context.mod)
    database.commit_tuning_record(ms.database.TuningRecord(
        sch.trace, workload, result.run_secs, context.target, args_info))
    if source and records_dir is not None:  # a build lets these records go first for this kernel
        note_hand_measured(records_dir, schedules.workload_key(context.mod),
                           schedules.hand_fingerprint(context.mod, preset, source))
    secs = mean_secs(result.run_secs)
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


def remeasure_hand_seeds(contexts, stats, seeded, preset, config: TuneConfig, database, builder, runner,
                          tracker: Tracker) -> None:
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
            measured += seed_record(contexts[i], preset, config.seed_schedules, database, builder, runner,
                                     stats[i], again=True, records_dir=Path(config.records_dir))
        except Stop as stop:
            tracker.failure = str(stop)
            raise
    tracker.run_trials += measured
    if measured:
        log.info("the hand schedules of %d tasks measured again after the search (%d records beyond the "
                 "budget of %d)", measured, measured, config.trials)


def seed_tasks(contexts, stats, seeded, preset, config: TuneConfig, database, builder, runner,
                tracker: Tracker) -> None:
    """Measure each task's seed before the search (:func:`seed_record`): the hand schedule
    first where one fits — the search starts from its record, and the records then hold its
    time, so their best is never slower than it (``hand_schedules.json`` notes it, and a build
    lets these records go first for that kernel); records that never measured the hand schedule
    as it is now get it now — and TVM's default schedule for a
    new task no hand schedule fits. A seed is a trial: it counts as run and against the budget,
    and seeding stops when the budget is spent (the search, which alone makes random records,
    then does not run: a task is never left with only a random record). Ctrl-C stops between
    seeds."""
    from .. import schedules

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
            tracker.run_trials += seed_record(contexts[i], preset, source, database, builder, runner, stats[i],
                                               records_dir=records_dir)
        except Stop as stop:
            tracker.failure = str(stop)
            raise
        done.add(i)
    if tracker.interrupted.is_set():
        raise KeyboardInterrupt
    if seed_key and unmeasured <= done:
        write_target_json(records_dir, preset, seed_key)
