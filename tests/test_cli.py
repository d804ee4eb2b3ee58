"""The CLI as a user runs it: real subprocesses, exit codes, one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

#: one xdist worker runs this module: its module-scoped fixtures are built once
pytestmark = pytest.mark.xdist_group("cli")

TVMSHUFFLE = [sys.executable, "-m", "tvmshuffle"]
SMALL = "shufflenet_v1_g3_x0_25"


def cli(*args, cwd=None):
    return subprocess.run([*TVMSHUFFLE, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tvmshuffle: error:"), lines[0]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_models_json_lists_the_zoo():
    proc = cli("models", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 29
    for row in rows:
        assert isinstance(row["macs"], int) and row["macs"] > 0
        assert isinstance(row["params"], int) and row["params"] > 0
    names = {row["name"] for row in rows}
    assert {"shufflenet_v1_g3_x1_0", "shufflenet_v2_x1_0", "shufflenet_v1_g8_x0_25"} <= names


def test_models_table_prints_every_model():
    proc = cli("models")
    assert proc.returncode == 0, proc.stderr
    assert sum(line.startswith("shufflenet_") for line in proc.stdout.splitlines()) == 29


@pytest.mark.slow
def test_compile_then_run_host(tmp_path):
    lib = tmp_path / "m.so"
    proc = cli("compile", SMALL, "--target", "host", "--input-shape", "1,3,96,96", "-o", lib)
    assert proc.returncode == 0, proc.stderr
    assert lib.exists() and "kernels" in proc.stdout
    x = np.random.default_rng(1).standard_normal((1, 3, 96, 96)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    proc = cli("run", lib, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy",
               "--repeat", "3", "--print-time")
    assert proc.returncode == 0, proc.stderr
    assert "median" in proc.stdout and "ms" in proc.stdout
    y = np.load(tmp_path / "y.npy")

    import torch

    from tvmshuffle.models import zoo

    with torch.no_grad():
        expected = zoo.get_model(SMALL)(torch.from_numpy(x)).numpy()
    assert y.shape == (1, 1000)
    assert np.abs(y - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


# --------------------------------------------------------------------------- bad input


def test_unknown_model_name():
    assert_one_line_error(cli("compile", "shufflenet_v1_g3_x1", "-o", "x.so"), "shufflenet_v1_g3_x1")


def test_missing_model_file(tmp_path):
    assert_one_line_error(cli("compile", tmp_path / "nope.onnx", "-o", tmp_path / "x.so"), "nope.onnx")


def test_corrupt_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage" * 100)
    assert_one_line_error(cli("compile", bad, "-o", tmp_path / "x.so"), "bad.onnx")


def test_corrupt_pt2_file(tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip archive" * 10)
    assert_one_line_error(cli("compile", bad, "-o", tmp_path / "x.so"), "bad.pt2")


def test_unknown_target_preset(tmp_path):
    assert_one_line_error(cli("compile", SMALL, "--target", "pixel9000", "-o", tmp_path / "x.so"), "pixel9000")


def test_android_without_ndk(tmp_path, monkeypatch):
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    assert_one_line_error(cli("compile", SMALL, "--target", "android-arm64", "-o", tmp_path / "x.so"),
                          "ANDROID_NDK_HOME")


def test_missing_cross_compiler(tmp_path):
    assert_one_line_error(
        cli("compile", SMALL, "--target", "aarch64", "--cross-compiler", "no-such-g++", "-o", tmp_path / "x.so"),
        "no-such-g++",
    )


@pytest.mark.parametrize("shape", ["1,3,224", "1,3,a,224", "1,3,0,224", "1,4,224,224"])
def test_bad_input_shape(tmp_path, shape):
    assert_one_line_error(cli("compile", SMALL, "--input-shape", shape, "-o", tmp_path / "x.so"), "--input-shape")


@pytest.mark.parametrize("command", ["compile", "models"])
def test_zoo_models_take_3_channels(tmp_path, command):
    args = [SMALL, "-o", tmp_path / "x.so"] if command == "compile" else []
    assert_one_line_error(cli(command, *args, "--input-shape", "1,4,32,32"), "--input-shape", "3 input channels", "C=4")


def _four_channel_model():
    import torch

    class FourChannels(torch.nn.Module):  # not a ShuffleNet: e.g. RGB + depth
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    torch.manual_seed(0)
    return FourChannels().eval()


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_own_model_with_4_input_channels(tmp_path, suffix):
    """--input-shape's C is the model's business for a user's file (C=3 was enforced for all)."""
    import torch

    module = _four_channel_model()
    x = np.random.default_rng(2).standard_normal((1, 4, 32, 32)).astype("float32")
    path = tmp_path / f"rgbd{suffix}"
    if suffix == ".pt2":
        torch.export.save(torch.export.export(module, (torch.from_numpy(x),)), path)
    else:
        torch.onnx.export(module, (torch.from_numpy(x),), path, dynamo=False, opset_version=17)
    lib = tmp_path / "m.so"
    proc = cli("compile", path, "--input-shape", "1,4,32,32", "-o", lib)
    assert proc.returncode == 0, proc.stderr
    np.save(tmp_path / "x.npy", x)
    proc = cli("run", lib, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout  # run checks against PyTorch / ONNX Runtime itself
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("command, args, flag", [
    ("compile", [SMALL, "-o", "{out}/m.so"], "-o"),
    ("run", ["{tmp}/m.so", "--input", "{tmp}/x.npy", "--output", "{out}/y.npy"], "--output"),
    ("bench", [SMALL, "--json", "{out}/b.json"], "--json"),
    ("bench", [SMALL, "--plot", "{out}/b.png"], "--plot"),
    ("study", ["--model", SMALL, "-o", "{out}/study"], "-o"),
])
def test_output_below_a_regular_file(tmp_path, command, args, flag):
    """An output path below a regular file: one line naming the flag, before the slow part
    (it was a NotADirectoryError traceback after it)."""
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "sub"
    proc = cli(command, *(a.format(out=out, tmp=tmp_path) for a in args))
    assert_one_line_error(proc, f"{flag} {out}", f"{tmp_path / 'file'} is not a directory")


def test_unsupported_op(tmp_path):
    import torch

    class Bessel(torch.nn.Module):
        def forward(self, x):
            return torch.special.bessel_j0(x)

    path = tmp_path / "bessel.pt2"
    torch.export.save(torch.export.export(Bessel(), (torch.randn(1, 3, 8, 8),)), path)
    assert_one_line_error(cli("compile", path, "-o", tmp_path / "x.so"), "bessel.pt2", "bessel_j0")


def test_unsupported_onnx_op(tmp_path):
    import torch

    class Det(torch.nn.Module):
        def forward(self, x):
            return torch.det(x[0, 0])

    path = tmp_path / "det.onnx"
    torch.onnx.export(Det(), (torch.randn(1, 3, 4, 4),), path, dynamo=False, opset_version=17)
    assert_one_line_error(cli("compile", path, "-o", tmp_path / "x.so"), "det.onnx", "Det")


def test_missing_weights_file(tmp_path):
    assert_one_line_error(cli("compile", SMALL, "--weights", tmp_path / "w.pt", "-o", tmp_path / "x.so"), "w.pt")


def test_run_missing_library(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), "float32"))
    assert_one_line_error(cli("run", tmp_path / "none.so", "--input", tmp_path / "x.npy"), "none.so")


def test_run_not_a_library(tmp_path):
    (tmp_path / "junk.so").write_bytes(b"junk")
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), "float32"))
    assert_one_line_error(cli("run", tmp_path / "junk.so", "--input", tmp_path / "x.npy"), "junk.so")


def test_missing_flag_is_one_line():
    assert_one_line_error(cli("compile", SMALL), "--output")


def test_verbose_shows_traceback():
    proc = cli("--verbose", "compile", "no_such_model", "-o", "x.so")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr


def test_tune_without_tracker_is_one_line(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = cli("tune", SMALL, "--input-shape", "1,3,64,64", "--trials", 2, "--rpc-tracker", f"127.0.0.1:{port}",
               "--rpc-key", "phone", "--tuning-records", tmp_path / "r")
    assert_one_line_error(proc, f"127.0.0.1:{port}")


def test_tune_cross_target_needs_a_device(tmp_path):
    proc = cli("tune", SMALL, "--input-shape", "1,3,64,64", "--trials", 2, "--target", "aarch64",
               "--tuning-records", tmp_path / "r")
    assert_one_line_error(proc, "--rpc-tracker")


def test_compile_refuses_records_of_another_target(tmp_path):
    records = tmp_path / "r"
    records.mkdir()
    (records / "target.json").write_text('{"preset": "aarch64", "target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}}')
    (records / "database_workload.json").write_text("")
    (records / "database_tuning_record.json").write_text("")
    proc = cli("compile", SMALL, "--input-shape", "1,3,64,64", "--tuning-records", records, "-o", tmp_path / "m.so")
    assert_one_line_error(proc, "aarch64")


# --------------------------------------------------------------------------- tvmc habits: --fill-mode, --print-top,
# --dump-code, tune's measurement flags


@pytest.fixture(scope="module")
def small_lib(tmp_path_factory):
    """(library, compile's stdout): SMALL at 64x64 for the host, with every --dump-code kind."""
    lib = tmp_path_factory.mktemp("small") / "m.so"
    proc = cli("compile", SMALL, "--input-shape", "1,3,64,64", "-o", lib, "--dump-code", "asm,tir",
               "--dump-code", "relax")
    assert proc.returncode == 0, proc.stderr
    return lib, proc.stdout


@pytest.mark.slow
def test_compile_dump_code_host(small_lib):
    import re

    lib, stdout = small_lib
    for kind, suffix in (("asm", ".s"), ("tir", ".tir.py"), ("relax", ".relax.py")):
        path = lib.parent / (lib.name + suffix)
        assert path.is_file() and path.stat().st_size > 0, path
        assert f"{kind}: {path}" in stdout
    asm = (lib.parent / "m.so.s").read_text()
    # x86 vector code: FMA or AVX registers (the host target names this CPU)
    assert re.search(r"\bvfmadd\w*\s|%[yz]mm\d+", asm), "no AVX code in the host assembly"
    tir = (lib.parent / "m.so.tir.py").read_text()
    assert "@T.prim_func" in tir and "shuffle_group_conv2d" in tir
    relax = (lib.parent / "m.so.relax.py").read_text()
    assert "@R.function" in relax and "R.call_tir" in relax and "@T.prim_func" not in relax


@pytest.mark.parametrize("value", ["ir", "asm,", "asm,llvm"])
def test_compile_bad_dump_code(tmp_path, value):
    assert_one_line_error(cli("compile", SMALL, "-o", tmp_path / "x.so", "--dump-code", value), "--dump-code")
    assert not (tmp_path / "x.so").exists()


@pytest.mark.slow
def test_run_fill_mode_equals_the_same_input_as_npy(small_lib, tmp_path):
    lib, _ = small_lib
    for mode, make in (("zeros", np.zeros), ("ones", np.ones)):
        np.save(tmp_path / f"{mode}.npy", make((1, 3, 64, 64), "float32"))
        filled = cli("run", lib, "--fill-mode", mode, "--no-check", "--output", tmp_path / f"{mode}-fill.npy")
        given = cli("run", lib, "--input", tmp_path / f"{mode}.npy", "--no-check",
                    "--output", tmp_path / f"{mode}-npy.npy")
        assert filled.returncode == 0 and given.returncode == 0, filled.stderr + given.stderr
        np.testing.assert_array_equal(np.load(tmp_path / f"{mode}-fill.npy"), np.load(tmp_path / f"{mode}-npy.npy"))
    assert not np.array_equal(np.load(tmp_path / "zeros-fill.npy"), np.load(tmp_path / "ones-fill.npy"))


@pytest.mark.slow
def test_run_fill_mode_random_print_top_and_check(small_lib):
    lib, _ = small_lib
    proc = cli("run", lib, "--fill-mode", "random", "--print-top", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    summary = next(i for i, ln in enumerate(lines) if ln.startswith("output float32[1, 1000]"))
    assert "top 3 (rank class score)" in lines[summary]
    rows = [ln.split() for ln in lines[summary + 1: summary + 4]]
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    scores = [float(r[2]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert all(0 <= int(r[1]) < 1000 for r in rows)
    # the generated input is what the reference is given, too (seed 0: the same each run)
    assert "-> OK" in proc.stdout


@pytest.mark.slow
@pytest.mark.rpc
def test_run_fill_mode_over_rpc(small_lib, rpc_env, tmp_path):
    lib, _ = small_lib
    proc = cli("run", lib, "--fill-mode", "ones", "--no-check", "--output", tmp_path / "y.npy",
               "--rpc-tracker", rpc_env.tracker, "--rpc-key", rpc_env.key)
    assert proc.returncode == 0, proc.stderr
    from tvmshuffle import runtime

    expected = runtime.run(runtime.load_library(lib), np.ones((1, 3, 64, 64), "float32")).output
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-5)


def test_run_fill_mode_needs_the_metadata(tmp_path):
    (tmp_path / "bare.so").write_bytes(b"junk")
    assert_one_line_error(cli("run", tmp_path / "bare.so", "--fill-mode", "zeros"), "--fill-mode", "bare.so.json")


@pytest.mark.parametrize("args,needle", [
    ((), "--fill-mode"),  # neither --input nor --fill-mode
    (("--input", "x.npy", "--fill-mode", "ones"), "--fill-mode"),  # both
    (("--fill-mode", "twos"), "--fill-mode"),
    (("--fill-mode", "ones", "--print-top", "0"), "--print-top"),
    (("--fill-mode", "ones", "--print-top", "-2"), "--print-top"),
    (("--fill-mode", "ones", "--print-top", "three"), "--print-top"),
])
def test_run_bad_new_flags(tmp_path, args, needle):
    (tmp_path / "m.so").write_bytes(b"junk")
    assert_one_line_error(cli("run", tmp_path / "m.so", *args), needle)


@pytest.mark.parametrize("args,needle", [
    (("--number", "0"), "--number"),
    (("--repeat", "0"), "--repeat"),
    (("--repeat", "-3"), "--repeat"),
    (("--min-repeat-ms", "-1"), "--min-repeat-ms"),
    (("--timeout", "-5"), "--timeout"),
    (("--timeout", "0"), "--timeout"),
    (("--number", "two"), "--number"),
    (("--search-population", "0"), "--search-population"),
])
def test_tune_bad_measurement_flags(tmp_path, args, needle):
    proc = cli("tune", SMALL, "--input-shape", "1,3,64,64", "--trials", 2, "--tuning-records", tmp_path / "r", *args)
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "r").exists()  # checked before anything is imported or written


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tune_ends_with_the_duel_unless_no_duel(tmp_path):
    """``tune`` ends by timing each kernel's best record against its hand schedule
    (``hand_wins.json``, see tvmshuffle/duel.py); ``--no-duel`` skips that."""
    procs = {}
    for name, flags in (("duel", ()), ("no-duel", ("--no-duel",))):
        procs[name] = cli("tune", SMALL, "--input-shape", "1,3,64,64", "--trials", 2, "--search-population", 32,
                          "--tuning-records", tmp_path / name, *flags)
        assert procs[name].returncode == 0, procs[name].stderr
    assert "duel of each kernel's best record" in procs["duel"].stdout + procs["duel"].stderr
    assert json.loads((tmp_path / "duel" / "hand_wins.json").read_text()) is not None
    assert "duel of" not in procs["no-duel"].stdout + procs["no-duel"].stderr
    assert not (tmp_path / "no-duel" / "hand_wins.json").exists()
