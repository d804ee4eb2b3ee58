"""Per-kernel timing of a built model (TVM 0.24+ has no Relax VM profiler).

Each compiled kernel (PrimFunc) is timed alone with ``time_evaluator`` on arguments of its
real shapes (random values; the kernels' run time does not depend on them), then reported
with its MACs, achieved GFLOP/s (2 FLOPs a MAC) and share of the summed time.

Each kernel is timed twice: *warm* (``number`` calls in a row: its weights and output stay in
cache between calls) and *cold* (caches flushed of every argument but the first before each
call, TVM's ``cache_flush_cpu_non_first_arg``: the input activation, just written by the kernel
before it, stays warm). In the whole model a kernel runs cold — the model's weights do not fit
in L2 — so the whole model minus the warm sum (the *gap*) splits into what the cold sum
explains (memory traffic the kernel's schedule does not hide) and the rest (the VM's dispatch
and allocations, thread-pool wake-ups).

Timed alone, warm or cold, a kernel is not where the model runs it. ``--in-model``
(:func:`in_model`) measures that directly: the model is rebuilt once per group of kernels
(:func:`kernel_groups`: pointwise convs by output plane, depthwise convs, other convs, the
matmul, pools, concatenations and gathers, everything else) with that group's kernels emptied
(:func:`without_kernels`: they take their arguments and do nothing), and once with every kernel
emptied (the VM alone); all builds are timed in interleaved rounds, and what a group costs in
the model is the whole model minus the model without it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .kernels import Kernel


@dataclass
class KernelTime:
    kernel: Kernel
    median_ms: float  # one call, warm (``number`` calls in a row)
    share: float = 0.0  # of the summed time of all kernels (calls counted)
    #: one call with caches flushed of every argument but the input (None: not timed cold)
    cold_ms: float | None = None

    @property
    def total_ms(self) -> float:
        return self.median_ms * self.kernel.calls

    @property
    def cold_total_ms(self) -> float | None:
        return None if self.cold_ms is None else self.cold_ms * self.kernel.calls

    @property
    def gflops(self) -> float:
        return 2 * self.kernel.macs / (self.median_ms * 1e6) if self.median_ms > 0 else 0.0

    def as_dict(self) -> dict:
        return {**self.kernel.as_dict(), "median_ms": self.median_ms, "total_ms": self.total_ms,
                "gflops": self.gflops, "share": self.share, "cold_ms": self.cold_ms}


def kernel_library(executable_or_module):
    """The module holding the kernels' functions, from a VM executable or a loaded ``.so``."""
    mod = getattr(executable_or_module, "mod", executable_or_module)
    for candidate in [mod, *mod.imports]:
        if candidate.kind in ("library", "llvm", "c"):
            return candidate
    return mod.imports[0]


#: TVM's ``time_evaluator`` pre-processing that evicts every argument but the first from the caches
COLD = "cache_flush_cpu_non_first_arg"


def time_kernels(library, kernels: list[Kernel], dev=None, number: int = 10, repeat: int = 5,
                 seed: int = 0, on_kernel=None, cold: bool = True) -> list[KernelTime]:
    """Time every kernel in ``library``, warm and (``cold``) with its weights and output flushed
    from the caches before each call (one call a sample, ``repeat`` × ``number`` samples);
    sorted slowest (by warm total time) first.

    ``on_kernel(what)`` is called before each kernel (a remote session bounds each step).
    """
    import tvm

    dev = dev or tvm.cpu()
    rng = np.random.default_rng(seed)
    rows = []
    for kernel in kernels:
        if on_kernel is not None:
            on_kernel(f"timing kernel {kernel.name}")
        args = [tvm.runtime.tensor(rng.standard_normal(s).astype("float32"), dev)
                for s in kernel.inputs]
        args += [tvm.runtime.tensor(np.zeros(s, "float32"), dev) for s in kernel.outputs]
        timer = library.time_evaluator(kernel.name, dev, number=number, repeat=repeat)
        row = KernelTime(kernel, float(np.median(timer(*args).results)) * 1e3)
        if cold:
            timer = library.time_evaluator(kernel.name, dev, number=1, repeat=repeat * number, f_preproc=COLD)
            row.cold_ms = float(np.median(timer(*args).results)) * 1e3
        rows.append(row)
    total = sum(r.total_ms for r in rows) or 1.0
    for r in rows:
        r.share = r.total_ms / total
    return sorted(rows, key=lambda r: r.total_ms, reverse=True)


@dataclass
class GroupCost:
    """What one group of kernels (:func:`kernel_groups`) costs: timed alone, and in the model."""

    group: str
    kernels: list[str]
    calls: int
    alone_ms: float  # the group's kernels timed alone, warm, each × its calls
    cold_ms: float | None  # the same, cold
    #: the whole model minus the whole model with these kernels emptied, the median of that
    #: difference over the interleaved rounds (each round's taken within the round: :func:`round_costs`)
    in_model_ms: float
    #: the lowest and the highest round's difference: how far the machine's noise moves it
    in_model_range_ms: tuple[float, float]

    @property
    def within_noise(self) -> bool:
        """Whether the rounds disagree on the sign of the cost: it is smaller than the noise."""
        low, high = self.in_model_range_ms
        return low <= 0.0 <= high

    def as_dict(self) -> dict:
        return {"group": self.group, "kernels": self.kernels, "calls": self.calls, "alone_ms": self.alone_ms,
                "cold_ms": self.cold_ms, "in_model_ms": self.in_model_ms,
                "in_model_range_ms": list(self.in_model_range_ms), "within_noise": self.within_noise}


def round_costs(whole_ms: list[float], without_ms: list[float], rounds: int) -> tuple[float, tuple[float, float]]:
    """What a model gains when something is taken out of it, from the samples of the two builds
    timed in the same ``rounds`` interleaved rounds (:func:`tvmshuffle.bench.time_interleaved`:
    samples in round order, as many in each round): per round, the median of the whole's
    samples minus the median of the other's; returns the median of those differences and
    (lowest, highest). A slow spell of a shared machine that falls on a round slows both builds
    of that round, so a difference within a round is not moved by it, and the spread of the
    rounds says how much the noise that remains moves the cost."""
    per_round = [float(np.median(w) - np.median(o))
                 for w, o in zip(np.array_split(np.asarray(whole_ms), rounds),
                                 np.array_split(np.asarray(without_ms), rounds))]
    return float(np.median(per_round)), (min(per_round), max(per_round))


@dataclass
class Profile:
    model: str
    where: str
    total_ms: float  # whole model, one run (median)
    kernels: list[KernelTime]
    #: ``--in-model``: each group's cost in the model, and the model with every kernel emptied
    in_model: list[GroupCost] | None = None
    vm_only_ms: float | None = None

    @property
    def kernels_ms(self) -> float:
        """The kernels timed alone, each × its calls."""
        return sum(k.total_ms for k in self.kernels)

    @property
    def kernels_cold_ms(self) -> float | None:
        """The kernels timed alone with cold caches, each × its calls (None: not timed cold)."""
        cold = [k.cold_total_ms for k in self.kernels]
        return None if not cold or None in cold else sum(cold)

    @property
    def gap_ms(self) -> float:
        """What the whole model takes beyond its kernels timed alone: the VM's dispatch and
        allocations, thread-pool wake-ups, caches cold between kernels (negative: the kernels
        ran faster in the model, e.g. warm caches)."""
        return self.total_ms - self.kernels_ms

    def as_dict(self) -> dict:
        found = {"model": self.model, "where": self.where, "total_ms": self.total_ms,
                 "kernels_ms": self.kernels_ms, "kernels_cold_ms": self.kernels_cold_ms, "gap_ms": self.gap_ms,
                 "kernels": [k.as_dict() for k in self.kernels]}
        if self.in_model is not None:
            found.update(in_model=[g.as_dict() for g in self.in_model], vm_only_ms=self.vm_only_ms)
        return found


def _kernels_of(path) -> list[Kernel]:
    from . import pipeline
    from .errors import UserError

    meta = pipeline.read_metadata(path)
    if meta is None:
        raise UserError(f"{path}: no {pipeline.metadata_path(path).name} beside it (compile with "
                        "tvmshuffle compile, or profile the model by name)")
    return [Kernel(**k) for k in meta["kernels"]]


# --------------------------------------------------------------------------- in the model


def kernel_groups(lowered) -> dict[str, list[str]]:
    """The kernels (PrimFunc names) of a lowered module by kind: ``pointwise 14x14`` and
    ``dw+pointwise 14x14`` (a depthwise conv and the 1x1 after it in one kernel; by output plane),
    ``depthwise``, ``conv`` (dense/strided: the stem), ``conv+pool`` (the stem and its max pool
    in one kernel), ``matmul``, ``pool``, ``injective`` (concatenations, gathers) and ``other``
    (the global mean); in first-seen order."""
    import tvm

    from .tir_analysis import describe

    groups: dict[str, list[str]] = {}
    for gv, func in lowered.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        layer = describe(func)
        if layer is None:
            group = "other"
        elif layer.kind in ("pointwise", "dw_pointwise"):
            kind = "pointwise" if layer.kind == "pointwise" else "dw+pointwise"
            group = f"{kind} {layer.out_hw[0]}x{layer.out_hw[1]}"
        elif layer.kind == "other":  # a conv neither pointwise nor depthwise: dense, strided (the stem)
            group = "conv"
        elif layer.kind == "conv_pool":
            group = "conv+pool"
        else:  # depthwise, matmul, pool, injective
            group = layer.kind
        groups.setdefault(group, []).append(gv.name_hint)
    return groups


#: what a schedule that folds a weight's repacking into the constants appends to a kernel's name
PREPACKED = "_prepacked"


def without_kernels(mod, names):
    """``mod`` (scheduled) with the kernels named ``names`` (their lowered names) emptied: each
    takes its arguments and does nothing. Not a model any more (its outputs are garbage): what
    :func:`in_model` times to tell what those kernels cost in the whole model."""
    import tvm

    names = set(names)
    functions = {}
    for gv, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and gv.name_hint.removesuffix(PREPACKED) in names:
            func = func.with_body(tvm.tirx.Evaluate(0))
        functions[gv] = func
    return tvm.IRModule(functions, attrs=mod.attrs)


def in_model(compiled, kernel_rows: list[KernelTime], device, directory, repeat: int = 5, number: int = 10,
             rounds: int = 10) -> tuple[list[GroupCost], float, float]:
    """Each kernel group's cost in the whole model (see the module docstring): ``compiled`` is
    :func:`tvmshuffle.pipeline.compile_model`'s result, its variants exported into
    ``directory``. Returns (groups, slowest first; the model with every kernel emptied; the
    whole model), medians of ``rounds × repeat`` samples of ``number`` runs, taken in ``rounds``
    interleaved rounds (:func:`tvmshuffle.bench.time_interleaved`: the order rotating, one settle
    sample first); a group's cost is taken round by round (:func:`round_costs`)."""
    from pathlib import Path

    from . import pipeline
    from .bench import Row, time_interleaved

    groups = kernel_groups(compiled.lowered)
    everything = [name for names in groups.values() for name in names]
    variants = {"": compiled.scheduled, **{g: without_kernels(compiled.scheduled, n) for g, n in groups.items()},
                None: without_kernels(compiled.scheduled, everything)}
    vms = {}
    for i, (group, mod) in enumerate(variants.items()):
        device.step(f"building the model without its {group} kernels" if group else "building the model")
        library = pipeline.export(pipeline.codegen(mod, compiled.target), compiled.target, Path(directory) / f"v{i}.so")
        vms[group] = device.load_vm(library)
    x = compiled.model.random_input()
    for vm in vms.values():
        device.run(vm, x)  # (the input every build is then timed on)
    timed = {group: Row(str(group), "") for group in vms}
    # one runtime and one thread pool for all the builds, never idle between them: nothing to
    # wait out (:func:`~tvmshuffle.bench.wait_until_idle`), one settle sample (``number`` runs) each
    time_interleaved([(timed[group], functools.partial(_one_sample, device, vm, number)) for group, vm in vms.items()],
                     warmup=1, repeat=rounds * repeat, settle_ms=0, rounds=rounds, idle=lambda: None)
    median = {group: row.median_ms for group, row in timed.items()}
    by_name = {row.kernel.name.removesuffix(PREPACKED): row for row in kernel_rows}
    costs = []
    for group, names in groups.items():
        rows = [by_name[n] for n in names if n in by_name]
        cold = [r.cold_total_ms for r in rows]
        cost, spread = round_costs(timed[""].samples_ms, timed[group].samples_ms, rounds)
        costs.append(GroupCost(group, names, sum(r.kernel.calls for r in rows), sum(r.total_ms for r in rows),
                               None if None in cold else sum(cold), cost, spread))
    return sorted(costs, key=lambda g: g.in_model_ms, reverse=True), median[None], median[""]


def _one_sample(device, vm, number: int) -> float:
    return device.time(vm, 1, number)[0]


def profile(model: str, config, device, number: int = 10, repeat: int = 5, in_the_model: bool = False) -> Profile:
    """Per-kernel times of ``model`` on ``device`` (:func:`tvmshuffle.devices.open_device`, not
    yet entered): a model by name or file, compiled with ``config`` (a
    :class:`~tvmshuffle.pipeline.CompileConfig`), or a ``.so`` from ``tvmshuffle compile``.

    A ``.so`` is profiled as it is on this CPU (:func:`profile_library`). A device elsewhere gets
    it rebuilt from its ``model.so.json`` (:func:`tvmshuffle.pipeline.compiled_from`): TVM's
    remote time evaluator finds only a module's root functions, so the kernels are exported
    alone, from the build (:func:`profile_model`).
    """
    from pathlib import Path

    from . import pipeline

    if str(model).endswith(".so"):
        if device.is_here and not in_the_model:
            return profile_library(Path(model), number=number, repeat=repeat, device=device)
        model, config = pipeline.compiled_from(Path(model))
    return profile_model(model, config, device, number, repeat, in_the_model)


def profile_model(model: str, config, device, number: int = 10, repeat: int = 5,
                  in_the_model: bool = False) -> Profile:
    """Per-kernel times of ``model``, compiled with ``config`` for ``device``'s target, on
    ``device`` (this CPU or one behind a tracker; emulated devices: labelled).

    The model is compiled as ``tvmshuffle compile`` does, and its kernels are also exported
    alone, as a second library, and timed from that one (over RPC the time evaluator finds
    only functions at a module's root). On a device every step is bounded by its
    ``--rpc-timeout`` (:class:`~tvmshuffle.remote.Session`), its pool configured as it starts.
    ``in_the_model``: also each kernel group's cost in the model (:func:`in_model`; one more
    build per group, and the whole model's time is then the median of those interleaved rounds).
    """
    import tempfile
    from pathlib import Path

    from . import pipeline, targets
    from .devices import where

    with tempfile.TemporaryDirectory() as tmp:
        compiled = pipeline.compile_model(model, Path(tmp) / "model.so", config)
        only_kernels = Path(tmp) / "kernels.so"
        targets.export_library(kernel_library(compiled.executable), compiled.target, only_kernels)
        kernels_list = _kernels_of(compiled.output)
        with device:
            vm = device.load_vm(compiled.output)
            library = device.load_module(only_kernels)
            rows, total = kernels_and_model(device, vm, library, kernels_list, compiled.model.random_input(),
                                            number, repeat)
            vm = library = None
            groups = vm_only = None
            if in_the_model:
                groups, vm_only, total = in_model(compiled, rows, device, tmp, repeat, number)
    return Profile(compiled.model.name, where(device, compiled.target), total, rows, groups, vm_only)


def profile_library(path, kernels_list: list[Kernel] | None = None, number: int = 10, repeat: int = 5,
                    threads=None, device=None) -> Profile:
    """Per-kernel times of a host ``.so`` (kernel shapes from its ``model.so.json``) on this CPU:
    ``device`` (a :class:`~tvmshuffle.devices.LocalDevice`, not yet entered), else one whose pool
    ``threads`` (a :class:`~tvmshuffle.runtime.ThreadConfig`) configures."""
    from .devices import LocalDevice, where
    from .frontend import DEFAULT_INPUT_SHAPE

    device = device or LocalDevice(threads)
    kernels_list = kernels_list or _kernels_of(path)
    with device:
        lib = device.load_module(path)  # loaded once: the VM and the kernels' timers share it
        vm = device.vm(lib, str(path))
        shape = kernels_list[0].inputs[0] if kernels_list else list(DEFAULT_INPUT_SHAPE)
        x = np.random.default_rng(0).standard_normal(shape).astype("float32")
        rows, total = kernels_and_model(device, vm, kernel_library(lib), kernels_list, x, number, repeat)
    return Profile(str(path), where(device), total, rows)


def kernels_and_model(device, vm, library, kernels_list: list[Kernel], x, number: int,
                      repeat: int) -> tuple[list[KernelTime], float]:
    """Each kernel alone (:func:`time_kernels`) and the whole model (``vm`` on ``x``; the median
    of ``repeat`` samples of ``number`` runs), on ``device`` (entered). The model's samples are
    spread among the kernels' timings, one every few kernels, not taken after them all. The
    speed of a shared machine drifts (2x within seconds on the 2-core cloud machines here), and
    the gap between the model and its kernels is a difference of the two, so both have to see
    the same phases."""
    device.run(vm, x)
    every = max(1, len(kernels_list) // repeat)
    whole: list[float] = []
    timed = 0

    def before_kernel(what: str) -> None:
        nonlocal timed
        if timed % every == 0 and len(whole) < repeat:
            whole.extend(device.time(vm, 1, number))
        timed += 1
        device.step(what)

    rows = time_kernels(library, kernels_list, device.cpu(), number=number, repeat=repeat, on_kernel=before_kernel)
    if len(whole) < repeat:
        whole.extend(device.time(vm, repeat - len(whole), number))
    return rows, float(np.median(whole))


def markdown(profile: Profile) -> str:
    head = (f"**{profile.model}** on {profile.where}: whole model {profile.total_ms:.3f} ms, "
            f"kernels timed alone sum to {profile.kernels_ms:.3f} ms, gap {profile.gap_ms:.3f} ms "
            f"({profile.gap_ms / profile.total_ms:.0%} of the model)")
    cold = profile.kernels_cold_ms
    if cold is not None:
        head += (f". With cold caches (weights and output flushed before each call, as in the whole model) "
                 f"the kernels sum to {cold:.3f} ms: ")
        if profile.gap_ms <= 0:
            head += "the whole model took no longer than its kernels warm, so there is no gap to explain"
        elif cold >= profile.total_ms:  # the model runs between its warm and its cold kernels
            head += ("more than the whole model, so memory traffic explains all of the gap (in the model "
                     "a kernel's input, just written by the kernel before it, and some of its weights are "
                     "still in cache)")
        else:
            head += (f"memory traffic explains {cold - profile.kernels_ms:.3f} ms of the gap, the VM's "
                     f"dispatch, allocations and thread wake-ups the other {profile.total_ms - cold:.3f} ms")
    lines = [
        head,
        "",
        "| kernel | calls | output | MACs (M) | ms per call | ms total | GFLOP/s | share | cold ms per call |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k in profile.kernels:
        cold_cell = "–" if k.cold_ms is None else f"{k.cold_ms:.4f}"
        lines.append(
            f"| {k.kernel.name} | {k.kernel.calls} | {' '.join(map(str, k.kernel.outputs))} | "
            f"{k.kernel.macs / 1e6:.2f} | {k.median_ms:.4f} | {k.total_ms:.4f} | {k.gflops:.1f} | {k.share:.1%} "
            f"| {cold_cell} |"
        )
    if profile.in_model is not None:
        lines += ["", _in_model_markdown(profile)]
    return "\n".join(lines)


def _in_model_markdown(profile: Profile) -> str:
    explained = sum(g.in_model_ms for g in profile.in_model) + profile.vm_only_ms
    lines = [
        f"**In the model** (`--in-model`: the model rebuilt with each group's kernels emptied, all builds "
        f"timed in interleaved rounds): whole model {profile.total_ms:.3f} ms; with every kernel emptied "
        f"{profile.vm_only_ms:.3f} ms (the VM: dispatch, allocations, calls); the groups' costs and the VM "
        f"add up to {explained:.3f} ms. A group's cost is the whole model minus the model without it, "
        f"taken within each round (a slow spell of the machine slows both alike): the median of the "
        f"rounds, and in brackets the lowest and highest round; where the rounds disagree on its sign the "
        f"cost is smaller than this machine's noise and has no share",
        "",
        "| kernels | count | calls | alone, warm (ms) | alone, cold (ms) | in the model (ms) | share of the model |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for g in profile.in_model:
        cold = "–" if g.cold_ms is None else f"{g.cold_ms:.3f}"
        low, high = g.in_model_range_ms
        share = "within noise" if g.within_noise else f"{g.in_model_ms / profile.total_ms:.0%}"
        lines.append(f"| {g.group} | {len(g.kernels)} | {g.calls} | {g.alone_ms:.3f} | {cold} "
                     f"| {g.in_model_ms:.3f} ({low:.3f} to {high:.3f}) | {share} |")
    return "\n".join(lines)
