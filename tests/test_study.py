"""tvmshuffle study: fused layers found and named, three schedules checked then timed, peak,
bandwidth and roofline computed, markdown + JSON + PNG written, tuning resumable."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from tvmshuffle import devices, study, targets
from tvmshuffle.study import hardware, measure
from tvmshuffle.errors import UserError
from tvmshuffle.records import records_dir_for
from tvmshuffle.runtime import ThreadConfig

#: one xdist worker runs this module: its module-scoped fixtures are built once
pytestmark = pytest.mark.xdist_group("study")

SMALL = "shufflenet_v2_x0_5"
SHAPE = (1, 3, 64, 64)
ROW_KEYS = {"layer", "kind", "schedule", "status", "ms", "gflops", "peak_fraction", "ai", "roofline_gflops",
            "roofline_fraction", "models", "calls", "note"}

#: hand schedules there (tvmshuffle.schedules): their rows must be "ok"; else they say "no hand schedule"


def small_config(**kwargs) -> study.StudyConfig:
    return study.StudyConfig(models=[SMALL], input_shape=SHAPE, number=3, repeat=3, progress=False,
                             bandwidth_mb=32, **kwargs)


@pytest.fixture(scope="module")
def layers():
    return study.fused_layers(small_config())


@pytest.fixture(scope="module")
def two_kinds(layers):
    """The first pointwise and the first depthwise layer of the small model."""
    return [next(l for l in layers if l.kind == "pointwise"), next(l for l in layers if l.kind == "depthwise")]


@pytest.mark.slow
def test_fused_layers_are_found_named_and_counted(layers):
    assert len(layers) >= 4
    assert len({l.layer for l in layers}) == len(layers)  # unique ids
    kinds = {l.kind for l in layers}
    assert {"pointwise", "depthwise"} <= kinds
    for layer in layers:
        assert layer.models == [SMALL] and layer.calls >= 1
        assert layer.macs > 0 and layer.bytes > 0 and layer.ai > 0
        assert layer.layer.startswith("pw " if layer.kind == "pointwise" else "dw3x3 s2 ")
        assert "+bias" in layer.layer  # the fused epilogue is named
    # a V2 unit's pointwise conv reads half its input: only that half counts as traffic
    half = next(l for l in layers if l.kind == "pointwise" and "/" in l.layer.split()[1])
    n, c, h, w = half.inputs[0]
    read = int(half.layer.split()[1].split("/")[0])
    weights_bias_out = sum(int(np.prod(s)) for s in half.inputs[1:]) + sum(int(np.prod(s)) for s in half.outputs)
    assert half.bytes == 4 * (n * read * h * w + weights_bias_out)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_study_of_a_pointwise_and_a_depthwise_layer(two_kinds, tmp_path):
    empty_root = tmp_path / "tuning_logs"
    report = study.run_study(small_config(tuning_records=empty_root), two_kinds)
    assert report.peak.gflops > 0 and "lanes" in report.peak.how
    # measured where the layers run (a TVM FMA kernel), the formula beside it as a cross-check
    assert report.peak.how.startswith("measured: TVM kernel of 12 register-resident") and "GHz" in report.peak.how
    assert report.bandwidth.gbps > 0 and "GB/s" in report.bandwidth.how
    assert report.where.startswith("this CPU") and not report.emulated
    assert len(report.rows) == 2 * len(study.SCHEDULES)
    rows = {(r.layer, r.schedule): r for r in report.rows}
    for layer in two_kinds:
        default, hand, tuned = (rows[layer.layer, s] for s in study.SCHEDULES)
        assert default.status == "ok", default
        assert hand.status == "ok", (layer.kind, hand.status, hand.note)
        assert hand.max_error <= 1e-4
        # no records in an empty root: missing, and the row says where it looked
        assert tuned.status == "missing" and tuned.ms is None and str(empty_root) in tuned.note
    for row in report.rows:
        assert row.ai > 0 and 0 < row.roofline_gflops <= report.peak.gflops
        if row.status == "ok":
            assert row.ms > 0 and row.gflops > 0
            assert row.gflops == pytest.approx(2 * row.macs / (row.ms * 1e6))
            assert row.peak_fraction == pytest.approx(row.gflops / report.peak.gflops)
            assert row.roofline_fraction == pytest.approx(row.gflops / row.roofline_gflops)

    out = study.write_outputs(report, tmp_path / "out")
    text = out["markdown"].read_text()
    assert f"Peak {report.peak.gflops:.1f} GFLOP/s" in text and "Memory bandwidth" in text
    table = [ln for ln in text.splitlines() if ln.startswith("| ")]
    assert table[0].startswith("| layer | kind |") and len(table) == 1 + len(two_kinds)
    for layer in two_kinds:
        assert any(ln.startswith(f"| {layer.layer} | {layer.kind} |") for ln in table)

    data = json.loads(out["json"].read_text())
    assert data["where"] == report.where and data["peak"]["gflops"] == report.peak.gflops
    assert data["bandwidth"]["gbps"] == report.bandwidth.gbps and data["bandwidth"]["how"]
    assert len(data["layers"]) == 6 and all(ROW_KEYS <= set(r) for r in data["layers"])
    assert {r["schedule"] for r in data["layers"]} == set(study.SCHEDULES)

    png = out["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    import matplotlib.image

    assert matplotlib.image.imread(out["plot"]).shape[0] > 100


@pytest.mark.slow
def test_a_wrong_schedule_is_reported_not_timed(two_kinds, tmp_path):
    """A variant with the layer's signature that writes zeros: wrong, and never timed."""
    from tvm import te

    layer = two_kinds[0]
    args = [te.placeholder(s, "float32", name=f"in{i}") for i, s in enumerate(layer.inputs)]
    zeros = te.compute(layer.outputs[0], lambda *i: te.const(0.0, "float32"), name="zeros")
    wrong = te.create_prim_func([*args, zeros])
    preset = targets.resolve("host")
    variants = {"default": (layer.func, "", "missing"), "hand": (wrong, "", "missing"),
                "tuned": (None, "no records", "missing")}
    with devices.open_device(None, threads=ThreadConfig(1)) as device:
        rows = {r.schedule: r for r in measure._measure_layer(layer, variants, device, preset, small_config(), 0)}
    assert rows["default"].status == "ok" and rows["default"].ms > 0
    assert rows["hand"].status.startswith("wrong") and rows["hand"].ms is None
    assert rows["tuned"].status == "missing" and rows["tuned"].note == "no records"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_trials_per_layer_tunes_the_layers_once(two_kinds, tmp_path):
    config = small_config(tuning_records=tmp_path, trials_per_layer=2,
                          tune_options={"search_population": 32, "trials_per_batch": 2})
    report = study.run_study(config, two_kinds)
    records = records_dir_for(targets.resolve("host"), study.STUDY_RECORDS, tmp_path)
    assert report.records_dir == str(records)
    tuned = [r for r in report.rows if r.schedule == "tuned"]
    assert len(tuned) == 2
    for row in tuned:
        assert row.status == "ok" and row.gflops > 0, (row.status, row.note)
        assert str(records) in row.note
    lines = (records / "database_tuning_record.json").read_text().count("\n")
    preset = targets.resolve("host")
    assert study.tune_layers(two_kinds, preset, records, config) is None  # resumed: nothing left
    assert (records / "database_tuning_record.json").read_text().count("\n") == lines


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="nosuchnet"):
        study.fused_layers(study.StudyConfig(models=["shufflenet_v2_x0_5", "nosuchnet"]))
    proc = subprocess.run([sys.executable, "-m", "tvmshuffle", "study", "--model", "shufflenet_v2_x1_O"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("tvmshuffle: error:") and "shufflenet_v2_x1_O" in lines[0]
    assert "did you mean" in lines[0] and "shufflenet_v2_x1_0" in lines[0].split("did you mean")[1]


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError, match="--trials-per-layer"):
        study.StudyConfig(trials_per_layer=-1)
    with pytest.raises(UserError, match="--rpc-tracker and --rpc-key"):
        study.StudyConfig(rpc_tracker="127.0.0.1:9190")
    with pytest.raises(UserError, match="--limit"):
        study.StudyConfig(layers_limit=0)
    with pytest.raises(UserError, match="--threads"):
        study.StudyConfig(threads=0)
    with pytest.raises(UserError, match="--affinity"):
        study.StudyConfig(affinity="middle")
    with pytest.raises(UserError, match="--target rpi4"):  # ARM code cannot run here
        study.fused_layers(study.StudyConfig(target="rpi4", models=[SMALL]))


def test_cpu_peak_spells_out_the_product():
    host = study.cpu_peak(targets.resolve("host"), threads=2)
    isa = study.isa_of(targets.resolve("host"))
    ghz, _ = study.host_clock_ghz()
    assert host.gflops == pytest.approx(2 * isa.lanes * isa.fma_units * 2 * ghz)
    assert f"{host.gflops:.1f} GFLOP/s" in host.how and "2 cores" in host.how and f"{isa.lanes} fp32 lanes" in host.how
    rpi4 = study.cpu_peak(targets.resolve("rpi4"))
    assert rpi4.gflops == pytest.approx(4 * 4 * 2 * 2 * 1.5) and "Cortex-A72" in rpi4.how and "upper bound" in rpi4.how
    unknown = study.cpu_peak(targets.resolve("aarch64"))
    assert unknown.gflops is None and "unknown" in unknown.how


def test_cpu_peak_of_an_arm_host_counts_neon(monkeypatch):
    """The host preset has no mtriple: on an AArch64 machine the peak counts 4 NEON lanes, not AVX2's 8."""
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(hardware, "host_clock_ghz", lambda: (2.0, "test clock"))
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: set())
    peak = study.cpu_peak(targets.resolve("host"), threads=2)
    assert peak.gflops == pytest.approx(2 * 4 * 2 * 2 * 2.0)
    assert "4 fp32 lanes (neon)" in peak.how


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cli_writes_the_three_files(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "tvmshuffle", "study", "--model", SMALL, "--input-shape", ",".join(map(str, SHAPE)),
         "--limit", "2", "--number", "2", "--repeat", "2", "--tuning-records", str(tmp_path / "none"),
         "-o", str(out), "--json"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert len(data["layers"]) == 2 * len(study.SCHEDULES)
    assert all(r["gflops"] > 0 for r in data["layers"] if r["status"] == "ok")
    assert {r["schedule"] for r in data["layers"] if r["status"] == "ok"} >= {"default"}
    assert data["peak"]["gflops"] > 0 and data["where"].startswith("this CPU")
    table = [ln for ln in (out / "study.md").read_text().splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + 2  # the header and one line per layer
    assert (out / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "study.json").read_text())["layers"] == data["layers"]


@pytest.mark.slow
@pytest.mark.rpc
@pytest.mark.timeout(600)
def test_study_on_an_rpc_device(two_kinds, rpc_env, tmp_path):
    """Over RPC: each built layer exported, uploaded and timed on the device (here a host server),
    its thread pool set through the session (``--threads 1 --affinity big``)."""
    config = small_config(tuning_records=tmp_path, rpc_tracker=rpc_env.tracker, rpc_key=rpc_env.key,
                          threads=1, affinity="big")
    report = study.run_study(config, two_kinds)
    assert report.where.startswith(f"{rpc_env.key} via {rpc_env.tracker}, 1 threads") and not report.emulated
    assert report.bandwidth.gbps > 0 and rpc_env.key in report.bandwidth.how
    rows = {(r.layer, r.schedule): r for r in report.rows}
    for layer in two_kinds:
        assert rows[layer.layer, "default"].status == "ok"
        assert rows[layer.layer, "hand"].status == "ok", rows[layer.layer, "hand"].note
    assert all(r.gflops > 0 and r.ms > 0 for r in report.rows if r.status == "ok")


def test_measured_peak_is_the_faster_of_the_isas_vector_widths():
    """The peak is measured at every width the ISA has (AVX-512: the hand schedules' 8 lanes and
    zmm's 16; a Xeon with two 512-bit FMA units runs zmm at twice the rate) and the faster taken."""
    preset = targets.resolve("host")
    isa = study.isa_of(preset)
    widths = [isa] + ([isa.wide] if isa.wide is not None else [])
    with devices.open_device() as device:
        peak = study.measure_peak(device, preset, threads=2, iterations=200_000)
    rates = re.findall(r"(\d+)-lane \((\w+)\) ([\d.]+)", peak.how.split("by width:")[1])
    assert [(int(lanes), name) for lanes, name, _ in rates] == [(w.lanes, w.name) for w in widths]
    assert peak.gflops > 0
    assert f"{peak.gflops:.1f}" == max(rates, key=lambda r: float(r[2]))[2]


@pytest.mark.parametrize("target,instruction", [("host", "vfmadd"), ("aarch64", "fmla")])
def test_peak_kernel_keeps_its_accumulators_in_registers(target, instruction):
    """The FMA chains that measure the peak run with no load or store between them (an
    accumulator kept in memory costs a store per FMA: a third of the peak, seen), and each
    thread runs all 12 chains at the hand schedules' width; AVX2 and NEON alike."""
    import tvm

    preset = targets.resolve(target)
    lanes = study.isa_of(preset).lanes
    lib = tvm.tirx.build(study.peak_kernel(2, lanes, 1000), targets.tvm_target(preset))
    asm = lib.inspect_source("asm").splitlines()
    at = [i for i, line in enumerate(asm) if instruction in line]
    assert len(at) >= 12, f"{len(at)} {instruction} instructions"
    loop = asm[at[0]:at[11] + 1]  # the first 12 FMAs: one iteration of the chains
    # a memory operand: "(%reg)" on x86, "[xN…]"/"[sp…]" on AArch64 (not a lane index "v2.s[0]")
    memory = [line for line in loop if "(" in line or re.search(r"\[(x\d+|sp)\b", line)]
    assert not memory, memory
