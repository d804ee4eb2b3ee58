"""The duel: each kernel's best tuning record against its hand schedule, timed side by side.

``tune`` measures every candidate once, in the order the search reaches it, each alone in
MetaSchedule's runner, and a build then gives each kernel its fastest record. Where the records
measured the kernel's hand schedule (it is measured first, and again after the search), that
rule says the best record is never slower than the hand schedule. On a shared 2-core machine it
was wrong often enough to lose in the model: V1 g3 1x tuned for 400 trials on an AMD EPYC
(znver4) ran 2.43 ms with its records against 2.24 ms with the hand schedules alone
(interleaved). The tuner had timed the hand schedule of ``fused_conv2d9_add8_relu6`` at 106
and 145 us and a record at 85; side by side (below), 73 and 98 us warm.

So at the end of ``tune`` (here, not over RPC) each kernel the records schedule gets one more
comparison: the build with the hand schedules alone and the build with the records alone are
made, and each kernel of both is timed alone, in turns (hand, record, record, hand), in one
process, with :func:`tvmshuffle.profile.time_kernels` — warm and cold (weights and output
flushed), the medians summed. Against its best record stands the kernel's hand schedule where the records
measured it, else, where no hand schedule fits, TVM's own schedule (as lowered). Where the record
is not faster, ``hand_wins.json`` notes the hand schedule (or ``"default"``) and a build gives the
kernel that (:meth:`tvmshuffle.records.Records.go_first`, :meth:`~tvmshuffle.records.Records.default_wins`).
The same V1 records with the duel's choice (9 of 27 kernels keep their hand schedule): 2.17 ms
against 2.24 hand-only (12 interleaved rounds). V2's unfused records had put search records on
its concat + shuffle + split kernels (two outputs: no hand schedule) that ran 10-12x TVM's own
schedule alone (0.13 against 0.010 ms a call); the tuner had ranked them first.
A later ``tune`` of the same dir runs the duel again on its records.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from . import targets
from .profile import PREPACKED
from .records import DEFAULT, check_records, read_hand_measured, write_hand_wins

log = logging.getLogger(__name__)



@dataclass
class Bout:
    """One kernel's duel: its hand schedule (or, where none fits, TVM's own schedule: ``against``
    ``"default"``) and its best record, ms (warm + cold medians)."""

    kernel: str
    hand_ms: float
    record_ms: float
    against: str = "hand"

    @property
    def hand_wins(self) -> bool:
        return self.hand_ms <= self.record_ms


def _side_by_side(hand_mod, records_mod, preset, number: int, repeat: int) -> dict[str, tuple[float, float]]:
    """Each kernel of two scheduled modules, built, timed alone in turns (hand, record, record,
    hand: a drift of the machine's speed hits both alike): name (as lowered) → (hand ms, record
    ms), each the sum of its warm and cold medians over both turns."""
    from . import kernels, pipeline, profile

    built = []
    for mod in (hand_mod, records_mod):
        library = profile.kernel_library(pipeline.codegen(mod, preset))
        built.append((library, {k.name.removesuffix(PREPACKED): k for k in kernels.list_kernels(mod)}))
    times = {}
    for name in built[0][1].keys() & built[1][1].keys():
        ms = [0.0, 0.0]
        for side in (0, 1, 1, 0):
            library, found = built[side]
            (row,) = profile.time_kernels(library, [found[name]], number=number, repeat=repeat)
            ms[side] += row.median_ms + row.cold_ms
        times[name] = (ms[0], ms[1])
    return times


def _from_records(mod) -> set[str]:
    """The kernels (names as lowered) a records-only build scheduled."""
    from .tir_analysis import scheduled_names

    return {name.removesuffix(PREPACKED) for name in scheduled_names(mod)}


def duel(mod, preset: targets.TargetPreset, records_dir: Path, source: str = "hand", number: int = 10,
         repeat: int = 5) -> list[Bout]:
    """Time each kernel of the lowered model ``mod`` that the records (``records_dir``) schedule
    against its hand schedule (``source``; where the records measured it) or, where no hand
    schedule fits, TVM's own schedule, and write ``hand_wins.json``: the kernels where the record
    was not faster. Returns the bouts, one per such kernel."""
    from tvm import relax

    from . import pipeline, schedules

    if not any(gv.name_hint == "main" and isinstance(f, relax.Function) for gv, f in mod.functions.items()):
        return []  # kernels without a model (the study's layers): nothing calls them
    records_dir = Path(records_dir)
    measured = read_hand_measured(records_dir)
    keys = pipeline.workload_keys(mod)  # kernel name → workload key
    if not check_records(records_dir, preset) or not any(key in measured for key in keys.values()):
        return []  # another CPU's records (set aside, a note logged), or none measured a hand schedule
    hand_db = schedules.database(preset, source)
    records_only = pipeline.schedule(mod, preset, records_dir, schedules.NONE)[0]
    times = _side_by_side(pipeline.schedule(mod, preset, None, source)[0], records_only, preset, number, repeat)
    tuned = _from_records(records_only)
    bouts, wins = [], {}
    for name, key in sorted(keys.items()):
        if name not in times:
            continue
        if key in measured:  # its hand schedule against its best record
            bout = Bout(name, *times[name])
            if bout.hand_wins:
                wins[key] = measured[key]
        elif name in tuned and not hand_db.fits(mod[name]):
            bout = Bout(name, *times[name], DEFAULT)  # no hand schedule: TVM's own
            if bout.hand_wins:
                wins[key] = DEFAULT
        else:
            continue
        bouts.append(bout)
    write_hand_wins(records_dir, wins)
    for bout in bouts:
        log.debug("duel %s: %s %.1f us, record %.1f us", bout.kernel, bout.against, bout.hand_ms * 1e3,
                  bout.record_ms * 1e3)
    kept = sum(1 for value in wins.values() if value != DEFAULT)
    log.info("duel of each kernel's best record and its hand schedule, timed side by side: %d of %d kernels "
             "keep their hand schedule, %d of %d without one TVM's own (%s)", kept,
             sum(1 for b in bouts if b.against == "hand"), len(wins) - kept,
             sum(1 for b in bouts if b.against == DEFAULT), records_dir / "hand_wins.json")
    return bouts
