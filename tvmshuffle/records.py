"""Tuning records on disk: where they live, which target they belong to, and applying them.

A records dir (``tuning_logs/<target>/<model>/``, :func:`records_dir_for`; the host's ``<target>``
names its CPU, ``host-znver4``, since tuning records belong to the CPU that measured them) holds

``database_workload.json`` / ``database_tuning_record.json``
    MetaSchedule's ``JSONDatabase`` (written by :mod:`tvmshuffle.tuning`), one JSON line per
    workload / measured candidate; a torn last line (a run killed mid-append) is dropped with a
    warning when the database is opened (:func:`repair_database_files`);
``target.json``
    the exact target the records were tuned for and its vector ISA. MetaSchedule's database
    is not target-aware (apache/tvm#15549), so :func:`check_target` refuses records of another
    ISA and sets aside (with a note) those of another CPU of the same ISA;
``hand_schedules.json``
    which hand schedule the records measured for each kernel: ``{kernel: fingerprint}``
    (:func:`tvmshuffle.schedules.workload_key`, :func:`~tvmshuffle.schedules.fingerprint`),
    noted by ``tune`` after measuring a hand schedule (:func:`note_hand_measured`). Where the
    records measured the hand schedule a build would use, their best is never slower than it
    and goes first; where they did not (tuned without hand schedules, with another ISA's, or
    before a schedule file changed), the hand schedule goes first (:meth:`Records.go_first`);
``hand_wins.json``
    the kernels whose hand schedule beat the records' best when ``tune`` timed the two side by
    side at its end (:mod:`tvmshuffle.duel`): their hand schedule goes first; and (``"default"``)
    the kernels no hand schedule takes whose best record lost to TVM's own schedule: they keep it.

:func:`apply_records` puts the best record of each kernel into a lowered module.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import _shipped, targets
from .errors import UserError
from .tir_analysis import scheduled_names

log = logging.getLogger(__name__)

WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
TARGET_FILE = "target.json"
HAND_FILE = "hand_schedules.json"
WINS_FILE = "hand_wins.json"
#: ``hand_wins.json``'s value for a kernel no hand schedule takes that keeps TVM's own schedule
DEFAULT = "default"

#: target attributes that do not change the generated code (compared with a warning only)
_NON_CODEGEN_KEYS = ("num-cores",)


def default_root() -> Path:
    """Where records live: ``$TVMSHUFFLE_TUNING_LOGS``, else the shipped ``tuning_logs/``
    (:func:`tvmshuffle._shipped.path`: the repository's own directory in an editable install)."""
    env = os.environ.get("TVMSHUFFLE_TUNING_LOGS")
    if env:
        return Path(env)
    return _shipped.path("tuning_logs")


def records_key(model_name: str, fused: bool = True, input_shape=None) -> str:
    """The ``<model>`` part of a records dir: ``-unfused`` and ``-HxW`` (not 224x224) set apart
    records of modules with other kernels."""
    key = model_name if fused else f"{model_name}-unfused"
    if input_shape is not None and tuple(input_shape)[2:] != (224, 224):
        key += f"-{input_shape[2]}x{input_shape[3]}"
    if input_shape is not None and input_shape[0] != 1:
        key += f"-b{input_shape[0]}"
    return key


def records_dir_for(preset: targets.TargetPreset, model_name: str, root: Path | None = None) -> Path:
    """``tuning_logs/<target>/<model>/`` (:func:`tvmshuffle.targets.records_name`: ``host-znver4``
    for the host; path separators in the names become ``_``)."""
    root = default_root() if root is None else root

    def clean(name: str) -> str:
        name = str(name).replace(os.sep, "_").replace("/", "_").strip()
        return name if name not in ("", ".", "..") else "_"

    return Path(root) / clean(targets.records_name(preset)) / clean(model_name)


def other_cpus(preset: targets.TargetPreset, model_name: str, root: Path | None = None) -> list[str]:
    """The other CPUs that have host records of ``model_name`` under ``root`` (the shipped ones by
    default): ``["rocketlake", "znver4"]``; [] for a target that is not the host."""
    if preset.name != "host":
        return []
    root = Path(default_root() if root is None else root)
    mine = targets.records_name(preset)
    prefix = targets.HOST_RECORDS_PREFIX
    return sorted(d.name.removeprefix(prefix) for d in root.glob(prefix + "*")
                  if d.name != mine and (d / model_name / WORKLOAD_FILE).is_file())


def _target_dict(preset: targets.TargetPreset) -> dict:
    """The canonical JSON dict of the TVM target a preset compiles for (with num-cores)."""
    return json.loads(str(targets.tvm_target(preset)))


def _target_text(target: dict) -> str:
    return json.dumps(target, sort_keys=True, separators=(",", ":"))


def _codegen_part(target: dict) -> dict:
    """What of a target decides which records fit it: not ``num-cores``, nor the LLVM features
    the host preset adds (:data:`tvmshuffle.targets.X86_HOST_FEATURES`, how LLVM lowers a load),
    so records tuned before those were added still apply."""
    part = {k: v for k, v in target.items() if k not in _NON_CODEGEN_KEYS}
    mattr = [f for f in part.pop("mattr", []) if f not in targets.X86_HOST_FEATURES]
    return {**part, "mattr": mattr} if mattr else part


def read_target_json(records_dir: Path) -> dict | None:
    path = records_dir / TARGET_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("target"), dict):
            raise ValueError("no 'target' object")
        return data
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable target record ({err})") from None


def _isa(target: dict, stored: dict | None = None) -> str:
    """The vector ISA a target's code uses ("avx2", "neon", or its triple): recorded in
    target.json; for older records, read from the triple (no triple: the shipped x86 records)."""
    if stored and stored.get("isa"):
        return stored["isa"]
    triple = str(target.get("mtriple", "")) or "x86_64"
    if triple.startswith(("aarch64", "arm64")):
        return "neon"
    return "avx2" if triple.startswith(("x86_64", "amd64", "i686")) else triple


#: vector ISAs of one instruction set (records of one may serve another's CPU: see set_aside)
_ARCH = {"avx2": "x86-64", "avx512": "x86-64", "neon": "aarch64"}


def _arch(isa: str) -> str:
    return _ARCH.get(isa, isa)


def _preset_isa(preset: targets.TargetPreset) -> str:
    from . import schedules

    try:
        return schedules.isa_for(preset).name
    except UserError:  # an ISA with no hand schedules
        return _isa(_target_dict(preset))


def _other_cpu(theirs: dict, current: dict) -> str:
    return f"tuned on {theirs.get('mcpu', 'generic')}, this CPU is {current.get('mcpu', 'generic')}"


def _only_the_cpu_differs(stored: dict, current: dict, preset: targets.TargetPreset) -> bool:
    """Records (``stored``: their target.json) for another CPU of ``preset``'s ISA: the targets
    differ in ``-mcpu`` alone."""
    theirs = stored["target"]
    return (_codegen_part(theirs) != _codegen_part(current) and _arch(_isa(theirs, stored)) == _arch(_preset_isa(preset))
            and _codegen_part({**theirs, "mcpu": None}) == _codegen_part({**current, "mcpu": None}))


def set_aside(records_dir: Path, preset: targets.TargetPreset, force: bool = False) -> str | None:
    """Why a build for ``preset`` sets the records of ``records_dir`` aside (``"tuned on
    znver4, this CPU is rocketlake"``), or None when it applies them (or refuses them: see
    :func:`check_target`)."""
    stored = read_target_json(Path(records_dir))
    current = _target_dict(preset)
    if force or stored is None or not _only_the_cpu_differs(stored, current, preset):
        return None
    return _other_cpu(stored["target"], current)


def check_target(records_dir: Path, preset: targets.TargetPreset, purpose: str,
                  force: bool = False) -> bool:
    """Whether records in ``records_dir`` may be used for ``preset``.

    Records of another ISA, or of another target when adding to them, are refused
    (UserError). Records of another CPU of the same ISA (another ``-mcpu``) are set aside
    with a note (False): tuning records belong to the CPU that measured them. ``force``
    applies them anyway.
    """
    stored = read_target_json(records_dir)
    current = _target_dict(preset)
    if stored is None:
        raise UserError(
            f"{records_dir}: no {TARGET_FILE}, so the target these records were tuned for is "
            f"unknown; refusing to {purpose} them (tune with `tvmshuffle tune` to record it)"
        )
    theirs = stored["target"]
    if _codegen_part(theirs) != _codegen_part(current):
        if not (purpose == "apply" and _only_the_cpu_differs(stored, current, preset)):
            raise UserError(
                f"{records_dir}: records were tuned for target {stored.get('preset', '?')} "
                f"{_target_text(_codegen_part(theirs))}, not for {preset.name} "
                f"{_target_text(_codegen_part(current))}; refusing to {purpose} them "
                "(MetaSchedule's database is not target-aware, apache/tvm#15549)"
            )
        cpus = _other_cpu(theirs, current)
        if force:
            log.warning("%s: records %s; applying them anyway (--force-records)", _shipped.display(records_dir), cpus)
            return True
        log.warning("%s: records %s: set aside, they belong to the CPU that measured them (tune for this CPU: "
                    "tvmshuffle tune MODEL --target %s --trials 400; or --force-records)",
                    _shipped.display(records_dir), cpus, preset.name)
        return False
    for key in _NON_CODEGEN_KEYS:
        if theirs.get(key) != current.get(key):
            log.warning("%s: records tuned with %s=%s, now %s=%s", records_dir, key,
                        theirs.get(key), key, current.get(key))
    return True


def write_target_json(records_dir: Path, preset: targets.TargetPreset, seed_schedules: str | None = None,
                      cache: str | None = None) -> None:
    """``target.json``: the target, its ISA, ``seed_schedules`` — the hand schedules whose
    own schedule is measured among the records for every kernel they fit (for the reader: a
    build decides kernel by kernel from ``hand_schedules.json``) — and ``cache``, how the
    candidates were timed (``tune --cache``: cold or warm); each kept from the file when None."""
    import tvm

    data = {"preset": preset.name, "target": _target_dict(preset), "isa": _preset_isa(preset),
            "tvm": tvm.__version__}
    stored = read_target_json(records_dir) or {}
    seed_schedules = seed_schedules or stored.get("seed_schedules")
    if seed_schedules:
        data["seed_schedules"] = seed_schedules
    cache = cache or stored.get("cache")
    if cache:
        data["cache"] = cache
    atomic_write(records_dir / TARGET_FILE, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _torn_tail(path: Path) -> tuple[bytes, int] | None:
    """If the last line of a JSON-lines file is torn (killed mid-append): the good part and
    the number of bytes dropped; None if the file is whole.

    Each line is one JSON array, so a prefix of a line that still parses is the whole line
    (only its newline is missing, which is added back).
    """
    data = path.read_bytes()
    body = data.rstrip(b"\n")
    if not body:
        return None
    last = body.rsplit(b"\n", 1)[-1]
    try:
        json.loads(last)
    except ValueError:
        cut = len(body) - len(last)
        return data[:cut], len(data) - cut
    if data.endswith(b"\n"):
        return None
    return data + b"\n", 0


def repair_database_files(records_dir: Path, in_place: bool) -> Path:
    """Drop a torn trailing line of the database files (with a warning).

    ``in_place``: rewrite the files (tuning owns the dir); else write repaired copies to a
    temporary dir and return it (applying records must not modify them). Returns the dir to
    load the database from.
    """
    torn = {}
    for name in (WORKLOAD_FILE, RECORD_FILE):
        path = records_dir / name
        if path.exists():
            result = _torn_tail(path)
            if result is not None:
                torn[name] = result
    if not torn:
        return records_dir
    for name, (_, dropped) in torn.items():
        if dropped:
            log.warning("%s: dropping a truncated last line (%d bytes; the run writing it was "
                        "killed mid-write)", records_dir / name, dropped)
    if in_place:
        for name, (good, _) in torn.items():
            path = records_dir / name
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(good)
            os.replace(tmp, path)
        return records_dir
    copy = Path(tempfile.mkdtemp(prefix="tvmshuffle-records-"))
    for name in (WORKLOAD_FILE, RECORD_FILE):
        src = records_dir / name
        data = torn[name][0] if name in torn else src.read_bytes()
        (copy / name).write_bytes(data)
    return copy


def open_database(db_dir: Path, where: Path):
    """MetaSchedule's JSONDatabase on ``db_dir`` (files created when missing)."""
    from tvm.s_tir import meta_schedule as ms

    try:
        return ms.database.JSONDatabase(
            path_workload=str(db_dir / WORKLOAD_FILE),
            path_tuning_record=str(db_dir / RECORD_FILE),
            allow_missing=True,
            module_equality="structural",
        )
    except Exception as err:  # noqa: BLE001 - TVM raises its own error kinds
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        raise UserError(
            f"{where}: cannot load the tuning database ({lines[0] if lines else err!r})"
        ) from None


def has_database(records_dir: Path) -> bool:
    return (records_dir / WORKLOAD_FILE).is_file() and (records_dir / RECORD_FILE).is_file()


# ---------------------------------------------------------------------------------------------
# applying records at build time


def check_records(records_dir: Path, preset: targets.TargetPreset, force: bool = False) -> bool:
    """UserError unless ``records_dir`` holds a tuning database for ``preset``'s ISA; False
    (with a note) if it was tuned on another CPU and ``force`` is not set: see :func:`check_target`."""
    records_dir = Path(records_dir)
    if not records_dir.is_dir():
        raise UserError(f"--tuning-records {records_dir}: no such directory")
    if not has_database(records_dir):
        raise UserError(
            f"--tuning-records {records_dir}: no tuning database there "
            f"({WORKLOAD_FILE}, {RECORD_FILE}); run `tvmshuffle tune` first"
        )
    return check_target(records_dir, preset, "apply", force)


def _read_kernel_map(path: Path) -> dict[str, str]:
    """A ``{kernel: fingerprint}`` file ({} when there is none)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return {str(k): str(v) for k, v in data.items()}
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable ({err})") from None


def read_hand_measured(records_dir: Path) -> dict[str, str]:
    """``hand_schedules.json``: kernel → fingerprint of the hand schedule the records measured
    for it ({} when there is none: records tuned without hand schedules, or before the file)."""
    return _read_kernel_map(Path(records_dir) / HAND_FILE)


def read_hand_wins(records_dir: Path) -> dict[str, str]:
    """``hand_wins.json``: kernel → fingerprint of the hand schedule that beat the records' best
    for it when both were timed side by side (:mod:`tvmshuffle.duel`), or ``"default"``: TVM's own
    schedule beat it ({} when there is none)."""
    return _read_kernel_map(Path(records_dir) / WINS_FILE)


def write_hand_wins(records_dir: Path, wins: dict[str, str]) -> None:
    atomic_write(Path(records_dir) / WINS_FILE, json.dumps(wins, indent=1, sort_keys=True) + "\n")


def note_hand_measured(records_dir: Path, key: str, fingerprint: str) -> None:
    """Note in ``hand_schedules.json`` that the records now hold a measurement of the hand
    schedule ``fingerprint`` of kernel ``key``."""
    measured = read_hand_measured(records_dir)
    if measured.get(key) != fingerprint:
        measured[key] = fingerprint
        atomic_write(Path(records_dir) / HAND_FILE, json.dumps(measured, indent=1, sort_keys=True) + "\n")


@dataclass
class Records:
    """A records dir opened for a build (:func:`open_records`)."""

    path: Path
    #: MetaSchedule's ``JSONDatabase`` of the records (read into memory; the files are not written)
    db: object
    #: ``hand_schedules.json``: kernel → the hand schedule the records measured for it
    hand_measured: dict[str, str]
    #: ``hand_wins.json``: kernel → the hand schedule that beat the records' best side by side
    hand_wins: dict[str, str] = field(default_factory=dict)

    def go_first(self, key: str, fingerprint: str) -> bool:
        """Whether the records' best goes before hand schedule ``fingerprint`` of kernel ``key``
        (the ``defer`` of :func:`tvmshuffle.schedules.database`): they measured it, so their best
        is never slower than it by their own times, and it did not win the duel
        (:mod:`tvmshuffle.duel`: both timed again side by side)."""
        return self.hand_measured.get(key) == fingerprint and self.hand_wins.get(key) != fingerprint

    def hand_won(self, key: str) -> bool:
        """Whether the hand schedule the records measured for kernel ``key`` won the duel against
        their best (so a build takes it, though the records measured it)."""
        return key in self.hand_wins and self.hand_wins[key] == self.hand_measured.get(key)

    def default_wins(self, key: str) -> bool:
        """Whether kernel ``key`` (no hand schedule takes it) keeps TVM's own schedule: the
        records' best was slower than it in the duel (the ``keep_default`` of
        :func:`tvmshuffle.schedules.database`)."""
        return self.hand_wins.get(key) == DEFAULT


def open_records(records_dir: Path, preset: targets.TargetPreset, force: bool = False) -> Records | None:
    """The records of ``records_dir`` for a build for ``preset``, or None when they are set
    aside (another CPU, a note logged; ``force`` applies them). Refuses (UserError) a records
    dir that does not exist, has no database, or was tuned for another ISA."""
    records_dir = Path(records_dir)
    if not check_records(records_dir, preset, force):
        return None
    db_dir = repair_database_files(records_dir, in_place=False)
    try:
        database = open_database(db_dir, records_dir)  # reads the files, writes nothing
    finally:
        if db_dir != records_dir:
            import shutil

            shutil.rmtree(db_dir, ignore_errors=True)
    return Records(records_dir, database, read_hand_measured(records_dir), read_hand_wins(records_dir))


def apply_records(mod, preset: targets.TargetPreset, records_dir: Path, force: bool = False):
    """Put the best tuned schedule of each PrimFunc of ``mod`` into it (records only: no
    hand schedules; :func:`tvmshuffle.pipeline.schedule` applies both).

    Returns ``(module, number of PrimFuncs that got a tuned schedule)``. Refuses (UserError) a
    records dir that does not exist, has no database, or was tuned for another ISA; records
    of another CPU are set aside (0 tuned) unless ``force``.
    """
    import tvm
    from tvm import relax

    records = open_records(records_dir, preset, force)
    if records is None:
        return mod, 0
    target = targets.tvm_target(preset)
    before = scheduled_names(mod)
    with target, records.db:
        applied = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    tuned = len(scheduled_names(applied) - before)
    kernels = sum(1 for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))
    log.info("applied tuning records from %s: %d of %d kernels tuned", records_dir, tuned, kernels)
    return applied, tuned
