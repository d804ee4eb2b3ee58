"""Start, inspect and stop the emulated device: a TVM RPC tracker plus an aarch64 RPC server.

``up()`` starts two process groups (``start_new_session=True``), so that ``down()`` also ends
the popen workers each of them spawns (killing only the leader would orphan them):

* the tracker, ``python -m tvm.exec.rpc_tracker`` on the host Python;
* the RPC server(s), TVM's ``tvm.exec.rpc_server`` on the emulated aarch64 Python (through the
  wrapper of :mod:`.provisioning` and ``_rpc_server_main.py``), registered under a key;
  ``count`` > 1 starts that many under the same key (a farm of devices: the tracker hands each
  session to a free one).

Their logs go to ``CACHE/logs/`` (``tracker-PORT.log``, ``server-KEY-PORT.log``; the second and
later servers of a key ``server-KEY-PORT-N.log``), their pids to
a state file ``CACHE/run/device-HOST-PORT.json`` (one per tracker address, so a test's device
and a user's device can run side by side).
Everything binds to 127.0.0.1 by default: an RPC server runs any code it is sent.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import remote
from ..errors import UserError
from .provisioning import EmulatorLayout, provision

log = logging.getLogger(__name__)

DEFAULT_KEY = remote.DEFAULT_KEY
DEFAULT_TRACKER_PORT = int(remote.DEFAULT_TRACKER.rsplit(":", 1)[1])
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
SERVER_MAIN = Path(__file__).with_name("_rpc_server_main.py")
#: Strings in the command line of every process of ours (leaders and popen workers).
OUR_MARKERS = ("tvm.exec.", SERVER_MAIN.name)


@dataclass(frozen=True)
class DeviceConfig:
    """One emulated device: the tracker it registers with and the key it registers under."""

    key: str = DEFAULT_KEY
    tracker_port: int = DEFAULT_TRACKER_PORT
    host: str = "127.0.0.1"
    #: ports the RPC server may listen on, [server_port, server_port_end)
    server_port: int = 9090
    server_port_end: int = 9190
    #: seconds to wait for the tracker to listen and for the server to register
    tracker_timeout: float = 60.0
    server_timeout: float = 300.0
    layout: EmulatorLayout = field(default_factory=EmulatorLayout)
    #: which of the key's servers this is (1, 2, …: ``device up --count N``)
    index: int = 1

    @property
    def name(self) -> str:
        """The server's name in the state file: the key, then ``KEY#2``, ``KEY#3``, …"""
        return self.key if self.index == 1 else f"{self.key}#{self.index}"

    @property
    def tracker_address(self) -> str:
        return f"{self.host}:{self.tracker_port}"

    @property
    def state_file(self) -> Path:
        return self.layout.run_dir / f"device-{self.host}-{self.tracker_port}.json"

    @property
    def tracker_log(self) -> Path:
        return self.layout.log_dir / f"tracker-{self.tracker_port}.log"

    @property
    def server_log(self) -> Path:
        suffix = "" if self.index == 1 else f"-{self.index}"
        return self.layout.log_dir / f"server-{self.key}-{self.tracker_port}{suffix}.log"


# --------------------------------------------------------------------------- public API


def up(key: str = DEFAULT_KEY, tracker_port: int = DEFAULT_TRACKER_PORT, host: str = "127.0.0.1",
       cache_dir: str | Path | None = None, timeout: float = 300.0, count: int = 1) -> dict:
    """Provision if needed, start (or reuse) the tracker and ``count`` emulated servers under
    ``key``; wait until the tracker lists ``count`` servers with the key.

    Idempotent: a tracker or servers already up are reused (servers registered under the key by
    anyone count; only the missing ones are started). Returns :func:`status`.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"--count must be an integer >= 1, got {count!r}")
    config = _config(key, tracker_port, host, cache_dir, server_timeout=timeout)
    warn_if_exposed(config.host)
    provision(config.layout)
    state = _load_state(config)
    _ensure_tracker(config, state)
    _ensure_servers(config, state, count)
    return status(tracker_port, host, cache_dir)


def status(tracker_port: int = DEFAULT_TRACKER_PORT, host: str = "127.0.0.1",
           cache_dir: str | Path | None = None) -> dict:
    """What runs at ``host:tracker_port``: the tracker's keys and queues, each server registered
    (:func:`tvmshuffle.remote.device_list`: key, address, free or busy), and our pids."""
    config = _config(DEFAULT_KEY, tracker_port, host, cache_dir)
    state = _load_state(config)
    report = {"tracker": config.tracker_address, "tracker_up": False, "keys": [], "queue": {},
              "servers": [], "pids": _pids_report(state), "state_file": str(config.state_file)}
    try:
        summary = remote.tracker_summary(config.host, config.tracker_port, timeout=3.0)
    except UserError:
        return report
    report.update(tracker_up=True, keys=remote.registered_keys(summary),
                  queue=summary.get("queue_info", {}), servers=remote.device_list(summary))
    return report


def down(tracker_port: int = DEFAULT_TRACKER_PORT, host: str = "127.0.0.1",
         cache_dir: str | Path | None = None) -> list[str]:
    """Stop the server(s) and tracker started by :func:`up` for this address; remove the state.

    Returns what was stopped (e.g. ``["server:emu-aarch64 (pid 123)", "tracker (pid 120)"]``).
    A tracker that :func:`up` found already running (not ours) is left alone.
    """
    config = _config(DEFAULT_KEY, tracker_port, host, cache_dir)
    state = _load_state(config)
    stopped = []
    for name, entry in [*((f"server:{k}", v) for k, v in state["servers"].items()), ("tracker", state["tracker"])]:
        if entry and entry.get("owned", True) and _stop_group(entry["pid"]):
            stopped.append(f"{name} (pid {entry['pid']})")
    config.state_file.unlink(missing_ok=True)
    log.info("stopped %s", ", ".join(stopped) if stopped else "nothing (no device of ours was running)")
    return stopped


def server_log(key: str = DEFAULT_KEY, tracker_port: int = DEFAULT_TRACKER_PORT,
               cache_dir: str | Path | None = None, index: int = 1) -> Path:
    """The log file of the emulated server ``key`` (the ``index``-th of that key) registered with
    the tracker on ``tracker_port``."""
    return _config(key, tracker_port, "127.0.0.1", cache_dir, index=index).server_log


def server_logs(key: str = DEFAULT_KEY, tracker_port: int = DEFAULT_TRACKER_PORT,
                cache_dir: str | Path | None = None) -> list[Path]:
    """The log files of every emulated server started under ``key`` for this tracker (the
    first one's path even when it does not exist)."""
    first = server_log(key, tracker_port, cache_dir)
    more = sorted(first.parent.glob(f"server-{key}-{tracker_port}-*.log"),
                  key=lambda p: int(p.stem.rsplit("-", 1)[-1]) if p.stem.rsplit("-", 1)[-1].isdigit() else 0)
    return [first, *[p for p in more if p.stem.rsplit("-", 1)[-1].isdigit()]]


def warn_if_exposed(host: str) -> bool:
    """Log a WARNING when ``host`` is not loopback (an RPC server runs any code it is sent)."""
    if host in LOOPBACK:
        return False
    log.warning("binding the RPC tracker and server to %s, not 127.0.0.1: an RPC server runs any "
                "code it is sent, so whoever reaches %s can run code on this machine", host, host)
    return True


# --------------------------------------------------------------------------- tracker


def _ensure_tracker(config: DeviceConfig, state: dict) -> None:
    """Reuse a tracker answering at the address, or start one and wait until it answers."""
    if _tracker_answers(config):
        ours = state["tracker"] and _group_alive(state["tracker"]["pid"])
        log.info("reusing the RPC tracker at %s%s", config.tracker_address,
                 f" (pid {state['tracker']['pid']})" if ours else " (not started by tvmshuffle)")
        if not ours:
            state["tracker"] = {"pid": None, "owned": False}
            _save_state(config, state)
        return
    if state["tracker"] and state["tracker"].get("owned"):
        _stop_group(state["tracker"]["pid"])  # ours but not answering: start afresh
    if _port_in_use(config.host, config.tracker_port):
        raise UserError(f"port {config.tracker_address} is in use by something that is not a TVM RPC "
                        "tracker; pick another with --tracker-port")
    cmd = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", config.host,
           "--port", str(config.tracker_port), "--port-end", str(config.tracker_port + 1)]
    proc = _spawn(cmd, config.tracker_log)
    state["tracker"] = {"pid": proc.pid, "owned": True, "log": str(config.tracker_log)}
    _save_state(config, state)
    log.info("starting the RPC tracker at %s (pid %d)", config.tracker_address, proc.pid)
    deadline = time.monotonic() + config.tracker_timeout
    while not _tracker_answers(config):
        _fail_if_dead(proc, "RPC tracker", config.tracker_log)
        if time.monotonic() > deadline:
            _stop_group(proc.pid)
            raise UserError(f"RPC tracker at {config.tracker_address} not answering after "
                            f"{config.tracker_timeout:.0f} s; {_log_tail(config.tracker_log)}")
        time.sleep(0.25)


def _tracker_answers(config: DeviceConfig) -> bool:
    try:
        remote.probe_tracker(config.host, config.tracker_port, timeout=2.0)
        return True
    except UserError:
        return False


# --------------------------------------------------------------------------- server


def _ensure_servers(config: DeviceConfig, state: dict, count: int) -> None:
    """Have ``count`` servers registered under the key: reuse those registered (by anyone) and
    ours still starting, start the missing ones (all at once), wait for them."""
    import dataclasses

    registered = _key_count(config)
    if registered >= count:
        log.info("device %r: %d server(s) registered with %s", config.key, registered, config.tracker_address)
        return
    servers = [dataclasses.replace(config, index=i) for i in range(1, count + 1)]
    starting = []  # ours, alive, not (yet) registered: counted, waited for
    missing = []
    for server in servers:
        entry = state["servers"].get(server.name)
        if entry and _leader_alive(entry["pid"]):
            starting.append((server, entry["pid"], None))
        else:
            missing.append(server)
    # ours that are alive may be among those registered already
    to_start = max(0, count - max(registered, len(starting)))
    started = []
    for server in missing[:to_start]:
        entry = state["servers"].get(server.name)
        if entry:
            _stop_group(entry["pid"])  # workers left behind by a server that died
        proc = _start_server(server, state)
        started.append((server, proc.pid, proc))
    if started:
        log.info("starting %d emulated aarch64 RPC server(s) %r (pids %s); under qemu each takes ~40 s "
                 "to register", len(started), config.key, ", ".join(str(p) for _, p, _ in started))
    _wait_for_count(config, count, [*starting, *started])


def _start_server(config: DeviceConfig, state: dict) -> subprocess.Popen:
    wrapper = str(config.layout.wrapper)
    cmd = [wrapper, str(SERVER_MAIN), wrapper, "--tracker", config.tracker_address, "--key", config.key,
           "--host", config.host, "--port", str(config.server_port), "--port-end", str(config.server_port_end)]
    proc = _spawn(cmd, config.server_log)
    state["servers"][config.name] = {"pid": proc.pid, "owned": True, "log": str(config.server_log)}
    _save_state(config, state)
    return proc


def _wait_for_count(config: DeviceConfig, count: int, ours: list) -> None:
    """Poll the tracker until ``count`` servers have ``config.key``; one of ``ours`` (``(config,
    pid, Popen or None)``) dying, or the wait passing ``server_timeout``, is a UserError."""
    start = time.monotonic()
    next_note = start + 15
    while (registered := _key_count(config)) < count:
        for server, pid, proc in ours:
            what = f"emulated RPC server {server.name!r}"
            if proc is not None:
                _fail_if_dead(proc, what, server.server_log)
            elif not _leader_alive(pid):
                _stop_group(pid)
                raise UserError(f"{what} (pid {pid}) exited; {_log_tail(server.server_log)}")
        now = time.monotonic()
        if now - start > config.server_timeout:
            for _, pid, _ in ours:
                _stop_group(pid)
            raise UserError(f"device {config.key!r}: {registered} of {count} server(s) registered with "
                            f"{config.tracker_address} within {config.server_timeout:.0f} s; "
                            f"{_log_tail(ours[-1][0].server_log) if ours else 'none of them started by tvmshuffle'}")
        if now >= next_note:
            log.info("  still waiting for %r to register: %d of %d (%.0f s)", config.key, registered, count,
                     now - start)
            next_note = now + 15
        time.sleep(1.0)
    log.info("device %r: %d server(s) registered with %s after %.0f s", config.key, count,
             config.tracker_address, time.monotonic() - start)


def _key_count(config: DeviceConfig) -> int:
    """Servers registered under ``config.key`` (busy or free); 0 if the tracker does not answer."""
    try:
        summary = remote.tracker_summary(config.host, config.tracker_port, timeout=3.0)
    except UserError:
        return 0
    return sum(1 for d in remote.device_list(summary) if d["key"] == config.key)


# --------------------------------------------------------------------------- processes


def _spawn(cmd: list[str], log_path: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (session), output appended to ``log_path`` (a
    restarted server's log keeps what the previous one wrote before it died)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as out:
        out.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(cmd)}\n")
        out.flush()
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)


def _fail_if_dead(proc: subprocess.Popen, what: str, log_path: Path) -> None:
    if proc.poll() is not None:
        _stop_group(proc.pid)  # its workers, if any
        raise UserError(f"{what} exited at start (code {proc.returncode}); {_log_tail(log_path)}")


def _group_members(pgid: int) -> list:
    """Live (non-zombie) processes of process group ``pgid``."""
    import psutil

    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _is_ours(members: list) -> bool:
    """The group runs one of our commands (guards against a recycled pid in a stale state file)."""
    import psutil

    for proc in members:
        try:
            if any(marker in " ".join(proc.cmdline()) for marker in OUR_MARKERS):
                return True
        except psutil.Error:
            continue
    return False


def _leader_alive(pid: int) -> bool:
    """The process ``pid`` itself runs (not a zombie) and is one of ours."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and _is_ours([proc])
    except psutil.Error:
        return False


def _group_alive(pgid: int | None) -> bool:
    if not pgid:
        return False
    members = _group_members(pgid)
    return bool(members) and _is_ours(members)


def _stop_group(pgid: int | None, grace: float = 5.0) -> bool:
    """SIGTERM the whole group, SIGKILL what is left after ``grace`` s. True if it was running."""
    if not pgid or not _group_alive(pgid):
        _reap(pgid)
        return False
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pgid)
            if not _group_members(pgid):
                return True
            time.sleep(0.1)
    _reap(pgid)
    return True


def _reap(pid: int | None) -> None:
    """Collect the exit status of our own child, so it does not linger as a zombie."""
    if not pid:
        return
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def _log_tail(path: Path, lines: int = 3) -> str:
    """The last lines of a log, joined into one line for a one-line error."""
    try:
        text = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"no log at {path}"
    tail = " | ".join(text[-lines:]) if text else "(empty)"
    return f"log {path}: {tail}"


# --------------------------------------------------------------------------- state


def _config(key, tracker_port, host, cache_dir, **kwargs) -> DeviceConfig:
    layout = EmulatorLayout(Path(cache_dir)) if cache_dir else EmulatorLayout()
    if not 0 < int(tracker_port) < 65536:
        raise UserError(f"--tracker-port: expected a port number, got {tracker_port}")
    return DeviceConfig(key=key, tracker_port=int(tracker_port), host=host, layout=layout, **kwargs)


def _load_state(config: DeviceConfig) -> dict:
    try:
        state = json.loads(config.state_file.read_text())
    except (OSError, ValueError):
        state = {}
    return {"tracker": state.get("tracker"), "servers": state.get("servers", {})}


def _save_state(config: DeviceConfig, state: dict) -> None:
    config.state_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = config.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"host": config.host, "port": config.tracker_port, **state}, indent=2) + "\n")
    tmp.replace(config.state_file)


def _pids_report(state: dict) -> dict:
    report = {}
    if state["tracker"] and state["tracker"].get("pid"):
        report["tracker"] = {"pid": state["tracker"]["pid"], "alive": _group_alive(state["tracker"]["pid"])}
    for key, entry in state["servers"].items():
        report[f"server:{key}"] = {"pid": entry["pid"], "alive": _group_alive(entry["pid"])}
    return report
