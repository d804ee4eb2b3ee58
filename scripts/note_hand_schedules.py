"""Write ``hand_schedules.json`` for records tuned before ``tune`` noted it.

A build lets a kernel's records go before its hand schedule only where ``hand_schedules.json``
says the records measured that very hand schedule (:class:`tvmshuffle.records.Records`). Records
tuned before the file existed do not say it, so their kernels get the hand schedules. This
looks through such records for the hand schedules they hold: for each kernel, each record's
trace (without MetaSchedule's postprocessing) is replayed on the kernel, and where the result
is the hand schedule a build would give it today (the same fingerprint,
:func:`tvmshuffle.schedules.hand_fingerprint`), the file notes it. A kernel whose records hold
another version of its hand schedule (tuned before its schedule file changed) is not noted: it
keeps its hand schedule until ``tvmshuffle tune`` measures it.

    python scripts/note_hand_schedules.py tuning_logs/host-znver4/shufflenet_v1_g3_x1_0 [--target host]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tvmshuffle import records, schedules, targets
from tvmshuffle.errors import UserError


def note(records_dir: Path, preset) -> tuple[int, int]:
    """Note the measured hand schedules of ``records_dir``: (kernels noted, kernels with a hand schedule)."""
    from tvm import s_tir

    opened = records.open_records(records_dir, preset, force=False)  # UserError: no records there
    if opened is None:
        raise UserError(f"{records_dir}: records of another CPU (see the note above); nothing to note")
    modules = schedules.load("hand")
    by_workload: dict = {}
    for record in opened.db.get_all_tuning_records():
        by_workload.setdefault(schedules.workload_key(record.workload.mod), []).append(record)
    noted = fitting = 0
    for key, found in sorted(by_workload.items()):
        kernel = found[0].workload.mod
        want = schedules.hand_fingerprint(kernel, preset, modules=modules)
        if want is None:
            continue
        fitting += 1
        for record in found:
            sch = s_tir.Schedule(kernel)
            try:
                record.trace.apply_to_schedule(sch, remove_postproc=True)
            except Exception:  # noqa: BLE001 - a trace of another schedule's structure
                continue
            if schedules.fingerprint(sch.mod) == want:
                records.note_hand_measured(records_dir, key, want)
                noted += 1
                break
    return noted, fitting


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records_dir", nargs="+", type=Path)
    parser.add_argument("--target", default="host")
    args = parser.parse_args()
    try:
        preset = targets.resolve(args.target)
        for records_dir in args.records_dir:
            noted, fitting = note(records_dir, preset)
            print(f"{records_dir}: the hand schedules of {noted} of {fitting} kernels with one are among the records")
    except UserError as err:  # one line, exit 2, as the CLI does; dirs done before it keep their notes
        print(f"note_hand_schedules.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
