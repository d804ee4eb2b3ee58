"""The duel: each kernel's best tuning record against its hand schedule, timed side by side.

``tune`` measures every candidate once, in the order the search reaches it, each alone in
MetaSchedule's runner, and a build then gives each kernel its fastest record. Where the records
measured the kernel's hand schedule (it is measured first, and again after the search), that
rule says the best record is never slower than the hand schedule. On a shared 2-core machine it
was wrong often enough to lose in the model: V1 g3 1x tuned for 400 trials on an AMD EPYC
(znver4) ran 2.43 ms with its records against 2.24 ms with the hand schedules alone
(interleaved). The tuner had timed the hand schedule of ``fused_conv2d9_add8_relu6`` at 106
and 145 us and a record at 85; side by side (below), 73 and 98 us warm.

So at the end of ``tune`` (here, not over RPC), each kernel whose records measured its hand
schedule gets one more comparison: the build with the hand schedules alone and the build with
the records alone are made, and each kernel of both is timed alone, one after the other, in
one process, with :func:`tvmshuffle.profile.time_kernels` — warm and cold (weights and output
flushed), the two medians summed. Where the record is not faster, ``hand_wins.json`` notes the
kernel's hand schedule and a build gives it that (:meth:`tvmshuffle.records.Records.go_first`).
The same V1 records with the duel's choice (13 of 27 kernels keep their record: the pools, the
stem, the classifier and a few 1x1 convs): 2.15 ms against 2.24 hand-only (12 interleaved rounds).
A later ``tune`` of the same dir runs the duel again on its records.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from . import targets
from .records import open_records, read_hand_measured, write_hand_wins

log = logging.getLogger(__name__)

PREPACKED = "_prepacked"  # the name a kernel gets once its weight repacking moved to compile time


@dataclass
class Bout:
    """One kernel's duel: its hand schedule and its best record, ms (warm + cold medians)."""

    kernel: str
    hand_ms: float
    record_ms: float

    @property
    def hand_wins(self) -> bool:
        return self.hand_ms <= self.record_ms


def _timed(mod, preset, number: int, repeat: int) -> dict[str, float]:
    """Each kernel of a scheduled module, built, timed alone: name (as lowered) → warm + cold ms."""
    from . import kernels, pipeline, profile

    library = profile.kernel_library(pipeline.codegen(mod, preset))
    rows = profile.time_kernels(library, kernels.list_kernels(mod), number=number, repeat=repeat)
    return {row.kernel.name.removesuffix(PREPACKED): row.median_ms + row.cold_ms for row in rows}


def duel(mod, preset: targets.TargetPreset, records_dir: Path, source: str = "hand", number: int = 10,
         repeat: int = 5) -> list[Bout]:
    """Time each kernel of the lowered model ``mod`` whose records (``records_dir``) measured its hand
    schedule (``source``) against its best record, and write ``hand_wins.json``: the kernels
    where the hand schedule was not slower. Returns the bouts, one per such kernel."""
    from . import pipeline, schedules

    from tvm import relax

    if not any(gv.name_hint == "main" and isinstance(f, relax.Function) for gv, f in mod.functions.items()):
        return []  # kernels without a model (the study's layers): nothing calls them
    records_dir = Path(records_dir)
    records = open_records(records_dir, preset)
    measured = read_hand_measured(records_dir)
    keys = pipeline._workload_keys(mod)  # noqa: SLF001 - kernel name → workload key
    if records is None or not any(key in measured for key in keys.values()):
        return []
    hand = _timed(pipeline.schedule(mod, preset, None, source)[0], preset, number, repeat)
    best = _timed(pipeline.schedule(mod, preset, records_dir, schedules.NONE)[0], preset, number, repeat)
    bouts, wins = [], {}
    for name, key in sorted(keys.items()):
        if key not in measured or name not in hand or name not in best:
            continue
        bout = Bout(name, hand[name], best[name])
        bouts.append(bout)
        if bout.hand_wins:
            wins[key] = measured[key]
    write_hand_wins(records_dir, wins)
    for bout in bouts:
        log.debug("duel %s: hand %.1f us, record %.1f us", bout.kernel, bout.hand_ms * 1e3, bout.record_ms * 1e3)
    log.info("duel of each kernel's best record and its hand schedule, timed side by side: %d of %d kernels "
             "keep their hand schedule (%s)", len(wins), len(bouts), records_dir / "hand_wins.json")
    return bouts
