"""What the layers are measured against: the fp32 peak of the CPU (a TVM FMA kernel; the
formula cores × lanes × FMA units × clock as a cross-check), the memory bandwidth (a TVM
streaming kernel), the TVM threads here."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import targets


log = logging.getLogger(__name__)

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
/* 8 dependent register-register adds an iteration (x doubles): 8 cycles an iteration on any
   out-of-order core. Not "add $1": recent Intel cores fold chains of immediate adds at rename
   (seen: 18 GHz "measured" on a Xeon that LLVM calls rocketlake). */
uint64_t spin(uint64_t n) {
  uint64_t x = 1;
  for (uint64_t i = 0; i < n; i++) {
#if defined(__x86_64__)
    __asm__ volatile("add %0, %0\n\tadd %0, %0\n\tadd %0, %0\n\tadd %0, %0\n\t"
                     "add %0, %0\n\tadd %0, %0\n\tadd %0, %0\n\tadd %0, %0" : "+r"(x));
#elif defined(__aarch64__)
    __asm__ volatile("add %0, %0, %0\n\tadd %0, %0, %0\n\tadd %0, %0, %0\n\tadd %0, %0, %0\n\t"
                     "add %0, %0, %0\n\tadd %0, %0, %0\n\tadd %0, %0, %0\n\tadd %0, %0, %0" : "+r"(x));
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
    from ..schedules import isa_for

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


#: independent FMA chains of the peak kernel: enough to cover an FMA's latency on every pipe
#: (4-5 cycles × 2 pipes) and few enough to stay in registers (AVX2 has 16, NEON 32)
PEAK_CHAINS = 12


def peak_kernel(threads: int, lanes: int, iterations: int, chains: int = PEAK_CHAINS):
    """``threads`` parallel iterations, each ``chains`` × ``lanes`` accumulators in registers
    updated ``iterations`` times by ``acc = acc * x + 0.5`` (one FMA each; with ``x`` = 0.5 and
    ``acc`` starting at 0 every output converges to exactly 1.0, a check that the loop ran).
    ``x`` is a scalar argument, not a buffer: read from a buffer it is reloaded after every
    store, and LLVM keeps the accumulators in memory (a store per FMA, a third of the peak)."""
    from tvm.script import tirx as T

    @T.prim_func
    def main(out: T.Buffer((threads, chains, lanes), "float32"), x: T.float32):
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        for t in T.parallel(threads):
            acc = T.alloc_buffer((chains, lanes), "float32", scope="local")
            for c in T.unroll(chains):
                for v in T.vectorized(lanes):
                    acc[c, v] = T.float32(0)
            for _ in T.serial(iterations):
                for c in T.unroll(chains):
                    for v in T.vectorized(lanes):
                        acc[c, v] = acc[c, v] * x + T.float32(0.5)
            for c in T.unroll(chains):
                for v in T.vectorized(lanes):
                    out[t, c, v] = acc[c, v]

    return main


def measure_peak(device, preset: targets.TargetPreset, threads: int, where: str | None = None,
                 iterations: int = 2_000_000) -> Peak:
    """fp32 peak on ``device`` (an open one of :mod:`tvmshuffle.devices`, named ``where`` in the
    note), measured: a TVM kernel of register-resident FMA chains (:func:`peak_kernel`), one
    chain set per thread, parallel over ``threads``; best of 5 samples of 3 runs, at each vector
    width the ISA has (the hand schedules' and, on AVX-512, zmm's), the faster width taken. It
    tells what the formula of :func:`cpu_peak` cannot: how many FMA pipes the core really has
    at a width (Zen 1 splits a 256-bit FMA over its two 128-bit pipes: half the formula; Zen 4
    runs zmm at ymm's rate; the Xeons here, with two 512-bit FMA units, at twice it), and the
    clock under load."""
    import tvm

    isa = isa_of(preset)
    widths = [isa] + ([isa.wide] if isa.wide is not None else [])
    rates = {}
    for width in widths:
        lib = tvm.tirx.build(peak_kernel(threads, width.lanes, iterations), targets.tvm_target(preset))
        module = device.load_built(lib, preset, f"peak{width.lanes}")
        out = device.tensor(np.zeros((threads, PEAK_CHAINS, width.lanes), "float32"))
        device.step(f"measuring the fp32 peak ({width.name})")
        module["main"](out, 0.5)
        if not np.all(out.numpy() == 1.0):
            return Peak(None, f"peak kernel ({width.name}) computed a wrong result; not measured")
        results = module.time_evaluator("main", device.cpu(), number=3, repeat=5)(out, 0.5).results
        out = module = None
        rates[width] = 2 * threads * PEAK_CHAINS * width.lanes * iterations / min(results) / 1e9
    best = max(rates, key=rates.get)
    each = ", ".join(f"{w.lanes}-lane ({w.name}) {g:.1f}" for w, g in rates.items())
    how = (f"measured: TVM kernel of {PEAK_CHAINS} register-resident FMA chains per thread, {threads} "
           f"threads, on {where or device.name}: {rates[best]:.1f} GFLOP/s at {best.lanes} lanes "
           f"({best.name}; best of 5 × 3 runs; GFLOP/s by width: {each})")
    return Peak(rates[best], how)


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


def measure_bandwidth(device, preset: targets.TargetPreset, megabytes: int = 64,
                      where: str | None = None) -> Bandwidth:
    """Memory bandwidth of a TVM streaming kernel ``c = a + b`` over ``megabytes`` MB arrays,
    parallel over every thread, on ``device`` (an open one of :mod:`tvmshuffle.devices`, named
    ``where`` in the note): 3 × size bytes per run (STREAM's count; the write-allocate read of
    ``c`` is not counted), best of 10 samples of 3 runs."""
    import tvm

    n = megabytes * 2**20 // 4
    lib = tvm.tirx.build(_stream_kernel(n), targets.tvm_target(preset))
    module = device.load_built(lib, preset, "bandwidth")
    a = device.tensor(np.ones(n, "float32"))
    b = device.tensor(np.full(n, 2.0, "float32"))
    c = device.tensor(np.zeros(n, "float32"))
    device.step("measuring the memory bandwidth")
    module["main"](a, b, c)  # first touch of the pages, and a check
    if not np.allclose(c.numpy()[:: max(1, n // 1024)], 3.0):
        return Bandwidth(None, "bandwidth kernel computed a wrong result; not measured")
    results = module.time_evaluator("main", device.cpu(), number=3, repeat=10)(a, b, c).results
    a = b = c = module = None
    best = min(results)
    gbps = 3 * n * 4 / best / 1e9
    how = (f"measured: TVM kernel c[i] = a[i] + b[i] over three {megabytes} MB fp32 arrays, parallel over "
           f"every thread, on {where or device.name}: 3 × {megabytes} MB in {best * 1e3:.2f} ms "
           f"(best of 10 × 3 runs) = {gbps:.1f} GB/s")
    if device.emulated:
        how += " (EMULATED: a qemu number, not the device's)"
    return Bandwidth(gbps, how)


