"""Hand schedules: find, describe, apply (the default of every build; ``--schedules none``: off).

The schedules themselves live in the repository's top-level ``schedules/`` directory (installed
with the package, see :mod:`tvmshuffle._shipped`), one file per kind of layer (``pointwise.py``,
``depthwise.py``, ``dw_pointwise.py``, ``stem.py``, ``matmul.py``, ``pool.py``, ``injective.py``), so that a user studying them edits plain files; this module is the registry
that loads them (``dw_pointwise.py`` builds on two others: :func:`sibling`) and the glue to the compiler:

* :func:`describe` (of :mod:`tvmshuffle.tir_analysis`, named here too) reads a fused PrimFunc
  (conv block ``shuffle_group_conv2d``, maybe a ``shuffle_pad`` stage before it, epilogue
  blocks after it) into the :class:`ConvLayer` a schedule file takes;
* :func:`isa_for` picks the vector ISA of a target preset (:data:`ISAS`: AVX2, NEON);
* :func:`load` loads a schedule directory (``"hand"`` = the shipped ``schedules/``);
* :func:`database` is the hand schedules as a MetaSchedule database
  (``ms.database.ScheduleFnDatabase``): :func:`tvmshuffle.pipeline.schedule` puts it in one
  database with the tuning records' and applies that;
* :func:`schedule_primfunc` / :func:`apply` put the hand schedule into one PrimFunc / every
  fitting PrimFunc of a lowered module (through :func:`database`);
* :func:`space_generator` makes a MetaSchedule design space from a hand schedule, its tile
  sizes left to the search, so tuning starts from it (``tvmshuffle tune``, by default).

``--schedules`` takes ``hand`` (the default: the shipped ``schedules/``), ``none`` (no hand
schedules: TVM alone) or a directory of schedule files. The value ``default`` of earlier
versions meant "no hand schedules"; it is refused with a one-line error naming both new values
(:func:`check_source`) rather than taken as an alias, whose meaning would be unclear.

A schedule file defines ``NAME``, ``matches(layer, isa) -> bool`` and
``apply(sch, layer, isa, sample=False)``; with ``sample=True`` it draws its tile sizes with
``sch.sample_perfect_tile`` (the hand choice as the initial decision) instead of fixing them,
which is what makes it a design space (:func:`split_factors` gives either). Helpers for the
files: :func:`phase_columns` and :func:`vectorize_padding` (a stride-2 window's padded plane).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from . import _shipped, targets
from .errors import UserError, first_line
# what a PrimFunc is (read by the schedule files): defined with the TIR analysis, named here too
from .tir_analysis import (  # noqa: F401 - re-exported
    CONV_BLOCK, CONV_BLOCKS, PAD_BLOCK, PAD_BLOCKS, ConvLayer, MatmulLayer, PoolLayer, describe, is_scheduled)

log = logging.getLogger(__name__)

#: ``--schedules`` values besides a directory path: the shipped hand schedules (the default), none
HAND, NONE = "hand", "none"
#: the value that meant "no hand schedules" before they became the default (refused)
RETIRED = "default"


@dataclass(frozen=True)
class Isa:
    """What a schedule needs to know of a vector ISA (fp32)."""

    name: str
    lanes: int  # fp32 lanes of one vector register
    registers: int  # architectural vector registers
    fma_units: int  # vector FMA instructions issued per cycle (typical core)
    #: wider vectors the ISA also has (AVX-512's zmm), which a schedule may take where ``lanes``
    #: cannot fill whole vectors (see ``ISAS``); None: none
    wide: Isa | None = None
    #: whether LLVM lowers TVM's stride-2 vector loads to de-interleaving loads (NEON ``ld2``).
    #: Where it does not (x86: a gather, or without one a scalar load and insert per lane), the
    #: schedules leave stride-2 rows to LLVM's loop vectorizer (``pool.py``, ``depthwise.py``,
    #: :func:`vectorize_padding`)
    deinterleaving_loads: bool = False


#: AVX-512F's own registers: 32 zmm of 16 floats
ZMM = Isa("zmm", lanes=16, registers=32, fma_units=2)

#: The vector ISAs the hand schedules are written for.
ISAS = {
    # x86-64 with AVX2 + FMA: 16 ymm registers of 8 floats, 2 FMA pipes (Haswell .. Zen 3).
    "avx2": Isa("avx2", lanes=8, registers=16, fma_units=2),
    # x86-64 with AVX-512F (Skylake-SP .. Sapphire Rapids, Ice/Rocket Lake, Zen 4): the schedules
    # keep AVX2's 8-float vectors and take 16-float zmm vectors only where 8 lanes cannot fill
    # whole vectors (pointwise.py: V2's 116-channel 14x14 convs, 4-float vectors under AVX2).
    # Measured in the whole model, V2 1x on a Xeon (LLVM: rocketlake), interleaved runs of one
    # process: 1 thread, AVX2 4.71 ms, zmm only there 3.82 ms, zmm for every schedule 4.27 ms;
    # 2 threads, AVX2 3.19 ms, zmm only there 2.95 ms (each kernel alone is faster with zmm, the
    # whole model is not: all-zmm lost most of the gain).
    "avx512": Isa("avx512", lanes=8, registers=16, fma_units=2, wide=ZMM),
    # AArch64 Advanced SIMD: 32 q registers of 4 floats; 2 FMA pipes on Cortex-A7x/X cores.
    "neon": Isa("neon", lanes=4, registers=32, fma_units=2, deinterleaving_loads=True),
}


def isa_for(preset: targets.TargetPreset) -> Isa:
    """The ISA the hand schedules use for ``preset``: NEON on AArch64; on x86-64 AVX-512 where
    the target's CPU (its ``-mcpu``, by LLVM's feature table) has AVX-512F, else AVX2.

    A target without ``mtriple`` (``host``) generates code for this machine: its ISA is this
    machine's (``platform.machine()``).
    """
    triple = str(preset.target.get("mtriple", "")) or platform.machine().lower()
    if triple.startswith(("aarch64", "arm64")):
        return ISAS["neon"]
    if not triple.startswith(("x86_64", "amd64", "i686")):
        raise UserError(f"--target {preset.name}: no hand schedules for {triple or 'this machine'} "
                        "(AVX2, AVX-512 and NEON only)")
    from tvm.target import codegen

    return ISAS["avx512" if codegen.llvm_cpu_has_features(["avx512f"], targets.tvm_target(preset)) else "avx2"]


def split_factors(sch, loop, inner: int, sample: bool):
    """Split factors for a schedule file: ``[None, inner]``, or (``sample``: the schedule is a
    MetaSchedule design space) a sampled perfect tile with ``inner`` as its first decision."""
    if not sample:
        return [None, inner]
    extent = int(sch.get(loop).extent)
    return sch.sample_perfect_tile(loop, n=2, max_innermost_factor=max(inner, 16),
                                   decision=[extent // inner, inner])


def phase_columns(sch, pad, stride: int) -> bool:
    """For a stride-2 window, lay the padded plane's columns out in two phases (column ``x`` at
    ``[.., x % 2, x // 2]``), so the window's stride-2 loads are unit-stride; whether it did (an
    odd number of padded columns has no such layout of the same size: its loads stay strided).
    The stem's and the pools' schedules use it, then :func:`vectorize_padding`."""
    if stride != 2 or int(sch.get(pad).writes[0].source.shape[-1]) % 2:
        return False
    sch.transform_layout(pad, ("write", 0), lambda n, c, yy, xx: (n, c, yy, xx % 2, xx // 2))
    return True


def vectorize_padding(sch, pad, phased: bool, isa: Isa | None = None) -> None:
    """Vectorize the padding stage along its columns. ``phased`` (:func:`phase_columns`): its
    loads are stride 2. On NEON (and with no ``isa``, as schedule files written before it was
    asked do) TVM vectorizes it phase by phase, contiguous stores (unchanged there: no ARM
    hardware here to time another form). On x86 LLVM makes TVM's stride-2 vector load a gather
    or a scalar load and insert per lane, so there the column pair is the loop body (both
    phases, unrolled) and the loop is left to LLVM's loop vectorizer, which loads whole vectors
    and de-interleaves them with shuffles: the stem 129 -> 92 us (AMD EPYC, ``znver4``,
    2 threads, interleaved rounds)."""
    *_, x = sch.get_loops(pad)
    if not phased:
        sch.vectorize(x)
        return
    x, phase = sch.split(x, [None, 2])
    if isa is None or isa.deinterleaving_loads:
        sch.reorder(phase, x)
        sch.vectorize(x)
    else:
        sch.unroll(phase)


# --------------------------------------------------------------------------- schedule files


def shipped_dir() -> Path:
    """The shipped ``schedules/`` (:func:`tvmshuffle._shipped.path`; ``$TVMSHUFFLE_SCHEDULES``
    overrides it)."""
    env = os.environ.get("TVMSHUFFLE_SCHEDULES")
    return Path(env) if env else _shipped.path("schedules")


def check_source(source: str | os.PathLike | None) -> str:
    """``--schedules`` as given → ``"hand"``, ``"none"`` or a directory; UserError (one line,
    naming the flag) for anything else, including the retired ``default``."""
    source = HAND if source is None else str(source)
    if source == RETIRED:
        raise UserError("--schedules default: no longer a value (hand schedules are the default now); "
                        "give --schedules none for TVM without them, or hand")
    if source not in (HAND, NONE) and not Path(source).is_dir():
        raise UserError(f"--schedules {source}: not 'hand', 'none' or a directory of schedule files")
    return source


def source_key(source: str | os.PathLike) -> str:
    """How a schedule source is recorded (``target.json``'s ``seed_schedules``): ``"hand"``,
    or a directory's absolute path."""
    source = check_source(source)
    return source if source in (HAND, NONE) else str(Path(source).resolve())


def _directory(source: str | os.PathLike) -> Path:
    source = check_source(source)
    if source == NONE:
        raise UserError("--schedules none: no schedule files to load")
    return shipped_dir() if source == HAND else Path(source)


def _load_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tvmshuffle_schedules.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - a user's file: say which one
        raise UserError(f"{path}: cannot load this schedule file ({type(err).__name__}: {err})") from err
    return module


def sibling(file: str | os.PathLike, name: str) -> ModuleType:
    """The schedule file ``name`` (e.g. ``"depthwise"``) in the directory of ``file`` (a schedule
    file's ``__file__``): how one schedule builds on others (``dw_pointwise.py`` on
    ``depthwise.py`` and ``pointwise.py``), the copies of its own directory, edited or not."""
    path = Path(file).with_name(f"{name}.py")
    if not path.is_file():
        raise UserError(f"{file}: needs the schedule file {path.name} beside it")
    return _load_file(path)


def load(source: str | os.PathLike = HAND) -> list[ModuleType]:
    """The schedule modules of a directory (``"hand"``: the shipped ones), in file-name order."""
    directory = _directory(source)
    modules = []
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_"):
            continue
        module = _load_file(path)
        missing = [a for a in ("NAME", "matches", "apply") if not hasattr(module, a)]
        if missing:
            raise UserError(f"{path}: a schedule file must define NAME, matches and apply (missing: {', '.join(missing)})")
        modules.append(module)
    if not modules:
        raise UserError(f"--schedules {source}: no schedule files (*.py) in {directory}")
    return modules


def find(layer: ConvLayer, isa: Isa, modules: list[ModuleType]) -> ModuleType | None:
    """The first schedule module that takes ``layer`` on ``isa``."""
    return next((m for m in modules if m.matches(layer, isa)), None)


def schedule_for(func, preset: targets.TargetPreset, modules: list[ModuleType]) -> ModuleType | None:
    """The schedule module that fits PrimFunc ``func`` on ``preset``, if any."""
    layer = describe(func)
    return find(layer, isa_for(preset), modules) if layer is not None else None


def _schedule(func, layer: ConvLayer, isa: Isa, module: ModuleType, sample: bool = False):
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    module.apply(sch, layer, isa, sample=sample)
    return sch


def schedule_primfunc(func, preset: targets.TargetPreset, source: str | os.PathLike = HAND,
                      modules: list[ModuleType] | None = None):
    """``func`` with its hand schedule (attr ``tirx.is_scheduled`` set), or None if none fits."""
    layer = describe(func)
    if layer is None:
        return None
    isa = isa_for(preset)
    module = find(layer, isa, modules if modules is not None else load(source))
    if module is None:
        return None
    try:
        sch = _schedule(func, layer, isa, module)
    except Exception as err:  # noqa: BLE001 - a schedule that does not apply is a user-facing bug
        raise UserError(f"schedule {module.NAME} ({module.__file__}) failed on {layer}: "
                        f"{first_line(err)}") from err
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def workload_key(mod) -> str:
    """A kernel as the records know it (``hand_schedules.json``'s keys): the structural hash of
    the ``main`` PrimFunc of its IRModule, hex (the module's own attributes, such as the task
    name MetaSchedule gives it, left out)."""
    import tvm_ffi

    return format(tvm_ffi.structural_hash(mod["main"]) & (2**64 - 1), "016x")


def fingerprint(scheduled_mod) -> str:
    """What a schedule made of a kernel (``hand_schedules.json``'s values): the structural hash
    of the scheduled ``main``, hex. Another tile, another ISA's schedule or an edited schedule
    file gives another fingerprint."""
    return workload_key(scheduled_mod)


def hand_fingerprint(mod, preset: targets.TargetPreset, source: str | os.PathLike = HAND,
                     modules: list[ModuleType] | None = None) -> str | None:
    """The :func:`fingerprint` of the hand schedule of kernel ``mod`` (a normalized IRModule),
    as :func:`database` schedules it; None where no hand schedule fits."""
    from tvm import s_tir

    layer = describe(mod["main"])
    isa = isa_for(preset)
    module = find(layer, isa, modules if modules is not None else load(source)) if layer is not None else None
    if module is None:
        return None
    sch = s_tir.Schedule(mod)
    module.apply(sch, layer, isa, sample=False)
    return fingerprint(sch.mod)


@dataclass
class HandDatabase:
    """The hand schedules of a directory for one target, as a MetaSchedule database (:func:`database`)."""

    #: ``ms.database.ScheduleFnDatabase``: asked for a PrimFunc, it answers with the hand
    #: schedule (no measured time), or nothing where no schedule file takes it (or ``defer`` says so)
    db: object
    modules: list[ModuleType]
    preset: targets.TargetPreset
    #: schedule files that failed while the database was applied (:meth:`raise_errors`)
    errors: list[str] = field(default_factory=list)
    #: the kernels (:func:`workload_key`) it answered for
    answered: set[str] = field(default_factory=set)
    #: the kernels it answered for with TVM's own schedule (``keep_default``)
    defaulted: set[str] = field(default_factory=set)

    def fits(self, func) -> bool:
        """Whether a hand schedule takes PrimFunc ``func`` (what the database will answer for,
        unless it defers to records)."""
        return not is_scheduled(func) and schedule_for(func, self.preset, self.modules) is not None

    def raise_errors(self) -> None:
        """UserError naming the first schedule file that failed (inside TVM's pass, whose own
        error would not name it): call after applying the database."""
        if self.errors:
            raise UserError(self.errors[0])


def database(preset: targets.TargetPreset, source: str | os.PathLike = HAND, defer=None,
             keep_default=None) -> HandDatabase:
    """The hand schedules of ``source`` for ``preset`` as an ``ms.database.ScheduleFnDatabase``.

    Asked for a PrimFunc, it schedules it with the first schedule file that takes it (tile
    sizes as the file chooses, ``sample=False``) and answers with that schedule's trace; for a
    PrimFunc none fits (or one already scheduled), nothing. ``defer(key, fingerprint)``
    (:func:`workload_key`, :func:`fingerprint`): True where tuning records measured exactly this
    hand schedule of the kernel; it then answers nothing there, and the records (next in an
    ``OrderedUnionDatabase``) answer with their best, which is never slower than it.
    ``keep_default(key)``: True for a kernel no hand schedule takes whose records' best lost the
    duel to TVM's own schedule (:mod:`tvmshuffle.duel`); it answers with the kernel as lowered.
    """
    from tvm.s_tir import meta_schedule as ms

    isa = isa_for(preset)
    modules = load(source)
    hand = HandDatabase(None, modules, preset)

    def schedule_fn(sch) -> bool:
        func = sch.mod["main"]
        if is_scheduled(func):
            return False
        key = workload_key(sch.mod)
        if keep_default is not None and keep_default(key):
            hand.defaulted.add(key)
            return True  # TVM's own schedule, as lowered: the records' best was slower side by side
        layer = describe(func)
        module = find(layer, isa, modules) if layer is not None else None
        if module is None:
            return False
        try:
            module.apply(sch, layer, isa, sample=False)
        except Exception as err:  # noqa: BLE001 - a schedule that does not apply is a user-facing bug
            hand.errors.append(f"schedule {module.NAME} ({module.__file__}) failed on {layer}: {first_line(err)}")
            return False
        if defer is not None and defer(key, fingerprint(sch.mod)):
            return False  # the records (asked next, on the kernel as it was) measured this very schedule
        hand.answered.add(key)
        return True

    hand.db = ms.database.ScheduleFnDatabase(schedule_fn)
    return hand


def apply(mod, preset: targets.TargetPreset, source: str | os.PathLike = HAND):
    """Hand-schedule every PrimFunc of ``mod`` that a schedule fits (:func:`database` applied
    by ``relax.transform.MetaScheduleApplyDatabase``). Returns ``(module, number of PrimFuncs
    scheduled)``; the caller's module is left as it was. Already scheduled PrimFuncs are left alone.
    """
    import tvm
    from tvm import relax

    hand = database(preset, source)
    count = sum(1 for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and hand.fits(f))
    if count:
        with targets.tvm_target(preset), hand.db:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        hand.raise_errors()
    log.info("hand schedules (%s): %d kernels", source, count)
    return mod, count


# --------------------------------------------------------------------------- MetaSchedule


def space_fn(preset: targets.TargetPreset, source: str | os.PathLike = HAND):
    """A MetaSchedule ``ScheduleFn`` body: the hand schedule with sampled tile sizes.

    Returns ``[]`` for PrimFuncs no hand schedule fits, so that in a
    ``SpaceGeneratorUnion`` with the default post-order-apply space it adds nothing there.
    """
    isa = isa_for(preset)
    modules = load(source)

    def fn(sch):
        layer = describe(sch.mod["main"])
        module = find(layer, isa, modules) if layer is not None else None
        if module is None:
            return []
        module.apply(sch, layer, isa, sample=True)
        return [sch]

    return fn


def space_generator(preset: targets.TargetPreset, source: str | os.PathLike = HAND):
    """Design space = MetaSchedule's own (post-order-apply) ∪ the hand schedule's."""
    from tvm.s_tir import meta_schedule as ms

    return ms.space_generator.SpaceGeneratorUnion(
        [ms.space_generator.PostOrderApply(), ms.space_generator.ScheduleFn(space_fn(preset, source))]
    )
