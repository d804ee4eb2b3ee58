"""Run and time a compiled model library on a remote device through a TVM RPC tracker.

The device is anything registered with the tracker under a key: a phone running TVM's RPC
app, a board running ``python -m tvm.exec.rpc_server``, or the emulated aarch64 device of
:mod:`tvmshuffle.device` (key ``emu-aarch64``). The flow::

    tracker = connect_tracker(host, port)          # after a bounded socket probe
    remote  = tracker.request(key, session_timeout=...)
    remote.upload(lib.so); vm = VirtualMachine(remote.load_module("lib.so"), remote.cpu())
    vm.set_input("main", x); vm.invoke_stateful("main"); y = vm.get_outputs("main")
    vm.time_evaluator("invoke_stateful", remote.cpu(), ...)("main")   # timed on the device

Timings from an emulated device (qemu on this machine) are labelled emulated: they say
nothing about the speed of a real ARM core and must never be reported as ARM latency.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .runtime import RunResult

log = logging.getLogger(__name__)

DEFAULT_TRACKER = "127.0.0.1:9190"
DEFAULT_KEY = "emu-aarch64"
#: Device keys starting with this are emulated devices (see :mod:`tvmshuffle.device`).
EMULATED_KEY_PREFIX = "emu-"


@dataclass
class RemoteRunResult(RunResult):
    """A :class:`~tvmshuffle.runtime.RunResult` plus where it ran."""

    key: str = DEFAULT_KEY
    tracker: str = DEFAULT_TRACKER
    #: True when the device is emulated: ``times_ms`` are then qemu times, not ARM latency.
    emulated: bool = False

    @property
    def latency_label(self) -> str:
        """How to name ``times_ms`` in a report."""
        if self.emulated:
            return f"emulated latency on {self.key} (qemu on this host, NOT an ARM latency)"
        return f"latency on {self.key}"


def is_emulated_key(key: str) -> bool:
    return key.startswith(EMULATED_KEY_PREFIX)


# --------------------------------------------------------------------------- tracker


def parse_tracker(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` → ``(host, port)``; errors name ``--rpc-tracker``."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--rpc-tracker: expected HOST:PORT (e.g. {DEFAULT_TRACKER}), got {text!r}")
    return host, int(port)


def probe_tracker(host: str, port: int, timeout: float = 5.0) -> None:
    """Fail fast (a :class:`UserError` within ``timeout`` s) unless a TVM tracker answers there.

    TVM's own client retries a refused connection for 60 s; this probe runs first so a wrong
    address or a tracker that is not up says so at once.
    """
    from tvm.rpc import base

    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            reply = sock.recv(4)
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise UserError(f"cannot reach RPC tracker {host}:{port} within {timeout:g} s ({reason}); "
                        "is a tracker running there?") from None
    if not reply:
        raise UserError(f"{host}:{port} closed the connection without answering: not a TVM RPC tracker")
    if len(reply) != 4 or struct.unpack("<i", reply)[0] != base.RPC_TRACKER_MAGIC:
        raise UserError(f"{host}:{port} answers but is not a TVM RPC tracker")


def connect_tracker(host: str, port: int, timeout: float = 5.0):
    """A tracker session whose socket gives up after ``timeout`` s (probed first)."""
    from tvm import rpc

    probe_tracker(host, port, timeout)
    session = rpc.connect_tracker(host, port)
    session._sock.settimeout(timeout)  # noqa: SLF001 - TVM has no public knob for this
    return session


def tracker_summary(host: str, port: int, timeout: float = 5.0) -> dict:
    """The tracker's summary: ``{"queue_info": {key: {free, pending}}, "server_info": [...]}``."""
    session = connect_tracker(host, port, timeout)
    try:
        return session.summary()
    except OSError as err:
        raise UserError(f"RPC tracker {host}:{port}: no summary ({err})") from None
    finally:
        session.close()


def registered_keys(summary: dict) -> list[str]:
    """Keys with at least one server connected to the tracker (busy or free)."""
    keys = {info["key"].split(":", 1)[1] for info in summary.get("server_info", [])
            if info.get("key", "").startswith("server:")}
    return sorted(keys)


def request_session(host: str, port: int, key: str, session_timeout: float = 600.0,
                    wait_timeout: float = 300.0, connect_timeout: float = 5.0):
    """An RPC session on a device ``key``; waits at most ``wait_timeout`` s for a free one."""
    keys = registered_keys(tracker_summary(host, port, connect_timeout))
    if key not in keys:
        have = ", ".join(keys) or "none"
        raise UserError(f"RPC tracker {host}:{port} has no device with key {key!r} (registered: {have})")
    session = connect_tracker(host, port, connect_timeout)
    session._sock.settimeout(wait_timeout)  # noqa: SLF001 - bounds the wait for a free device
    try:
        return session.request(key, session_timeout=session_timeout, max_retry=1)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UserError(f"device {key!r} via {host}:{port}: no session within {wait_timeout:.0f} s ({reason})") from None
    finally:
        session.close()


# --------------------------------------------------------------------------- run


def run_remote(lib_path: str | Path, x: np.ndarray, tracker: str = DEFAULT_TRACKER, key: str = DEFAULT_KEY,
               repeat: int = 0, number: int = 1, timeout: float = 600.0, connect_timeout: float = 5.0,
               emulated: bool | None = None) -> RemoteRunResult:
    """Upload ``lib_path``, run ``main(x)`` on device ``key``; with ``repeat`` > 0 time it there.

    ``timeout`` bounds the whole session (the server ends it after that many seconds);
    ``connect_timeout`` bounds reaching the tracker. ``emulated`` defaults to
    :func:`is_emulated_key`. Times are per-repeat means in ms, measured on the device.
    """
    lib_path = Path(lib_path)
    if not lib_path.is_file():
        raise UserError(f"{lib_path}: no such file")
    if repeat < 0 or number < 1:
        raise UserError("--repeat must be >= 0 and --number >= 1")
    host, port = parse_tracker(tracker)
    start = time.perf_counter()
    remote = request_session(host, port, key, session_timeout=timeout, connect_timeout=connect_timeout)
    log.info("session on %s via %s:%d (%.1f s)", key, host, port, time.perf_counter() - start)
    try:
        vm, dev = load_remote_vm(remote, lib_path, key)
        output = run_stateful(vm, dev, x)
        times = time_stateful(vm, dev, repeat, number) if repeat > 0 else []
    finally:  # end the session now: the device serves one at a time (TVM ends it with the last reference)
        vm = dev = remote = None
        gc.collect()
    emulated = is_emulated_key(key) if emulated is None else emulated
    return RemoteRunResult(output, times, key=key, tracker=f"{host}:{port}", emulated=emulated)


def load_remote_vm(remote, lib_path: Path, key: str):
    """Upload the library and open a Relax VM on the device's CPU."""
    from tvm import relax

    name = os.path.basename(lib_path)
    remote.upload(str(lib_path))
    dev = remote.cpu()
    try:
        return relax.VirtualMachine(remote.load_module(name), dev), dev
    except Exception as err:  # noqa: BLE001 - dlopen errors come back as TVM errors
        raise UserError(f"{lib_path}: device {key!r} cannot load it ({_last_line(err)}); "
                        "was it compiled for this device's target?") from err


def run_stateful(vm, dev, x: np.ndarray) -> np.ndarray:
    """``main(x)`` through the stateful API: calling ``vm["main"]`` over RPC on a function
    returning a tuple gives an opaque ``RPCObjectRef``; ``get_outputs`` unpacks it."""
    import tvm

    data = tvm.runtime.tensor(np.ascontiguousarray(x, dtype="float32"), dev)
    try:
        vm.set_input("main", data)
        vm.invoke_stateful("main")
    except Exception as err:  # noqa: BLE001 - shape mismatch is checked inside the VM
        raise UserError(f"--input: the library rejects an input of shape {x.shape}: {_last_line(err)}") from err
    return _first_tensor(vm.get_outputs("main")).numpy()


def time_stateful(vm, dev, repeat: int, number: int) -> list[float]:
    """Per-repeat mean latency (ms) measured on the device by the VM's time evaluator."""
    timer = vm.time_evaluator("invoke_stateful", dev, number=number, repeat=repeat)
    return [t * 1e3 for t in timer("main").results]


def _first_tensor(out):
    while not hasattr(out, "numpy"):
        out = out[0]  # a (possibly nested) one-element tuple
    return out


def _last_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__
