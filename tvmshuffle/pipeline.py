"""The whole compiler, top to bottom: import → fuse → (tune) → build → export.

Each phase is one function; :func:`compile_model` runs them in order and is what the CLI's
``compile`` calls. Read this file to know what happens to a model.

1. **import** (:func:`tvmshuffle.frontend.load`): zoo name / ``.pt2`` / ``.onnx`` → Relax,
   weights bound as constants, batch norm folded.
2. **fuse** (:func:`lower`): ``FuseShuffleGroupConv`` puts every channel shuffle into the
   convolution that reads it, ``FuseDepthwisePointwise`` every depthwise conv and the 1x1 conv
   reading it into one kernel, ``FuseConvPool`` the stem conv and its max pool, then TVM's own
   lowering — LegalizeOps (ops → TIR), AnnotateTIROpPattern, FoldConstant, FuseOps + FuseTIR
   (bias/BN, ReLU and residual adds fused behind each convolution). The result is what
   MetaSchedule tunes.
3. **tune** (:mod:`tvmshuffle.tuning`, separate command): records under ``tuning_logs/``.
4. **build** (:func:`schedule`, :func:`codegen`): one MetaSchedule database applied — the hand
   schedules (:mod:`tvmshuffle.schedules`, the default; ``--schedules none``: off) and the
   tuning records (if any), each kernel getting the faster of the two (see :func:`schedule`) —,
   weight repacking folded into the constants, code for the target.
5. **export** (:func:`export`): one shared library, cross-linked for ARM targets.

``--dump-code asm,tir,relax`` (:func:`dump_code`) writes what was built beside the library:
the assembly, the scheduled kernels (TIR) and the Relax graph calling them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import frontend, targets
from .errors import UserError, writable_output
from .tir_analysis import is_scheduled, scheduled_names

log = logging.getLogger(__name__)


@dataclass
class CompileConfig:
    """What ``tvmshuffle compile`` is asked to do."""

    target: str = "host"
    fuse: bool = True
    tuning_records: Path | None = None
    cross_compiler: str | None = None
    input_shape: tuple[int, ...] | None = None
    weights: str | None = None
    #: "hand" (schedules/, the default), "none" (TVM alone: records or untuned) or a directory
    #: of schedule files; with records, :func:`schedule` says which wins where
    schedules: str = "hand"
    #: apply records tuned on another CPU of the same ISA (else they are set aside with a note)
    force_records: bool = False
    #: what to write beside the library (:data:`DUMP_SUFFIXES`): "asm", "tir", "relax"
    dump_code: tuple[str, ...] = ()


@dataclass
class CompileResult:
    output: Path
    target: targets.TargetPreset
    kernels: int
    tuned_kernels: int
    hand_kernels: int
    seconds: float
    model: frontend.ImportedModel
    #: ``--dump-code`` kind → the file written
    dumps: dict[str, Path] = field(default_factory=dict)
    #: the VM executable the library was exported from (e.g. to export its kernels alone)
    executable: object = None
    #: the module after phase 2 (:func:`lower`: one unscheduled PrimFunc per kernel) and after
    #: phase 4a (:func:`schedule`), e.g. to rebuild it with some kernels changed (``profile --in-model``)
    lowered: object = None
    scheduled: object = None


def lower_passes(fuse: bool = True, across_layers: bool = True) -> list:
    """Phase 2: the graph passes, in order. ``across_layers`` (with ``fuse``): a depthwise conv
    and the 1x1 conv that reads it become one kernel, and so do the stem conv and its max pool
    (the study keeps them apart, to time each ``shuffle_group_conv2d`` alone)."""
    from tvm import relax

    passes = []
    if fuse:
        from .passes import FuseConvPool, FuseDepthwisePointwise, FuseShuffleGroupConv

        passes.append(FuseShuffleGroupConv())
        if across_layers:
            passes += [FuseDepthwisePointwise(), FuseConvPool()]
    passes += [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]
    return passes


def lower(mod, preset: targets.TargetPreset, fuse: bool = True, across_layers: bool = True):
    """Phase 2: Relax graph → fused Relax calling one PrimFunc per kernel (:func:`lower_passes`)."""
    import tvm

    with targets.tvm_target(preset):
        return tvm.transform.Sequential(lower_passes(fuse, across_layers))(mod)


def schedule(mod, preset: targets.TargetPreset, tuning_records: Path | None = None,
             schedule_source: str = "hand", force_records: bool = False):
    """Phase 4a: schedule the kernels. Returns (module, kernels from the records, hand-scheduled kernels).

    One MetaSchedule database is applied (``relax.transform.MetaScheduleApplyDatabase``): the
    hand schedules' (``schedule_source``: ``"hand"``, a directory, ``"none"`` for none; an
    ``ms.database.ScheduleFnDatabase``, :func:`tvmshuffle.schedules.database`) and the tuning
    records' (``tuning_records``: their ``JSONDatabase``) joined in an
    ``ms.database.OrderedUnionDatabase``, which answers for each kernel with the first
    database that has it. What wins when:

    The hand schedules come first, and defer, kernel by kernel, to records that measured them:

    * a kernel whose records measured exactly the hand schedule this build would give it
      (``tvmshuffle tune`` does by default: it builds, measures and commits each kernel's hand
      schedule before searching, and notes it in ``hand_schedules.json``): **its best record**,
      the faster of that hand schedule and everything the search found, as measured on the CPU
      that tuned them — unless the hand schedule won the duel at the end of ``tune`` (timed
      side by side with that best record, ``hand_wins.json``, :mod:`tvmshuffle.duel`): then
      **the hand schedule**;
    * a kernel whose records never measured its hand schedule (tuned with ``--schedules none``,
      with another ISA's schedules, or before its schedule file changed): **the hand
      schedule**, since the records never competed with it;
    * a kernel no hand schedule takes: its best record, if any — unless TVM's own schedule won
      the duel against it (``hand_wins.json``: ``"default"``): then TVM's own;
    * no records (none given, or another CPU's, set aside with a note): the hand schedules
      where they fit;
    * ``--schedules none``: the records alone; no records either: TVM's own lowering (the
      raw baseline).

    Kernels neither database answers for keep TVM's default schedule. ``UnionDatabase`` (the
    best across databases by measured time) is not used: the hand database's answers carry no
    time, which ``UnionDatabase`` ranks behind any measured record — the same as records first,
    also for records that never measured the hand schedule.

    A schedule may repack a weight in a block marked ``meta_schedule.layout_rewrite_preproc``;
    ``SplitLayoutRewritePreproc`` + ``FoldConstant`` move that repacking into the constant
    weights, so it is done once, at compile time (the kernel is then called
    ``<name>_prepacked``). Records tuned on another CPU are set aside with a note unless
    ``force_records`` (:func:`tvmshuffle.records.check_records`).
    """
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from . import schedules
    from .records import open_records

    source = schedules.check_source(schedule_source)
    records = open_records(Path(tuning_records), preset, force_records) if tuning_records is not None else None
    hand = None
    if source != schedules.NONE:
        hand = schedules.database(preset, source, defer=records.go_first if records else None,
                                    keep_default=records.default_wins if records else None)
    databases = [db for db in (hand.db if hand else None, records.db if records else None) if db is not None]
    from_hand = tuned = 0
    with targets.tvm_target(preset):
        if databases:
            database = databases[0] if len(databases) == 1 else ms.database.OrderedUnionDatabase(*databases)
            keys = workload_keys(mod)
            with database:
                scheduled = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            if hand is not None:
                hand.raise_errors()
            # what each kernel got: its hand schedule (the hand database answered), else a record
            done = scheduled_names(scheduled) - scheduled_names(mod)
            from_hand = sum(1 for name in done if hand is not None and keys[name] in hand.answered)
            kept_default = sum(1 for name in done if hand is not None and keys[name] in hand.defaulted)
            tuned = len(done) - from_hand - kept_default
            mod = scheduled
        mod = tvm.transform.Sequential([
            relax.transform.SplitLayoutRewritePreproc(),
            relax.transform.FoldConstant(),
            relax.transform.DeadCodeElimination(),
        ])(mod)
    if hand is not None and hand.answered and records is not None:
        won = sum(1 for key in hand.answered if records.hand_won(key))
        log.info("%s: %d kernels get their hand schedule (%d won the duel against the records' best; the others "
                 "the records never measured: tuned without it, or before it changed, `tvmshuffle tune` measures it)",
                 records.path, from_hand, won)
    log.info("scheduled %d kernels from %s, %s", tuned, records.path if records else "no records",
             f"{from_hand} with {source} schedules" if hand is not None else "no hand schedules (--schedules none)")
    return mod, tuned, from_hand


def workload_keys(mod) -> dict[str, str]:
    """The PrimFuncs of ``mod`` not yet scheduled: name → :func:`~tvmshuffle.schedules.workload_key`."""
    import tvm
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    from . import schedules

    return {gv.name_hint: schedules.workload_key(_normalize_mod(func)) for gv, func in mod.functions.items()
            if isinstance(func, tvm.tirx.PrimFunc) and not is_scheduled(func)}


def codegen(mod, preset: targets.TargetPreset):
    """Phase 4b: generate code for the target (the VM executable)."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    target = targets.tvm_target(preset)
    finish = tvm.transform.Sequential(
        cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target)
    )
    return tvm.compile(mod, target=target, relax_pipeline=finish)


def build(mod, preset: targets.TargetPreset, tuning_records: Path | None = None,
          schedule_source: str = "hand", force_records: bool = False):
    """Phase 4: :func:`schedule` + :func:`codegen`. Returns (executable, tuned, hand-scheduled)."""
    mod, tuned, hand = schedule(mod, preset, tuning_records, schedule_source, force_records)
    return codegen(mod, preset), tuned, hand


def export(executable, preset: targets.TargetPreset, output: Path) -> Path:
    """Phase 5: one deployable shared library (cross-linked for ARM presets)."""
    output = Path(output)
    if output.suffix != ".so":
        raise UserError(f"-o {output}: the library must end in .so")
    writable_output(output, "-o")
    targets.export_library(executable, preset, output)
    return output


#: ``--dump-code`` kinds → what is appended to the library's name (``m.so`` → ``m.so.s``)
DUMP_SUFFIXES = {"asm": ".s", "tir": ".tir.py", "relax": ".relax.py"}


def parse_dump_code(values) -> tuple[str, ...]:
    """``--dump-code`` values (each may be comma-separated; repeatable) → the kinds, in the
    order given, each once. UserError for an unknown kind."""
    if isinstance(values, str):
        values = [values]
    kinds: list[str] = []
    for value in values or ():
        for kind in str(value).split(","):
            kind = kind.strip().lower()
            if kind not in DUMP_SUFFIXES:
                raise UserError(f"--dump-code {value}: {kind or '(empty)'!r} is not one of "
                                f"{', '.join(DUMP_SUFFIXES)}")
            if kind not in kinds:
                kinds.append(kind)
    return tuple(kinds)


def dump_paths(library: Path, kinds) -> dict[str, Path]:
    """Where :func:`dump_code` writes each kind: ``<library>.s``, ``.tir.py``, ``.relax.py``."""
    return {kind: Path(str(library) + DUMP_SUFFIXES[kind]) for kind in parse_dump_code(kinds)}


def _llvm_modules(module) -> list:
    """The LLVM (host or cross) code modules among ``module`` and its imports."""
    found, stack, seen = [], [module], set()
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if m.kind == "llvm":
            found.append(m)
        stack.extend(m.imports)
    return found


def dump_code(mod, executable, library: Path, kinds, preset: targets.TargetPreset | None = None) -> dict[str, Path]:
    """Write what was built beside ``library`` (:func:`dump_paths`); returns kind → path.

    * ``asm``: the target's assembly, from the executable's LLVM module (``inspect_source("asm")``)
      — e.g. NEON ``fmla v0.4s, …`` for aarch64, AVX ``vfmadd…`` on ymm/zmm registers for x86;
    * ``tir``: the kernels (PrimFuncs) as scheduled — hand schedules, tuning records or
      TVM's defaults — in TVMScript;
    * ``relax``: the Relax graph as built (after lowering and scheduling: one ``call_tir`` per
      fused kernel, weights as ``metadata[...]`` constants) in TVMScript.

    ``mod`` is the scheduled module (:func:`schedule`), ``executable`` its :func:`codegen`.
    """
    import tvm
    from tvm import relax

    where = f" ({preset.name}: {json.dumps(preset.target)})" if preset is not None else ""
    paths = dump_paths(library, kinds)
    for kind, path in paths.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "asm":
            code = [m.inspect_source("asm") for m in _llvm_modules(executable.mod)]
            if not code:
                raise UserError(f"--dump-code asm: {library} has no LLVM code module to print")
            text = "\n".join(code)
        else:
            wanted = tvm.tirx.PrimFunc if kind == "tir" else relax.Function
            part = tvm.IRModule({gv: f for gv, f in mod.functions.items() if isinstance(f, wanted)})
            what = ("the kernels as scheduled (TIR)" if kind == "tir" else
                    f"the Relax graph as built (kernels: --dump-code tir, {library.name}{DUMP_SUFFIXES['tir']})")
            text = f"# {library.name}{where}: {what}\n" + part.script()
        path.write_text(text)
    return paths


def metadata_path(library: Path) -> Path:
    """``model.so`` → ``model.so.json``: what the library was compiled from (for run/profile)."""
    return Path(str(library) + ".json")


def write_metadata(library: Path, model: str, config: CompileConfig, preset: targets.TargetPreset,
                   imported: frontend.ImportedModel, mod) -> Path:
    import tvm

    from . import __version__, kernels

    is_file = os.path.exists(model)
    meta = {
        "model": os.path.abspath(model) if is_file else model,
        "weights": os.path.abspath(config.weights) if config.weights else None,
        "input_shape": list(imported.input_shape),
        "target": preset.name,
        "tvm_target": preset.target,
        "fused": config.fuse,
        "tuning_records": str(config.tuning_records) if config.tuning_records else None,
        "schedules": config.schedules,
        "kernels": [k.as_dict() for k in kernels.list_kernels(mod)],
        "tvmshuffle": __version__,
        "tvm": tvm.__version__,
    }
    path = metadata_path(library)
    path.write_text(json.dumps(meta, indent=1))
    return path


def read_metadata(library: Path) -> dict | None:
    path = metadata_path(library)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable library metadata ({err}); recompile or delete it") from err


def compiled_from(library: Path) -> tuple[str, CompileConfig]:
    """The model and :class:`CompileConfig` a library was compiled with (its ``model.so.json``)."""
    meta = read_metadata(library)
    if meta is None:
        raise UserError(f"{library}: no {metadata_path(library).name} beside it; give the model by name")
    config = CompileConfig(
        target=meta["target"] if meta["target"] != "custom" else json.dumps(meta["tvm_target"]),
        fuse=meta["fused"], input_shape=tuple(meta["input_shape"]), weights=meta.get("weights"),
        tuning_records=Path(meta["tuning_records"]) if meta.get("tuning_records") else None,
        schedules=_schedules_of(meta))
    return meta["model"], config


def _schedules_of(meta: dict) -> str:
    """The ``--schedules`` a library was compiled with; ``"default"`` (or nothing) in a library
    from before hand schedules were the default meant none."""
    value = meta.get("schedules") or "none"
    return "none" if value == "default" else value


def count_kernels(mod) -> int:
    import tvm

    return sum(1 for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))


def compile_model(model: str, output: Path, config: CompileConfig) -> CompileResult:
    """import → fuse → build → export, as ``tvmshuffle compile`` does."""
    if Path(output).suffix != ".so":
        raise UserError(f"-o {output}: the library must end in .so")
    writable_output(output, "-o")  # and if it cannot be written (e.g. below a regular file)
    preset = targets.resolve(config.target, config.cross_compiler)
    targets.cross_compiler_command(preset)  # fail before the slow part if the linker is missing
    records = config.tuning_records
    if records is not None:
        from .records import check_records

        # and if the records do not fit; another CPU's are set aside here, with a note
        records = records if check_records(Path(records), preset, config.force_records) else None
    from . import schedules

    if schedules.check_source(config.schedules) != schedules.NONE:  # --schedules is hand, none or a dir
        schedules.load(config.schedules)  # whose files load
    parse_dump_code(config.dump_code)  # and if --dump-code names an unknown kind
    start = time.perf_counter()
    imported = frontend.load(model, config.input_shape, config.weights)
    log.info("imported %s (%s), input %s", imported.name, imported.source, imported.input_shape)
    lowered = lower(imported.mod, preset, fuse=config.fuse)
    mod, tuned, hand = schedule(lowered, preset, records, config.schedules, config.force_records)
    executable = codegen(mod, preset)
    path = export(executable, preset, output)
    write_metadata(path, model, config, preset, imported, mod)
    dumps = dump_code(mod, executable, path, config.dump_code, preset) if config.dump_code else {}
    seconds = time.perf_counter() - start
    log.info("wrote %s in %.1f s", path, seconds)
    return CompileResult(path, preset, count_kernels(mod), tuned, hand, seconds, imported, dumps, executable,
                         lowered, mod)
