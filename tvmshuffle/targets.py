"""Target presets: one table, name → TVM target dict + how to link the shared library.

A preset says what to generate code for (the TVM target, a JSON dict as TVM 0.27 takes it)
and how to link it into a deployable ``.so`` (``None`` = the host's own compiler; otherwise a
cross compiler command). Anything that is not a preset name may be a raw TVM target JSON
(``'{"kind":"llvm","mtriple":"aarch64-linux-gnu"}'``).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass, field

from .errors import UserError, last_line


@dataclass(frozen=True)
class TargetPreset:
    """A named compilation target."""

    name: str
    target: dict  # TVM target dict (without num-cores; see :func:`tvm_target`)
    cross_compiler: str | None = None  # None: link with the host compiler
    description: str = ""
    #: where the cross compiler comes from, said in the error when it is missing
    install_hint: str = ""
    #: cores of the device (MetaSchedule's ``num-cores``); None: this machine's
    num_cores: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_cross(self) -> bool:
        return self.cross_compiler is not None


def _host_cpu() -> str:
    from tvm.target import codegen

    return codegen.llvm_get_system_cpu()


_AARCH64_LINUX = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
_DEBIAN_CROSS = "aarch64-linux-gnu-g++"
_DEBIAN_HINT = "apt-get install g++-aarch64-linux-gnu"

#: The preset table. ``host``'s ``mcpu`` is filled in at lookup time (detected).
PRESETS: dict[str, TargetPreset] = {
    p.name: p
    for p in [
        TargetPreset("host", {"kind": "llvm"}, None, "this machine's CPU (detected -mcpu)"),
        TargetPreset(
            "aarch64",
            _AARCH64_LINUX,
            _DEBIAN_CROSS,
            "generic 64-bit ARM Linux with NEON",
            _DEBIAN_HINT,
            num_cores=4,
        ),
        TargetPreset(
            "rpi4",
            {**_AARCH64_LINUX, "mcpu": "cortex-a72"},
            _DEBIAN_CROSS,
            "Raspberry Pi 4 (Cortex-A72, 4 cores)",
            _DEBIAN_HINT,
            num_cores=4,
        ),
        TargetPreset(
            "android-arm64",
            {"kind": "llvm", "mtriple": "aarch64-linux-android", "mcpu": "cortex-a76",
             "mattr": ["+neon"]},
            "ndk",  # resolved from ANDROID_NDK_HOME in :func:`cross_compiler_command`
            "Android arm64 phone (Cortex-A76); links with the NDK's clang",
            "set ANDROID_NDK_HOME to an Android NDK",
            num_cores=4,
        ),
    ]
}

ANDROID_API_LEVEL = 28


def _parse_raw(spec: str) -> TargetPreset:
    try:
        target = json.loads(spec)
    except json.JSONDecodeError:
        names = ", ".join(PRESETS)
        raise UserError(
            f"--target: unknown target preset {spec!r} (presets: {names}; or a TVM target JSON dict)"
        ) from None
    if not isinstance(target, dict) or "kind" not in target:
        raise UserError(f"--target: a raw target must be a JSON object with a 'kind', got {spec!r}")
    import tvm

    try:
        tvm.target.Target(target)
    except Exception as err:  # noqa: BLE001 - TVM raises many kinds
        raise UserError(f"--target: TVM rejects target {spec!r}: {last_line(err)}") from None
    triple = target.get("mtriple", "")
    cross = _DEBIAN_CROSS if triple.startswith("aarch64") and "android" not in triple else None
    if "android" in triple:
        cross = "ndk"
    return TargetPreset("custom", target, cross, "raw TVM target JSON", _DEBIAN_HINT if cross else "")


#: LLVM features the ``host`` preset adds on an x86 CPU. ``+prefer-no-gather``: LLVM builds a
#: strided vector load (a stride-2 conv's or pool's input row, a channel vector of an NCHW
#: tensor) from contiguous loads and shuffles or from scalar loads, not from an AVX2/AVX-512
#: gather. LLVM already does that for Zen 1-3, not for Zen 4 nor Intel's AVX-512 CPUs (V1 g3
#: 1x: 169 and 155 ``vgather``), where a gather is slow (Zen 4) or made slow by the Downfall
#: microcode (Intel's Skylake to Ice Lake and Rocket Lake cores). On Zen 4, timed alone and interleaved:
#: max pool 3x3/2 1.3-1.7x faster, the global mean 1.25x, the average pools up to 1.45x.
#: Tuning records apply with or without these (:func:`tvmshuffle.records.check_target`): they
#: change how LLVM lowers a load, not the schedule a record holds.
X86_HOST_FEATURES = ("+prefer-no-gather",)


def host_is_x86() -> bool:
    """Whether this machine is x86 (LLVM's host triple)."""
    from tvm.target import codegen

    return codegen.llvm_get_system_triple().split("-")[0] in ("x86_64", "i386", "i686")


@functools.lru_cache(maxsize=None)
def _host_preset() -> TargetPreset:
    base = PRESETS["host"]
    target = {"kind": "llvm", "mcpu": _host_cpu()}
    if host_is_x86():
        target["mattr"] = list(X86_HOST_FEATURES)
    return TargetPreset(base.name, target, None, base.description)


def resolve(spec: str, cross_compiler: str | None = None) -> TargetPreset:
    """A preset name or raw TVM target JSON → :class:`TargetPreset`; ``--cross-compiler`` overrides."""
    if spec == "host":
        preset = _host_preset()
    elif spec in PRESETS:
        preset = PRESETS[spec]
    else:
        preset = _parse_raw(spec)
    if cross_compiler:
        preset = TargetPreset(preset.name, preset.target, cross_compiler, preset.description,
                              preset.install_hint, preset.num_cores)
    return preset


#: what :func:`records_name` puts before the host's CPU (``host-znver4``)
HOST_RECORDS_PREFIX = "host-"


def records_name(preset: TargetPreset) -> str:
    """The ``<target>`` of a records dir (``tuning_logs/<target>/<model>/``): the preset's name,
    and the host's CPU with it (``host-znver4``) — tuning records belong to the CPU that measured
    them, so each CPU's go to a dir of their own and a build finds this CPU's."""
    if preset.name == "host":
        return HOST_RECORDS_PREFIX + (preset.target.get("mcpu") or "generic")
    return preset.name


def with_threads(preset: TargetPreset, threads: int | None) -> TargetPreset:
    """``preset`` with ``num-cores`` = ``threads`` (``--threads``: the cores the code will run
    on, which MetaSchedule sizes its parallel loops for); unchanged when ``threads`` is None."""
    if threads is None:
        return preset
    import dataclasses

    return dataclasses.replace(preset, num_cores=int(threads))


def tvm_target(preset: TargetPreset):
    """The :class:`tvm.target.Target` for a preset, with ``num-cores`` set (MetaSchedule needs it)."""
    import tvm

    cores = preset.num_cores or os.cpu_count() or 1
    return tvm.target.Target({**preset.target, "num-cores": cores})


def cross_compiler_command(preset: TargetPreset) -> str | None:
    """The linker command for a preset's ``.so`` (None: the host's), checked to exist."""
    cc = preset.cross_compiler
    if cc is None:
        return None
    if cc == "ndk":
        ndk = os.environ.get("ANDROID_NDK_HOME")
        if not ndk:
            raise UserError(
                f"--target {preset.name}: linking for Android needs the NDK's clang; "
                "set ANDROID_NDK_HOME to an Android NDK (or pass --cross-compiler)"
            )
        cc = os.path.join(
            ndk, "toolchains", "llvm", "prebuilt", "linux-x86_64", "bin",
            f"aarch64-linux-android{ANDROID_API_LEVEL}-clang++",
        )
        if not os.path.exists(cc):
            raise UserError(f"--target {preset.name}: ANDROID_NDK_HOME has no {cc}")
        return cc
    if shutil.which(cc) is None and not os.path.exists(cc):
        hint = f" ({preset.install_hint})" if preset.install_hint else ""
        raise UserError(f"--target {preset.name}: cross compiler {cc!r} not found{hint}")
    return cc


def export_function(preset: TargetPreset):
    """``fcompile`` for ``Executable.export_library`` / MetaSchedule's builder (None: host)."""
    cc = cross_compiler_command(preset)
    if cc is None:
        return None
    from tvm.support import cc as tvm_cc

    return tvm_cc.cross_compiler(cc)


def export_library(module, preset: TargetPreset, path) -> None:
    """Write ``module`` (an executable or a runtime module) as a shared library for ``preset``
    at ``path``: linked by the preset's cross compiler, or by the host's for the host."""
    fcompile = export_function(preset)
    if fcompile is None:
        module.export_library(str(path))
    else:
        module.export_library(str(path), fcompile=fcompile)


def host_cpu_name() -> str:
    """This machine's CPU model as /proc/cpuinfo names it (for reports)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
