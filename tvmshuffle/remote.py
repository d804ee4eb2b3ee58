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
import itertools
import logging
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError, last_line
from .runtime import RunResult, ThreadConfig, configure_threads

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
        return latency_label(self.key, self.emulated)


def latency_label(key: str, emulated: bool) -> str:
    """How to name the times measured on device ``key``: emulated ones are said not to be ARM's."""
    if emulated:
        return f"emulated latency on {key} (qemu on this host, NOT an ARM latency)"
    return f"latency on {key}"


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


def key_counts(summary: dict, key: str) -> tuple[int, int]:
    """(servers registered with ``key``, free ones)."""
    total = 0
    for item in summary.get("server_info", []):
        if str(item.get("key", "")).split(":", 1)[-1] == key:
            total += 1
    free = int(summary.get("queue_info", {}).get(key, {}).get("free", 0))
    return total, free


UNKNOWN_KEY_GRACE_SEC = 20.0


def check_rpc(tracker: str, key: str, device_wait_sec: float = 300.0, timeout: float = 5.0) -> int:
    """Check the tracker answers and has a free device with ``key`` (waits up to
    ``device_wait_sec`` for one). Returns the number of free devices; UserError otherwise."""
    host, port = parse_tracker(tracker)
    start = time.monotonic()
    deadline = start + device_wait_sec
    waited = False
    while True:
        summary = tracker_summary(host, port, timeout)
        total, free = key_counts(summary, key)
        if free > 0:
            return free
        # a busy device is waited for; a key nobody registers fails after a short grace
        # (a server re-registers with the tracker a moment after each session)
        if not total and time.monotonic() >= start + min(device_wait_sec, UNKNOWN_KEY_GRACE_SEC):
            deadline = time.monotonic()
        if time.monotonic() >= deadline:
            if total:
                raise UserError(
                    f"RPC tracker {tracker}: all {total} device(s) with key {key!r} are busy "
                    f"(none free after {device_wait_sec:g} s)"
                )
            keys = sorted({str(i.get("key", "")).split(":", 1)[-1]
                           for i in summary.get("server_info", [])})
            have = ", ".join(repr(k) for k in keys) if keys else "none"
            raise UserError(
                f"RPC tracker {tracker}: no device with key {key!r} after waiting "
                f"{device_wait_sec:g} s (keys there: {have})"
            )
        if not waited:
            log.info("waiting up to %g s for a free device with key %r on %s",
                     device_wait_sec, key, tracker)
            waited = True
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def device_count(tracker: str, key: str, timeout: float = 5.0) -> int:
    """Servers registered under ``key`` at ``tracker`` (busy or free)."""
    host, port = parse_tracker(tracker)
    return key_counts(tracker_summary(host, port, timeout), key)[0]


def device_list(summary: dict) -> list[dict]:
    """Each server registered with the tracker: ``{"key", "address", "state"}``, sorted.

    The tracker counts free servers per key (``queue_info``), it does not say which ones: when
    all of a key's servers are free (or none is) that decides each one's ``state``; otherwise a
    server on this machine is ``busy`` while a session is connected to its port, ``free`` if
    not, and a server elsewhere is ``"free or busy"``.
    """
    servers = []
    for info in summary.get("server_info", []):
        key = str(info.get("key", ""))
        if not key.startswith("server:"):
            continue
        addr = info.get("addr") or [None, None]
        servers.append({"key": key.split(":", 1)[1], "host": addr[0], "port": addr[1]})
    by_key: dict[str, list[dict]] = {}
    for server in servers:
        by_key.setdefault(server["key"], []).append(server)
    for key, group in by_key.items():
        free = int(summary.get("queue_info", {}).get(key, {}).get("free", 0))
        if free >= len(group) or free == 0:
            for server in group:
                server["state"] = "free" if free else "busy"
            continue
        connected = _connected_local_ports()
        for server in group:
            if server["host"] in ("127.0.0.1", "localhost", "::1") and connected is not None:
                server["state"] = "busy" if server["port"] in connected else "free"
            else:
                server["state"] = "free or busy"
    return sorted(({"key": s["key"], "address": f"{s['host']}:{s['port']}", "state": s["state"]}
                   for s in servers), key=lambda s: (s["key"], s["address"]))


def _connected_local_ports() -> set[int] | None:
    """Local ports of this machine's established TCP connections (None if they cannot be read)."""
    import psutil

    try:
        return {c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED}
    except (psutil.Error, OSError):
        return None


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
        raise UserError(f"device {key!r} via {host}:{port}: no session within {wait_timeout:.0f} s "
                        f"({last_line(err)})") from None
    finally:
        session.close()


# --------------------------------------------------------------------------- bounded steps

#: Seconds a remote step may go without an answer before the session is given up
#: (``--rpc-timeout``): enough to upload a model library to an emulated device and run it once.
DEFAULT_RPC_TIMEOUT = 120.0


class DeviceTimeout(UserError):
    """A device stopped answering: a remote step made no progress within the bound."""


def server_log_hint(key: str, tracker: str) -> str:
    """Where the device's server log is: the emulated device's file, else the device's own."""
    if is_emulated_key(key):
        from .device import service

        _, port = parse_tracker(tracker)
        logs = service.server_logs(key, port)
        return f"server log {logs[0]}" if len(logs) == 1 else f"server logs {', '.join(map(str, logs))}"
    return "see the RPC server's own log on the device"


class Watchdog:
    """Bounds every step of a remote session: ``step(what)`` starts a step that must finish
    within ``seconds``, else :class:`DeviceTimeout` names the key, the step and the log.

    This is TVM's own interrupt path: TVM's socket calls retry on EINTR after running Python's
    signal handlers, so the exception raised by the SIGALRM handler ends a call blocked on a
    device that stopped answering (as Ctrl-C does). Signals reach only the main thread; in
    another thread the steps are not bounded (logged).
    """

    def __init__(self, key: str, tracker: str, seconds: float = DEFAULT_RPC_TIMEOUT) -> None:
        check_rpc_timeout(seconds)
        self.key, self.tracker, self.seconds = key, tracker, seconds
        self.what, self.limit = "starting", seconds
        self.expired = False
        self._previous = None
        self._armed = False

    def __enter__(self) -> Watchdog:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._outer = (signal.getitimer(signal.ITIMER_REAL)[0], time.monotonic())  # e.g. pytest-timeout's
            self._previous = signal.signal(signal.SIGALRM, self._expired)
            self._armed = True
        else:
            log.debug("remote steps on %s are not time-bounded outside the main thread", self.key)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        if self._armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
            self._armed = False
            left, since = self._outer
            if left > 0:  # give back what an outer alarm had left
                signal.setitimer(signal.ITIMER_REAL, max(left - (time.monotonic() - since), 0.001))

    def step(self, what: str, seconds: float | None = None) -> None:
        """From now on the session is doing ``what``, which may take ``seconds`` (default: the bound)."""
        import signal

        self.what, self.limit = what, seconds or self.seconds
        if self._armed:
            signal.setitimer(signal.ITIMER_REAL, self.limit)

    def _expired(self, *_) -> None:
        self.expired = True
        raise DeviceTimeout(
            f"device {self.key!r} via {self.tracker}: no answer for {self.limit:.0f} s while "
            f"{self.what} (--rpc-timeout {self.seconds:g}); {server_log_hint(self.key, self.tracker)}")


def check_rpc_timeout(seconds: float) -> float:
    if not seconds > 0:
        raise UserError(f"--rpc-timeout must be > 0 seconds, got {seconds:g}")
    return seconds


def check_rpc_args(tracker: str | None, key: str | None, timeout: float = DEFAULT_RPC_TIMEOUT) -> None:
    """The flags of a remote run: tracker and key together, a timeout > 0, a HOST:PORT tracker."""
    if bool(tracker) != bool(key):
        raise UserError("--rpc-tracker and --rpc-key go together")
    check_rpc_timeout(timeout)
    if tracker:
        parse_tracker(tracker)


# --------------------------------------------------------------------------- sessions

_exported = itertools.count(1)  # numbers the libraries :meth:`Session.load_built` uploads


class Session:
    """One RPC session on device ``key`` behind ``tracker``, every step bounded (:class:`Watchdog`):
    the device behind a tracker of :mod:`tvmshuffle.devices` (whose :class:`~tvmshuffle.devices.LocalDevice`
    has the same interface for this machine; :func:`~tvmshuffle.devices.open_device` picks one).

    ``with Session(tracker, key) as s: vm = s.load_vm(lib); y = s.run(vm, x); t = s.time(vm, 10)``.
    The session ends with the block (the device serves one session at a time). ``threads``
    (``--threads``/``--affinity``) configures the thread pool of the session's process on the
    device as it starts; ``self.threads`` is then the pool's size there.
    """

    #: the code runs elsewhere: a loaded module lives only as long as the session, and TVM's
    #: remote time evaluator finds only a module's root functions
    is_here = False

    def __init__(self, tracker: str, key: str, timeout: float = DEFAULT_RPC_TIMEOUT,
                 session_timeout: float = 600.0, connect_timeout: float = 5.0,
                 threads: ThreadConfig | None = None) -> None:
        self.key = key
        self.thread_config = threads or ThreadConfig()
        self.threads: int | None = None
        self.host, self.port = parse_tracker(tracker)
        self.tracker = f"{self.host}:{self.port}"
        self.session_timeout, self.connect_timeout = session_timeout, connect_timeout
        self.watchdog = Watchdog(key, self.tracker, timeout)
        self.remote = None
        self._fds: set[int] = set()
        self._run_s = 0.0
        self._exports = None  # a temporary directory for :meth:`load_built`

    @property
    def emulated(self) -> bool:
        return is_emulated_key(self.key)

    @property
    def name(self) -> str:
        """The device's short name in a report: its key."""
        return self.key

    def place(self, preset=None) -> str:
        """The device named in full, for a report's heading: ``KEY via HOST:PORT``."""
        return f"{self.key} via {self.tracker}"

    @property
    def label(self) -> str:
        """The device in a log line: ``device KEY via HOST:PORT`` (emulated: said so)."""
        return f"device {self.key!r} via {self.tracker}" + (" (emulated: not ARM timings)" if self.emulated else "")

    @property
    def latency_label(self) -> str:
        """How to name the times measured here (:func:`latency_label`)."""
        return latency_label(self.key, self.emulated)

    @property
    def threads_note(self) -> str:
        """``", N threads"`` when ``--threads``/``--affinity`` configured the device's pool, else ``""``."""
        return f", {self.threads} threads" if self.threads else ""

    def __enter__(self) -> Session:
        self.watchdog.__enter__()
        try:
            self.step("waiting for a session")
            start = time.perf_counter()
            before = _tcp_fds()
            self.remote = request_session(self.host, self.port, self.key, session_timeout=self.session_timeout,
                                          wait_timeout=self.watchdog.seconds, connect_timeout=self.connect_timeout)
            self._fds = _tcp_fds() - before  # the session's connection to the device
            log.info("session on %s via %s (%.1f s)", self.key, self.tracker, time.perf_counter() - start)
            if self.thread_config.requested:
                self.step("configuring the thread pool")
                self.threads = configure_threads(self.remote.get_function, self.thread_config,
                                                 where=f"device {self.key!r}")
        except BaseException:
            self.watchdog.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.watchdog.expired:
                # A call interrupted half-way leaves TVM's session waiting on the device: end the
                # connection under it, so its teardown fails fast instead of waiting for ever.
                _shutdown(self._fds)
            self.step("ending the session")
            self.remote = None  # TVM ends the session with its last reference
            gc.collect()
        except DeviceTimeout:
            pass
        finally:
            self.watchdog.__exit__()
            if self._exports is not None:
                self._exports.cleanup()
                self._exports = None

    def step(self, what: str, seconds: float | None = None) -> None:
        self.watchdog.step(what, seconds)

    def cpu(self):
        return self.remote.cpu()

    def load_module(self, path: Path):
        """Upload a library and load it on the device."""
        path = Path(path)
        self.step(f"uploading {path.name}")
        self.remote.upload(str(path))
        self.step(f"loading {path.name}")
        try:
            return self.remote.load_module(path.name)
        except DeviceTimeout:
            raise
        except Exception as err:  # noqa: BLE001 - dlopen errors come back as TVM errors
            raise UserError(f"{path}: device {self.key!r} cannot load it ({last_line(err)}); "
                            "was it compiled for this device's target?") from err

    def load_built(self, built, preset, name: str = "module"):
        """A module built in this process (a VM executable or a runtime module) loaded on the
        device: exported for ``preset`` (:func:`tvmshuffle.targets.export_library`) into the
        session's own temporary directory, uploaded and loaded. Each export gets a name of its
        own (a library loaded twice under one name would be the first one again)."""
        import tempfile

        from . import targets

        if self._exports is None:
            self._exports = tempfile.TemporaryDirectory(prefix="tvmshuffle-session-")
        path = Path(self._exports.name) / f"{name}_{next(_exported)}.so"
        targets.export_library(built, preset, path)
        return self.load_module(path)

    def vm(self, module, name: str = "the library"):
        """A Relax VM on the device's CPU over a loaded module."""
        from tvm import relax

        self.step(f"opening a VM on {name}")
        return relax.VirtualMachine(module, self.cpu())

    def load_vm(self, lib_path: Path):
        """Upload the library and open a Relax VM on the device's CPU."""
        return self.vm(self.load_module(lib_path), Path(lib_path).name)

    def tensor(self, array: np.ndarray):
        """``array`` copied to the device."""
        import tvm

        return tvm.runtime.tensor(array, self.cpu())

    def run(self, vm, x: np.ndarray) -> np.ndarray:
        """``main(x)`` on the device; how long it took bounds :meth:`time`."""
        self.step("running the model")
        start = time.perf_counter()
        out = run_stateful(vm, self.cpu(), x)
        self._run_s = time.perf_counter() - start
        return out

    def time(self, vm, repeat: int, number: int = 1) -> list[float]:
        """Per-repeat mean latency (ms) measured on the device: bounded by the work asked for
        (three times the first run's time per run) plus ``--rpc-timeout``."""
        self.step(f"timing {repeat} x {number} runs", self.watchdog.seconds + 3 * self._run_s * repeat * number)
        return time_stateful(vm, self.cpu(), repeat, number)


def _tcp_fds() -> set[int]:
    import psutil

    return {c.fd for c in psutil.Process().net_connections("tcp") if c.fd >= 0}


def _shutdown(fds: set[int]) -> None:
    """Shut down these sockets of ours (the descriptors stay TVM's to close)."""
    import socket

    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.detach()


# --------------------------------------------------------------------------- run


def run_remote(lib_path: str | Path, x: np.ndarray, tracker: str = DEFAULT_TRACKER, key: str = DEFAULT_KEY,
               repeat: int = 0, number: int = 1, timeout: float = DEFAULT_RPC_TIMEOUT,
               emulated: bool | None = None, threads: ThreadConfig | None = None) -> RemoteRunResult:
    """Upload ``lib_path``, run ``main(x)`` on device ``key``; with ``repeat`` > 0 time it there.

    Every step is bounded by ``timeout`` s without an answer (:class:`DeviceTimeout`).
    ``threads`` configures the device's thread pool first (:class:`~tvmshuffle.runtime.ThreadConfig`).
    ``emulated`` defaults to :func:`is_emulated_key`. Times are per-repeat means in ms,
    measured on the device.
    """
    lib_path = Path(lib_path)
    if not lib_path.is_file():
        raise UserError(f"{lib_path}: no such file")
    if repeat < 0 or number < 1:
        raise UserError("--repeat must be >= 0 and --number >= 1")
    with Session(tracker, key, timeout, threads=threads) as session:
        vm = session.load_vm(lib_path)
        output = session.run(vm, x)
        times = session.time(vm, repeat, number) if repeat > 0 else []
        vm = None
    emulated = is_emulated_key(key) if emulated is None else emulated
    return RemoteRunResult(output, times, session.threads, key=key, tracker=session.tracker, emulated=emulated)


def device_threads(tracker: str, key: str, threads: ThreadConfig, timeout: float = DEFAULT_RPC_TIMEOUT) -> int | None:
    """Open a session on ``key``, configure its thread pool as ``threads`` says, and return the
    pool's size there (``runtime.NumThreads`` on the device); None when nothing is asked."""
    if not threads.requested:
        return None
    with Session(tracker, key, timeout, threads=threads) as session:
        return session.threads


def run_stateful(vm, dev, x: np.ndarray) -> np.ndarray:
    """``main(x)`` through the stateful API: calling ``vm["main"]`` over RPC on a function
    returning a tuple gives an opaque ``RPCObjectRef``; ``get_outputs`` unpacks it."""
    import tvm

    data = tvm.runtime.tensor(np.ascontiguousarray(x, dtype="float32"), dev)
    try:
        vm.set_input("main", data)
        vm.invoke_stateful("main")
    except Exception as err:  # noqa: BLE001 - shape mismatch is checked inside the VM
        raise UserError(f"--input: the library rejects an input of shape {x.shape}: {last_line(err)}") from err
    return _first_tensor(vm.get_outputs("main")).numpy()


def time_stateful(vm, dev, repeat: int, number: int) -> list[float]:
    """Per-repeat mean latency (ms) measured on the device by the VM's time evaluator."""
    timer = vm.time_evaluator("invoke_stateful", dev, number=number, repeat=repeat)
    return [t * 1e3 for t in timer("main").results]


def _first_tensor(out):
    while not hasattr(out, "numpy"):
        out = out[0]  # a (possibly nested) one-element tuple
    return out


