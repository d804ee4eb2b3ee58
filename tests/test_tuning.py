"""MetaSchedule tuning: local and over RPC, records on disk, resume after a kill, errors.

Real processes throughout (builders, runners, an RPC tracker and server, a tuning process
that gets SIGKILLed); budgets are a handful of trials on a tiny conv2d+relu → dense model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import tvmshuffle
from tvmshuffle import bench, pipeline, records, remote, runtime, targets, tuning
from tvmshuffle.tuning import candidates
from tvmshuffle.records import (RECORD_FILE, TARGET_FILE, WORKLOAD_FILE, apply_records, records_dir_for, records_key,
                                set_aside, write_target_json)
from tvmshuffle.errors import UserError

from conftest import free_port, kill_group, rpc_tracker_and_server, wait_exit

#: the tests of the tuned records (``tuned_local``, a module-scoped tune) share one xdist worker,
#: so it is tuned once; the others spread over the workers (``tiny`` is quick to build again)
TUNED_LOCAL = pytest.mark.xdist_group("tuning-local")

#: small and quick: tiny population, one measurement per candidate; MetaSchedule's own design
#: space (the tiny conv has a hand schedule, stem.py; seeding is tested in test_schedules.py)
FAST = dict(search_population=32, number=1, repeat=1, min_repeat_ms=0, progress=False,
            builder_timeout_sec=120, runner_timeout_sec=60, seed_schedules="none")


def _lower(mod, preset):
    from tvmshuffle import pipeline

    return pipeline.lower(mod, preset, fuse=False)


@pytest.fixture(scope="module")
def tiny():
    """(lowered module, host preset, input, PyTorch's output): conv2d+relu → dense."""
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = model(x).numpy()
    mod = from_exported_program(torch.export.export(model, (x,)))
    preset = targets.resolve("host")
    return _lower(mod, preset), preset, x.numpy(), expected


def _run(mod, preset, records_dir, x, force=False):
    """Build as the pipeline does (records applied) and run: (output, tuned kernels)."""
    import tvm

    executable, tuned, _ = pipeline.build(mod, preset, records_dir, force_records=force)
    vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
    return runtime.run(vm, x).output, tuned


def _lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def tuned_local(tiny, tmp_path_factory):
    mod, preset, _, _ = tiny
    records = tmp_path_factory.mktemp("local") / "host" / "tiny"
    result = tuning.tune(mod, preset, tuning.TuneConfig(trials=6, records_dir=records, **FAST))
    return result


# --------------------------------------------------------------------------------------------
# local


@TUNED_LOCAL
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_tune_local_records_apply_and_output(tiny, tuned_local):
    mod, preset, x, expected = tiny
    res = tuned_local
    rec = res.records_dir
    assert res.trials_run >= 6 and res.trials_total == res.trials_run
    assert len(_lines(rec / RECORD_FILE)) == res.trials_total
    assert len(_lines(rec / WORKLOAD_FILE)) == len(res.tasks) == 3
    assert sum(t.trials for t in res.tasks) == res.trials_total
    assert all(t.best_us is not None and t.best_us > 0 for t in res.tasks)
    assert res.est_latency_ms == pytest.approx(sum(t.weight * t.best_us for t in res.tasks) / 1e3)

    stored = json.loads((rec / TARGET_FILE).read_text())
    assert stored["preset"] == "host"
    assert stored["target"] == json.loads(str(targets.tvm_target(preset)))

    curve = json.loads((rec / tuning.CURVE_FILE).read_text())
    assert [p["trials"] for p in curve] == sorted(p["trials"] for p in curve)
    assert curve[-1]["trials"] == res.trials_total
    assert curve[-1]["est_latency_ms"] == pytest.approx(res.est_latency_ms)
    assert (rec / "logs").is_dir()

    out, tuned = _run(mod, preset, rec, x)
    assert tuned >= 1
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@TUNED_LOCAL
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_budget_already_met_does_nothing(tiny, tuned_local):
    mod, preset, _, _ = tiny
    before = (tuned_local.records_dir / RECORD_FILE).read_bytes()
    res = tuning.tune(mod, preset, tuning.TuneConfig(
        trials=tuned_local.trials_total, records_dir=tuned_local.records_dir, **FAST))
    assert res.trials_run == 0
    assert res.trials_total == tuned_local.trials_total
    assert (tuned_local.records_dir / RECORD_FILE).read_bytes() == before


@TUNED_LOCAL
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_apply_tolerates_a_torn_last_line(tiny, tuned_local, tmp_path, caplog):
    mod, preset, x, expected = tiny
    rec = tmp_path / "rec"
    rec.mkdir()
    for name in (WORKLOAD_FILE, RECORD_FILE, TARGET_FILE):
        (rec / name).write_bytes((tuned_local.records_dir / name).read_bytes())
    whole = (rec / RECORD_FILE).read_bytes()
    last = whole.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    (rec / RECORD_FILE).write_bytes(whole + last[: len(last) // 2])  # killed mid-append
    with caplog.at_level(logging.WARNING, logger="tvmshuffle.tuning"):
        out, tuned = _run(mod, preset, rec, x)
    assert tuned >= 1
    assert "truncated last line" in caplog.text
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    # applying does not modify the records
    assert (rec / RECORD_FILE).read_bytes() == whole + last[: len(last) // 2]


# --------------------------------------------------------------------------------------------
# measurement settings (tune --number --repeat --min-repeat-ms --timeout)


@pytest.mark.timeout(60)
def test_measurement_settings_reach_the_builder_and_runners(tmp_path):
    config = tuning.TuneConfig(trials=2, records_dir=tmp_path / "r", number=2, repeat=3, min_repeat_ms=7,
                               builder_timeout_sec=11, runner_timeout_sec=13, progress=False)
    runner, ms_runner = candidates.make_runner(config)
    try:
        assert ms_runner is runner  # local
        ev = runner.evaluator_config
        assert (ev.number, ev.repeat, ev.min_repeat_ms, ev.enable_cpu_cache_flush) == (2, 3, 7, True)  # cold
        assert runner.timeout_sec == 13
    finally:
        runner.pool.shutdown()
    builder = candidates.make_builder(config)
    assert builder.timeout_sec == 11 and builder.pool._timeout == 11
    candidates.shutdown_builder(builder)
    # over RPC: the same evaluator; each candidate's run bounded by the timeout + the device wait
    rpc = tuning.TuneConfig(trials=2, records_dir=tmp_path / "r", number=4, repeat=2, min_repeat_ms=0,
                            runner_timeout_sec=13, device_wait_sec=5, rpc_tracker="127.0.0.1:1", rpc_key="k")
    runner, ms_runner = candidates.make_runner(rpc)
    try:
        ev = runner.evaluator_config
        assert (ev.number, ev.repeat, ev.min_repeat_ms) == (4, 2, 0)
        assert runner.pool._timeout == 18
        assert ms_runner is not runner
    finally:
        runner.pool.shutdown(wait=False)


@pytest.mark.timeout(120)
def test_builder_workers_live_across_batches(tmp_path, monkeypatch):
    """The builder's worker processes serve call after call (a fresh one imports tvm and torch,
    ~5 s, which MetaSchedule's LocalBuilder paid on every batch and every seed), are replaced
    after BUILDS_PER_WORKER builds and after a timeout, and end with :func:`shutdown_builder`."""
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    a = te.placeholder((64,), name="a")
    mod = tvm.IRModule({"main": te.create_prim_func([a, te.compute((64,), lambda i: a[i] * 2.0, name="b")])})
    job = ms.builder.BuilderInput(mod, targets.tvm_target(targets.resolve("host")))
    monkeypatch.setattr(candidates, "BUILDS_PER_WORKER", 3)  # its 4th build is a fresh process's
    builder = candidates.make_builder(tuning.TuneConfig(trials=1, records_dir=tmp_path, builder_workers=1,
                                                        progress=False))
    pool = builder.pool

    def worker_pid():
        (worker,) = pool._worker_map.values()
        return worker._proc.pid

    try:
        results = builder.build([job])
        assert results[0].error_msg is None and Path(results[0].artifact_path).is_file()
        first = worker_pid()
        assert [r.error_msg for r in builder.build([job, job])] == [None, None]
        assert worker_pid() == first  # the same process: no second import
        assert builder.build([job])[0].error_msg is None
        assert worker_pid() != first
        pool._timeout = 1e-4  # a build past its bound: the message MetaSchedule's builder gives
        assert "LocalBuilder: Timeout, killed after" in builder.build([job])[0].error_msg
    finally:
        candidates.shutdown_builder(builder)
    assert all(w._proc is None or w._proc.poll() is not None for w in pool._worker_map.values())


def test_measurement_defaults_follow_the_cache(tmp_path):
    """Cold (the default): one call a sample, each after the flush, 10 samples; warm:
    MetaSchedule's 3 runs for at least 100 ms; a flag given wins over either."""
    cold = tuning.TuneConfig(trials=2, records_dir=tmp_path)
    assert (cold.cache, cold.number, cold.repeat, cold.min_repeat_ms) == ("cold", 1, 10, 0)
    assert (cold.builder_timeout_sec, cold.runner_timeout_sec) == (60.0, 60.0)
    warm = tuning.TuneConfig(trials=2, records_dir=tmp_path, cache="warm", repeat=2)
    assert (warm.number, warm.repeat, warm.min_repeat_ms) == (3, 2, 100)
    runner, _ = candidates.make_runner(warm)
    try:
        assert runner.evaluator_config.enable_cpu_cache_flush is False
    finally:
        runner.pool.shutdown()
    with pytest.raises(UserError, match="--cache"):
        tuning.TuneConfig(trials=2, records_dir=tmp_path, cache="lukewarm")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_records_timed_warm_are_not_added_to_cold(tiny, tmp_path):
    """Warm times are shorter than cold ones of the same kernel: a database mixing them would
    rank by how each was timed. Tuning cold into warm records is refused, naming the flag, and
    the records are left as they were; --cache warm adds to them."""
    mod, preset, _, _ = tiny
    rec = tmp_path / "rec"
    tuning.tune(mod, preset, tuning.TuneConfig(trials=2, records_dir=rec, cache="warm", **FAST))
    assert json.loads((rec / TARGET_FILE).read_text())["cache"] == "warm"
    before = (rec / RECORD_FILE).read_text()
    with pytest.raises(UserError, match=r"--cache cold: .* timed warm; give --cache warm"):
        tuning.tune(mod, preset, tuning.TuneConfig(trials=4, records_dir=rec, **FAST))
    assert (rec / RECORD_FILE).read_text() == before
    res = tuning.tune(mod, preset, tuning.TuneConfig(trials=4, records_dir=rec, cache="warm", **FAST))
    assert res.trials_total >= 4


@pytest.mark.parametrize("option,value,flag", [
    ("number", 0, "--number"), ("number", -1, "--number"), ("repeat", 0, "--repeat"),
    ("min_repeat_ms", -1, "--min-repeat-ms"), ("builder_timeout_sec", 0, "--timeout"),
    ("runner_timeout_sec", -2.5, "--timeout"), ("runner_timeout_sec", float("inf"), "--timeout"),
])
def test_bad_measurement_settings(tmp_path, option, value, flag):
    with pytest.raises(UserError, match=flag):
        tuning.TuneConfig(trials=2, records_dir=tmp_path, **{option: value})


def test_a_candidate_is_timed_by_the_median_of_its_samples():
    """MetaSchedule ranks by the mean of ``run_secs``: one preempted sample (seen: 1145 us among
    ~85 us ones) would rank the candidate behind slower ones. The record keeps the median."""
    samples = [88.8e-6, 85.8e-6, 84.7e-6, 86.2e-6, 82.2e-6, 85.7e-6, 81.8e-6, 81.9e-6, 1144.7e-6, 119.3e-6]
    assert candidates.candidate_time(samples) == [pytest.approx(85.75e-6)]
    assert sum(samples) / len(samples) > 2 * 85.75e-6  # what the mean would have ranked it by
    assert candidates.candidate_time([3.0, 1.0]) == [2.0]
    assert candidates.candidate_time([]) == []  # nothing measured stays nothing


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_tiny_tune_records_one_time_per_candidate(tiny, tmp_path):
    """Each candidate is timed ``repeat`` times (cold: each after the flush) and its record keeps
    one time, the median (:func:`candidates.candidate_time`)."""
    mod, preset, _, _ = tiny
    rec = tmp_path / "rec"
    res = tuning.tune(mod, preset, tuning.TuneConfig(
        trials=2, records_dir=rec, **{**FAST, "repeat": 3, "runner_timeout_sec": 30, "builder_timeout_sec": 60}))
    assert res.trials_run >= 2
    lines = [json.loads(ln) for ln in _lines(rec / RECORD_FILE)]
    assert len(lines) == res.trials_total
    run_secs = [record[1] for _, record in lines]  # a line: [workload, [trace, run_secs, target, args]]
    measured = [r for r in run_secs if r and max(r) < 1e9]
    assert measured and all(len(r) == 1 and 0 < r[0] < 1 for r in measured), run_secs


# --------------------------------------------------------------------------------------------
# refusing records


def _fake_records(path: Path, preset_name: str) -> Path:
    path.mkdir(parents=True)
    (path / WORKLOAD_FILE).write_text("")
    (path / RECORD_FILE).write_text("")
    write_target_json(path, targets.resolve(preset_name))
    return path


@pytest.mark.timeout(60)
def test_apply_refuses_records_of_another_target(tiny, tmp_path):
    mod, preset, _, _ = tiny
    rec = _fake_records(tmp_path / "aarch64" / "tiny", "aarch64")
    with pytest.raises(UserError, match=r"tuned for target aarch64.*not for host.*15549"):
        apply_records(mod, preset, rec)
    # and tuning refuses to add host records to them
    with pytest.raises(UserError, match="refusing to add to"):
        tuning.tune(mod, preset, tuning.TuneConfig(trials=4, records_dir=rec, **FAST))


def test_records_from_before_the_host_features_apply(tmp_path):
    """Records whose target lacks the LLVM features the host preset adds (targets.X86_HOST_FEATURES:
    how LLVM lowers a load, not which schedule fits) apply to this CPU; a feature the user chose
    is still a target of its own."""
    host = targets.resolve("host")
    rec = _fake_records(tmp_path / "host" / "m", "host")
    stored = json.loads((rec / TARGET_FILE).read_text())
    if targets.host_is_x86():
        assert stored["target"]["mattr"] == list(targets.X86_HOST_FEATURES)
    stored["target"].pop("mattr", None)
    (rec / TARGET_FILE).write_text(json.dumps(stored))
    assert records.check_target(rec, host, "apply") and records.set_aside(rec, host) is None

    stored["target"]["mattr"] = ["+avx512f"]
    (rec / TARGET_FILE).write_text(json.dumps(stored))
    with pytest.raises(UserError, match=r"avx512f.*refusing to apply"):
        records.check_target(rec, host, "apply")


@TUNED_LOCAL
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_records_of_another_cpu_are_set_aside_with_a_note(tiny, tuned_local, tmp_path, caplog):
    """Same ISA, another -mcpu: a note naming both CPUs and the tune command, nothing applied;
    --force-records applies them; tuning into them is still refused."""
    mod, preset, x, expected = tiny
    rec = tmp_path / "host" / "tiny"
    shutil.copytree(tuned_local.records_dir, rec)
    stored = json.loads((rec / TARGET_FILE).read_text())
    ours = stored["target"].get("mcpu", "generic")
    stored["target"]["mcpu"] = "znver1" if ours != "znver1" else "znver4"
    (rec / TARGET_FILE).write_text(json.dumps(stored))

    with caplog.at_level(logging.WARNING, logger="tvmshuffle.tuning"):
        applied, tuned = apply_records(mod, preset, rec)
    assert tuned == 0
    note = " ".join(r.getMessage() for r in caplog.records)
    for needle in (f"tuned on {stored['target']['mcpu']}", f"this CPU is {ours}", "set aside",
                   "tvmshuffle tune", "--force-records"):
        assert needle in note, (needle, note)

    # what bench's tuned rows say instead of "0 kernels tuned"
    why = f"tuned on {stored['target']['mcpu']}, this CPU is {ours}"
    assert set_aside(rec, preset) == why
    assert bench.tuned_note(0, rec, set_aside(rec, preset)) == f"records set aside: {why} ({rec})"
    assert set_aside(rec, preset, force=True) is None and set_aside(tuned_local.records_dir, preset) is None

    out, forced = _run(mod, preset, rec, x, force=True)
    assert forced >= 1
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="refusing to add to"):
        tuning.tune(mod, preset, tuning.TuneConfig(trials=tuned_local.trials_total + 2, records_dir=rec, **FAST))


@pytest.mark.timeout(60)
def test_apply_refuses_missing_or_empty_dirs(tiny, tmp_path):
    mod, preset, _, _ = tiny
    with pytest.raises(UserError, match="no such directory"):
        apply_records(mod, preset, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no tuning database"):
        apply_records(mod, preset, tmp_path / "empty")
    rec = _fake_records(tmp_path / "untagged", "host")
    (rec / TARGET_FILE).unlink()
    with pytest.raises(UserError, match="no target.json"):
        apply_records(mod, preset, rec)


@pytest.mark.timeout(60)
def test_apply_empty_database_tunes_nothing(tiny, tmp_path):
    mod, preset, x, expected = tiny
    rec = _fake_records(tmp_path / "host" / "tiny", "host")
    out, tuned = _run(mod, preset, rec, x)
    assert tuned == 0
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_records_dir_for(monkeypatch, tmp_path):
    monkeypatch.delenv("TVMSHUFFLE_TUNING_LOGS", raising=False)
    repo_logs = Path(tvmshuffle.__file__).resolve().parent.parent / "tuning_logs"
    assert repo_logs.is_dir()  # the shipped records: the default root in a checkout
    rpi4, host = targets.resolve("rpi4"), targets.resolve("host")
    assert records_dir_for(rpi4, "shufflenet_v2_x1_0") == repo_logs / "rpi4/shufflenet_v2_x1_0"
    cpu = host.target["mcpu"]
    assert records_dir_for(host, "a/b.onnx", root=Path("/r")) == Path(f"/r/host-{cpu}/a_b.onnx")
    monkeypatch.setenv("TVMSHUFFLE_TUNING_LOGS", "/elsewhere")
    assert records_dir_for(host, "m") == Path(f"/elsewhere/host-{cpu}/m")


def test_each_cpu_has_its_own_records_dir(tmp_path):
    """The host's records dir names its CPU, so records tuned on one CPU are not found by a build
    on another; other_cpus names those that do have records of the model."""
    host = targets.resolve("host")
    other = dataclasses.replace(host, target={**host.target, "mcpu": "not-this-cpu"})
    assert records_dir_for(other, "m", tmp_path) != records_dir_for(host, "m", tmp_path)
    assert records.other_cpus(host, "m", tmp_path) == []
    theirs = records_dir_for(other, "m", tmp_path)
    theirs.mkdir(parents=True)
    (theirs / WORKLOAD_FILE).write_text("")
    records_dir_for(host, "m", tmp_path).mkdir(parents=True)
    (records_dir_for(host, "m", tmp_path) / WORKLOAD_FILE).write_text("")
    assert records.other_cpus(host, "m", tmp_path) == ["not-this-cpu"]
    assert records.other_cpus(host, "another-model", tmp_path) == []
    assert records.other_cpus(targets.resolve("rpi4"), "m", tmp_path) == []


def test_records_key_sets_apart_other_modules():
    assert records_key("m") == "m"
    assert records_key("m", fused=False) == "m-unfused"
    assert records_key("m", True, (1, 3, 224, 224)) == "m"
    assert records_key("m", False, (1, 3, 160, 128)) == "m-unfused-160x128"
    assert records_key("m", True, (4, 3, 224, 224)) == "m-b4"


# --------------------------------------------------------------------------------------------
# failures end the run with the worker's message


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_all_builds_failing_stops_with_the_builders_message(tiny, tmp_path):
    mod, preset, _, _ = tiny
    rec = tmp_path / "rec"
    config = tuning.TuneConfig(trials=6, records_dir=rec, **{**FAST, "builder_timeout_sec": 0.001})
    with pytest.raises(UserError, match=r"all \d+ builds .* failed: LocalBuilder: Timeout"):
        tuning.tune(mod, preset, config)
    # the builder's fault, not the schedules': the batch is not committed, no budget spent
    assert _lines(rec / RECORD_FILE) == []


@pytest.mark.timeout(10)
def test_tracker_not_there_is_a_user_error(tiny, tmp_path):
    mod, preset, _, _ = tiny
    port = free_port()
    config = tuning.TuneConfig(trials=4, records_dir=tmp_path / "r", rpc_tracker=f"127.0.0.1:{port}",
                               rpc_key="k", **FAST)
    with pytest.raises(UserError, match=rf"cannot reach RPC tracker 127\.0\.0\.1:{port}"):
        tuning.tune(mod, preset, config)
    assert not (tmp_path / "r").exists()  # checked before anything is written


@pytest.mark.timeout(15)
def test_tracker_that_does_not_answer_is_a_user_error(tmp_path):
    with socket.socket() as silent:  # accepts connections (kernel backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        with pytest.raises(UserError, match=rf"cannot reach RPC tracker 127\.0\.0\.1:{port}"):
            remote.check_rpc(f"127.0.0.1:{port}", "k", device_wait_sec=0, timeout=2.0)


@pytest.mark.rpc
@pytest.mark.timeout(90)
def test_key_with_no_device_is_a_user_error(rpc_env):
    start = time.monotonic()
    with pytest.raises(UserError, match=r"no device with key 'no-such-board'.*tvmshuffle-test-host"):
        remote.check_rpc(rpc_env.tracker, "no-such-board", device_wait_sec=1.0)
    assert time.monotonic() - start < 10
    assert remote.check_rpc(rpc_env.tracker, rpc_env.key, device_wait_sec=1.0) == 1


def test_cross_target_needs_a_device(tiny, tmp_path):
    mod, _, _, _ = tiny
    with pytest.raises(UserError, match="needs a device"):
        tuning.tune(mod, targets.resolve("aarch64"),
                    tuning.TuneConfig(trials=4, records_dir=tmp_path / "r"))


# --------------------------------------------------------------------------------------------
# RPC


@pytest.mark.slow
@pytest.mark.rpc
@pytest.mark.timeout(240)
def test_tune_over_rpc(tiny, rpc_env, tmp_path):
    mod, preset, x, expected = tiny
    rec = tmp_path / "rpc"
    res = tuning.tune(mod, preset, tuning.TuneConfig(
        trials=4, records_dir=rec, rpc_tracker=rpc_env.tracker, rpc_key=rpc_env.key,
        session_timeout_sec=30, device_wait_sec=30, **FAST))
    assert res.trials_run >= 4
    assert len(_lines(rec / RECORD_FILE)) == res.trials_total
    measured = [t for t in res.tasks if t.best_us is not None]
    assert measured, "no candidate ran on the RPC server"
    run_secs = [json.loads(ln)[1][1] for ln in _lines(rec / RECORD_FILE)]
    assert all(len(r) == 1 for r in run_secs if r and max(r) < 1e9), run_secs  # the median, as locally
    out, tuned = _run(mod, preset, rec, x)
    assert tuned >= 1
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.rpc
@pytest.mark.timeout(300)
def test_two_devices_under_one_key_both_serve_one_tuning_session(tiny, tmp_path, caplog):
    """Two servers registered under one key: the runner measures two candidates at once, and
    the tracker hands sessions to both (each server's log shows sessions); each session's pool
    configured first (``--threads 1 --affinity big``)."""
    mod, preset, _, _ = tiny
    with rpc_tracker_and_server(tmp_path, "tvmshuffle-test-two", servers=2) as env:
        assert remote.device_count(env.tracker, env.key) == 2
        with caplog.at_level(logging.INFO, logger=tuning.log.name):
            res = tuning.tune(mod, preset, tuning.TuneConfig(
                trials=8, trials_per_batch=4, records_dir=tmp_path / "rec", rpc_tracker=env.tracker,
                rpc_key=env.key, session_timeout_sec=30, device_wait_sec=30, threads=1, affinity="big", **FAST))
        assert res.trials_run >= 8 and any(t.best_us is not None for t in res.tasks)
        assert "candidates are measured with 1 threads" in caplog.text
        assert "2 device(s) with key 'tvmshuffle-test-two'" in caplog.text
        sessions = [log.read_text().count("connected from") for log in env.server_logs]
        assert len(sessions) == 2 and all(n >= 1 for n in sessions), sessions


@pytest.mark.rpc
@pytest.mark.timeout(120)
def test_runner_workers_follow_the_devices_registered(tmp_path):
    """The runner's pool is re-sized to the devices under the key before each batch (a second
    server registering between batches gives a second worker; the old pool is kept until the end)."""
    with rpc_tracker_and_server(tmp_path, "tvmshuffle-test-follow", servers=2) as env:
        config = tuning.TuneConfig(trials=2, records_dir=tmp_path / "r", rpc_tracker=env.tracker,
                                   rpc_key=env.key, **FAST)
        runner, ms_runner = candidates.make_runner(config, workers=1, follow_devices=True)
        try:
            assert runner.workers == 1
            first = runner.pool
            ms_runner.run([])  # a batch: the devices are re-read first
            assert runner.workers == 2 and runner.pool is not first and runner.retired_pools == [first]
            assert runner.pool._threadpool._max_workers == 2
        finally:
            candidates.shutdown_runner(runner)


# --------------------------------------------------------------------------------------------
# kill and resume

_TUNE_SCRIPT = textwrap.dedent("""
    import json, logging, sys
    from pathlib import Path
    import tvm
    from tvmshuffle import pipeline, runtime, targets, tuning
    logging.basicConfig(level=logging.INFO)
    mod = tvm.ir.load_json(Path(sys.argv[1]).read_text())
    config = tuning.TuneConfig(trials=int(sys.argv[3]), records_dir=Path(sys.argv[2]),
                               trials_per_batch=1, **json.loads(sys.argv[4]))
    tuning.tune(mod, targets.resolve("host"), config)
""")


def _start_tuner(tmp_path: Path, rec: Path, budget: int, log_name: str) -> subprocess.Popen:
    with open(tmp_path / log_name, "wb") as log:
        return subprocess.Popen(
            [sys.executable, str(tmp_path / "tune.py"), str(tmp_path / "mod.json"), str(rec),
             str(budget), json.dumps(FAST)],
            stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own group: builder/runner workers included
        )


def _wait_for_records(proc, records: Path, at_least: int, log: Path, timeout: float = 200) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if records.exists() and records.read_bytes().count(b"\n") >= at_least:
            return
        time.sleep(0.2)
    assert proc.poll() is None, log.read_text()[-3000:]
    raise AssertionError(f"fewer than {at_least} records within {timeout} s")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_and_sigkill_keep_records_and_rerun_resumes(tiny, tmp_path, caplog):
    import tvm
    from tvm.s_tir import meta_schedule as ms

    mod, preset, x, expected = tiny
    rec = tmp_path / "host" / "tiny"
    records = rec / RECORD_FILE
    (tmp_path / "mod.json").write_text(tvm.ir.save_json(mod))
    (tmp_path / "tune.py").write_text(_TUNE_SCRIPT)
    budget = 60  # far more than it gets to do before being stopped

    # Ctrl-C (to the whole process group, as a terminal does): stops after the batch
    proc = _start_tuner(tmp_path, rec, budget, "int.log")
    try:
        _wait_for_records(proc, records, 1, tmp_path / "int.log")
        os.killpg(proc.pid, signal.SIGINT)
        assert wait_exit(proc, 60), "the tuner did not stop within 60 s of Ctrl-C"
    finally:
        kill_group(proc)  # its workers, if any are left; reaps it
    log = (tmp_path / "int.log").read_text()
    assert proc.returncode != 0 and "KeyboardInterrupt" in log
    assert "are kept in" in log and "rerun to resume" in log
    after_int = len(_lines(records))
    assert after_int >= 1

    # SIGKILL mid-run: no chance to clean up
    proc = _start_tuner(tmp_path, rec, budget, "kill.log")
    try:
        _wait_for_records(proc, records, after_int + 1, tmp_path / "kill.log")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the tuner and its builder/runner workers
        kill_group(proc)

    # what was measured is on disk and loads
    kept = len(_lines(records))
    assert kept > after_int
    db = ms.database.JSONDatabase(path_workload=str(rec / WORKLOAD_FILE),
                                  path_tuning_record=str(records))
    assert len(db) == kept
    # the kill may also land mid-append: a torn last line must not break the rerun
    whole = records.read_bytes()
    records.write_bytes(whole + whole.rstrip(b"\n").rsplit(b"\n", 1)[-1][:40])

    # rerun: counts the old records against the budget, adds to them
    budget = kept + 3
    with caplog.at_level(logging.INFO, logger="tvmshuffle.tuning"):
        res = tuning.tune(mod, preset, tuning.TuneConfig(
            trials=budget, records_dir=rec, trials_per_batch=1, **FAST))
    assert "truncated last line" in caplog.text
    assert f"{kept} trials already in" in caplog.text
    assert res.trials_total - res.trials_run == kept
    assert res.trials_run == 3  # batches of 1: the budget is met exactly
    lines = _lines(records)
    assert len(lines) == res.trials_total == budget
    for line in lines:  # the torn line was dropped, not glued to the next append
        json.loads(line)
    curve = json.loads((rec / tuning.CURVE_FILE).read_text())
    assert curve[-1]["trials"] == res.trials_total

    out, tuned = _run(mod, preset, rec, x)
    assert tuned >= 1
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
