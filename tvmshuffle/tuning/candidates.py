"""How tuning builds and measures MetaSchedule's candidates: the builder, the local and RPC
runners, and the bounds on every wait of theirs.

* :func:`make_builder`: parallel local builds, each bounded (``--timeout``), linked by the
  target's linker (the cross compiler for ARM presets), so that a device's RPC server can load
  the ``.so`` without a compiler of its own.
* :func:`make_runner`: a local runner, or an RPC runner that measures as many candidates at once
  as there are devices under the key (re-read before each batch), each session bounded, and
  that fails the rest of a batch at once when its device is gone (:func:`_fail_fast`).
* :func:`candidate_time`: the median of a candidate's samples is the time it is ranked by.

The builder does not use MetaSchedule's ``default_build``: that imports
``tvm.s_tir.tensor_intrin`` (~30 s here, mostly CUDA) in every fresh builder process, so builds
timed out in a cascade. :func:`_build` does the same without that import (fp32 CPU schedules
tensorize nothing), and the main process registers only the CPU tensor intrinsics
(:func:`register_cpu_tensor_intrins`).

Nor is it MetaSchedule's ``LocalBuilder``, which starts new worker processes for every call of
``build``: one per batch, and one per hand schedule seeded or re-measured (a call each). A
fresh worker imports tvm, and tvm imports torch: 4.6-5 s of CPU on a Xeon before it builds
anything, paid twice per seeded task (seeding, then re-measuring) and once per batch. :func:`make_builder`'s
workers live across calls and are replaced after :data:`BUILDS_PER_WORKER` builds (the reason
LocalBuilder restarts them: their memory grows with use) or when a build times out.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import tempfile
import threading
from typing import TYPE_CHECKING

from ..errors import UserError
from ..remote import device_count, key_counts, parse_tracker
from ..runtime import ThreadConfig, apart_from_pool_workers, configure_local_threads, configure_threads

if TYPE_CHECKING:
    from . import TuneConfig

log = logging.getLogger(__name__)


def register_cpu_tensor_intrins() -> None:
    """Register the CPU tensor intrinsics without importing the GPU ones.

    ``TuneContext()`` does ``import tvm.s_tir.tensor_intrin``, whose ``__init__`` imports the
    CUDA, ROCm and Hexagon intrinsics too: 30-50 s on this machine, of which the CPU ones
    (x86, arm_cpu, riscv_cpu — what the ``llvm`` schedule rules may name) take ~4 s. This
    puts the package into ``sys.modules`` without running its ``__init__`` and imports only the
    CPU submodules; a later explicit ``import tvm.s_tir.tensor_intrin.cuda`` still works.
    """
    import importlib
    import sys
    import types

    import tvm.s_tir

    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        pkg = types.ModuleType(name, "Tensor intrinsics (CPU ones only, see tvmshuffle.tuning)")
        pkg.__path__ = [os.path.join(os.path.dirname(tvm.s_tir.__file__), "tensor_intrin")]
        pkg.__package__ = name
        sys.modules[name] = pkg
        tvm.s_tir.tensor_intrin = pkg
    for sub in ("x86", "arm_cpu", "riscv_cpu"):
        importlib.import_module(f"{name}.{sub}")


# builder / runner functions: module level, pickled by reference into popen workers
def _build(mod, target, _params):
    """MetaSchedule's ``default_build`` without ``import tvm.s_tir.tensor_intrin``."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def _export(rt_mod, cross_compiler: str | None = None) -> str:
    """A ``.so`` in a fresh temp dir (MetaSchedule's RemoveBuildArtifact deletes the dir)."""
    path = os.path.join(tempfile.mkdtemp(prefix="tvmshuffle-ms-"), "tvm_tmp_mod.so")
    if cross_compiler is None:
        rt_mod.export_library(path)
    else:
        from tvm.support import cc as tvm_cc

        rt_mod.export_library(path, fcompile=tvm_cc.cross_compiler(cross_compiler))
    return path


#: error texts that mean the device is gone or unusable (the rest of a batch is skipped)
_DEVICE_GONE = ("no free device with key", "is gone from RPC tracker", "Timeout, killed after")


def _request_session(rpc_config, device_wait_sec: float, threads: ThreadConfig | None = None):
    """RPCConfig.connect_server, but a device that left the tracker is an error at once and
    the wait for a busy one is bounded (upstream waits forever); with ``threads``, the
    session's thread pool on the device is configured before anything is measured in it
    (MetaSchedule's RPC runner calls this first in each candidate's session)."""
    key = rpc_config.tracker_key
    where = f"{rpc_config.tracker_host}:{rpc_config.tracker_port}"
    tracker = rpc_config.connect_tracker()  # bounded by session_timeout_sec
    total, _ = key_counts(tracker.summary(), key)
    if total == 0:
        tracker.close()
        raise RuntimeError(f"the device with key {key!r} is gone from RPC tracker {where}")
    box: dict = {}

    def request():
        try:
            box["session"] = tracker.request(
                key=key,
                priority=rpc_config.session_priority,
                session_timeout=rpc_config.session_timeout_sec,
            )
        except Exception as err:  # noqa: BLE001 - reported below
            box["error"] = err

    thread = threading.Thread(target=request, daemon=True)
    thread.start()
    thread.join(device_wait_sec)
    if thread.is_alive():
        tracker.close()
        raise TimeoutError(
            f"no free device with key {key!r} on RPC tracker {where} within {device_wait_sec:g} s"
        )
    if "error" in box:
        raise box["error"]
    session = box["session"]
    if threads is not None and threads.requested:
        configure_threads(session.get_function, threads, where=f"device {key!r}", quiet=True)
    return session


def candidate_time(samples: list[float]) -> list[float]:
    """A candidate's time, as MetaSchedule records it: the median of its samples, as the only one.

    MetaSchedule ranks candidates (and trains its cost model) by the mean of their ``run_secs``.
    On a 2-core machine a sample during which anything else ran (the tuner itself, the OS) takes
    2-14x as long — kernels of 85 us measured 1145 us in 1 of 10 cold samples with the machine
    otherwise idle — so the mean ranked candidates by their luck. The median of 10 does not move.
    """
    return [float(statistics.median(samples))] if samples else samples


def _run_evaluator(rt_mod, device, evaluator_config, repeated_args, threads: ThreadConfig | None = None):
    """LocalRunner's evaluator: this (the runner worker's) thread pool configured as the model
    will run (``threads``), MetaSchedule's timing with the calling thread off the pool workers'
    cores (:func:`~tvmshuffle.runtime.apart_from_pool_workers`), then :func:`candidate_time`."""
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    if threads is not None:
        configure_local_threads(threads, quiet=True)
    with apart_from_pool_workers():
        return candidate_time(run_evaluator_common(rt_mod, device, evaluator_config, repeated_args))


def _rpc_run_evaluator(_session, rt_mod, device, evaluator_config, repeated_args):
    """RPCRunner's evaluator: MetaSchedule's timing on the device, then :func:`candidate_time`
    (the session's thread pool was configured when it was opened: :func:`_request_session`)."""
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    return candidate_time(run_evaluator_common(rt_mod, device, evaluator_config, repeated_args))


def _runner_pool(workers: int, config: TuneConfig):
    """The RPC runner's process pool: ``workers`` candidates measured at once (one session each,
    the tracker handing each to a free device of the key); each bounded (RPCRunner's own pool
    has no timeout: a device that hangs or drops would block it forever)."""
    from tvm.support.popen_pool import PopenPoolExecutor

    return PopenPoolExecutor(max_workers=workers, timeout=config.runner_timeout_sec + config.device_wait_sec)


def _resize_runner(rpc_runner, config: TuneConfig) -> None:
    """Between batches: one runner worker per device registered under the key now (devices
    come and go). The old pool is retired, not shut down: candidates of a batch still being
    measured finish in it (:func:`shutdown_runner` ends it)."""
    inst = rpc_runner._inst  # noqa: SLF001 - the Python RPCRunner
    try:
        devices = device_count(config.rpc_tracker, config.rpc_key)
    except UserError as err:  # the tracker did not answer this time: keep the pool as it is
        log.debug("devices not re-read: %s", err)
        return
    if devices < 1 or devices == inst.workers:
        return  # none registered: the sessions say so (the device is gone)
    log.info("%d device(s) with key %r now: measuring %d candidates at once (was %d)", devices,
             config.rpc_key, devices, inst.workers)
    inst.retired_pools.append(inst.pool)
    inst.pool = _runner_pool(devices, config)
    inst.workers = devices


def shutdown_runner(rpc_runner) -> None:
    inst = rpc_runner._inst  # noqa: SLF001
    for pool in [*inst.retired_pools, inst.pool]:
        pool.shutdown(wait=False)
    inst.retired_pools.clear()


def _fail_fast(rpc_runner, config: TuneConfig | None = None):
    """Wrap an RPCRunner: once a candidate finds the device gone (left the tracker, busy past
    the wait, or hung past the timeout), the rest of its batch is skipped instead of each
    waiting out the same timeouts; the batch then counts as failed. With ``config``, the
    runner's workers follow the devices registered under the key, re-read before each batch
    (:func:`_resize_runner`)."""
    from types import SimpleNamespace

    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class FailFastFuture(ms.runner.PyRunnerFuture):
        def __init__(self, inner, state) -> None:
            super().__init__()
            self.inner = inner
            self.state = state

        def done(self) -> bool:
            return self.state.dead is not None or self.inner.done()

        def result(self):
            if self.state.dead is not None and self.inner.future.cancel():
                return ms.runner.RunnerResult(None, f"skipped, device unusable: {self.state.dead}")
            res = self.inner.result()
            if res.error_msg is not None and any(m in str(res.error_msg) for m in _DEVICE_GONE):
                self.state.dead = worker_message(res.error_msg)
            return res

    @derived_object
    class FailFastRPCRunner(ms.runner.PyRunner):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def run(self, runner_inputs):
            if config is not None:
                _resize_runner(self.inner, config)
            state = SimpleNamespace(dead=None)
            # ``_inst``: the Python RPCRunner (its FFI ``run`` would return plain RunnerFutures)
            return [FailFastFuture(f, state) for f in self.inner._inst.run(runner_inputs)]

    return FailFastRPCRunner(rpc_runner)


def worker_message(msg: str) -> str:
    """One line from a builder/runner error: its headline and the exception line."""
    lines = [ln.strip() for ln in str(msg).strip().splitlines() if ln.strip()]
    if not lines:
        return "(no message)"
    head = lines[0]
    tail = next((ln for ln in reversed(lines)
                 if not ln.startswith(("File ", "^", "~", "Traceback"))), lines[-1])
    return head if tail == head else f"{head} {tail}"


#: builds a builder worker does before it is replaced by a fresh one (see the module docstring)
BUILDS_PER_WORKER = 64


def make_builder(config: TuneConfig, cross_compiler: str | None = None):
    """A MetaSchedule builder for ``config``: parallel local builds, each bounded by
    ``builder_timeout_sec`` (``--timeout``), linked by ``cross_compiler`` (None: the host's), in
    worker processes that live until :func:`shutdown_builder` (LocalBuilder's ``build``
    otherwise, with its results and messages)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import local_builder
    from tvm.s_tir.meta_schedule.utils import cpu_count
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    f_export = functools.partial(_export, cross_compiler=cross_compiler)
    timeout = config.builder_timeout_sec

    @derived_object
    class PooledBuilder(ms.builder.PyBuilder):
        def __init__(self) -> None:
            super().__init__()
            self.timeout_sec = timeout
            self.pool = PopenPoolExecutor(max_workers=config.builder_workers or cpu_count(logical=True),
                                          timeout=timeout, maximum_process_uses=BUILDS_PER_WORKER)

        def build(self, build_inputs):
            results = []
            jobs = [(_build, f_export, b.mod, b.target, local_builder._serialize_params(b.params))  # noqa: SLF001
                    for b in build_inputs]
            for done in self.pool.map_with_error_catching(lambda job: local_builder._worker_func(*job), jobs):  # noqa: SLF001
                if done.status == StatusKind.COMPLETE:
                    results.append(ms.builder.BuilderResult(done.value, None))
                elif done.status == StatusKind.TIMEOUT:
                    results.append(ms.builder.BuilderResult(
                        None, f"LocalBuilder: Timeout, killed after {timeout} seconds"))
                else:
                    results.append(ms.builder.BuilderResult(
                        None, "LocalBuilder: An exception occurred\n" + str(done.value)))
            return results

    return PooledBuilder()


def shutdown_builder(builder) -> None:
    """End :func:`make_builder`'s worker processes."""
    builder._inst.pool.shutdown(wait=False)  # noqa: SLF001


def make_runner(config: TuneConfig, workers: int = 1, follow_devices: bool = False):
    """MetaSchedule's runner for ``config``: local, or over RPC. Measures as ``config`` says
    (``EvaluatorConfig(number, repeat, min_repeat_ms, enable_cpu_cache_flush)``: ``--cache``), each
    candidate bounded by ``runner_timeout_sec`` (``--timeout``; over RPC plus the wait for a
    free device).

    Over RPC, ``workers`` candidates are measured at once, each in its own session (the
    tracker hands each session to a free device of the key: one worker per device); with
    ``follow_devices`` the number is re-read from the tracker before each batch.

    Returns (the runner, what to hand MetaSchedule: the same, or the RPC one made to fail fast).
    """
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(
        number=config.number,
        repeat=config.repeat,
        min_repeat_ms=config.min_repeat_ms,
        enable_cpu_cache_flush=config.cache == "cold",
    )
    threads = config.thread_config
    if config.rpc_tracker is None:
        runner = ms.runner.LocalRunner(
            timeout_sec=config.runner_timeout_sec, evaluator_config=evaluator,
            f_run_evaluator=functools.partial(_run_evaluator, threads=threads if threads.requested else None))
        return runner, runner
    host, port = parse_tracker(config.rpc_tracker)
    rpc_config = ms.runner.RPCConfig(
        tracker_host=host,
        tracker_port=port,
        tracker_key=config.rpc_key,
        session_timeout_sec=config.session_timeout_sec,
    )
    workers = max(1, int(workers))
    runner = ms.runner.RPCRunner(
        rpc_config,
        evaluator,
        f_create_session=functools.partial(_request_session, device_wait_sec=config.device_wait_sec,
                                           threads=threads if threads.requested else None),
        f_run_evaluator=_rpc_run_evaluator,
        max_workers=workers,
    )
    runner.pool.shutdown()  # its pool has no timeout
    runner.pool = _runner_pool(workers, config)
    runner.workers = workers
    runner.retired_pools = []
    return runner, _fail_fast(runner, config if follow_devices else None)
