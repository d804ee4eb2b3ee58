"""Shared fixtures. Add yours below; keep each one's processes in its own process group."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

#: The smallest zoo model and input that exercise every path (where the shape does not matter).
SMALL = "shufflenet_v1_g3_x0_25"
SMALL_SHAPE = (1, 3, 64, 64)


def _zoo_params():
    """Every zoo model as a parameter; the tests of one model share an xdist worker (and so
    :func:`zoo_import`'s cache), whichever test file they are in."""
    from tvmshuffle.models import zoo

    return [pytest.param(name, marks=pytest.mark.xdist_group(f"zoo-{name}")) for name in sorted(zoo.MODELS)]


ZOO_MODELS = _zoo_params()


@functools.lru_cache(maxsize=4)
def zoo_import(name: str, shape: tuple[int, ...] = SMALL_SHAPE):
    """``frontend.load(name, shape)``, imported once per worker for all tests that only read it."""
    from tvmshuffle import frontend

    return frontend.load(name, shape)


def kernel_layers(mod, kind: str | None = None) -> list:
    """``tir_analysis.describe`` of every PrimFunc of the lowered ``mod`` (None for one it does
    not read); with ``kind``, only the layers of that kind."""
    import tvm

    from tvmshuffle.tir_analysis import describe

    layers = [describe(f) for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return layers if kind is None else [layer for layer in layers if getattr(layer, "kind", None) == kind]


def chain_module(input_type, chain):
    """A module whose ``main(x)`` is one chain of ops: ``chain(bb, x)`` emits it into ``bb``'s
    dataflow block and returns its last expression (to emit as the output)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", input_type)
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(chain(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def composite_module(fused_name: str, composite: str, input_type, weights: list, chain):
    """The module ``FuseOpsByPattern`` makes of one matched chain: a private primitive function
    ``fused_name`` (attr ``Composite``: ``composite``) taking the input and the weights as
    ``param_N``, and ``main`` calling it with the constants ``weights``. ``chain(bb, x, params)``
    emits the chain into ``bb``'s dataflow block and returns its last expression (to emit)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", input_type)
    params = [relax.Var(f"param_{i}", w.ty) for i, w in enumerate(weights)]
    with bb.function(fused_name, [x, *params], attrs={"Composite": composite, "Primitive": True}, private=True):
        with bb.dataflow():
            out = bb.emit_output(chain(bb, x, params))
        bb.emit_func_output(out)
    fused = bb.get().get_global_var(fused_name)
    x_main = relax.Var("x", input_type)
    with bb.function("main", [x_main]):
        with bb.dataflow():
            out = bb.emit_output(relax.Call(fused, [x_main, *weights]))
        bb.emit_func_output(out)
    return bb.get()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait up to ``timeout`` s for ``proc`` to exit, without reaping it (so that
    :func:`kill_group` can still clean up its group safely). True if it has exited."""
    deadline = time.monotonic() + timeout
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group ``proc`` leads (started with start_new_session=True), then
    SIGKILL whatever is left once the leader has exited or after ``grace`` seconds.

    The leader is reaped only at the end: while it is a zombie its pid, the group's number, is
    not given to another process. Once ``proc`` has been waited for, that number may belong to
    a stranger (e.g. a tracker another test just started in its own session), so then nothing is
    signalled."""
    if proc.returncode is not None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        proc.wait()
        return
    if pgid != proc.pid:  # not its own group leader: never signal someone else's group
        proc.kill()
        proc.wait()
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
        wait_exit(proc, grace)
        os.killpg(pgid, signal.SIGKILL)  # the leader if it lingers, and stragglers (forked handlers)
    except ProcessLookupError:
        pass
    proc.wait()


@dataclass
class RPCEnv:
    """A running RPC tracker with host (not emulated) RPC servers registered under ``key``
    (one, unless ``rpc_tracker_and_server(servers=N)``)."""

    tracker: str  # "127.0.0.1:PORT"
    key: str
    host: str
    port: int
    log_dir: Path
    server_pid: int  # leader of the (first) server's process group
    server_logs: tuple[Path, ...] = ()  # one per server: server.log, server-2.log, …

    def stop_server(self) -> None:
        """SIGSTOP the server and its workers: a device that stops answering."""
        os.killpg(self.server_pid, signal.SIGSTOP)


def _wait_for_key(host: str, port: int, key: str, procs, timeout: float, free: int = 1) -> None:
    from tvm import rpc

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for name, proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"RPC {name} exited with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                pass
            tracker = rpc.connect_tracker(host, port)
            try:
                last = tracker.summary()
            finally:
                tracker.close()
            if last.get("queue_info", {}).get(key, {}).get("free", 0) >= free:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"RPC server with key {key!r} did not register within {timeout} s: {last}")


@contextmanager
def rpc_tracker_and_server(log_dir: Path, key: str, servers: int = 1, server_env: dict | None = None):
    """``python -m tvm.exec.rpc_tracker`` + ``servers`` × ``python -m tvm.exec.rpc_server``
    under ``key`` (``server_env``: more environment for the servers), on 127.0.0.1 (free ports,
    each in its own process group, killed as a group at the end)."""
    host = "127.0.0.1"
    tracker_port = free_port()
    procs: list[tuple[str, subprocess.Popen]] = []
    logs = [log_dir / ("server.log" if i == 1 else f"server-{i}.log") for i in range(1, servers + 1)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        with open(log_dir / "tracker.log", "wb") as out:
            procs.append(("tracker", subprocess.Popen(
                [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host,
                 "--port", str(tracker_port), "--port-end", str(tracker_port + 1)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=env,
            )))
        for log in logs:
            server_port = free_port()
            with open(log, "wb") as out:
                procs.append(("server", subprocess.Popen(
                    [sys.executable, "-m", "tvm.exec.rpc_server", "--host", host,
                     "--port", str(server_port), "--port-end", str(server_port + 1),
                     "--tracker", f"{host}:{tracker_port}", "--key", key],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, env={**env, **(server_env or {})},
                )))
        _wait_for_key(host, tracker_port, key, procs, timeout=60.0, free=servers)
        yield RPCEnv(f"{host}:{tracker_port}", key, host, tracker_port, log_dir, procs[1][1].pid, tuple(logs))
    finally:
        for _, proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGCONT)  # a test may have stopped it
            except ProcessLookupError:
                pass
            kill_group(proc)


@pytest.fixture(scope="session")
def rpc_env(tmp_path_factory):
    """A tracker and a host RPC server shared by the session's tests (never stop it)."""
    with rpc_tracker_and_server(tmp_path_factory.mktemp("rpc"), "tvmshuffle-test-host") as env:
        yield env


@pytest.fixture
def own_rpc_env(tmp_path_factory):
    """A tracker and a host RPC server of the test's own (it may SIGSTOP the server)."""
    with rpc_tracker_and_server(tmp_path_factory.mktemp("rpc"), "tvmshuffle-test-own") as env:
        yield env


@pytest.fixture(scope="session")
def small_host_library(tmp_path_factory):
    """V1 g3 0.25x at 64x64 compiled for this CPU (with its model.so.json), once per session."""
    from tvmshuffle import pipeline

    out = tmp_path_factory.mktemp("small") / "small-host.so"
    pipeline.compile_model(SMALL, out, pipeline.CompileConfig(input_shape=SMALL_SHAPE))
    return out
