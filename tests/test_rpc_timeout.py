"""Every remote step is bounded: against a real RPC server that stops answering (SIGSTOP of its
process group), each command ends within ``--rpc-timeout`` with one error line naming the device
key, what it was doing and where the server's log is; exit 2, no traceback."""

import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import SMALL, SMALL_SHAPE

from tvmshuffle import remote

SHAPE_FLAG = ",".join(map(str, SMALL_SHAPE))
TIMEOUT = 5  # --rpc-timeout of these tests: the device is frozen, so any bound is reached


def tvmshuffle(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "tvmshuffle", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def assert_timed_out(proc, env, doing):
    """Exit 2, and the last line says which device, doing what, and where its log is."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("tvmshuffle: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    line = errors[0]
    for needle in (repr(env.key), f"no answer for {TIMEOUT} s while {doing}", f"--rpc-timeout {TIMEOUT}", "log"):
        assert needle in line, (needle, line)


def rpc(env):
    return ["--rpc-tracker", env.tracker, "--rpc-key", env.key, "--rpc-timeout", TIMEOUT]


@pytest.mark.rpc
@pytest.mark.timeout(120)
def test_session_steps_are_bounded_in_process(own_rpc_env, small_host_library):
    """A session that was answering, then stops: the next step (upload) ends with DeviceTimeout."""
    x = np.zeros(SMALL_SHAPE, "float32")
    with remote.Session(own_rpc_env.tracker, own_rpc_env.key, timeout=TIMEOUT) as session:
        y = session.run(session.load_vm(small_host_library), x)  # the device answers
        assert y.shape == (1, 1000)
        own_rpc_env.stop_server()
        start = time.monotonic()
        with pytest.raises(remote.DeviceTimeout, match=f"no answer for {TIMEOUT} s while uploading small-host.so"):
            session.load_vm(small_host_library)
        assert time.monotonic() - start < TIMEOUT + 10


@pytest.mark.rpc
@pytest.mark.timeout(120)
def test_run_on_a_frozen_device(own_rpc_env, small_host_library, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros(SMALL_SHAPE, "float32"))
    own_rpc_env.stop_server()
    proc = tvmshuffle("run", small_host_library, "--input", tmp_path / "x.npy", *rpc(own_rpc_env))
    assert_timed_out(proc, own_rpc_env, "waiting for a session")


#: each command that compiles the model, then goes to the device (its flags besides --rpc-*)
COMPILING_COMMANDS = {
    "bench": lambda tmp: ["bench", SMALL, "--input-shape", SHAPE_FLAG, "--repeat", 1, "--threads", 1,
                          "--tuning-records", tmp / "none"],
    "profile": lambda tmp: ["profile", SMALL, "--input-shape", SHAPE_FLAG],
    "study": lambda tmp: ["study", "--model", SMALL, "--input-shape", SHAPE_FLAG, "--limit", 1, "-o", tmp / "study"],
}


@pytest.mark.slow
@pytest.mark.rpc
@pytest.mark.timeout(300)
@pytest.mark.parametrize("command", sorted(COMPILING_COMMANDS))
def test_compiling_command_on_a_frozen_device(own_rpc_env, tmp_path, command):
    own_rpc_env.stop_server()
    proc = tvmshuffle(*COMPILING_COMMANDS[command](tmp_path), *rpc(own_rpc_env))
    assert_timed_out(proc, own_rpc_env, "waiting for a session")


def test_rpc_timeout_must_be_positive(tmp_path):
    proc = tvmshuffle("run", tmp_path / "x.so", "--input", tmp_path / "x.npy", "--rpc-tracker", "127.0.0.1:9",
                      "--rpc-key", "k", "--rpc-timeout", 0)
    assert proc.returncode == 2 and "--rpc-timeout must be > 0" in proc.stderr.splitlines()[-1]


@pytest.mark.slow
@pytest.mark.rpc
@pytest.mark.timeout(400)
def test_tune_on_a_frozen_device_keeps_records(own_rpc_env, tmp_path):
    """The device's fault: tuning stops within the bound, says what it kept, resumes later."""
    records = tmp_path / "records"
    args = ["tune", SMALL, "--input-shape", SHAPE_FLAG, "--trials-per-batch", 2, "--timeout", 30,
            "--search-population", 32, "--number", 1, "--min-repeat-ms", 0,
            "--tuning-records", records, *rpc(own_rpc_env)]
    proc = tvmshuffle(*args, "--trials", 2)  # the device answers: records measured on it
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = (records / "database_tuning_record.json").read_text().count("\n")
    assert kept >= 2
    own_rpc_env.stop_server()
    start = time.monotonic()
    proc = tvmshuffle(*args, "--trials", kept + 4)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = [ln for ln in proc.stderr.splitlines() if ln.startswith("tvmshuffle: error:")][-1]
    assert own_rpc_env.key in last and "records so far kept" in last, last
    assert time.monotonic() - start < 180  # the bound (5 s a session, 30 s a candidate), not forever
    assert (records / "database_tuning_record.json").read_text().count("\n") >= kept
