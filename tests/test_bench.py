"""tvmshuffle bench: every row, checked before timed, JSON + PNG."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from tvmshuffle import bench, frontend, pipeline, runtime, targets, tuning
from tvmshuffle.devices import LocalDevice
from tvmshuffle.kernels import Kernel
from tvmshuffle.profile import KernelTime
from tvmshuffle.records import records_dir_for, records_key

#: one xdist worker runs this module: its module-scoped fixtures are built once
pytestmark = pytest.mark.xdist_group("bench")

SMALL = "shufflenet_v1_g3_x0_25"
SHAPE = (1, 3, 64, 64)


@pytest.fixture(scope="module")
def records_root(tmp_path_factory):
    """A records root with a few trials for the small model, fused and unfused."""
    root = tmp_path_factory.mktemp("tuning_logs")
    preset = targets.resolve("host")
    imported = frontend.load(SMALL, SHAPE)
    for fused in (True, False):
        records = records_dir_for(preset, records_key(SMALL, fused, SHAPE), root)
        config = tuning.TuneConfig(trials=4, records_dir=records, trials_per_batch=2, search_population=32,
                                   progress=False, seed_schedules="none")  # CI time: no seed builds
        tuning.tune(pipeline.lower(imported.mod, preset, fuse=fused), preset, config)
    return root


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_bench_runs_every_row(records_root, tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run(
        [sys.executable, "-m", "tvmshuffle", "bench", SMALL, "--input-shape", ",".join(map(str, SHAPE)),
         "--tuning-records", str(records_root), "--threads", "1", "--repeat", "5",
         "--json", str(out_json), "--plot", str(out_png)],
        capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert report["threads"] == 1 and report["repeat"] == 5
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == set(bench.VARIANTS)
    for name, row in rows.items():
        assert row["correct"] is True, (name, row["note"])
        assert row["median_ms"] > 0 and len(row["samples_ms"]) == 5
        assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["vs_onnxruntime"] == pytest.approx(row["median_ms"] / rows["onnxruntime"]["median_ms"])
    for name in bench.TVM_VARIANTS:
        assert rows[name]["speedup_vs_untuned"] == pytest.approx(
            rows["tvm-untuned-unfused"]["median_ms"] / rows[name]["median_ms"])
    assert "kernels tuned" in rows["tvm-tuned-fused"]["note"]
    assert "with hand schedules" in rows["tvm-tuned-fused"]["note"]
    hand = int(rows["tvm-hand-fused"]["note"].split(" with hand schedules")[0].split()[-1])
    assert hand > 0 and "kernels tuned" not in rows["tvm-hand-fused"]["note"]
    for name in ("tvm-untuned-unfused", "tvm-untuned-fused"):  # --schedules none: TVM alone
        assert "hand" not in rows[name]["note"] and "tuned" not in rows[name]["note"]
    assert "| tvm-tuned-fused |" in proc.stdout  # the markdown table
    # stdout is the table alone (scripts/readme_figures.sh tees it into docs/<cpu>/bench-*.md);
    # the files written are said on stderr
    assert "wrote" not in proc.stdout
    assert f"wrote {out_json}" in proc.stderr and f"wrote {out_png}" in proc.stderr
    png = out_png.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    import matplotlib.image

    assert matplotlib.image.imread(out_png).shape[0] > 100


def test_missing_records_are_said_not_hidden(tmp_path):
    """No records for this CPU: the tuned rows say so, and name the CPUs that have some (another
    CPU's fused records here: they are not applied, each CPU's records live in a dir of its own)."""
    theirs = tmp_path / "host-not-this-cpu" / records_key(SMALL, True, SHAPE)
    theirs.mkdir(parents=True)
    (theirs / "database_workload.json").write_text("")
    report = bench.bench(SMALL, bench.BenchConfig(tuning_records=tmp_path, input_shape=SHAPE, repeat=2, threads=1))
    rows = {r.variant: r for r in report.rows}
    for name in ("tvm-tuned-unfused", "tvm-tuned-fused"):
        assert rows[name].median_ms is None and rows[name].correct is None
        assert "no tuning records" in rows[name].note
    assert "records of not-this-cpu are there, not of this CPU" in rows["tvm-tuned-fused"].note
    assert "not-this-cpu" not in rows["tvm-tuned-unfused"].note and "--no-fuse" in rows["tvm-tuned-unfused"].note
    for name in ("tvm-untuned-fused", "tvm-hand-fused"):
        assert rows[name].correct and rows[name].median_ms > 0


def test_tuned_note_names_records_relative(tmp_path, monkeypatch):
    """Reports (the README's tables) carried the absolute path of the machine they were made on."""
    from pathlib import Path

    from tvmshuffle import _shipped

    records = tmp_path / "tuning_logs" / "host" / "m"
    records.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert bench.tuned_note(28, records) == f"28 kernels tuned ({Path('tuning_logs/host/m')})"
    monkeypatch.chdir(records)
    assert bench.tuned_note(28, records) == "28 kernels tuned (.)"
    shipped = _shipped.path("tuning_logs") / "host-rocketlake" / "shufflenet_v1_g3_x1_0"  # seen from elsewhere
    assert bench.tuned_note(3, shipped) == f"3 kernels tuned ({Path('tuning_logs/host-rocketlake/shufflenet_v1_g3_x1_0')})"
    assert bench.tuned_note(3, Path("/elsewhere/r")) == "3 kernels tuned (/elsewhere/r)"


def test_wrong_output_is_reported_not_timed():
    """A real TVM build checked against another model's PyTorch output: wrong, and never timed."""
    import tvm

    preset = targets.resolve("host")
    imported = frontend.load(SMALL, SHAPE)
    executable, _, _ = pipeline.build(pipeline.lower(imported.mod, preset), preset)
    vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
    x = imported.random_input()
    other = frontend.load("shufflenet_v1_g3_x0_5", SHAPE).reference(x)  # same shape, other weights
    timed = []
    row = bench.measure(bench.Row("tvm-untuned-fused", "this CPU"),
                        lambda: vm["main"](tvm.runtime.tensor(x)).numpy(),
                        lambda: timed.append(1) or [1.0], other, 1e-4)
    assert row.correct is False and row.median_ms is None and timed == []
    assert "WRONG" in row.note
    right = bench.measure(bench.Row("tvm-untuned-fused", "this CPU"),
                          lambda: vm["main"](tvm.runtime.tensor(x)).numpy(),
                          lambda: [1.0, 2.0, 3.0], imported.reference(x), 1e-4)
    assert right.correct and right.median_ms == 2.0


def test_check_rejects_shape_and_nan():
    ok, err = runtime.check(np.ones((1, 10)), np.ones((1, 10)), 1e-4)
    assert ok and err == 0
    assert not runtime.check(np.ones((1, 9)), np.ones((1, 10)), 1e-4)[0]
    assert not runtime.check(np.full((1, 10), np.nan), np.ones((1, 10)), 1e-4)[0]


class _Recording(LocalDevice):
    """This CPU, noting in order what it is asked to time: a kernel alone ("kernel", from the
    step said before each) or the whole model (("model", samples))."""

    def __init__(self):
        super().__init__()
        self.asked = []

    def step(self, what, seconds=None):
        if what.startswith("timing kernel"):
            self.asked.append("kernel")
        super().step(what, seconds)

    def time(self, vm, repeat, number=1):
        self.asked.append(("model", repeat))
        return super().time(vm, repeat, number)


@pytest.mark.slow
def test_profile_kernels_sum_to_the_model(tmp_path):
    from tvmshuffle import profile
    from tvmshuffle.pipeline import CompileConfig, compile_model

    compiled = compile_model(SMALL, tmp_path / "m.so", CompileConfig(input_shape=SHAPE))
    device = _Recording()
    result = profile.profile_library(compiled.output, device=device)
    assert len(result.kernels) == compiled.kernels
    # the whole model's 5 samples (the default repeat) are taken among the kernels' timings, so
    # that the model and its kernels see the same phases of a machine whose speed drifts
    models = [i for i, what in enumerate(device.asked) if what != "kernel"]
    kernels = [i for i, what in enumerate(device.asked) if what == "kernel"]
    assert sum(device.asked[i][1] for i in models) == 5 and len(kernels) == compiled.kernels
    assert kernels[0] < models[1] and models[-1] < kernels[-1], device.asked
    assert all(k.median_ms > 0 for k in result.kernels)
    assert [k.total_ms for k in result.kernels] == sorted((k.total_ms for k in result.kernels), reverse=True)
    assert sum(k.share for k in result.kernels) == pytest.approx(1.0)
    # both figures and their gap (timings are a benchmark's business, not asserted here)
    assert result.total_ms > 0 and result.kernels_ms == pytest.approx(sum(k.median_ms * k.kernel.calls
                                                                          for k in result.kernels))
    assert result.as_dict()["gap_ms"] == pytest.approx(result.total_ms - result.kernels_ms)
    # every kernel also timed cold (caches flushed of all but its input before each call)
    assert all(k.cold_ms > 0 for k in result.kernels)
    assert result.as_dict()["kernels_cold_ms"] == pytest.approx(sum(k.cold_ms * k.kernel.calls for k in result.kernels))
    convs = [k for k in result.kernels if k.kernel.macs]
    assert convs and all(k.gflops > 0 for k in convs)
    text = profile.markdown(result)
    assert "GFLOP/s" in text and compiled.kernels + 4 == len(text.splitlines())
    assert f"gap {result.gap_ms:.3f} ms" in text.splitlines()[0]
    assert f"the kernels sum to {result.kernels_cold_ms:.3f} ms" in text.splitlines()[0]


def test_a_kernel_emptied_does_nothing_and_the_others_are_untouched():
    """``without_kernels``: the named kernel's body becomes a no-op (golden: the same PrimFunc,
    body ``Evaluate(0)``), a ``_prepacked`` name is found by its lowered name, and every other
    function is left as it was (negative case)."""
    import tvm

    from tvmshuffle import profile

    preset = targets.resolve("host")
    lowered = pipeline.lower(frontend.load(SMALL, SHAPE).mod, preset)
    scheduled, _, _ = pipeline.schedule(lowered, preset)
    prepacked = [gv.name_hint for gv, f in scheduled.functions_items() if gv.name_hint.endswith("_prepacked")]
    plain = [gv.name_hint for gv, f in scheduled.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc) and not gv.name_hint.endswith("_prepacked")]
    assert prepacked and plain
    chosen = {prepacked[0].removesuffix("_prepacked"), plain[0]}
    emptied = profile.without_kernels(scheduled, chosen)
    for gv, func in scheduled.functions_items():
        if gv.name_hint in (prepacked[0], plain[0]):
            tvm.ir.assert_structural_equal(emptied[gv.name_hint], func.with_body(tvm.tirx.Evaluate(0)))
            with pytest.raises(ValueError):
                tvm.ir.assert_structural_equal(emptied[gv.name_hint], func)
        else:
            tvm.ir.assert_structural_equal(emptied[gv.name_hint], func)


def test_kernel_groups_partition_the_kernels():
    import tvm

    from tvmshuffle import profile
    from tvmshuffle.tir_analysis import describe

    lowered = pipeline.lower(frontend.load(SMALL, SHAPE).mod, targets.resolve("host"))
    groups = profile.kernel_groups(lowered)
    names = [n for group in groups.values() for n in group]
    kernels = [gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert sorted(names) == sorted(kernels)  # each kernel in exactly one group
    assert {"conv+pool", "matmul", "pool", "injective", "other"} <= set(groups)  # pool: V1's average pools
    assert any(g.startswith("pointwise ") for g in groups)
    assert any(g.startswith("dw+pointwise ") for g in groups)  # every depthwise conv, with its 1x1
    assert "depthwise" not in groups and "conv" not in groups
    (stem,) = groups["conv+pool"]  # the stem (dense 3x3 stride 2 on the image) with its max pool
    layer = describe(lowered[stem])
    assert (layer.conv.kernel, layer.conv.stride, layer.conv.in_channels) == ((3, 3), (2, 2), 3)
    assert all(describe(lowered[name]).block == "pool_sum" for name in groups["pool"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_profile_in_the_model_covers_every_group(tmp_path):
    """``profile --in-model``: one row per kernel group with its kernels, calls and times alone
    (summed from the per-kernel rows), its cost in the model and the VM alone; in the markdown
    and the JSON (the figures themselves are a benchmark's business)."""
    from tvmshuffle import devices, profile
    from tvmshuffle.pipeline import CompileConfig

    result = profile.profile(SMALL, CompileConfig(input_shape=SHAPE), devices.open_device(), number=2, repeat=2,
                             in_the_model=True)
    lowered = pipeline.lower(frontend.load(SMALL, SHAPE).mod, targets.resolve("host"))
    assert sorted(g.group for g in result.in_model) == sorted(profile.kernel_groups(lowered))
    assert sum(g.calls for g in result.in_model) == sum(k.kernel.calls for k in result.kernels)
    assert sum(g.alone_ms for g in result.in_model) == pytest.approx(result.kernels_ms)
    assert result.vm_only_ms > 0 and result.total_ms > 0
    assert [g.in_model_ms for g in result.in_model] == sorted((g.in_model_ms for g in result.in_model), reverse=True)
    text = profile.markdown(result).split("**In the model**")[1]
    assert f"with every kernel emptied {result.vm_only_ms:.3f} ms" in text
    for g in result.in_model:
        low, high = g.in_model_range_ms
        assert low <= g.in_model_ms <= high
        share = "within noise" if g.within_noise else f"{g.in_model_ms / result.total_ms:.0%}"
        assert (f"| {g.group} | {len(g.kernels)} | {g.calls} | {g.alone_ms:.3f} |" in text
                and f"| {g.in_model_ms:.3f} ({low:.3f} to {high:.3f}) | {share} |" in text)
    as_json = result.as_dict()
    assert {g["group"] for g in as_json["in_model"]} == {g.group for g in result.in_model}
    assert all(len(g["in_model_range_ms"]) == 2 and isinstance(g["within_noise"], bool) for g in as_json["in_model"])
    assert as_json["vm_only_ms"] == result.vm_only_ms
    # without --in-model, no such rows: test_threads.py's test_profile_and_bench_with_threads_on_the_device


def test_a_groups_cost_in_the_model_is_taken_round_by_round():
    """``--in-model``: a group's cost is the whole model minus the model without it within each
    round, then the median of the rounds, with the lowest and highest round beside it: a slow
    spell that falls on a round slows both builds there and moves only that round's difference.
    Rounds that disagree on the sign mark the cost as within the noise; the markdown gives it no
    share."""
    from tvmshuffle import profile

    whole = [3.0, 3.0, 3.0, 3.0, 9.0, 9.0]  # 3 rounds of 2 samples; a slow spell in the last
    without = [2.0, 2.0, 2.0, 2.0, 8.5, 8.5]
    assert profile.round_costs(whole, without, 3) == (1.0, (0.5, 1.0))
    noisy = profile.round_costs([3.0, 3.1, 2.9], [3.05, 3.0, 3.0], 3)  # rounds of one sample
    assert noisy == (pytest.approx(-0.05), (pytest.approx(-0.1), pytest.approx(0.1)))
    group = profile.GroupCost("pool", ["max_pool2d"], 1, 0.05, None, *noisy)
    clear = profile.GroupCost("depthwise", ["fused_conv2d1"], 2, 0.2, None, *profile.round_costs(whole, without, 3))
    assert group.within_noise and not clear.within_noise
    kernel = KernelTime(Kernel("max_pool2d", [[1, 8, 8, 8]], [[1, 8, 4, 4]], 0, False, False), 0.05)
    result = profile.Profile("m", "here", 4.0, [kernel], [clear, group], 0.03)
    text = profile.markdown(result)
    assert "| 1.000 (0.500 to 1.000) | 25% |" in text
    assert "| -0.050 (-0.100 to 0.100) | within noise |" in text


def test_the_gap_sentence_never_gives_a_negative_share():
    """The profile's first line splits the gap between memory traffic (the kernels timed cold)
    and the rest only where the cold sum is below the whole model; where it is above (the model
    runs between its kernels warm and cold) memory traffic explains all of the gap, and a model
    no slower than its warm kernels has no gap to split."""
    from tvmshuffle import profile

    def head(total, warm, cold):
        kernel = KernelTime(Kernel("k", [[1]], [[1]], 0, False, False), warm, 1.0, cold)
        return profile.markdown(profile.Profile("m", "here", total, [kernel])).splitlines()[0]

    assert "memory traffic explains 1.000 ms of the gap, the VM's dispatch, allocations and thread wake-ups the " \
           "other 1.000 ms" in head(4.0, 2.0, 3.0)
    assert "more than the whole model, so memory traffic explains all of the gap" in head(4.0, 3.0, 4.5)
    assert "no gap to explain" in head(2.0, 3.0, 4.5)
    assert not any(re.search(r"-\d", h) for h in (head(4.0, 2.0, 3.0), head(4.0, 3.0, 4.5)))  # no negative figure


def test_variants_are_timed_in_interleaved_rounds():
    """Rounds of consecutive runs, the order rotating, each variant's preceded by a wait until
    the process is idle and untimed runs until ``settle_ms`` have passed: drift hits every
    variant alike, and no variant's samples are the one before's."""
    order = []
    rows = [bench.Row(name, "this CPU") for name in ("a", "b", "c")]
    pending = [(row, lambda name=row.variant: order.append(name) or float(len(order))) for row in rows]
    # each run "takes" as many ms as runs so far: here every run is past 1 ms, one settle run
    bench.time_interleaved(pending, warmup=1, repeat=5, settle_ms=1, rounds=2, idle=lambda: order.append("idle"))
    assert order == (["a", "b", "c"]  # warm-up
                     + ["idle", *"aaaa", "idle", *"bbbb", "idle", *"cccc"]  # round 1: settle + 3 samples each
                     + ["idle", *"bbb", "idle", *"ccc", "idle", *"aaa"])  # round 2: settle + 2
    assert [len(r.samples_ms) for r in rows] == [5, 5, 5]
    assert rows[0].samples_ms == [6.0, 7.0, 8.0, 29.0, 30.0] and rows[0].median_ms == 8.0
    # settle runs go on until their times add up to settle_ms: 2 + 3 + 4 >= 9 ms
    order.clear()
    bench.time_interleaved(pending[:1], warmup=1, repeat=2, settle_ms=9, rounds=1, idle=lambda: order.append("idle"))
    assert order == ["a", "idle", "a", "a", "a", "a", "a"] and rows[0].samples_ms == [6.0, 7.0]


_SPIN_SCRIPT = """
import sys, time, tvm
from tvmshuffle import bench, frontend, pipeline, runtime, targets
runtime.configure_local_threads(runtime.ThreadConfig(2, None))
imported = frontend.load(sys.argv[1], tuple(map(int, sys.argv[2].split(","))))
preset = targets.resolve("host")
executable, _, _ = pipeline.build(pipeline.lower(imported.mod, preset), preset, None, "hand")
vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
x = tvm.runtime.tensor(imported.random_input())

def runs():
    for _ in range(3):
        vm["main"](x)

def cpu_over(seconds):  # cores this process used over the next ``seconds``
    start = time.process_time()
    time.sleep(seconds)
    return (time.process_time() - start) / seconds

runs()
spinning = cpu_over(0.03)
runs()
bench.wait_until_idle()
print(spinning, cpu_over(0.1))
"""


def test_waiting_until_tvms_pool_stops_spinning():
    """After a run TVM's pool workers spin before they sleep (each on a core); a runtime timed
    next would share its cores with them. ``wait_until_idle`` returns once the process uses
    (almost) no CPU: measured by the process's CPU time, which other processes do not move.
    In a process of its own: a pool of 2 threads, as no earlier test configured it."""
    done = subprocess.run([sys.executable, "-c", _SPIN_SCRIPT, SMALL, ",".join(map(str, SHAPE))],
                          capture_output=True, text=True, timeout=300, check=True)
    spinning, after_wait = map(float, done.stdout.split())
    assert spinning > 0.2  # right after the runs the worker spins (negative case: not idle)
    assert after_wait < 0.1
