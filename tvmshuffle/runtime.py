"""Run and time a compiled model library (``.so``) on this machine; TVM's thread pool, here
or on a device (:func:`configure_threads`)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError, last_line

log = logging.getLogger(__name__)

#: ``--affinity`` → the mode of TVM's ``runtime.config_threadpool``: 1 pins the workers to the
#: big cores first (the fastest by ``cpuinfo_max_freq``), -1 to the little ones first, 0 leaves
#: the pinning as it is (TVM's own start-up default is big-first)
AFFINITY_MODES = {"big": 1, "little": -1, "default": 0}


@dataclass(frozen=True)
class ThreadConfig:
    """``--threads N`` and ``--affinity big|little|default`` of TVM's thread pool, where the model
    runs (a device's pool through its RPC session). Neither given: the pool is left as it is."""

    #: worker threads (None: the mode's own count: big → the big cores, default → every core)
    threads: int | None = None
    #: "big", "little" or "default" (None: "default" when ``threads`` is given)
    affinity: str | None = None

    def __post_init__(self) -> None:
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise UserError(f"--threads must be an integer >= 1, got {self.threads!r}")
        if self.affinity is not None and self.affinity not in AFFINITY_MODES:
            raise UserError(f"--affinity must be one of {', '.join(AFFINITY_MODES)}, got {self.affinity!r}")

    @property
    def requested(self) -> bool:
        return self.threads is not None or self.affinity is not None

    @property
    def mode(self) -> int:
        return AFFINITY_MODES[self.affinity or "default"]

    def describe(self) -> str:
        parts = [f"--threads {self.threads}" if self.threads is not None else "",
                 f"--affinity {self.affinity}" if self.affinity is not None else ""]
        return " ".join(p for p in parts if p)


def configure_threads(get_global: Callable[[str], Callable], config: ThreadConfig,
                      where: str = "this machine", quiet: bool = False) -> int | None:
    """Configure TVM's thread pool as ``config`` says and return the number of threads it now
    runs parallel loops with (None: nothing asked, the pool is left as it is).

    ``get_global`` looks up a global function of the runtime to configure: ``tvm.get_global_func``
    for this process, an RPC session's ``get_function`` for a device (the pool of the session's
    process on the device, which every later call of the session runs in). A pool can use at
    most the workers it was started with (the device's cores, or its ``TVM_NUM_THREADS``): a
    smaller count than asked is logged (``quiet``: at debug level, as every tuning candidate's
    session does after :func:`tvmshuffle.tuning.tune` said it once).
    """
    if not config.requested:
        return None
    get_global("runtime.config_threadpool")(config.mode, config.threads or 0)
    used = int(get_global("runtime.NumThreads")())
    if used < 1:  # --affinity little (no count) where every core runs at one frequency
        get_global("runtime.config_threadpool")(AFFINITY_MODES["default"], 0)  # a usable pool again
        raise UserError(f"{where}: --affinity {config.affinity} gives TVM's thread pool no threads: TVM finds "
                        f"no {config.affinity} cores there (every core has the same maximum frequency); "
                        "use --affinity big or default, or give --threads N")
    if config.threads is not None and used != config.threads:
        (log.debug if quiet else log.warning)("%s: TVM's thread pool runs %d threads, not the %d asked for (it has no more "
                    "workers: the cores there, or TVM_NUM_THREADS)", where, used, config.threads)
    else:
        (log.debug if quiet else log.info)("%s: TVM's thread pool runs %d threads (%s)", where, used,
                                           config.describe())
    return used


_applied_here: ThreadConfig | None = None  # the last configuration of this process's pool


def configure_local_threads(config: ThreadConfig, quiet: bool = False) -> int | None:
    """:func:`configure_threads` for this process (``TVM_NUM_THREADS`` set first, so a pool not
    started yet gets the workers asked for). The configuration applied last time again (a
    device opened per variant or per layer) is logged at debug level only."""
    global _applied_here
    if not config.requested:
        return None
    import tvm

    if config.threads is not None:
        os.environ["TVM_NUM_THREADS"] = str(config.threads)
    used = configure_threads(tvm.get_global_func, config, quiet=quiet or config == _applied_here)
    _applied_here = config
    return used


def pool_worker_cores() -> set[int]:
    """The cores that other threads of this process are pinned to, one core each: TVM's pool
    workers (Linux; empty if none is pinned). Workers of an earlier, larger pool stay alive and
    pinned, idle, after the pool is configured smaller."""
    me = threading.get_native_id()
    taken: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        if int(tid) == me:
            continue
        with contextlib.suppress(OSError):  # the thread may have ended meanwhile
            cores = os.sched_getaffinity(int(tid))
            if len(cores) == 1:
                taken |= cores
    return taken


@contextlib.contextmanager
def apart_from_pool_workers() -> Iterator[None]:
    """Keep the calling thread off the cores TVM's pool workers are pinned to, for the body.

    TVM pins each pool worker to a core and lets the calling thread, which runs the first share
    of every parallel loop, go anywhere: when the OS keeps it on a worker's core the two take
    turns on it and the loop takes ~1.8x as long. Seen in tuning on a 2-core Xeon: one kernel
    measured 47-61 us or 87-90 us from one candidate to the next, all of 10 samples alike, and
    an unlucky hand schedule lost to a slower candidate; with the caller kept apart, 50-60 us
    every time. The affinity is restored after the body (threads started from the caller
    inherit it: ONNX Runtime's or PyTorch's pools must not). With a pool of one thread (the
    caller alone runs every loop), without pinned workers, or with no core left for the caller,
    nothing changes."""
    import tvm

    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    if tvm.get_global_func("runtime.NumThreads")() < 2:  # (also starts the pool, pinning its workers)
        yield
        return
    before = os.sched_getaffinity(0)
    free = before - pool_worker_cores()
    if not free or free == before:
        yield
        return
    os.sched_setaffinity(0, free)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@dataclass
class RunResult:
    output: np.ndarray
    #: per-repeat mean latency in ms (``number`` runs averaged in each); empty when not timed
    times_ms: list[float]
    #: threads of TVM's pool where it ran, when ``--threads``/``--affinity`` configured it
    threads: int | None = None

    @property
    def median_ms(self) -> float:
        return float(np.median(self.times_ms)) if self.times_ms else float("nan")


def load_module(path: str | Path):
    """A shared library loaded in this process. Errors name the file."""
    import tvm

    path = str(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    try:
        return tvm.runtime.load_module(path)
    except Exception as err:  # noqa: BLE001 - dlopen / TVM loader errors
        raise UserError(f"{path}: cannot load as a TVM library for this machine ({last_line(err)})") from err


def open_vm(module, name: str):
    """A Relax VM on this CPU over a loaded module (or a VM executable) called ``name``."""
    import tvm
    from tvm import relax

    try:
        return relax.VirtualMachine(module, tvm.cpu())
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{name}: not a tvmshuffle model library (no Relax VM inside)") from err


def load_library(path: str | Path):
    """A host ``.so`` → Relax VM on the CPU. Errors name the file."""
    return open_vm(load_module(path), str(path))


def load_input(path: str | Path) -> np.ndarray:
    path = str(path)
    if not os.path.exists(path):
        raise UserError(f"--input {path}: no such file")
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"--input {path}: not a .npy array ({err})") from err
    return np.ascontiguousarray(x, dtype="float32")


#: ``tvmshuffle run --fill-mode``: a generated input instead of ``--input``
FILL_MODES = ("zeros", "ones", "random")
#: ``--fill-mode random`` draws a standard normal with this seed (the same input every run)
FILL_SEED = 0


def fill_input(mode: str, shape, seed: int = FILL_SEED) -> np.ndarray:
    """A float32 input of ``shape``: all zeros, all ones, or standard normal (seeded)."""
    shape = tuple(int(d) for d in shape)
    if mode == "zeros":
        return np.zeros(shape, "float32")
    if mode == "ones":
        return np.ones(shape, "float32")
    if mode == "random":
        return np.random.default_rng(seed).standard_normal(shape).astype("float32")
    raise UserError(f"--fill-mode {mode}: not one of {', '.join(FILL_MODES)}")


def top_classes(output: np.ndarray, n: int) -> list[tuple[int, int, float]]:
    """``(rank, class, score)`` of the ``n`` highest scores of the first image of ``output``
    (rank 1 is the highest; fewer when there are fewer classes; ties: the lower class first)."""
    if n < 1:
        raise UserError(f"--print-top must be >= 1, got {n}")
    scores = output.reshape(output.shape[0], -1)[0] if output.ndim > 1 else output.reshape(-1)
    order = np.argsort(-scores, kind="stable")[:n]
    return [(rank, int(c), float(scores[c])) for rank, c in enumerate(order, start=1)]


def run(vm, x: np.ndarray, repeat: int = 0, number: int = 1) -> RunResult:
    """Run ``main(x)``; with ``repeat`` > 0 also time it (``repeat`` samples of ``number`` runs)."""
    import tvm

    dev = tvm.cpu()
    data = tvm.runtime.tensor(x, dev)
    try:
        out = vm["main"](data)
    except Exception as err:  # noqa: BLE001 - shape mismatch is checked inside the VM
        msg = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        raise UserError(f"--input: the library rejects an input of shape {x.shape}: {msg[-1] if msg else err}") from err
    output = _to_numpy(out)
    times = time_main(vm, data, repeat, number) if repeat > 0 else []
    return RunResult(output, times)


def time_main(vm, x, repeat: int, number: int = 1) -> list[float]:
    """Per-repeat mean latency (ms) of ``main(x)`` (``x``: an array or a tensor on the CPU),
    by the VM's time evaluator."""
    import tvm

    dev = tvm.cpu()
    data = x if hasattr(x, "numpy") else tvm.runtime.tensor(np.ascontiguousarray(x, dtype="float32"), dev)
    timer = vm.time_evaluator("main", dev, number=number, repeat=repeat)
    return [t * 1e3 for t in timer(data).results]


def _to_numpy(out) -> np.ndarray:
    if hasattr(out, "numpy"):
        return out.numpy()
    return _to_numpy(out[0])  # a one-element tuple


def check(output: np.ndarray, expected: np.ndarray, tolerance: float) -> tuple[bool, float]:
    """(agrees with the reference, max error relative to the output scale ``max(1, max|expected|)``)."""
    if output.shape != expected.shape or not np.all(np.isfinite(output)):
        return False, float("inf")
    error = float(np.abs(output - expected).max() / max(1.0, float(np.abs(expected).max())))
    return error <= tolerance, error
