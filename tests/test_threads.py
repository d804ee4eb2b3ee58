"""``--threads`` and ``--affinity``: TVM's thread pool configured where the model runs, through
the RPC session on a device (``runtime.config_threadpool``), the same code here; tuning's
measuring sessions too. Real tracker and servers on 127.0.0.1."""

import json
import logging
import os
import subprocess
import sys

import pytest
from conftest import SMALL, SMALL_SHAPE, rpc_tracker_and_server

from tvmshuffle import remote, runtime, targets, tuning
from tvmshuffle.tuning import candidates
from tvmshuffle.records import TARGET_FILE
from tvmshuffle.errors import UserError
from tvmshuffle.runtime import ThreadConfig

#: one xdist worker runs this module: its module-scoped fixture is built once
pytestmark = pytest.mark.xdist_group("threads")

#: the server's pool starts with this many workers (on x86 TVM would take half the cores)
SERVER_THREADS = 2


@pytest.fixture(scope="module")
def pool_env(tmp_path_factory):
    """A tracker and a host RPC server whose TVM pool has SERVER_THREADS workers."""
    with rpc_tracker_and_server(tmp_path_factory.mktemp("rpc"), "tvmshuffle-test-threads",
                                server_env={"TVM_NUM_THREADS": str(SERVER_THREADS)}) as env:
        yield env


def remote_pool_size(session) -> int:
    """The size of the session's thread pool, reported by the device itself."""
    return int(session.get_function("runtime.NumThreads")())


@pytest.mark.rpc
@pytest.mark.timeout(120)
@pytest.mark.parametrize("threads,affinity", [(1, "big"), (2, "big"), (1, "little"), (1, "default"), (None, "big")])
def test_threads_and_affinity_reach_the_remote_pool(pool_env, threads, affinity):
    """Configured through a real session: the pool on the device reports the size asked for
    (``--affinity big`` alone: the big cores, all of them on this machine's equal cores)."""
    config = ThreadConfig(threads, affinity)
    with remote.Session(pool_env.tracker, pool_env.key, timeout=30, threads=config) as session:
        expected = threads or min(SERVER_THREADS, os.cpu_count())  # big: the (equal) cores, at most the workers
        assert session.threads == expected
        assert remote_pool_size(session.remote) == expected


@pytest.mark.rpc
@pytest.mark.timeout(120)
def test_little_cores_where_there_are_none_is_a_user_error(pool_env):
    """``--affinity little`` alone asks TVM for the little cores; where every core has one
    maximum frequency (this machine, the emulated device) it finds none and its pool would run
    parallel loops with 0 threads: a one-line error instead."""
    try:
        with remote.Session(pool_env.tracker, pool_env.key, timeout=30, threads=ThreadConfig(None, "little")) as s:
            assert s.threads >= 1 and remote_pool_size(s.remote) == s.threads  # a CPU with little cores
    except UserError as err:
        assert f"device {pool_env.key!r}: --affinity little gives TVM's thread pool no threads" in str(err)
        assert "\n" not in str(err)


@pytest.mark.rpc
@pytest.mark.timeout(120)
def test_pool_is_left_alone_unless_asked_and_more_threads_than_workers_is_said(pool_env, caplog):
    with remote.Session(pool_env.tracker, pool_env.key, timeout=30) as session:
        assert session.threads is None
        assert remote_pool_size(session.remote) == SERVER_THREADS  # each session starts afresh
    with caplog.at_level(logging.WARNING, logger=runtime.log.name):
        with remote.Session(pool_env.tracker, pool_env.key, timeout=30, threads=ThreadConfig(8, "big")) as session:
            assert session.threads == SERVER_THREADS == remote_pool_size(session.remote)
    assert f"runs {SERVER_THREADS} threads, not the 8 asked for" in caplog.text


@pytest.mark.rpc
@pytest.mark.timeout(120)
def test_tuning_sessions_are_configured_before_measuring(pool_env, tmp_path):
    """MetaSchedule's RPC runner opens each candidate's session with :func:`candidates._request_session`
    (its ``f_create_session``): the pool there has the threads asked for before anything is timed."""
    from tvm.s_tir import meta_schedule as ms

    config = tuning.TuneConfig(trials=2, records_dir=tmp_path / "r", rpc_tracker=pool_env.tracker,
                               rpc_key=pool_env.key, threads=1, affinity="big", progress=False)
    runner, _ = candidates.make_runner(config)
    try:
        create = runner.f_create_session
        assert create.keywords["threads"] == ThreadConfig(1, "big")
    finally:
        candidates.shutdown_runner(runner)
    host, port = remote.parse_tracker(pool_env.tracker)
    session = create(ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=pool_env.key,
                                         session_timeout_sec=30))
    assert remote_pool_size(session) == 1
    # here: LocalRunner's evaluator configures its worker's pool the same way
    local, _ = candidates.make_runner(tuning.TuneConfig(trials=2, records_dir=tmp_path / "l", threads=1, progress=False))
    try:
        assert local.f_run_evaluator.keywords["threads"] == ThreadConfig(1, None)
    finally:
        local.pool.shutdown()


def test_local_pool_is_configured_by_the_same_code():
    import tvm

    used = runtime.configure_threads(tvm.get_global_func, ThreadConfig(1, "default"))
    assert used == 1 == int(tvm.get_global_func("runtime.NumThreads")())


@pytest.mark.timeout(120)
def test_tune_threads_is_the_targets_num_cores(tmp_path):
    """``tune --threads 2``: the records' target has num-cores 2 (a zero budget writes it, tunes nothing)."""
    from tvmshuffle import frontend, pipeline

    preset = targets.resolve("host")
    imported = frontend.load(SMALL, SMALL_SHAPE)
    mod = pipeline.lower(imported.mod, preset)
    tuning.tune(mod, preset, tuning.TuneConfig(trials=0, records_dir=tmp_path, threads=2, progress=False))
    assert json.loads((tmp_path / TARGET_FILE).read_text())["target"]["num-cores"] == 2
    assert targets.tvm_target(targets.with_threads(targets.PRESETS["aarch64"], 3)).attrs["num-cores"] == 3


@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_bad_threads_in_the_api(value):
    with pytest.raises(UserError, match="--threads"):
        ThreadConfig(value)
    with pytest.raises(UserError, match="--affinity"):
        ThreadConfig(None, "middle")


def tvmshuffle(*args):
    return subprocess.run([sys.executable, "-m", "tvmshuffle", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


COMMANDS = {
    "run": ["run", "x.so", "--fill-mode", "zeros"],
    "bench": ["bench", SMALL],
    "profile": ["profile", SMALL],
    "study": ["study", "--model", SMALL],
    "tune": ["tune", SMALL, "--trials", 1],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("flags,message", [
    (["--threads", 0], "--threads must be an integer >= 1, got 0"),
    (["--affinity", "middle"], "argument --affinity: invalid choice: 'middle'"),
])
def test_bad_values_are_one_line_exit_2(command, flags, message):
    proc = tvmshuffle(*COMMANDS[command], *flags)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tvmshuffle: error:") and message in lines[0], proc.stderr


@pytest.mark.slow
@pytest.mark.rpc
@pytest.mark.timeout(300)
def test_run_with_threads_on_the_device_and_here(pool_env, small_host_library):
    """``run --threads 1 --affinity big``: the latency line says the pool's size where it ran."""
    rpc = ["--rpc-tracker", pool_env.tracker, "--rpc-key", pool_env.key]
    for where in (rpc, []):
        proc = tvmshuffle("run", small_host_library, "--fill-mode", "ones", "--print-time", "--repeat", 2,
                          "--threads", 1, "--affinity", "big", *where)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "-> OK" in proc.stdout and ", 1 threads: median" in proc.stdout, proc.stdout


@pytest.mark.slow
@pytest.mark.rpc
@pytest.mark.timeout(400)
def test_profile_and_bench_with_threads_on_the_device(pool_env, small_host_library, tmp_path):
    """``profile``/``bench`` over RPC with ``--threads 1 --affinity big``: the device's pool runs 1
    thread and the reports say so."""
    rpc = ["--rpc-tracker", pool_env.tracker, "--rpc-key", pool_env.key, "--threads", 1, "--affinity", "big"]
    proc = tvmshuffle("profile", small_host_library, "--number", 1, "--repeat", 1, "--json", *rpc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["where"].startswith(f"{pool_env.key} via {pool_env.tracker}, 1 threads")
    assert report["kernels"] and "in_model" not in report  # each group's cost in the model: only when asked
    proc = tvmshuffle("bench", SMALL, "--input-shape", ",".join(map(str, SMALL_SHAPE)), "--repeat", 2,
                      "--tuning-records", tmp_path / "none", "--json", tmp_path / "bench.json", *rpc)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert rows["tvm-untuned-fused"]["where"].endswith(", 1 threads") and rows["tvm-untuned-fused"]["correct"]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux thread affinity")
def test_the_calling_thread_is_kept_off_the_pool_workers_cores():
    """TVM pins each pool worker to a core and lets the calling thread (the first share of every
    parallel loop) roam: on a worker's core the two take turns and a kernel times ~1.8x. Inside
    ``apart_from_pool_workers`` the caller's cores are the others; after it, what they were.
    With a pool of one thread nothing changes, even though the workers of the larger pool before
    it are still alive and pinned (CI ran this test after another had configured two threads)."""
    before = os.sched_getaffinity(0)
    try:
        if len(before) >= 2:
            runtime.configure_local_threads(ThreadConfig(len(before), None), quiet=True)
            workers = runtime.pool_worker_cores()
            assert workers and workers < before, (workers, before)  # TVM pinned its workers
            with runtime.apart_from_pool_workers():
                inside = os.sched_getaffinity(0)
            assert inside == before - workers and inside
            assert os.sched_getaffinity(0) == before  # restored
        runtime.configure_local_threads(ThreadConfig(1, None), quiet=True)
        with runtime.apart_from_pool_workers():
            assert os.sched_getaffinity(0) == before
    finally:
        os.sched_setaffinity(0, before)
        runtime.configure_local_threads(ThreadConfig(len(before), None), quiet=True)
