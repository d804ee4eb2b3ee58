"""``tvmshuffle study``: every fused ``shuffle_group_conv2d`` layer of the zoo, timed alone.

For each distinct fused layer (a PrimFunc holding the SBlock ``shuffle_group_conv2d``, with
its ``shuffle_pad`` and its bias/ReLU/residual epilogue) of the chosen models, three
schedules are built and measured on the same random inputs:

``default``
    the PrimFunc as :func:`tvmshuffle.pipeline.lower` leaves it, built as is (what an
    untuned model build runs: one thread, no explicit vectorisation);
``hand``
    :func:`tvmshuffle.schedules.schedule_primfunc` (a row says "no hand schedule" when
    none fits);
``tuned``
    the best MetaSchedule record for the layer (``tuning_logs/<target>/study`` by default;
    with ``trials_per_layer`` > 0 the layers are tuned there first, resumably). A layer with
    no record is reported as missing, never left out.

Every variant's output is checked against ``default`` (max error ≤ ``tolerance`` × the
output scale, :func:`tvmshuffle.runtime.check`) before it is timed; a wrong one is reported
as wrong and not timed. Times are medians of ``repeat`` samples of ``number`` runs
(``time_evaluator``), here or on an RPC device (an emulated one is labelled EMULATED and
gets no peak).

Each row also puts the layer on a roofline: FLOPs = 2 × MACs; bytes = the minimum traffic
(every input buffer read once — of the activation only the channels the convolution reads,
half of them in a ShuffleNet V2 unit — and the output written once, fp32); arithmetic
intensity AI = FLOPs / bytes; bound = min(peak, AI × bandwidth), with the CPU's peak from
:func:`cpu_peak` and the bandwidth measured by :func:`measure_bandwidth`.
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import os
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import frontend, kernels, pipeline, schedules, targets, tuning
from ._shipped import display
from .errors import UserError, writable_output
from .remote import DeviceTimeout, check_rpc_args
from .runtime import ThreadConfig, check, configure_local_threads

log = logging.getLogger(__name__)

#: the fused operator's compute block and its zero border stage (part of it, not an epilogue)
CONV_BLOCK, PAD_BLOCK = schedules.CONV_BLOCK, schedules.PAD_BLOCK
SCHEDULES = ("default", "hand", "tuned")
#: ``<records root>/<target>/study``: where the study's tuning records live
STUDY_RECORDS = "study"
FAMILIES = ("shufflenet_v1", "shufflenet_v2")


# --------------------------------------------------------------------------- config, results


@dataclass
class StudyConfig:
    """What ``tvmshuffle study`` is asked to do."""

    target: str = "host"
    #: zoo names; None: every ShuffleNet V1 (g = 1, 2, 3, 4, 8) and V2 model of the zoo
    models: list[str] | None = None
    input_shape: tuple[int, ...] = (1, 3, 224, 224)
    #: a records dir (has a tuning database or target.json) or a root like ``tuning_logs/``
    #: (``<root>/<target>/study`` first, then the other fused records dirs of the target);
    #: None: the default root (:func:`tvmshuffle.tuning.default_root`)
    tuning_records: Path | None = None
    #: 0: no tuning (layers without records: tuned "missing"); N: every layer gets N trials
    #: in the study records dir first (resumable: trials already there count)
    trials_per_layer: int = 0
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    number: int = 20
    repeat: int = 15
    #: the first N distinct layers only (the models after the one that completes them are
    #: not read: their ``models`` and ``calls`` then count the models read)
    layers_limit: int | None = None
    #: TVM threads where the layers run (``--threads``; on a device, set through its session);
    #: None: here ``TVM_NUM_THREADS`` if set, else every core (TVM's own default halves the
    #: cores on x86, for hyper-threads), on a device its pool as it is
    threads: int | None = None
    #: ``--affinity big|little|default`` of TVM's thread pool (None: as it is)
    affinity: str | None = None
    tolerance: float = 1e-4
    cross_compiler: str | None = None
    seed: int = 0
    #: size of each of the three arrays of the bandwidth kernel, MB
    bandwidth_mb: int = 64
    #: RPC: one session per layer, ended by the device after this many seconds
    session_timeout: float = 600.0
    #: RPC: seconds a remote step may go without an answer (``--rpc-timeout``)
    rpc_timeout: float = 120.0
    #: tqdm bars on stderr (on a terminal only)
    progress: bool = True
    #: more :class:`tvmshuffle.tuning.TuneConfig` fields for the tuning (e.g. search_population)
    tune_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.input_shape is not None:
            self.input_shape = tuple(int(v) for v in self.input_shape)
            if len(self.input_shape) != 4 or any(v <= 0 for v in self.input_shape):
                raise UserError(f"--input-shape: expected four positive integers, got {self.input_shape}")
        if self.tuning_records is not None:
            self.tuning_records = Path(self.tuning_records)
        if self.number < 1 or self.repeat < 1:
            raise UserError("--number and --repeat must be >= 1")
        if self.trials_per_layer < 0:
            raise UserError(f"--trials-per-layer must be >= 0, got {self.trials_per_layer}")
        if self.layers_limit is not None and self.layers_limit < 1:
            raise UserError(f"--limit must be >= 1, got {self.layers_limit}")
        ThreadConfig(self.threads, self.affinity)  # --threads >= 1, --affinity one of the modes
        check_rpc_args(self.rpc_tracker, self.rpc_key, self.rpc_timeout)
        if self.models is not None and not self.models:
            raise UserError("--model: give at least one model (or none for the whole zoo)")


@dataclass
class Layer:
    """One distinct fused ``shuffle_group_conv2d`` PrimFunc and where the zoo uses it."""

    #: readable unique id, e.g. ``pw 58/116>58 28x28 g2 +bias+relu``
    layer: str
    kind: str  # "pointwise", "depthwise" or "other"
    func: object  # tvm.tirx.PrimFunc, as lowered
    macs: int
    #: minimum traffic in bytes (see the module docstring)
    bytes: int
    models: list[str]
    calls: int  # calls over all the models read
    name: str = ""  # the kernel's name in the first model that has it
    inputs: list[list[int]] = field(default_factory=list)  # shapes of the arguments read
    outputs: list[list[int]] = field(default_factory=list)  # shapes of the outputs written
    dtypes: list[str] = field(default_factory=list)  # of inputs then outputs
    shuffle_groups: int | None = None
    epilogue: list[str] = field(default_factory=list)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def ai(self) -> float:
        """Arithmetic intensity, flop per byte of minimum traffic."""
        return self.flops / self.bytes if self.bytes else 0.0


@dataclass
class Peak:
    """fp32 peak of the CPU the layers run on; ``gflops`` None when unknown."""

    gflops: float | None
    how: str


@dataclass
class Bandwidth:
    """Measured memory bandwidth; ``gbps`` None when not measured."""

    gbps: float | None
    how: str


@dataclass
class Row:
    """One layer × schedule."""

    layer: str
    kind: str
    schedule: str  # "default", "hand" or "tuned"
    status: str  # "ok", "missing", "wrong: …" or "error: …"
    ms: float | None = None  # median of one call
    gflops: float | None = None
    peak_fraction: float | None = None
    ai: float = 0.0  # flop/byte
    roofline_gflops: float | None = None
    roofline_fraction: float | None = None
    models: list[str] = field(default_factory=list)
    calls: int = 0
    macs: int = 0
    bytes: int = 0
    max_error: float | None = None  # vs default
    note: str = ""
    emulated: bool = False


@dataclass
class StudyReport:
    rows: list[Row]
    peak: Peak
    bandwidth: Bandwidth
    where: str  # "this CPU (AMD EPYC, znver4), 2 threads", "<key> (EMULATED …)"
    target: str
    input_shape: list[int]
    number: int
    repeat: int
    threads: int | None  # TVM threads here; None on a device
    records_dir: str  # the study's records dir
    models: list[str]
    emulated: bool = False

    def layer_names(self) -> list[str]:
        return list(dict.fromkeys(r.layer for r in self.rows))


# --------------------------------------------------------------------------- models, layers


def study_models() -> list[str]:
    """Every ShuffleNet V1 and V2 model of the zoo, in zoo order."""
    from .models import zoo

    return [name for name, spec in zoo.MODELS.items() if spec.family in FAMILIES]


def _model_names(config: StudyConfig) -> list[str]:
    from .models import zoo

    if config.models is None:
        return study_models()
    names = list(dict.fromkeys(config.models))
    for name in names:  # every name before the slow part
        if name.endswith((".pt2", ".onnx")):
            if not os.path.isfile(name):
                raise UserError(f"--model {name}: no such file")
            continue
        if name not in zoo.MODELS:
            close = difflib.get_close_matches(name, list(zoo.MODELS), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"--model: unknown model {name!r}{hint} (`tvmshuffle models` lists them)")
    return names


def _preset(config: StudyConfig) -> targets.TargetPreset:
    preset = targets.resolve(config.target, config.cross_compiler)
    if preset.is_cross and not config.rpc_tracker:
        raise UserError(f"--target {preset.name}: code for it cannot run here; give --rpc-tracker and --rpc-key")
    return preset


def _bar(iterable, config: StudyConfig, **kwargs):
    from tqdm import tqdm

    return tqdm(iterable, disable=None if config.progress else True, dynamic_ncols=True, **kwargs)


def fused_layers(config: StudyConfig) -> list[Layer]:
    """Import and lower every model; the distinct fused ``shuffle_group_conv2d`` PrimFuncs.

    Layers are deduplicated by structural equality: one :class:`Layer` per distinct PrimFunc,
    with the models that call it and the number of calls over all of them.
    """
    import tvm_ffi
    from tqdm.contrib.logging import logging_redirect_tqdm

    preset = _preset(config)
    names = _model_names(config)
    layers: list[Layer] = []
    by_hash: dict[int, list[Layer]] = {}
    start = time.perf_counter()
    models_read = 0
    with logging_redirect_tqdm():
        bar = _bar(names, config, desc="lowering", unit="model")
        for name in bar:
            bar.set_postfix_str(name)
            models_read += 1
            imported = frontend.load(name, config.input_shape)
            mod = pipeline.lower(imported.mod, preset, fuse=True)
            found = 0
            for kernel in kernels.list_kernels(mod):
                if not kernel.fused_shuffle_conv:
                    continue
                func = mod[kernel.name]
                shape = _analyse(func, len(kernel.outputs))
                if shape is None:
                    continue
                found += 1
                h = tvm_ffi.structural_hash(func)
                same = next((l for l in by_hash.get(h, []) if tvm_ffi.structural_equal(l.func, func)), None)
                if same is not None:
                    if imported.name not in same.models:
                        same.models.append(imported.name)
                    same.calls += kernel.calls
                    continue
                if config.layers_limit is not None and len(layers) >= config.layers_limit:
                    continue
                layer = Layer(layer=shape["label"], kind=shape["kind"], func=func, macs=kernel.macs,
                              bytes=shape["bytes"], models=[imported.name], calls=kernel.calls,
                              name=kernel.name, inputs=shape["inputs"], outputs=shape["outputs"],
                              dtypes=shape["dtypes"], shuffle_groups=shape["shuffle_groups"],
                              epilogue=shape["epilogue"])
                layers.append(layer)
                by_hash.setdefault(h, []).append(layer)
            log.debug("%s: %d fused shuffle_group_conv2d kernels", imported.name, found)
            if config.layers_limit is not None and len(layers) >= config.layers_limit:
                break
        bar.close()
    _unique_labels(layers)
    log.info("%d distinct fused shuffle_group_conv2d layers, used by %d of the %d models read (%.0f s)",
             len(layers), len({m for l in layers for m in l.models}), models_read, time.perf_counter() - start)
    return layers


def _unique_labels(layers: list[Layer]) -> None:
    seen: dict[str, int] = {}
    for layer in layers:
        base = layer.layer
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            layer.layer = f"{base} #{seen[base]}"


# --------------------------------------------------------------------------- PrimFunc analysis


def _type_name(obj) -> str:
    return type(obj).__name__


def _walk(expr, kind: str) -> list:
    """Every sub-expression of ``expr`` whose class is named ``kind`` (pre-order)."""
    import tvm_ffi

    found: list = []
    tvm_ffi.structural_walk(expr, lambda x: found.append(x) if _type_name(x) == kind else None, order="pre")
    return found


def _int(expr) -> int | None:
    return int(expr.value) if _type_name(expr) == "IntImm" else None


def _ordered_blocks(func) -> list:
    """The SBlocks of a PrimFunc in program order (root excluded)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        root = sch.get_sblock("root")
    except Exception:  # noqa: BLE001 - a func without a root block has no blocks
        return []
    out = []

    def visit(rv):
        for child in sch.get_child_blocks(rv):
            out.append(sch.get(child))
            visit(child)

    visit(root)
    return out


def _shape(buffer) -> list[int]:
    return [int(d) for d in buffer.shape]


def _dtype_bytes(dtype) -> int:
    import tvm

    return max(1, tvm.runtime.DataType(str(dtype)).bits // 8)


def _epilogue_name(block, params) -> str:
    """``bias``, ``relu``, ``add`` (residual) or the block's own name."""
    value = getattr(block.body, "value", None)
    kind = _type_name(value)
    if kind == "Max" and (_type_name(value.b) in ("FloatImm", "IntImm") and float(value.b.value) == 0.0):
        return "relu"
    if kind == "Add":
        loads = [v for v in (value.a, value.b) if _type_name(v) == "TensorLoad"]
        out = _shape(block.body.buffer)
        for load in loads:
            if any(load.source.same_as(p) for p in params):
                shape = _shape(load.source)
                if len(shape) == len(out) and shape != out and math.prod(shape) < math.prod(out):
                    return "bias"
        return "add"  # a residual (or any other) addition
    name = block.name_hint
    for prefix in ("T_", "compute_"):
        name = name.removeprefix(prefix)
    return name.rstrip("0123456789").rstrip("_") or block.name_hint


def _analyse(func, n_outputs: int) -> dict | None:
    """Shape facts of a fused layer; None if it has no ``shuffle_group_conv2d`` block."""
    blocks = _ordered_blocks(func)
    index = next((i for i, b in enumerate(blocks) if b.name_hint == CONV_BLOCK), None)
    if index is None:
        return None
    conv = blocks[index]
    params = list(func.params)
    inputs, outputs = params[: len(params) - n_outputs], params[len(params) - n_outputs:]
    loads = _walk(conv.body.value, "TensorLoad")
    _, out_c, out_h, out_w = _shape(conv.body.buffer)
    facts = {
        "inputs": [_shape(p) for p in inputs],
        "outputs": [_shape(p) for p in outputs],
        "dtypes": [str(p.dtype) for p in params],
        "shuffle_groups": None,
        "epilogue": [_epilogue_name(b, params) for b in blocks[index + 1:]],
    }
    # the reads of acc + data * weight (the accumulator is the output itself)
    reads = [ld for ld in loads if not ld.source.same_as(conv.body.buffer)]
    if len(reads) < 2 or len(_shape(reads[-1].source)) != 4:
        facts.update(kind="other", label=f"conv {out_c} {out_h}x{out_w}", bytes=_min_bytes(inputs, outputs))
        return facts
    data_load = reads[0]
    layer = schedules.describe(func)  # kind, kernel, stride, groups: as the hand schedules see it
    kh, kw = layer.kernel
    activation = _activation_param(data_load, blocks[:index], inputs)
    c_total, height, width = (_shape(activation)[1:4] if activation is not None else (0, 0, 0))
    groups = [_int(m.b) for m in _walk(data_load.indices[1], "FloorMod") if _int(m.b)]
    ri = [int(iv.dom.extent) for iv in conv.iter_vars if iv.var.name in ("v_ri", "ri")]
    facts["shuffle_groups"] = groups[0] if groups else (ri[0] if ri else None)
    conv_groups = layer.conv_groups
    count = layer.group_in * conv_groups  # channels the convolution reads
    stride = layer.stride[0]
    spatial = f"{height}x{width}" + (f">{out_h}x{out_w}" if (height, width) != (out_h, out_w) else "")
    read = f"{count}/{c_total}" if c_total and c_total != count else f"{count}"
    kind = layer.kind
    if kind == "pointwise":
        label = f"pw {read}>{out_c}" + (f" grp{conv_groups}" if conv_groups > 1 else "") + f" {spatial}"
    elif kind == "depthwise":
        label = f"dw{kh}x{kw} s{stride} {read}" + (f">{out_c}" if out_c != count else "") + f" {spatial}"
    else:
        label = f"conv{kh}x{kw} s{stride} {read}>{out_c}" + (f" grp{conv_groups}" if conv_groups > 1 else "") \
            + f" {spatial}"
    if facts["shuffle_groups"]:
        label += f" g{facts['shuffle_groups']}"
    if facts["epilogue"]:
        label += " +" + "+".join(facts["epilogue"])
    facts.update(kind=kind, label=label,
                 bytes=_min_bytes(inputs, outputs, activation, count))
    return facts


def _activation_param(data_load, before: list, inputs: list):
    """The function argument the convolution's data comes from (through ``shuffle_pad``)."""
    for p in inputs:
        if data_load.source.same_as(p):
            return p
    for block in before:  # data read through a pad stage: what that stage reads
        if block.body is not None and hasattr(block.body, "buffer") and block.body.buffer.same_as(data_load.source):
            for load in _walk(block.body.value, "TensorLoad"):
                for p in inputs:
                    if load.source.same_as(p):
                        return p
    return None


def _min_bytes(inputs, outputs, activation=None, count: int = 0) -> int:
    """Every input read once (of ``activation`` only its first ``count`` channels' worth), every
    output written once."""
    total = 0
    for p in inputs:
        shape = _shape(p)
        if activation is not None and p.same_as(activation) and count and len(shape) == 4 and count < shape[1]:
            shape = [shape[0], count, *shape[2:]]  # only the channels the convolution reads
        total += math.prod(shape) * _dtype_bytes(p.dtype)
    total += sum(math.prod(_shape(p)) * _dtype_bytes(p.dtype) for p in outputs)
    return total


# --------------------------------------------------------------------------- peak, bandwidth


#: RPC devices whose peak is known: nominal numbers (an upper bound, said in ``how``)
DEVICE_PEAKS = {
    "rpi4": {"cpu": "Cortex-A72", "cores": 4, "ghz": 1.5, "isa": "neon", "lanes": 4, "fma_units": 2,
             "caveat": "nominal: both NEON pipes issuing a 4-lane FMA every cycle on all 4 cores at the "
                       "1.5 GHz top clock; a Pi 4 throttles when hot and A72 FMA latency rarely lets both "
                       "pipes stay busy, so treat it as a generous upper bound"},
}


def _cpu_flags() -> set[str]:  # noqa: D103
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_CLOCK_SOURCE = r"""
#include <stdint.h>
/* 8 dependent integer adds an iteration: 8 cycles an iteration on any out-of-order core */
uint64_t spin(uint64_t n) {
  uint64_t x = 0;
  for (uint64_t i = 0; i < n; i++) {
#if defined(__x86_64__)
    __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\t"
                     "add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
#elif defined(__aarch64__)
    __asm__ volatile("add %0, %0, #1\n\tadd %0, %0, #1\n\tadd %0, %0, #1\n\tadd %0, %0, #1\n\t"
                     "add %0, %0, #1\n\tadd %0, %0, #1\n\tadd %0, %0, #1\n\tadd %0, %0, #1" : "+r"(x));
#else
#error "no add chain for this ISA"
#endif
  }
  return x;
}
"""


def measure_clock_ghz(iterations: int = 40_000_000, repeat: int = 5) -> float | None:
    """The clock a busy core runs at, measured: a chain of dependent integer adds (1 cycle
    each) compiled with the host C compiler, best of ``repeat``. None without a compiler."""
    import ctypes
    import shutil
    import subprocess
    import tempfile
    import time

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp) / "spin.c", Path(tmp) / "spin.so"
        src.write_text(_CLOCK_SOURCE)
        try:
            subprocess.run([compiler, "-O1", "-shared", "-fPIC", "-o", str(lib), str(src)],
                           check=True, capture_output=True, timeout=60)
        except (subprocess.SubprocessError, OSError):
            return None
        spin = ctypes.CDLL(str(lib)).spin
        spin.argtypes, spin.restype = [ctypes.c_uint64], ctypes.c_uint64
        spin(iterations // 10)  # wake the core up
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            spin(iterations)
            best = min(best, time.perf_counter() - start)
    return 8 * iterations / best / 1e9


@functools.lru_cache(maxsize=None)
def host_clock_ghz() -> tuple[float, str] | None:
    """The clock for the peak, GHz, and how it was found: measured under load
    (:func:`measure_clock_ghz`; under a hypervisor /proc/cpuinfo shows the nominal clock, not
    the boost one), else the highest ``cpu MHz`` of /proc/cpuinfo. None: neither."""
    measured = measure_clock_ghz()
    nominal = []
    try:
        with open("/proc/cpuinfo") as f:
            nominal = [float(line.split(":", 1)[1]) for line in f if line.startswith("cpu MHz")]
    except (OSError, ValueError):
        pass
    if measured is not None:
        said = f", /proc/cpuinfo says {max(nominal) / 1e3:.2f}" if nominal else ""
        return measured, f"measured on one busy core with a dependent-add chain{said}"
    if nominal:
        return max(nominal) / 1e3, "highest 'cpu MHz' in /proc/cpuinfo (not measured: no C compiler)"
    return None


def isa_of(preset: targets.TargetPreset):
    """The vector ISA of ``preset`` (lanes, FMA units): the one the hand schedules use."""
    from .schedules import isa_for

    return isa_for(preset)


def cpu_peak(preset: targets.TargetPreset, threads: int | None = None) -> Peak:
    """fp32 peak = cores × lanes × FMA units × 2 flop × clock, with ``how`` spelling it out.

    This machine (a non-cross preset): cores = ``threads`` (default: the TVM threads, see
    :func:`tvm_threads`), lanes and FMA units from :func:`isa_of`, clock the highest
    ``cpu MHz`` of /proc/cpuinfo. An RPC device: :data:`DEVICE_PEAKS` by preset name, else
    unknown (``gflops`` None).
    """
    if preset.is_cross:
        spec = DEVICE_PEAKS.get(preset.name)
        if spec is None:
            return Peak(None, f"peak unknown for target {preset.name} (no clock/core table entry for it)")
        gflops = spec["cores"] * spec["lanes"] * spec["fma_units"] * 2 * spec["ghz"]
        how = (f"{preset.name} ({spec['cpu']}): {spec['cores']} cores × {spec['lanes']} fp32 lanes "
               f"({spec['isa']}) × {spec['fma_units']} FMA units × 2 flop/FMA × {spec['ghz']:g} GHz = "
               f"{gflops:.1f} GFLOP/s ({spec['caveat']})")
        return Peak(gflops, how)
    isa = isa_of(preset)
    cores = threads or tvm_threads()
    clock = host_clock_ghz()
    if clock is None:
        return Peak(None, "peak unknown: no 'cpu MHz' in /proc/cpuinfo")
    ghz, source = clock
    gflops = cores * isa.lanes * isa.fma_units * 2 * ghz
    how = (f"{cores} cores (the TVM threads) × {isa.lanes} fp32 lanes ({isa.name}) × {isa.fma_units} "
           f"FMA units × 2 flop/FMA × {ghz:.2f} GHz ({source}) = {gflops:.1f} GFLOP/s")
    if isa.name == "avx2" and "avx512f" in _cpu_flags():
        how += ("; the CPU has AVX-512 but is counted as AVX2 (Zen 4 executes 512-bit FMAs on its "
                "two 256-bit FMA datapaths: 2 × 8 lanes a cycle)")
    return Peak(gflops, how)


def tvm_threads() -> int:
    """Threads TVM's pool runs parallel loops with in this process."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())


def set_tvm_threads(threads: int, affinity: str | None = None) -> int:
    """Ask for ``threads`` TVM threads (pinned as ``affinity`` says: big, little, or default =
    as they are); returns the number TVM's pool really has
    (:func:`tvmshuffle.runtime.configure_local_threads`).

    Effective only before the pool first runs a parallel loop (``TVM_NUM_THREADS`` is read
    when the pool starts); later it can only shrink.
    """
    return configure_local_threads(ThreadConfig(threads, affinity))


def _stream_kernel(n: int):
    """``c[i] = a[i] + b[i]``: outer loop parallel over every thread, inner 16 lanes vectorised."""
    import tvm
    from tvm import te

    a = te.placeholder((n,), "float32", name="a")
    b = te.placeholder((n,), "float32", name="b")
    c = te.compute((n,), lambda i: a[i] + b[i], name="c")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b, c]))
    (loop,) = sch.get_loops(sch.get_sblock("c"))
    outer, inner = sch.split(loop, [None, 16])
    sch.parallel(outer)
    sch.vectorize(inner)
    return sch.mod


# --------------------------------------------------------------------------- where the code runs


class _Runner:
    """Loads built modules and makes tensors, here or on an RPC device."""

    emulated = False

    def __init__(self, preset: targets.TargetPreset, config: StudyConfig, tmp: Path) -> None:
        self.preset = preset
        self.config = config
        self.tmp = tmp
        self.session = None
        self.count = 0

    @property
    def where(self) -> str:
        raise NotImplementedError

    @contextmanager
    def open(self) -> Iterator[None]:
        yield

    def step(self, what: str) -> None:
        """Say what is measured next (a remote session bounds each step)."""

    def device(self):
        raise NotImplementedError

    def load(self, lib):
        raise NotImplementedError

    def tensor(self, array: np.ndarray):
        import tvm

        return tvm.runtime.tensor(array, self.device())


class _LocalRunner(_Runner):
    def __init__(self, preset, config, tmp, threads: int) -> None:
        super().__init__(preset, config, tmp)
        self.threads = threads

    @property
    def where(self) -> str:
        mcpu = self.preset.target.get("mcpu", "generic")
        return f"this CPU ({targets.host_cpu_name()}, {mcpu}), {self.threads} threads"

    def device(self):
        import tvm

        return tvm.cpu()

    def load(self, lib):
        return lib


class _RemoteRunner(_Runner):
    def __init__(self, preset, config, tmp) -> None:
        from . import remote

        super().__init__(preset, config, tmp)
        self.host, self.port = remote.parse_tracker(config.rpc_tracker)
        self.key = config.rpc_key
        self.emulated = remote.is_emulated_key(self.key)
        targets.export_function(preset)  # UserError now if the linker is missing
        self.threads: int | None = None  # the device's pool, when --threads/--affinity set it

    @property
    def where(self) -> str:
        label = f"{self.key} via {self.host}:{self.port}"
        if self.threads:
            label += f", {self.threads} threads"
        return label + (" (EMULATED under qemu: not ARM timings)" if self.emulated else "")

    @contextmanager
    def open(self) -> Iterator[None]:
        from . import remote

        with remote.Session(self.config.rpc_tracker, self.key, self.config.rpc_timeout,
                            session_timeout=self.config.session_timeout,
                            threads=ThreadConfig(self.config.threads, self.config.affinity)) as self.session:
            self.threads = self.session.threads
            try:
                yield
            finally:
                self.session = None

    def step(self, what: str) -> None:
        self.session.step(what)

    def device(self):
        return self.session.cpu()

    def load(self, lib):
        """Export the built module itself (remote ``time_evaluator`` finds only root functions)."""
        self.count += 1
        path = self.tmp / f"study_{self.count}.so"
        targets.export_library(lib, self.preset, path)
        return self.session.load_module(path)


def measure_bandwidth(runner: _Runner, preset: targets.TargetPreset, megabytes: int = 64) -> Bandwidth:
    """Memory bandwidth of a TVM streaming kernel ``c = a + b`` over ``megabytes`` MB arrays,
    parallel over every thread, where the layers run: 3 × size bytes per run (STREAM's count;
    the write-allocate read of ``c`` is not counted), best of 10 samples of 3 runs."""
    import tvm

    n = megabytes * 2**20 // 4
    lib = tvm.tirx.build(_stream_kernel(n), targets.tvm_target(preset))
    with runner.open():
        module = runner.load(lib)
        a = runner.tensor(np.ones(n, "float32"))
        b = runner.tensor(np.full(n, 2.0, "float32"))
        c = runner.tensor(np.zeros(n, "float32"))
        runner.step("measuring the memory bandwidth")
        module["main"](a, b, c)  # first touch of the pages, and a check
        if not np.allclose(c.numpy()[:: max(1, n // 1024)], 3.0):
            return Bandwidth(None, "bandwidth kernel computed a wrong result; not measured")
        results = module.time_evaluator("main", runner.device(), number=3, repeat=10)(a, b, c).results
        a = b = c = module = None
    best = min(results)
    gbps = 3 * n * 4 / best / 1e9
    how = (f"measured: TVM kernel c[i] = a[i] + b[i] over three {megabytes} MB fp32 arrays, parallel over "
           f"every thread, on {runner.where}: 3 × {megabytes} MB in {best * 1e3:.2f} ms "
           f"(best of 10 × 3 runs) = {gbps:.1f} GB/s")
    if runner.emulated:
        how += " (EMULATED: a qemu number, not the device's)"
    return Bandwidth(gbps, how)


# --------------------------------------------------------------------------- schedules


def _build(func, preset: targets.TargetPreset):
    """A runtime module with the layer as its root function ``main``."""
    import tvm

    func = func.with_attr("global_symbol", "main")
    return tvm.tirx.build(tvm.IRModule({"main": func}), targets.tvm_target(preset))


def _hand(func, preset: targets.TargetPreset) -> tuple[object | None, str, str]:
    """(hand-scheduled func or None, note, status when None)."""
    try:
        scheduled = schedules.schedule_primfunc(func, preset, source="hand")
    except UserError as err:  # a schedule that fits but fails: this row's error, not the study's
        return None, str(err), f"error: {_last_line(err)}"
    if scheduled is None:
        return None, "no hand schedule fits this layer", "missing"
    return scheduled, "", "missing"


def _gv(index: int) -> str:
    return f"layer{index:03d}"


def _layers_module(layers: list[Layer], indices=None):
    import tvm

    indices = range(len(layers)) if indices is None else indices
    return tvm.IRModule({_gv(i): layers[i].func for i in indices})


def _is_records_dir(path: Path) -> bool:
    return (path / tuning.WORKLOAD_FILE).is_file() or (path / tuning.TARGET_FILE).is_file()


def records_dirs(config: StudyConfig, preset: targets.TargetPreset) -> tuple[Path, list[Path]]:
    """(the study's records dir — tuning writes there, looked up first; other records dirs
    to look up layers still missing: the fused records of each model for the target)."""
    given = config.tuning_records
    if given is not None and _is_records_dir(given):
        return given, []
    root = given if given is not None else tuning.default_root()
    study = tuning.records_dir_for(preset.name, STUDY_RECORDS, root)
    others = []
    if study.parent.is_dir():
        others = sorted(d for d in study.parent.iterdir()
                        if d.is_dir() and d != study and not d.name.endswith("-unfused")
                        and (d / tuning.WORKLOAD_FILE).is_file() and (d / tuning.RECORD_FILE).is_file())
    return study, others


def _is_scheduled(func) -> bool:
    return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))


def tuned_funcs(layers: list[Layer], preset: targets.TargetPreset, study_dir: Path,
                others: list[Path]) -> tuple[dict[int, tuple[object, Path]], list[str]]:
    """Per layer index: (func with its best tuned schedule, records dir it came from), looked
    up in ``study_dir`` first, then in ``others``; and notes on dirs that could not be used."""
    found: dict[int, tuple[object, Path]] = {}
    notes: list[str] = []
    for records in [study_dir, *others]:
        missing = [i for i in range(len(layers)) if i not in found]
        if not missing:
            break
        if not ((records / tuning.WORKLOAD_FILE).is_file() and (records / tuning.RECORD_FILE).is_file()):
            continue
        try:
            applied, _ = tuning.apply_records(_layers_module(layers, missing), preset, records)
        except UserError as err:
            log.warning("%s", err)
            notes.append(str(err))
            continue
        for i in missing:
            func = applied[_gv(i)]
            if _is_scheduled(func):
                found[i] = (func, records)
    return found, notes


@contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def tune_layers(layers: list[Layer], preset: targets.TargetPreset, study_dir: Path, config: StudyConfig):
    """Give every layer ``trials_per_layer`` trials in ``study_dir`` (resumable: the trials
    already there count; layers that have them all are not tuned again)."""
    per_layer = config.trials_per_layer
    options = {"records_dir": study_dir, "rpc_tracker": config.rpc_tracker, "rpc_key": config.rpc_key,
               "progress": config.progress, "threads": config.threads, "affinity": config.affinity,
               **config.tune_options}
    todo = list(range(len(layers)))
    if (study_dir / tuning.WORKLOAD_FILE).is_file():  # count what is there (a zero budget tunes nothing)
        with _quiet(tuning.log):
            counted = tuning.tune(_layers_module(layers), preset, tuning.TuneConfig(trials=0, **options))
        counts = {t.name: t.trials for t in counted.tasks}
        if any(_gv(i) in counts for i in todo):
            todo = [i for i in todo if counts.get(_gv(i), 0) < per_layer]
        else:  # task names that are not ours: let tune count them against the whole budget
            log.debug("tuning tasks are named %s; tuning every layer", sorted(counts))
    if not todo:
        log.info("every layer has %d trials in %s: nothing to tune", per_layer, study_dir)
        return None
    log.info("tuning %d of %d layers, %d trials each, into %s", len(todo), len(layers), per_layer, study_dir)
    return tuning.tune(_layers_module(layers, todo), preset,
                       tuning.TuneConfig(trials=per_layer * len(todo), **options))


# --------------------------------------------------------------------------- measuring


def _random_args(layer: Layer, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    n_in = len(layer.inputs)
    dtypes = layer.dtypes or ["float32"] * (n_in + len(layer.outputs))
    inputs = [rng.standard_normal(s).astype(dtypes[i]) for i, s in enumerate(layer.inputs)]
    outputs = [np.zeros(s, dtypes[n_in + i]) for i, s in enumerate(layer.outputs)]
    return inputs, outputs


def _last_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def _run(runner: _Runner, module, inputs, outputs) -> tuple[list, list[np.ndarray]]:
    args = [runner.tensor(a) for a in inputs] + [runner.tensor(o) for o in outputs]
    module["main"](*args)
    return args, [a.numpy() for a in args[len(inputs):]]


#: block annotation of a weight repacking stage (hand pointwise schedules, MetaSchedule's RewriteLayout)
LAYOUT_REWRITE = "meta_schedule.layout_rewrite_preproc"


def without_weight_packing(func):
    """``func`` without its weight repacking stages, taking the weights already packed (as a
    model build folds the packing into the constant weights, and as MetaSchedule measures);
    None if it has no such stage."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    if not any(LAYOUT_REWRITE in b.annotations for b in _ordered_blocks(func)):
        return None
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)["main"]


def _measure_layer(layer: Layer, variants: dict[str, tuple[object | None, str, str]], runner: _Runner,
                   preset: targets.TargetPreset, config: StudyConfig, seed: int) -> list[Row]:
    """One row per schedule: built, checked against ``default``, then timed.

    ``variants``: schedule → (func or None, note, status of the row when func is None). A
    schedule that repacks a weight is checked with the repacking and timed without it
    (:func:`without_weight_packing`), on random arguments of the packed shapes.
    """
    inputs, outputs = _random_args(layer, seed)
    rows = [Row(layer.layer, layer.kind, schedule, variants[schedule][2], ai=layer.ai, models=list(layer.models),
                calls=layer.calls, macs=layer.macs, bytes=layer.bytes, note=variants[schedule][1],
                emulated=runner.emulated) for schedule in SCHEDULES]
    expected: list[np.ndarray] | None = None
    with runner.open():
        for row in rows:
            func = variants[row.schedule][0]
            if func is None:
                continue
            if row.schedule != "default" and expected is None:
                row.status = "error: default did not run, nothing to check against"
                continue
            try:
                module = runner.load(_build(func, preset))
                args, got = _run(runner, module, inputs, outputs)
                kernel = without_weight_packing(func)
                if kernel is not None:
                    rng = np.random.default_rng(seed)
                    module = runner.load(_build(kernel, preset))
                    args = [runner.tensor(rng.standard_normal(_shape(p)).astype(str(p.dtype))) for p in kernel.params]
                    row.note = _join(row.note, "weight packing checked, not timed (a model build does it "
                                                "once, at compile time)")
            except DeviceTimeout:
                raise  # the device stopped answering: nothing more can be measured
            except Exception as err:  # noqa: BLE001 - a schedule that does not build or run: its row says so
                row.status = f"error: {_last_line(err)}"
                log.warning("%s, %s: %s", layer.layer, row.schedule, row.status)
                continue
            if expected is None:
                expected = got  # default is the reference
                row.max_error = 0.0
            else:
                checks = [check(g, e, config.tolerance) for g, e in zip(got, expected)]
                row.max_error = max(err for _, err in checks)
                if not all(ok for ok, _ in checks):
                    row.status = f"wrong: max error {row.max_error:.2e} > {config.tolerance:g} vs default"
                    row.note = _join(row.note, "output differs from default: not timed")
                    log.warning("%s, %s: %s", layer.layer, row.schedule, row.status)
                    continue
            runner.step(f"timing {layer.layer} ({row.schedule})")
            timer = module.time_evaluator("main", runner.device(), number=config.number, repeat=config.repeat)
            row.ms = float(np.median(timer(*args).results)) * 1e3
            row.status = "ok"
            module = args = timer = None
    return rows


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _fill_rates(row: Row, peak: Peak, bandwidth: Bandwidth) -> None:
    if peak.gflops is not None and bandwidth.gbps is not None:
        row.roofline_gflops = min(peak.gflops, row.ai * bandwidth.gbps)
    elif bandwidth.gbps is not None:
        row.roofline_gflops = row.ai * bandwidth.gbps  # the bandwidth slope only
    if row.ms is None or row.ms <= 0:
        return
    row.gflops = 2 * row.macs / (row.ms * 1e6)
    if peak.gflops:
        row.peak_fraction = row.gflops / peak.gflops
    if row.roofline_gflops:
        row.roofline_fraction = row.gflops / row.roofline_gflops


def run_study(config: StudyConfig, layers: list[Layer] | None = None) -> StudyReport:
    """Measure every layer (``layers``, else :func:`fused_layers` of ``config``) three ways."""
    preset = _preset(config)
    remote_run = config.rpc_tracker is not None
    threads = None
    if not remote_run:
        want = config.threads or int(os.environ.get("TVM_NUM_THREADS") or 0) or os.cpu_count() or 1
        threads = set_tvm_threads(want, config.affinity)
    else:
        tuning.check_rpc(config.rpc_tracker, config.rpc_key)  # fail before the slow part
    if layers is None:
        layers = fused_layers(config)
    if not layers:
        raise UserError("no fused shuffle_group_conv2d layer in the models studied")
    study_dir, others = records_dirs(config, preset)
    if config.trials_per_layer > 0:
        tune_layers(layers, preset, study_dir, config)
    tuned, tuned_notes = tuned_funcs(layers, preset, study_dir, others)
    log.info("tuned schedules for %d of %d layers (%s%s)", len(tuned), len(layers), study_dir,
             f" and {len(others)} model records dirs" if others else "")
    with tempfile.TemporaryDirectory(prefix="tvmshuffle-study-") as tmp:
        runner: _Runner
        if remote_run:
            runner = _RemoteRunner(preset, config, Path(tmp))
        else:
            runner = _LocalRunner(preset, config, Path(tmp), threads)
        if runner.emulated:
            peak = Peak(None, f"{config.rpc_key} is an emulated device (qemu on this host): its speed says "
                                "nothing of an ARM core's, so no peak is given")
        elif remote_run and not preset.is_cross:  # a device running this machine's kind of code
            peak = cpu_peak(preset, config.threads or preset.num_cores or os.cpu_count() or 1)
            peak.how += (f" (assumes device {config.rpc_key} is a CPU like this one, every core busy; "
                         "its TVM may run fewer threads)")
        else:
            peak = cpu_peak(preset, threads)
        bandwidth = measure_bandwidth(runner, preset, config.bandwidth_mb)
        log.debug("peak: %s", peak.how)
        log.debug("bandwidth: %s", bandwidth.how)
        rows: list[Row] = []
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():
            bar = _bar(list(enumerate(layers)), config, desc="measuring", unit="layer")
            for i, layer in bar:
                bar.set_postfix_str(layer.layer)
                hand = _hand(layer.func, preset)
                if i in tuned:
                    func, source = tuned[i]
                    tuned_variant = (func, f"records: {display(source)}", "missing")
                else:
                    searched = ", ".join(display(d) for d in [study_dir, *others])
                    tuned_variant = (None, f"no tuning records for this layer (looked in {searched}; "
                                           f"tvmshuffle study --trials-per-layer N tunes it)", "missing")
                variants = {"default": (layer.func, "as lowered", "missing"), "hand": hand, "tuned": tuned_variant}
                rows += _measure_layer(layer, variants, runner, preset, config, config.seed + i)
            bar.close()
        where = runner.where
    for row in rows:
        _fill_rates(row, peak, bandwidth)
        if runner.emulated and "EMULATED" not in row.note:
            row.note = _join("EMULATED", row.note)
    top = max((r.gflops for r in rows if r.gflops), default=0.0)
    if peak.gflops and top > peak.gflops:
        peak.how += (f". NOTE: {top:.1f} GFLOP/s was measured, above this peak: the cores ran faster than "
                     "that clock (boost clocks; under a hypervisor 'cpu MHz' shows the nominal one)")
        log.warning("a measured rate (%.1f GFLOP/s) exceeds the computed peak (%.1f)", top, peak.gflops)
    if tuned_notes:
        log.warning("tuning records not used: %s", "; ".join(tuned_notes))
    models = list(dict.fromkeys(m for l in layers for m in l.models))
    return StudyReport(rows=rows, peak=peak, bandwidth=bandwidth, where=where, target=preset.name,
                       input_shape=list(config.input_shape), number=config.number, repeat=config.repeat,
                       threads=threads, records_dir=display(study_dir), models=models,
                       emulated=runner.emulated)


# --------------------------------------------------------------------------- output


def to_json(report: StudyReport) -> dict:
    """The report as JSON-ready data: one ``layers`` entry per layer × schedule."""
    return {
        "target": report.target,
        "where": report.where,
        "emulated": report.emulated,
        "input_shape": report.input_shape,
        "number": report.number,
        "repeat": report.repeat,
        "threads": report.threads,
        "records_dir": report.records_dir,
        "models": report.models,
        "peak": asdict(report.peak),
        "bandwidth": asdict(report.bandwidth),
        "layers": [asdict(r) for r in report.rows],
    }


def _short_models(models: list[str]) -> str:
    if len(models) <= 2:
        return ", ".join(models)
    return f"{models[0]}, {models[1]} +{len(models) - 2}"


def _cell(row: Row | None) -> str:
    if row is None:
        return "–"
    if row.status == "ok":
        text = f"{row.gflops:.2f}"
        return text + (f" ({row.peak_fraction:.1%})" if row.peak_fraction is not None else "")
    if row.status == "missing":
        return "no hand schedule" if row.schedule == "hand" else "missing"
    return "**WRONG**" if row.status.startswith("wrong") else "error"


def markdown(report: StudyReport) -> str:
    """A table, one line per layer, preceded by the peak and bandwidth sentences."""
    peak = f"{report.peak.gflops:.1f} GFLOP/s" if report.peak.gflops is not None else "unknown"
    bandwidth = f"{report.bandwidth.gbps:.1f} GB/s" if report.bandwidth.gbps is not None else "unknown"
    lines = [
        f"**shuffle_group_conv2d study** on {report.where}, target {report.target}, input "
        f"{'x'.join(map(str, report.input_shape))}, {len(report.layer_names())} layers of "
        f"{len(report.models)} models; median of {report.repeat} samples × {report.number} runs",
        "",
        f"- Peak {peak}: {report.peak.how}",
        f"- Memory bandwidth {bandwidth}: {report.bandwidth.how}",
        "- GFLOP/s = 2 × MACs / time (% of peak in brackets); AI = flop / byte of minimum traffic; "
        "roofline = min(peak, AI × bandwidth)",
    ]
    if report.emulated:
        lines.append("- **EMULATED**: every time below is a qemu time on this host, not an ARM time")
    lines += [
        "",
        "| layer | kind | models | calls | MFLOP | AI | roofline GFLOP/s | default GFLOP/s | hand GFLOP/s | "
        "tuned GFLOP/s | best |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    notes: dict[str, list[str]] = {}
    for name in report.layer_names():
        rows = {r.schedule: r for r in report.rows if r.layer == name}
        first = next(iter(rows.values()))
        ok = [r for r in rows.values() if r.status == "ok"]
        best = max(ok, key=lambda r: r.gflops) if ok else None
        best_text = "–"
        if best is not None:
            base = rows.get("default")
            speedup = (f" ({best.gflops / base.gflops:.1f}× default)"
                       if base is not None and base.status == "ok" and best is not base else "")
            best_text = best.schedule + speedup
            if best.roofline_fraction is not None:
                best_text += f", {best.roofline_fraction:.0%} of roofline"
        roof = f"{first.roofline_gflops:.1f}" if first.roofline_gflops is not None else "–"
        lines.append(
            f"| {name} | {first.kind} | {_short_models(first.models)} | {first.calls} | "
            f"{2 * first.macs / 1e6:.2f} | {first.ai:.2f} | {roof} | {_cell(rows.get('default'))} | "
            f"{_cell(rows.get('hand'))} | {_cell(rows.get('tuned'))} | {'EMULATED ' if first.emulated else ''}"
            f"{best_text} |")
        for r in rows.values():
            if r.status != "ok":
                notes.setdefault(f"{r.schedule} {r.status}: {r.note}".strip(": "), []).append(name)
    if notes:
        lines += ["", "Not measured:"]
        for text, layers in notes.items():
            which = ", ".join(layers) if len(layers) <= 3 else f"{len(layers)} layers"
            lines.append(f"- {text} ({which})")
    return "\n".join(lines)


MARKERS = {"default": "o", "hand": "s", "tuned": "^"}
COLORS = {"pointwise": "#4c72b0", "depthwise": "#dd8452", "other": "#55a868"}


def plot(report: StudyReport, path: Path) -> Path:
    """Roofline PNG: log-log AI vs GFLOP/s, the peak roof and the bandwidth slope, one point
    per layer × schedule (marker per schedule, colour per kind)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in report.rows if r.gflops]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ais = [r.ai for r in report.rows if r.ai > 0] or [1.0]
    lo, hi = min(ais) / 2, max(ais) * 2
    peak, bw = report.peak.gflops, report.bandwidth.gbps
    if bw is not None:
        knee = peak / bw if peak else None
        lo, hi = min(lo, knee / 2 if knee else lo), max(hi, knee * 2 if knee else hi)
        xs = np.geomspace(lo, hi, 200)
        ys = np.minimum(xs * bw, peak) if peak else xs * bw
        ax.plot(xs, ys, color="black", linewidth=1.2,
                label=(f"roofline: {bw:.1f} GB/s, peak {peak:.0f} GFLOP/s" if peak
                       else f"bandwidth slope {bw:.1f} GB/s (no peak)"))
    elif peak:
        ax.axhline(peak, color="black", linewidth=1.2, label=f"peak {peak:.0f} GFLOP/s")
    for r in rows:
        ax.scatter(r.ai, r.gflops, marker=MARKERS.get(r.schedule, "x"), color=COLORS.get(r.kind, "gray"),
                   edgecolors="black", linewidths=0.4, s=36, zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("arithmetic intensity, flop/byte (minimum traffic)")
    ax.set_ylabel("GFLOP/s")
    title = f"shuffle_group_conv2d layers, {report.target}, on {report.where}"
    if report.emulated and "EMULATED" not in title:
        title += " (EMULATED: qemu times)"
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    handles = [Line2D([], [], linestyle="", marker=m, color="gray", label=s) for s, m in MARKERS.items()]
    handles += [Line2D([], [], linestyle="", marker="o", color=c, label=k) for k, c in COLORS.items()
                if any(r.kind == k for r in report.rows)]
    roof_handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=roof_handles + handles, fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(report: StudyReport, output_dir: Path) -> dict[str, Path]:
    """``study.md``, ``study.json`` and ``roofline.png`` in ``output_dir``."""
    import json

    output_dir = writable_output(output_dir, "-o", directory=True)
    md = output_dir / "study.md"
    md.write_text(markdown(report) + "\n")
    js = output_dir / "study.json"
    js.write_text(json.dumps(to_json(report), indent=1) + "\n")
    png = plot(report, output_dir / "roofline.png")
    return {"markdown": md, "json": js, "plot": png}
