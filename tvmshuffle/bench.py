"""``tvmshuffle bench``: TVM (alone, hand-scheduled, tuned × unfused/fused), PyTorch and ONNX Runtime, one process.

The TVM rows (:data:`TVM_VARIANTS`): ``tvm-untuned-unfused`` / ``tvm-untuned-fused`` (``--schedules
none``, no records: TVM alone), ``tvm-hand-fused`` (the default compile, no records: what a user
gets without tuning), ``tvm-tuned-unfused`` / ``tvm-tuned-fused`` (the default compile with the
records: each kernel the faster of its best record and its hand schedule).

Every variant runs on the same input with the same thread count. Each one's output is first
checked against PyTorch (max error ≤ ``tolerance`` × the output scale); a variant that
disagrees is reported as wrong and not timed. Then warm-up runs, then the ``repeat`` timed runs
of every variant, in ``--rounds`` rounds (5; the order rotating, the process idle between two
variants: :func:`time_interleaved`): median, p10 and p90, and ratios to ONNX Runtime and to the untuned unfused TVM build. Over RPC
the TVM variants run on the device (emulated devices labelled so); PyTorch and ONNX Runtime
rows say "host only".
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import devices, frontend, pipeline, targets
from .records import WORKLOAD_FILE, other_cpus, records_dir_for, records_key, set_aside
from ._shipped import display
from .errors import UserError
from . import runtime
from .runtime import check

log = logging.getLogger(__name__)

#: TVM's rows (JSON ``variant`` names are a contract) → (fused, tuning records, ``--schedules``):
#: ``untuned``: TVM alone (``--schedules none``, no records); ``hand``: the default compile with
#: no records (what a user gets without tuning); ``tuned``: the default compile with records
#: (each kernel the faster of its best record and its hand schedule: the best build)
TVM_VARIANTS = {
    "tvm-untuned-unfused": (False, False, "none"),
    "tvm-untuned-fused": (True, False, "none"),
    "tvm-hand-fused": (True, False, "hand"),
    "tvm-tuned-unfused": (False, True, "hand"),
    "tvm-tuned-fused": (True, True, "hand"),
}
VARIANTS = (*TVM_VARIANTS, "pytorch", "onnxruntime")


@dataclass
class BenchConfig:
    target: str = "host"
    #: a records dir (fused; ``<dir>-unfused`` beside it) or a root (``<root>/<target>/<model>[-unfused]``);
    #: None: the shipped tuning_logs/
    tuning_records: Path | None = None
    threads: int | None = None  # None: all cores here; a device's pool as it is
    #: ``--affinity big|little|default`` of TVM's pool, here and on a device (None: as it is)
    affinity: str | None = None
    repeat: int = 30
    warmup: int = 5
    #: N > 1: each variant's runs in N rounds, the variants' order rotating (a slow spell of a
    #: shared machine then hits all alike; between two variants the process waits until the
    #: runtime before has stopped spinning, :func:`wait_until_idle`); 1: each variant's in a row
    rounds: int = 5
    tolerance: float = 1e-4
    input_shape: tuple[int, ...] | None = None
    weights: str | None = None
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    #: RPC: seconds a remote step may go without an answer (``--rpc-timeout``)
    rpc_timeout: float = 120.0
    #: apply records tuned on another CPU of the same ISA (else set aside, with a note)
    force_records: bool = False


@dataclass
class Row:
    variant: str
    where: str  # "this CPU", "emulated aarch64 (…)", "host only", …
    correct: bool | None = None  # None: not run (e.g. no tuning records)
    max_error: float | None = None
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    vs_onnxruntime: float | None = None  # median / ONNX Runtime's median
    speedup_vs_untuned: float | None = None  # tvm-untuned-unfused median / this median
    note: str = ""
    samples_ms: list[float] = field(default_factory=list)


@dataclass
class BenchReport:
    model: str
    target: str
    cpu: str
    threads: int
    repeat: int
    input_shape: list[int]
    rows: list[Row]

    def as_dict(self) -> dict:
        return asdict(self)


def set_threads(threads: int, affinity: str | None = None) -> int:
    """The same thread count for TVM, PyTorch and ONNX Runtime (call before TVM runs); TVM's
    workers pinned as ``affinity`` says (big cores first, little ones, or None/default: left
    as they are). Returns the threads TVM's pool runs."""
    import torch

    torch.set_num_threads(threads)
    return runtime.configure_local_threads(runtime.ThreadConfig(threads, affinity))


def check_row(row: Row, run: Callable[[], np.ndarray], expected: np.ndarray, tolerance: float) -> bool:
    """Check ``run()`` against ``expected``; a wrong variant is marked and will not be timed."""
    row.correct, row.max_error = check(run(), expected, tolerance)
    if not row.correct:
        row.note = f"WRONG: max error {row.max_error:.2e} > {tolerance:g}; not timed"
    return bool(row.correct)


def set_samples(row: Row, samples_ms: list[float]) -> Row:
    row.samples_ms = list(samples_ms)
    row.median_ms = float(np.median(row.samples_ms))
    row.p10_ms = float(np.percentile(row.samples_ms, 10))
    row.p90_ms = float(np.percentile(row.samples_ms, 90))
    return row


def measure(row: Row, run: Callable[[], np.ndarray], time_it: Callable[[], list[float]],
            expected: np.ndarray, tolerance: float) -> Row:
    """Check ``run()`` against ``expected``; time it with ``time_it()`` only if it agrees."""
    if check_row(row, run, expected, tolerance):
        set_samples(row, time_it())
    return row


#: a checked variant waiting to be timed: its row and one timed run (ms)
Pending = tuple[Row, Callable[[], float]]


def wait_until_idle(limit_s: float = 2.0, window_s: float = 0.02, busy: float = 0.1) -> float:
    """Wait until this process's threads stop spinning, at most ``limit_s``; the seconds waited.

    After a run a thread pool's workers spin a while before they sleep, each on a core of its
    own: measured here (Xeon, 2 threads, V1 g3 1x), TVM's worker ~90 ms (300,000 yields,
    ``TVM_THREAD_POOL_SPIN_COUNT``), ONNX Runtime's ~40 ms, PyTorch's (libgomp) ~6 ms. The runtime
    timed next would share its cores with them: ONNX Runtime's median doubled when its runs
    followed TVM's. Idle = the process used less than ``busy`` of one core over a ``window_s``
    window (its CPU time, all its threads: other processes do not count)."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        cpu = time.process_time()
        time.sleep(window_s)
        if time.process_time() - cpu < busy * window_s:
            break
    return time.perf_counter() - start


def time_interleaved(pending: list[Pending], warmup: int, repeat: int, settle_ms: float = 50.0,
                     rounds: int = 1, idle: Callable[[], object] = wait_until_idle) -> None:
    """Time the variants in ``rounds`` rounds of consecutive samples each (the order rotating),
    so that a slow spell of a shared machine hits every variant alike instead of the one it
    falls on, while each runtime runs long enough in a row to be itself.

    Before each variant's runs of a round the process waits until the thread pools of the
    runtime that ran before it have stopped spinning (``idle``: :func:`wait_until_idle`), then
    runs the variant untimed until its samples add up to ``settle_ms`` (one sample at least): its
    caches, its pool's wake-up, and a core that was idle getting back to speed. The runtime
    that ran just before must not be what the samples measure. Measured in one process on the
    Emerald Rapids Xeon (V1 g3 1x, TVM's blocks of 8 runs, 25 interleaved rounds): after a TVM
    block 4.27 ms; after ONNX Runtime, the wait and one settle run 4.49 ms; with 50 ms of settle
    runs instead 4.23 ms; after ONNX Runtime with no wait 4.34 ms.
    """
    for _ in range(warmup):
        for _, sample in pending:
            sample()
    rounds = max(1, min(rounds, repeat))
    samples: list[list[float]] = [[] for _ in pending]
    for round_ in range(rounds):
        take = repeat // rounds + (1 if round_ < repeat % rounds else 0)
        for k in range(len(pending)):
            i = (round_ + k) % len(pending)
            idle()
            settled = pending[i][1]()
            while settled < settle_ms:
                settled += pending[i][1]()
            samples[i].extend(pending[i][1]() for _ in range(take))
    for (row, _), taken in zip(pending, samples):
        set_samples(row, taken)


def _one_run(fn: Callable[[], object]) -> Callable[[], float]:
    def sample() -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return sample


def bench(model: str, config: BenchConfig) -> BenchReport:
    """Measure every variant of ``model``; see the module docstring."""
    if config.repeat < 1 or config.warmup < 0:
        raise UserError("--repeat must be >= 1 (and warm-up >= 0)")
    if config.rounds < 1:
        raise UserError("--rounds must be >= 1")
    preset = targets.resolve(config.target)
    devices.check_device(preset, config.rpc_tracker, config.rpc_key, config.rpc_timeout)
    runtime.ThreadConfig(config.threads, config.affinity)  # --threads >= 1, --affinity known
    threads = config.threads or os.cpu_count() or 1
    set_threads(threads, config.affinity)
    imported = frontend.load(model, config.input_shape, config.weights)
    x = imported.random_input(seed=1)
    expected = imported.reference(x)  # PyTorch (ONNX Runtime for an .onnx model)
    root = config.tuning_records
    rows: list[Row] = []
    pending: list[Pending] = []  # checked, to be timed together

    def add(row: Row, sample: Callable[[], float] | None) -> None:
        rows.append(row)
        if sample is not None:
            pending.append((row, sample))

    # where the TVM variants run: this CPU (all its cores unless --threads) or the device
    device = functools.partial(devices.open_device, config.rpc_tracker, config.rpc_key, config.rpc_timeout,
                               runtime.ThreadConfig(config.threads, config.affinity), here_threads=threads)
    for variant, (fused, tuned, source) in TVM_VARIANTS.items():
        add(*_bench_tvm(variant, imported, preset, fused, tuned, root, x, expected, config, device, source))
    here = "this CPU" if device().is_here else "host only"
    add(*_bench_pytorch(imported, x, expected, config, here))
    add(*_bench_onnxruntime(imported, model, x, expected, config, threads, here))
    log.info("timing %d variants, %d runs each %s", len(pending), config.repeat,
             "in a row" if config.rounds == 1 else f"in {config.rounds} rounds, the order rotating")
    time_interleaved(pending, config.warmup, config.repeat, rounds=config.rounds)
    _ratios(rows)
    return BenchReport(imported.name, preset.name, targets.host_cpu_name(), threads, config.repeat,
                       list(imported.input_shape), rows)


def _records_for(root: Path | None, preset, imported, fused: bool) -> Path:
    """``--tuning-records``: a records dir (the fused one; ``<dir>-unfused`` beside it) or a root
    like ``tuning_logs/`` (``<root>/<target>/<model>[-unfused]``); None: the shipped records."""
    if root is not None and (Path(root) / WORKLOAD_FILE).exists():
        root = Path(root)
        return root if fused else root.with_name(root.name + "-unfused")
    return records_dir_for(preset, records_key(imported.name, fused, imported.input_shape), root)


def no_records_note(records: Path, preset, fused: bool) -> str:
    """A tuned row's note where this target (this CPU, for the host) has no records: where they
    would be, which other CPUs have some (they would be set aside here) and how to tune."""
    others = other_cpus(preset, records.name, records.parent.parent)
    shipped = f"; records of {', '.join(others)} are there, not of this CPU" if others else ""
    return (f"no tuning records in {display(records)}{shipped} (tvmshuffle tune … --target {preset.name}"
            + ("" if fused else " --no-fuse") + ")")


def tuned_note(tuned_kernels: int, records: Path, aside: str | None = None) -> str:
    """A tuned row's note: kernels the records scheduled, or why they were set aside (``aside``:
    another CPU's), and the records by a path relative to the current directory
    (``tuning_logs/…`` for the shipped ones: :func:`tvmshuffle._shipped.display`)."""
    if aside:
        return f"records set aside: {aside} ({display(records)})"
    return f"{tuned_kernels} kernels tuned ({display(records)})"


def _bench_tvm(variant, imported, preset, fused, tuned, root, x, expected, config, device,
               source="hand") -> tuple[Row, Callable[[], float] | None]:
    """The variant's row (with a note when it cannot run) and, if it is right, one timed run to
    interleave with the others'; None when the device is elsewhere: it times its runs itself,
    in its session, and the row is complete. ``device()`` opens the device (one session a variant)."""
    row = Row(variant, "this CPU")
    records = None
    if tuned:
        records = _records_for(root, preset, imported, fused)
        if not records.exists():
            row.note = no_records_note(records, preset, fused)
            return row, None
    log.info("%s: building", variant)
    mod = pipeline.lower(imported.mod, preset, fuse=fused)
    try:
        executable, tuned_kernels, hand_kernels = pipeline.build(mod, preset, records, source, config.force_records)
    except UserError as err:  # records for another target: say so in the row, go on
        row.note = str(err)
        return row, None
    notes = [tuned_note(tuned_kernels, records, set_aside(records, preset, config.force_records))] if tuned else []
    if source != "none":
        notes.append(f"{hand_kernels} with hand schedules")
    row.note = ", ".join(notes)
    with device() as dev:
        vm = dev.vm(dev.load_built(executable, preset, variant), variant)
        if not check_row(row, lambda: dev.run(vm, x), expected, config.tolerance):
            return row, None
        if not dev.is_here:  # the module lives as long as the session: timed now, on the device
            row.where = dev.latency_label + dev.threads_note
            set_samples(row, dev.time(vm, config.repeat, 1))
            vm = None
            return row, None
    return row, lambda: dev.time(vm, 1, 1)[0]


def _bench_pytorch(imported, x, expected, config, here="this CPU") -> tuple[Row, Callable[[], float] | None]:
    row = Row("pytorch", here)
    module = imported.torch_module
    if module is None:
        row.note = "an .onnx model has no PyTorch module"
        return row, None
    import torch

    data = torch.from_numpy(x)

    def run():
        with torch.no_grad():
            return module(data).numpy()

    return row, (_one_run(run) if check_row(row, run, expected, config.tolerance) else None)


def _bench_onnxruntime(imported, model, x, expected, config, threads,
                       here="this CPU") -> tuple[Row, Callable[[], float] | None]:
    import onnxruntime as ort

    row = Row("onnxruntime", here)
    with tempfile.TemporaryDirectory() as tmp:
        if imported.source == "onnx":
            path = model
        else:
            import torch

            path = os.path.join(tmp, "model.onnx")
            torch.onnx.export(imported.torch_module, (torch.from_numpy(x),), path, dynamo=False,
                              opset_version=17, input_names=["input"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run():
        return session.run(None, {name: x})[0]

    row.note = f"CPUExecutionProvider, {threads} threads"
    return row, (_one_run(run) if check_row(row, run, expected, config.tolerance) else None)


def _ratios(rows: list[Row]) -> None:
    by = {r.variant: r for r in rows}
    ort = by["onnxruntime"].median_ms
    base = by["tvm-untuned-unfused"].median_ms
    for r in rows:
        if r.median_ms is None:
            continue
        if ort:
            r.vs_onnxruntime = r.median_ms / ort
        if base and r.variant.startswith("tvm-"):
            r.speedup_vs_untuned = base / r.median_ms


# --------------------------------------------------------------------------- output


def markdown(report: BenchReport) -> str:
    def f(v, fmt="{:.2f}"):
        return fmt.format(v) if v is not None else "–"

    lines = [
        f"**{report.model}** on {report.target} ({report.cpu}), input {'x'.join(map(str, report.input_shape))}, "
        f"{report.threads} threads, median of {report.repeat} runs",
        "",
        "| variant | where | correct | median ms | p10 | p90 | × ONNX Runtime | speed-up vs untuned | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in report.rows:
        correct = {True: "yes", False: "**NO**", None: "–"}[r.correct]
        lines.append(
            f"| {r.variant} | {r.where} | {correct} | {f(r.median_ms)} | {f(r.p10_ms)} | {f(r.p90_ms)} | "
            f"{f(r.vs_onnxruntime)} | {f(r.speedup_vs_untuned, '{:.1f}x')} | {r.note} |"
        )
    return "\n".join(lines)


def plot(report: BenchReport, path: Path) -> Path:
    from .figures import new_figure, save_figure

    rows = [r for r in report.rows if r.median_ms is not None]
    fig, ax = new_figure((8, 0.6 * len(rows) + 1.5))
    names = [r.variant for r in rows]
    medians = [r.median_ms for r in rows]
    errors = [[r.median_ms - r.p10_ms for r in rows], [r.p90_ms - r.median_ms for r in rows]]
    colors = ["#4c72b0" if n.startswith("tvm") else "#999999" for n in names]
    ax.barh(names, medians, xerr=errors, color=colors)
    for i, r in enumerate(rows):
        label = f"{r.median_ms:.2f} ms" + (" (emulated)" if "emulated" in r.where else "")
        ax.text(r.median_ms, i, "  " + label, va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("latency, ms (median; bars p10–p90)")
    ax.set_title(f"{report.model} on {report.target} ({report.cpu}), {report.threads} threads", fontsize=9)
    ax.set_xlim(0, max(medians) * 1.3)
    return save_figure(fig, path)
