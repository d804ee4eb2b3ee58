"""The emulated aarch64 device: provision, up/status/down, and a model run on it over RPC.

The device is brought up once for the module (its own key, tracker on a free port, so it never
clashes with a user's device on 9190 or with other tests) and taken down at the end. The first
run on a machine provisions the arm64 Python + TVM into the cache (~150 MB; apt-get installs
qemu-user-static and the cross linker if missing); later runs reuse it.
"""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from tvmshuffle import device, remote
from tvmshuffle.device import provisioning
from tvmshuffle.device import service
from tvmshuffle.errors import UserError

#: one xdist worker runs this module: its module-scoped fixtures are built once
pytestmark = pytest.mark.xdist_group("device")

KEY = "emu-aarch64-test"
SHAPE = (1, 3, 64, 64)


def free_port(preferred: int = 0) -> int:
    """``preferred`` if free (stable log names in the cache), else any free port."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def emu_device():
    """``(tracker "HOST:PORT", port, status after up)``; the device is down after the module."""
    port = free_port(preferred=9391)
    try:
        yield f"127.0.0.1:{port}", port, device.up(key=KEY, tracker_port=port)
    finally:
        device.down(tracker_port=port)


@pytest.mark.slow
@pytest.mark.rpc
@pytest.mark.timeout(1200)  # cold: apt-get + ~150 MB of downloads + import check
def test_provision_is_idempotent():
    first = device.provision()
    assert first.tvm_version == provisioning.TVM_VERSION
    start = time.perf_counter()
    second = device.provision()
    assert second.reused and time.perf_counter() - start < 10
    layout = second.layout
    assert layout.wrapper.exists() and layout.python.exists()
    assert (layout.site_packages / "tvm").is_dir() and (layout.site_packages / "tvm_ffi").is_dir()
    assert device.is_provisioned(layout)


@pytest.mark.slow
@pytest.mark.rpc
@pytest.mark.timeout(900)
def test_up_registers_key_and_is_idempotent(emu_device):
    tracker, port, status = emu_device
    assert status["tracker"] == tracker and status["tracker_up"]
    assert KEY in status["keys"]
    assert status["pids"]["tracker"]["alive"] and status["pids"][f"server:{KEY}"]["alive"]
    start = time.perf_counter()
    again = device.up(key=KEY, tracker_port=port)
    assert time.perf_counter() - start < 20  # reused, nothing started
    assert again["pids"] == status["pids"]
    assert json.loads(json.dumps(again)) == again  # plain data, printable as JSON


@pytest.mark.slow
@pytest.mark.rpc
@pytest.mark.timeout(900)
def test_model_runs_on_emulated_device_like_pytorch(emu_device, tmp_path):
    from tvmshuffle.pipeline import CompileConfig, compile_model

    tracker, _, _ = emu_device
    compiled = compile_model("shufflenet_v1_g3_x0_25", tmp_path / "small-aarch64.so",
                             CompileConfig(target="aarch64", input_shape=SHAPE))
    x = compiled.model.random_input()
    result = remote.run_remote(compiled.output, x, tracker=tracker, key=KEY, repeat=2, timeout=300)
    expected = compiled.model.reference(x)
    assert result.output.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max()))
    assert float(np.abs(result.output - expected).max()) <= 1e-4 * scale
    assert len(result.times_ms) == 2 and all(t > 0 for t in result.times_ms)
    assert result.emulated and "emulated" in result.latency_label and "NOT an ARM" in result.latency_label
    logging.getLogger(__name__).info("%s: %s ms", result.latency_label, result.times_ms)


@pytest.mark.slow
@pytest.mark.rpc
@pytest.mark.timeout(600)
def test_consecutive_sessions_never_hang(emu_device, tmp_path):
    """Each session of the emulated server starts in a child forked by its forkserver (a fork of
    the multithreaded server under qemu-user could deadlock): 12 sessions in a row, each bounded."""
    from tvmshuffle.pipeline import CompileConfig, compile_model

    tracker, _, _ = emu_device
    compiled = compile_model("shufflenet_v1_g3_x0_25", tmp_path / "small-aarch64.so",
                             CompileConfig(target="aarch64", input_shape=SHAPE))
    x = compiled.model.random_input()
    expected = compiled.model.reference(x)
    for _ in range(12):  # each session waits for the device to be free again after the last
        with remote.Session(tracker, KEY, timeout=60) as session:
            out = session.run(session.load_vm(compiled.output), x)
        assert float(np.abs(out - expected).max()) <= 1e-4 * max(1.0, float(np.abs(expected).max()))


@pytest.mark.slow
@pytest.mark.rpc
@pytest.mark.timeout(900)
@pytest.mark.parametrize("model", ["shufflenet_v2_x0_5", "shufflenet_v1_g3_x0_5"])
def test_neon_hand_schedules_run_on_the_device_like_pytorch(emu_device, tmp_path, model):
    """The NEON variants of schedules/ (pointwise and depthwise, stride 1 and 2) on AArch64."""
    from tvmshuffle.pipeline import CompileConfig, compile_model

    tracker, _, _ = emu_device
    compiled = compile_model(model, tmp_path / "hand-aarch64.so",
                             CompileConfig(target="aarch64", input_shape=SHAPE, schedules="hand"))
    assert compiled.hand_kernels > 0
    x = compiled.model.random_input()
    result = remote.run_remote(compiled.output, x, tracker=tracker, key=KEY, repeat=1, timeout=300)
    expected = compiled.model.reference(x)
    scale = max(1.0, float(np.abs(expected).max()))
    assert float(np.abs(result.output - expected).max()) <= 1e-4 * scale


@pytest.mark.slow
@pytest.mark.rpc
@pytest.mark.timeout(120)
def test_unknown_key_is_user_error(emu_device, tmp_path):
    tracker, _, _ = emu_device
    lib = tmp_path / "any.so"
    lib.write_bytes(b"\0")
    with pytest.raises(UserError, match=f"no device with key 'no-such-device'.*{KEY}"):
        remote.run_remote(lib, np.zeros(SHAPE, "float32"), tracker=tracker, key="no-such-device")


def tvmshuffle(*args, timeout=900):
    """The CLI, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "tvmshuffle", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


SMALL = "shufflenet_v1_g3_x0_25"
SHAPE_FLAG = ",".join(map(str, SHAPE))
#: tuning with the fewest candidates and runs that still measure on the device (the search
#: itself, not the device, took most of these tests' time with MetaSchedule's population of 512)
QUICK_SEARCH = ["--search-population", 32, "--number", 1, "--min-repeat-ms", 0]


@pytest.mark.slow
@pytest.mark.rpc
@pytest.mark.timeout(1500)
def test_phone_flow_tune_compile_run(emu_device, tmp_path):
    """tune through the tracker on the device → compile with the records → run there, checked."""
    tracker, _, _ = emu_device
    records = tmp_path / "records"
    rpc = ["--rpc-tracker", tracker, "--rpc-key", KEY]
    proc = tvmshuffle("tune", SMALL, "--input-shape", SHAPE_FLAG, "--target", "aarch64", *rpc,
                      "--trials", 8, "--trials-per-batch", 4, *QUICK_SEARCH, "--tuning-records", records)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "EMULATED" in proc.stdout  # the estimate is labelled, never an ARM latency
    assert json.loads((records / "target.json").read_text())["preset"] == "aarch64"
    assert (records / "database_tuning_record.json").read_text().count("\n") >= 1

    lib = tmp_path / "tuned-aarch64.so"
    proc = tvmshuffle("compile", SMALL, "--input-shape", SHAPE_FLAG, "--target", "aarch64",
                      "--tuning-records", records, "-o", lib)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tuned = int(re.search(r"(\d+) with tuned schedules", proc.stdout).group(1))
    assert tuned >= 1

    x = np.random.default_rng(0).standard_normal(SHAPE).astype("float32")
    np.save(tmp_path / "x.npy", x)
    proc = tvmshuffle("run", lib, "--input", tmp_path / "x.npy", *rpc, "--repeat", 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "-> OK" in proc.stdout and "emulated latency" in proc.stdout and "NOT an ARM latency" in proc.stdout


@pytest.mark.slow
@pytest.mark.rpc
@pytest.mark.timeout(900)
def test_profile_on_the_device(emu_device, tmp_path):
    tracker, _, _ = emu_device
    lib = tmp_path / "small-aarch64.so"
    assert tvmshuffle("compile", SMALL, "--input-shape", SHAPE_FLAG, "--target", "aarch64", "-o", lib).returncode == 0
    proc = tvmshuffle("profile", lib, "--rpc-tracker", tracker, "--rpc-key", KEY, "--number", 1, "--repeat", 2, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert "EMULATED" in result["where"]
    assert all(k["median_ms"] > 0 for k in result["kernels"])
    assert result["gap_ms"] == pytest.approx(result["total_ms"] - result["kernels_ms"])
    # the cache flush before each cold call runs on the device too
    assert all(k["cold_ms"] > 0 for k in result["kernels"]) and result["kernels_cold_ms"] > 0


@pytest.fixture(scope="module")
def unit_model(tmp_path_factory):
    """One ShuffleNet V1 unit (grouped 1x1, shuffle + depthwise 3x3, grouped 1x1 + residual) as a
    ``.pt2`` file: 3 kernels to tune where a zoo model has 28, so a tuning round takes seconds."""
    import torch

    from tvmshuffle.models.shufflenet_v1 import ShuffleUnitV1

    torch.manual_seed(0)
    unit = ShuffleUnitV1(24, 24, stride=1, groups=3, first_groups=3).eval()
    path = tmp_path_factory.mktemp("unit") / "shuffle_unit_v1.pt2"
    torch.export.save(torch.export.export(unit, (torch.randn(*UNIT_SHAPE),)), path)
    return path


UNIT_SHAPE = (1, 24, 16, 16)


@pytest.mark.slow
@pytest.mark.rpc
@pytest.mark.timeout(1200)
def test_device_killed_mid_tune_keeps_records_and_resumes(emu_device, unit_model, tmp_path):
    tracker, port, _ = emu_device
    records = tmp_path / "records"
    record_file = records / "database_tuning_record.json"
    args = ["tune", unit_model, "--input-shape", ",".join(map(str, UNIT_SHAPE)), "--target", "aarch64",
            "--rpc-tracker", tracker, "--rpc-key", KEY, "--trials-per-batch", 2, *QUICK_SEARCH,
            "--rpc-timeout", 30,  # a request already waiting for the device when it drops: 30 s, not 300
            "--tuning-records", records]
    log = tmp_path / "tune.log"  # a file, not a pipe nobody reads while waiting (it would fill and block)
    with open(log, "w") as out:
        tune = subprocess.Popen([sys.executable, "-m", "tvmshuffle", *map(str, args), "--trials", "200"],
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (record_file.exists() and record_file.read_text().count("\n") >= 2):
            assert tune.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "no records measured on the device in time"
            time.sleep(1)
        assert tune.poll() is None, "the tune ended before the device was killed: budget too small"
        server_pid = device.status(tracker_port=port)["pids"][f"server:{KEY}"]["pid"]
        os.killpg(server_pid, signal.SIGKILL)  # the device drops
        tune.wait(timeout=600)  # ends by itself: no silent hang
    finally:
        if tune.poll() is None:
            tune.kill()
    err = log.read_text()
    assert tune.returncode == 2, err[-2000:]
    last = [line for line in err.splitlines() if line.startswith("tvmshuffle: error:")]
    assert last and "records so far kept" in last[-1], err[-2000:]
    kept = record_file.read_text().count("\n")
    assert kept >= 2

    device.up(key=KEY, tracker_port=port)  # the device is back
    proc = tvmshuffle(*args, "--trials", kept + 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{kept} trials already" in proc.stderr  # resumed from what was kept
    assert record_file.read_text().count("\n") >= kept + 2


@pytest.mark.slow
@pytest.mark.rpc
@pytest.mark.timeout(120)
def test_down_stops_every_process(emu_device):
    _, port, status = emu_device
    pids = [entry["pid"] for entry in status["pids"].values()]
    stopped = device.down(tracker_port=port)
    assert len(stopped) == 2
    after = device.status(tracker_port=port)
    assert not after["tracker_up"] and after["keys"] == [] and after["pids"] == {}
    for pid in pids:  # leaders and their popen workers (same process group) are gone
        assert not [p for p in psutil.process_iter() if _pgid(p.pid) == pid and p.status() != psutil.STATUS_ZOMBIE]
    assert device.down(tracker_port=port) == []  # idempotent


@pytest.mark.timeout(60)
def test_unreachable_tracker_fails_fast(tmp_path):
    lib = tmp_path / "any.so"
    lib.write_bytes(b"\0")
    start = time.perf_counter()
    with pytest.raises(UserError, match="cannot reach RPC tracker"):
        remote.run_remote(lib, np.zeros(SHAPE, "float32"), tracker=f"127.0.0.1:{free_port()}", key=KEY)
    assert time.perf_counter() - start < 10
    with pytest.raises(UserError, match="--rpc-tracker"):
        remote.run_remote(lib, np.zeros(SHAPE, "float32"), tracker="no-port", key=KEY)


@pytest.mark.rpc
@pytest.mark.timeout(120)
def test_server_dying_at_start_is_one_line_user_error(tmp_path):
    """A server that exits at start → UserError with its log's tail; the tracker is stopped after."""
    layout = provisioning.EmulatorLayout(tmp_path / "cache")
    layout.wrapper.parent.mkdir(parents=True)
    layout.wrapper.write_text("#!/bin/sh\necho 'boom: this emulator is broken' >&2\nexit 3\n")
    layout.wrapper.chmod(0o755)
    layout.stamp.write_text(json.dumps(provisioning._stamp_content(layout)))  # "provisioned"
    port = free_port()
    try:
        with pytest.raises(UserError, match="exited at start.*boom: this emulator is broken") as err:
            device.up(key=KEY, tracker_port=port, cache_dir=layout.cache_dir)
        assert "\n" not in str(err.value)
    finally:
        stopped = device.down(tracker_port=port, cache_dir=layout.cache_dir)
    assert [s.split(" ")[0] for s in stopped] == ["tracker"]  # the dead server was cleaned up already
    assert not device.status(tracker_port=port, cache_dir=layout.cache_dir)["tracker_up"]


def _host_python_device(tmp_path):
    """A cache whose "emulator" is this machine's Python: ``device up`` then runs real TVM RPC
    servers (``_rpc_server_main.py``, forkserver and all) without qemu, in seconds."""
    layout = provisioning.EmulatorLayout(tmp_path / "cache")
    layout.wrapper.parent.mkdir(parents=True)
    layout.wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    layout.wrapper.chmod(0o755)
    layout.stamp.write_text(json.dumps(provisioning._stamp_content(layout)))  # "provisioned"
    return layout


@pytest.mark.rpc
@pytest.mark.timeout(240)
def test_up_count_starts_servers_under_one_key_and_status_lists_each(tmp_path):
    layout = _host_python_device(tmp_path)
    key, port = "emu-farm-test", free_port()
    try:
        status = device.up(key=key, tracker_port=port, cache_dir=layout.cache_dir, count=2, timeout=120)
        servers = [s for s in status["servers"] if s["key"] == key]
        assert len(servers) == 2 and len({s["address"] for s in servers}) == 2, status["servers"]
        assert all(s["state"] == "free" for s in servers), servers
        assert status["pids"][f"server:{key}"]["alive"] and status["pids"][f"server:{key}#2"]["alive"]
        assert service.server_logs(key, port, layout.cache_dir)[1].name == f"server-{key}-{port}-2.log"
        again = device.up(key=key, tracker_port=port, cache_dir=layout.cache_dir, count=2, timeout=120)
        assert again["pids"] == status["pids"]  # reused, nothing started
        # one session open: the tracker counts 1 of 2 free; the one serving it is busy
        session = remote.request_session("127.0.0.1", port, key, session_timeout=60, wait_timeout=30)
        try:
            deadline = time.monotonic() + 30
            while (busy := device.status(tracker_port=port, cache_dir=layout.cache_dir)["servers"]) and \
                    sorted(s["state"] for s in busy) != ["busy", "free"]:
                assert time.monotonic() < deadline, busy
                time.sleep(0.5)
        finally:
            session = None
        proc = tvmshuffle("device", "status", "--tracker-port", port, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert len([ln for ln in proc.stdout.splitlines() if ln.strip().startswith(key)]) == 2, proc.stdout
    finally:
        stopped = device.down(tracker_port=port, cache_dir=layout.cache_dir)
    assert sorted(s.split(" ")[0] for s in stopped) == [f"server:{key}", f"server:{key}#2", "tracker"]


def test_device_count_must_be_positive():
    proc = tvmshuffle("device", "up", "--count", 0, timeout=60)
    assert proc.returncode == 2 and proc.stderr.splitlines() == ["tvmshuffle: error: --count must be >= 1, got 0"]


def test_non_loopback_host_warns(caplog):
    with caplog.at_level(logging.WARNING, logger=service.__name__):
        assert service.warn_if_exposed("0.0.0.0")
        assert not service.warn_if_exposed("127.0.0.1")
    assert len(caplog.records) == 1 and "runs any code" in caplog.records[0].getMessage()


def _pgid(pid):
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
