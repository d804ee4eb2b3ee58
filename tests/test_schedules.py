"""Hand schedules for the fused shuffle+conv kernels (``schedules/``): numerics, targets, CLI,
and the one database they share with the tuning records.

Every schedule is applied to a fused PrimFunc as the compiler makes it (shuffle_group_conv2d +
bias + ReLU / residual add, after FuseOps/FuseTIR), built for this CPU (AVX2) and for aarch64
(NEON), and its output compared with the NumPy reference of the operator.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tvm
from tvm import relax
from conftest import chain_module

from tvmshuffle import pipeline, schedules, targets
from tvmshuffle.errors import UserError
from tvmshuffle.records import (RECORD_FILE, TARGET_FILE, WORKLOAD_FILE, note_hand_measured, read_hand_measured,
                                read_hand_wins)
from tvmshuffle.ops import channel_shuffle_ref, emit_shuffle_gather, emit_shuffle_group_conv2d, shuffle_group_conv2d_ref

HOST = targets.resolve("host")
AARCH64 = targets.resolve("aarch64")
#: explicit x86 CPUs: one without AVX-512 (its code runs on any x86-64 with AVX2) and one with it
X86_AVX2 = targets.resolve('{"kind":"llvm","mtriple":"x86_64-linux-gnu","mcpu":"haswell"}')
X86_AVX512 = targets.resolve('{"kind":"llvm","mtriple":"x86_64-linux-gnu","mcpu":"skylake-avx512"}')


# name (kind_...) → (data shape, weight shape, operator params, epilogue)
LAYERS = {
    # V2 1x1 on half of a shuffled tensor, 28x28: pixel-vector form
    "pw_v2_half_28": ((1, 116, 28, 28), (58, 58, 1, 1), dict(shuffle_groups=2, channel_offset=58), "bias_relu"),
    # 7x7 plane (49 pixels, no vector divides): channel-vector form, weight repacked
    "pw_dense_7": ((1, 64, 7, 7), (32, 64, 1, 1), dict(shuffle_groups=4), "bias_relu"),
    # grouped 1x1 (conv groups 4) read through a shuffle, residual add epilogue
    "pw_grouped_14": ((1, 48, 14, 14), (48, 12, 1, 1), dict(shuffle_groups=3, conv_groups=4), "bias_add"),
    # odd channel count and 14x14: only half-width vectors divide
    "pw_half_lanes": ((1, 116, 14, 14), (58, 58, 1, 1), dict(shuffle_groups=2), "bias_relu"),
    # V2 1x 7x7 (232 channels, 29 vectors): 8-wide channel vectors, not 7-wide pixel ones
    "pw_v2_7": ((1, 464, 7, 7), (232, 232, 1, 1), dict(shuffle_groups=2, channel_offset=232), "bias_relu"),
    # V1 depthwise 3x3 stride 1 (g=3) and stride 2, bias only
    "dw_s1_28": ((1, 60, 28, 28), (60, 1, 3, 3), dict(shuffle_groups=3, conv_groups=60, padding=1), "bias"),
    "dw_s2_28": ((1, 120, 28, 28), (120, 1, 3, 3), dict(shuffle_groups=3, conv_groups=120, strides=2, padding=1), "bias"),
    # a 4x4 input to a 2x2 output: the stride must be read from the index, not the shapes
    "dw_s2_tiny": ((1, 16, 4, 4), (16, 1, 3, 3), dict(shuffle_groups=2, conv_groups=16, strides=2, padding=1), "bias"),
    # stride 2 on a 56x56 input (rows of 28: two AVX2 vectors): on x86 a padded plane and rows
    # left to LLVM's loop vectorizer, residual add
    "dw_s2_56": ((1, 24, 56, 56), (24, 1, 3, 3), dict(shuffle_groups=3, conv_groups=24, strides=2, padding=1), "bias_add"),
    # V2 depthwise stride 2 on an odd 7-wide output, residual add
    "dw_s2_odd": ((1, 48, 14, 14), (48, 1, 3, 3), dict(shuffle_groups=2, conv_groups=48, strides=2, padding=1), "bias_add"),
}


def _lowered(data_shape, weight_shape, params, epilogue, preset=HOST):
    """The lowered Relax module (one fused kernel) and the NumPy reference."""
    rng = np.random.default_rng(sum(data_shape) + sum(weight_shape))
    weight = rng.standard_normal(weight_shape).astype("float32")
    bias = rng.standard_normal((1, weight_shape[0], 1, 1)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(data_shape), "float32"))
    residual = None
    with bb.function("main", [x]):
        with bb.dataflow():
            y = emit_shuffle_group_conv2d(bb, x, relax.const(weight), **params)
            y = bb.emit(relax.op.add(y, relax.const(bias)))
            if epilogue == "bias_relu":
                y = bb.emit(relax.op.nn.relu(y))
            if epilogue == "bias_add":
                residual = rng.standard_normal([int(d) for d in y.ty.shape]).astype("float32")
                y = bb.emit(relax.op.add(y, relax.const(residual)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = pipeline.lower(bb.get(), preset, fuse=False)

    def reference(data):
        y = shuffle_group_conv2d_ref(data, weight, **params) + bias
        if epilogue == "bias_relu":
            y = np.maximum(y, 0)
        return y if residual is None else y + residual

    return mod, reference


def _fused_funcs(mod):
    return [f for _, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and schedules.describe(f) is not None]


def _run(executable, data):
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(data)).numpy()


def _hand_matches_reference_and_none(mod, data, expected, run=_run, preset=HOST):
    """Built with its one hand schedule (the default) and with ``--schedules none``: the hand
    build matches ``expected`` and, closer, the none build."""
    hand, _, n_hand = pipeline.build(mod, preset)
    none, _, n_none = pipeline.build(mod, preset, schedule_source="none")
    assert (n_hand, n_none) == (1, 0)
    out_hand, out_none = run(hand, data), run(none, data)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(out_hand, expected, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(out_hand, out_none, rtol=1e-5, atol=1e-5 * scale)


def _hand_builds_aarch64_elf(mod, library: Path) -> None:
    """Built for aarch64 with its one hand schedule: an AArch64 ELF shared library."""
    executable, _, n_hand = pipeline.build(mod, AARCH64)
    assert n_hand == 1
    header = pipeline.export(executable, AARCH64, library).read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_hand_schedule_matches_the_reference_op_and_the_default_build(name):
    data_shape, weight_shape, params, epilogue = LAYERS[name]
    mod, reference = _lowered(data_shape, weight_shape, params, epilogue)
    (func,) = _fused_funcs(mod)
    layer = schedules.describe(func)
    assert layer.kind == name.split("_")[0].replace("pw", "pointwise").replace("dw", "depthwise")
    assert schedules.schedule_primfunc(func, HOST) is not None, f"no hand schedule fits {layer}"

    data = np.random.default_rng(1).standard_normal(data_shape).astype("float32")
    _hand_matches_reference_and_none(mod, data, reference(data))
    assert schedules.describe(_fused_funcs(mod)[0]) is not None  # the caller's module is untouched


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_hand_schedule_builds_for_aarch64_neon(name, tmp_path):
    data_shape, weight_shape, params, epilogue = LAYERS[name]
    mod, _ = _lowered(data_shape, weight_shape, params, epilogue, preset=AARCH64)
    _hand_builds_aarch64_elf(mod, tmp_path / "layer.so")


#: pools (ShuffleNet's: the stem's max pool, V1's shortcut average pools; and an odd one)
POOLS = {
    "max_stem": ("max", (1, 24, 112, 112), 3, 2, 1),
    "avg_shortcut_14": ("avg", (1, 48, 14, 14), 3, 2, 1),  # 7x7 out
    "avg_odd_unpadded": ("avg", (1, 8, 9, 9), 2, 1, 0),  # stride 1, no padding stage
    "max_s2_odd_width": ("max", (1, 8, 15, 15), 3, 2, 1),  # 17 padded columns: no phase layout
}


def _pool_module(kind, shape, size, stride, padding, preset=HOST):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(shape), "float32"))
    if kind == "max":
        pool = relax.op.nn.max_pool2d(x, pool_size=size, strides=stride, padding=padding)
    else:  # as PyTorch's AvgPool2d (V1's shortcut): the padding counts
        pool = relax.op.nn.avg_pool2d(x, pool_size=size, strides=stride, padding=padding, count_include_pad=True)
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(pool)
        bb.emit_func_output(out)
    return pipeline.lower(bb.get(), preset, fuse=False)


def _pool_reference(kind, data, size, stride, padding):
    """NumPy pooling; the average counts the padding (PyTorch's default)."""
    fill = -np.inf if kind == "max" else 0.0
    padded = np.pad(data, [(0, 0), (0, 0), (padding, padding), (padding, padding)], constant_values=fill)
    out_h = (padded.shape[2] - size) // stride + 1
    out_w = (padded.shape[3] - size) // stride + 1
    windows = np.stack([padded[:, :, dy:dy + stride * out_h:stride, dx:dx + stride * out_w:stride]
                        for dy in range(size) for dx in range(size)])
    return windows.max(axis=0) if kind == "max" else windows.mean(axis=0)


@pytest.mark.parametrize("name", sorted(POOLS))
def test_pool_schedule_matches_numpy_and_the_default_build(name):
    kind, shape, size, stride, padding = POOLS[name]
    mod = _pool_module(kind, shape, size, stride, padding)
    (func,) = _fused_funcs(mod)
    layer = schedules.describe(func)
    assert (layer.kind, layer.kernel, layer.stride, layer.block) == (
        "pool", (size, size), (stride, stride), "pool_max" if kind == "max" else "pool_sum")
    assert (layer.pad_block is not None) == (padding > 0)
    data = np.random.default_rng(2).standard_normal(shape).astype("float32")
    _hand_matches_reference_and_none(mod, data, _pool_reference(kind, data, size, stride, padding))


@pytest.mark.parametrize("name", ["max_stem", "avg_shortcut_14"])
def test_pool_schedule_builds_for_aarch64_neon(name, tmp_path):
    mod = _pool_module(*POOLS[name], preset=AARCH64)
    _hand_builds_aarch64_elf(mod, tmp_path / "pool.so")


#: name → (channels, height, width): V2's gather + concatenation at a plane that one vector
#: covers (7x7), that takes a 49-float chunk (14x14), and one split into 64-float chunks (56x56)
INJECTIVE = {"gather_concat_7": (16, 7, 7), "gather_concat_14": (24, 14, 14), "gather_concat_56": (8, 56, 56)}


def _injective_module(channels, height, width, preset=HOST):
    """concat(channel_shuffle(x, 2)[:, :C/2], relu(x)): one fused kernel of three stages."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, channels, height, width], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            half = emit_shuffle_gather(bb, x, shuffle_groups=2, channel_offset=0, count=channels // 2)
            relu = bb.emit(relax.op.nn.relu(x))
            out = bb.emit_output(relax.op.concat([half, relu], axis=1))
        bb.emit_func_output(out)
    mod = pipeline.lower(bb.get(), preset, fuse=False)

    def reference(data):
        return np.concatenate([channel_shuffle_ref(data, 2)[:, :channels // 2], np.maximum(data, 0)], axis=1)

    return mod, reference


@pytest.mark.parametrize("name", sorted(INJECTIVE))
def test_injective_schedule_matches_numpy_and_the_default_build(name):
    mod, reference = _injective_module(*INJECTIVE[name])
    (func,) = _fused_funcs(mod)
    layer = schedules.describe(func)
    assert layer.kind == "injective" and layer.blocks[-1] == "T_concat" and len(layer.blocks) == 3
    data = np.random.default_rng(2).standard_normal((1, *INJECTIVE[name])).astype("float32")
    _hand_matches_reference_and_none(mod, data, reference(data))


def test_an_injective_kernel_with_two_outputs_is_left_alone():
    """Negative: V2's unfused concat + shuffle + split is one kernel writing two outputs; its
    stages cannot all be inlined into one, so it is not described (TVM's own lowering serves)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 8, 7, 7], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            both = bb.emit(relax.op.concat([x, relax.op.nn.relu(x)], axis=1))
            parts = bb.emit(relax.op.split(both, 2, axis=1))
            out = bb.emit_output(relax.Tuple([bb.emit(relax.TupleGetItem(parts, i)) for i in range(2)]))
        bb.emit_func_output(out)
    mod = pipeline.lower(bb.get(), HOST, fuse=False)
    funcs = [f for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 1 and schedules.describe(funcs[0]) is None
    after, n = schedules.apply(mod, HOST, "hand")
    assert n == 0
    tvm.ir.assert_structural_equal(after, mod)


def test_injective_schedule_builds_for_aarch64_neon(tmp_path):
    mod, _ = _injective_module(*INJECTIVE["gather_concat_14"], preset=AARCH64)
    _hand_builds_aarch64_elf(mod, tmp_path / "concat.so")


def test_isa_choice_per_target():
    assert schedules.isa_for(HOST).name in ("avx2", "avx512") and schedules.isa_for(HOST).lanes == 8
    assert schedules.isa_for(AARCH64).name == "neon" and schedules.isa_for(AARCH64).lanes == 4


@pytest.mark.parametrize("mcpu, isa", [("skylake-avx512", "avx512"), ("icelake-server", "avx512"),
                                       ("znver4", "avx512"), ("haswell", "avx2"), ("znver1", "avx2"),
                                       (None, "avx2")])
def test_x86_isa_follows_the_targets_cpu(mcpu, isa):
    """AVX-512 where the target's ``-mcpu`` has AVX-512F (LLVM's feature table), else AVX2 (also
    for a target naming no CPU): the hand schedules reason from the target, not this machine."""
    target = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", **({"mcpu": mcpu} if mcpu else {})}
    chosen = schedules.isa_for(targets.resolve(json.dumps(target)))
    assert chosen.name == isa and chosen.lanes == 8
    assert (chosen.wide is not None and chosen.wide.lanes == 16 and chosen.wide.registers == 32) == (isa == "avx512")


@pytest.mark.parametrize("machine, isa", [("aarch64", "neon"), ("arm64", "neon"), ("x86_64", "x86"),
                                          ("AMD64", "x86")])
def test_host_isa_is_this_machines(monkeypatch, machine, isa):
    """``host`` has no mtriple: its ISA is the machine's (an ARM host got AVX2 before); on x86
    AVX2 or AVX-512, as this CPU has it."""
    import platform

    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert schedules.isa_for(HOST).name in (("avx2", "avx512") if isa == "x86" else (isa,))
    assert schedules.isa_for(AARCH64).name == "neon"  # an mtriple still decides
    x86 = targets.resolve('{"kind":"llvm","mtriple":"x86_64-linux-gnu"}')
    assert schedules.isa_for(x86).name == "avx2"


def test_host_isa_unknown_machine(monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    with pytest.raises(UserError, match="riscv64"):
        schedules.isa_for(HOST)


def test_the_tile_follows_the_isa():
    """NEON has twice the registers at half the width: the pointwise tile differs."""
    mod, _ = _lowered(*LAYERS["pw_v2_half_28"])
    layer = schedules.describe(_fused_funcs(mod)[0])
    (pointwise,) = [m for m in schedules.load("hand") if m.NAME == "pointwise"]
    avx2 = pointwise._choose(layer, schedules.ISAS["avx2"])
    neon = pointwise._choose(layer, schedules.ISAS["neon"])
    assert avx2[1] == 8 and neon[1] == 4
    assert avx2[2] * avx2[3] <= 14 and neon[2] * neon[3] <= 30 and neon[2] * neon[3] > 14


def test_the_tile_avoids_vectors_loaded_in_pieces():
    """A 7-float vector (7 divides 49 and 196 pixels) is loaded as 4 + 2 + 1 floats and
    shuffled together; the tile takes full or half vectors where they fit, 7-wide only where
    nothing else does (negative case: 7x7 with 9 channels)."""
    (pointwise,) = [m for m in schedules.load("hand") if m.NAME == "pointwise"]
    avx2 = schedules.ISAS["avx2"]
    chosen = {}
    for name in ("pw_half_lanes", "pw_v2_7"):
        mod, _ = _lowered(*LAYERS[name])
        chosen[name] = pointwise._choose(schedules.describe(_fused_funcs(mod)[0]), avx2)
    assert chosen["pw_half_lanes"][:2] == ("pixel", 4)  # 116 channels x 196 pixels
    assert chosen["pw_v2_7"][:2] == ("channel", 8)  # 232 channels x 49 pixels
    mod, _ = _lowered((1, 18, 7, 7), (9, 9, 1, 1), dict(shuffle_groups=2), "bias_relu")
    assert pointwise._choose(schedules.describe(_fused_funcs(mod)[0]), avx2)[:2] == ("pixel", 7)


def test_avx512_takes_zmm_where_8_lanes_do_not_fill_whole_vectors():
    """On AVX-512 the tile is AVX2's where 8 lanes fill whole vectors (232 channels x 49 pixels:
    8-wide channel vectors) and a zmm one where they do not (116 channels x 196 pixels: 14 of 16
    lanes, against AVX2's 4-wide vectors)."""
    (pointwise,) = [m for m in schedules.load("hand") if m.NAME == "pointwise"]
    avx2, avx512 = schedules.ISAS["avx2"], schedules.ISAS["avx512"]
    for name, want in (("pw_half_lanes", ("pixel", 14)), ("pw_v2_7", ("channel", 8))):
        mod, _ = _lowered(*LAYERS[name])
        layer = schedules.describe(_fused_funcs(mod)[0])
        tile = pointwise._choose(layer, avx512)
        assert tile[:2] == want and tile[2] * tile[3] <= (30 if want[1] > 8 else 14), (name, tile)
        if want[1] == 8:  # negative: whole 8-lane vectors keep AVX2's tile
            assert tile == pointwise._choose(layer, avx2)


@pytest.mark.parametrize("preset", [X86_AVX2, X86_AVX512], ids=["avx2", "avx512"])
def test_pointwise_on_either_x86_isa_matches_the_reference(preset):
    """The 116-channel 14x14 layer built for an AVX2 CPU (4-wide vectors) and an AVX-512 one
    (zmm): the AVX-512 code has zmm FMAs; each matches NumPy and the none build where this CPU
    can run it (every x86-64 here runs the AVX2 build)."""
    from tvm.target import codegen

    data_shape, weight_shape, params, epilogue = LAYERS["pw_half_lanes"]
    mod, reference = _lowered(data_shape, weight_shape, params, epilogue, preset=preset)
    hand, _, n_hand = pipeline.build(mod, preset)
    assert n_hand == 1
    asm = "\n".join(m.inspect_source("asm") for m in pipeline._llvm_modules(hand.mod))
    has_zmm_fma = any("vfmadd" in line and "zmm" in line for line in asm.splitlines())
    assert has_zmm_fma == (preset is X86_AVX512)
    if preset is X86_AVX512 and not codegen.llvm_cpu_has_features(["avx512f"], targets.tvm_target(HOST)):
        pytest.skip("this CPU has no AVX-512F: the AVX-512 build is checked for zmm code above, not run")
    data = np.random.default_rng(1).standard_normal(data_shape).astype("float32")
    _hand_matches_reference_and_none(mod, data, reference(data), preset=preset)


# --------------------------------------------------------------------------- what is (not) touched


def test_describe_reads_the_fused_kernel():
    mod, _ = _lowered(*LAYERS["dw_s2_28"])
    layer = schedules.describe(_fused_funcs(mod)[0])
    assert (layer.kind, layer.stride, layer.kernel, layer.out_hw) == ("depthwise", (2, 2), (3, 3), (14, 14))
    assert layer.padded and layer.out_per_group == 1 and layer.epilogue == ["T_add"]
    mod, _ = _lowered(*LAYERS["pw_grouped_14"])
    layer = schedules.describe(_fused_funcs(mod)[0])
    assert (layer.kind, layer.out_per_group, layer.conv_groups) == ("pointwise", 12, 4)


def test_kernels_no_schedule_file_takes_are_left_alone():
    """Negative: a kernel with neither conv, matmul nor pool (a ReLU and a sum) is not a
    hand-schedule candidate; apply() leaves such a module structurally unchanged."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 8, 8, 8], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(x))
            out = bb.emit_output(relax.op.sum(y, axis=[2, 3]))
        bb.emit_func_output(out)
    mod = pipeline.lower(bb.get(), HOST, fuse=False)
    assert not _fused_funcs(mod)
    after, n = schedules.apply(mod, HOST, "hand")
    assert n == 0
    tvm.ir.assert_structural_equal(after, mod)


def test_a_layer_no_schedule_fits_is_left_alone():
    """Negative: a 3x3 dense conv through a shuffle is neither pointwise nor depthwise."""
    mod, _ = _lowered((1, 8, 8, 8), (8, 8, 3, 3), dict(shuffle_groups=2, padding=1), "bias")
    (func,) = _fused_funcs(mod)
    assert schedules.describe(func).kind == "other"
    assert schedules.schedule_primfunc(func, HOST) is None


# --------------------------------------------------------------------------- schedule files


def test_a_schedule_directory_can_be_the_users(tmp_path):
    (tmp_path / "broken.py").write_text("NAME = 'broken'\n")
    with pytest.raises(UserError, match=r"broken\.py: a schedule file must define NAME, matches and apply"):
        schedules.load(tmp_path)
    with pytest.raises(UserError, match="not 'hand', 'none' or a directory"):
        schedules.load(tmp_path / "missing")
    (tmp_path / "broken.py").unlink()
    src = schedules.shipped_dir() / "depthwise.py"
    (tmp_path / "only_depthwise.py").write_text(src.read_text())
    mods = schedules.load(tmp_path)
    assert [m.NAME for m in mods] == ["depthwise"]
    mod, _ = _lowered(*LAYERS["pw_v2_half_28"])
    assert schedules.apply(mod, HOST, tmp_path)[1] == 0  # no pointwise schedule in that dir


def test_a_schedule_built_on_another_names_the_file_it_misses(tmp_path):
    """``dw_pointwise.py`` loads ``depthwise.py`` and ``pointwise.py`` from its own directory
    (:func:`tvmshuffle.schedules.sibling`); copied without one of them, loading it is one line
    naming both files; with them, it uses the copies beside it."""
    (tmp_path / "dw_pointwise.py").write_text((schedules.shipped_dir() / "dw_pointwise.py").read_text())
    (tmp_path / "pointwise.py").write_text((schedules.shipped_dir() / "pointwise.py").read_text())
    with pytest.raises(UserError, match=r"dw_pointwise\.py: needs the schedule file depthwise\.py beside it"):
        schedules.load(tmp_path)
    (tmp_path / "depthwise.py").write_text((schedules.shipped_dir() / "depthwise.py").read_text())
    (dw_pointwise,) = [m for m in schedules.load(tmp_path) if m.NAME == "dw_pointwise"]
    assert Path(dw_pointwise.depthwise.__file__) == tmp_path / "depthwise.py"


# --------------------------------------------------------------------------- whole models


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "tvmshuffle", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["shufflenet_v2_x0_5", "shufflenet_v1_g3_x0_5"])
def test_a_default_compile_has_hand_schedules_and_matches_pytorch(model, tmp_path):
    library = tmp_path / "model.so"
    proc = _cli("compile", model, "--input-shape", "1,3,64,64", "-o", str(library))  # no --schedules
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(Path(str(library) + ".json").read_text())
    fused = sum(k["calls"] > 0 and k["fused_shuffle_conv"] for k in meta["kernels"])
    hand = int(re.search(r"(\d+) with hand schedules", proc.stdout).group(1))
    assert hand > fused > 0 and meta["schedules"] == "hand"  # the fused kernels and plain 1x1 / depthwise convs
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    proc = _cli("run", str(library), "--input", str(tmp_path / "x.npy"))  # checks against PyTorch
    assert proc.returncode == 0, proc.stderr
    assert "-> OK" in proc.stdout, proc.stdout  # the check against PyTorch passed


def _off_zoo_v1(path: Path) -> Path:
    """A ShuffleNet V1 (3 groups) at 1.25x width — 300/600/1200 channels, no zoo model has
    them — with two units a stage, saved as a ``.pt2`` for a 160x160 input: planes of 20x20,
    10x10 and 5x5 pixels, which no zoo model has either."""
    import torch
    from torch import nn

    from tvmshuffle.models.shufflenet_v1 import ShuffleUnitV1

    torch.manual_seed(0)
    units, c_in = [], 24
    for c in (300, 600, 1200):
        units += [ShuffleUnitV1(c_in, c, 2, 3, 1 if c_in == 24 else 3), ShuffleUnitV1(c, c, 1, 3, 3)]
        c_in = c
    model = nn.Sequential(nn.Conv2d(3, 24, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
                          nn.MaxPool2d(3, stride=2, padding=1), *units, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(c_in, 1000))
    for module in model.modules():  # BN statistics that are not the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.eval()
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 160, 160),)), path)
    return path


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_model_with_shapes_no_zoo_model_has_gets_hand_schedules_and_matches_pytorch(tmp_path):
    model = _off_zoo_v1(tmp_path / "v1_g3_1.25x.pt2")
    library = tmp_path / "model.so"
    proc = _cli("compile", str(model), "--input-shape", "1,3,160,160", "-o", str(library))
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(Path(str(library) + ".json").read_text())
    fused = sum(k["fused_shuffle_conv"] for k in meta["kernels"])
    hand = int(re.search(r"(\d+) with hand schedules", proc.stdout).group(1))
    assert fused > 0 and hand > fused, proc.stdout  # the fused kernels and the plain convs around them
    x = np.random.default_rng(0).standard_normal((1, 3, 160, 160)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    proc = _cli("run", str(library), "--input", str(tmp_path / "x.npy"))  # checks against PyTorch
    assert proc.returncode == 0, proc.stderr
    assert "-> OK" in proc.stdout, proc.stdout


def test_schedules_none_is_tvm_alone():
    """``--schedules none``: no kernel hand-scheduled, the module as TVM lowers it."""
    from conftest import SMALL, zoo_import

    mod = pipeline.lower(zoo_import(SMALL).mod, HOST)
    none, tuned, hand = pipeline.schedule(mod, HOST, schedule_source="none")
    assert (tuned, hand) == (0, 0)

    def scheduled(m):
        return sorted(gv.name_hint for gv, f in m.functions.items() if isinstance(f, tvm.tirx.PrimFunc)
                      and f.attrs is not None and f.attrs.get("tirx.is_scheduled", False))

    assert scheduled(none) == []
    default, _, hand = pipeline.schedule(mod, HOST)
    fitting = [f for f in _fused_funcs(mod) if schedules.schedule_for(f, HOST, schedules.load()) is not None]
    assert hand == len(fitting) > 0 and len(scheduled(default)) == hand


@pytest.mark.parametrize("command", ["compile", "tune", "profile"])
@pytest.mark.parametrize("value", ["nope", "default"])
def test_a_bad_schedules_flag_is_one_line(command, value, tmp_path):
    """A directory that is not there, or ``default`` (which meant no hand schedules before they
    were the default): one line naming the flag, exit 2, before the model is imported."""
    value = str(tmp_path / value) if value == "nope" else value
    extra = {"compile": ["-o", str(tmp_path / "m.so")], "tune": ["--trials", "1", "--tuning-records",
                                                                  str(tmp_path / "rec")], "profile": []}[command]
    proc = _cli(command, "shufflenet_v2_x0_5", "--schedules", value, *extra, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and f"--schedules {value}" in proc.stderr
    if value == "default":
        assert "--schedules none" in proc.stderr
    assert not (tmp_path / "rec").exists()


# --------------------------------------------------------------------------- hand schedules + records


def _records(path: Path, kernel, func, traces, measured: str | None) -> Path:
    """A records dir for this CPU holding one kernel's records, (trace, seconds) each;
    ``measured``: the fingerprint of the hand schedule they note as measured (None: none)."""
    from tvm.s_tir import meta_schedule as ms

    path.mkdir(parents=True)
    db = ms.database.JSONDatabase(str(path / WORKLOAD_FILE), str(path / RECORD_FILE),
                                  allow_missing=True, module_equality="structural")
    workload = db.commit_workload(kernel)
    target = targets.tvm_target(HOST)
    for trace, secs in traces:
        db.commit_tuning_record(ms.database.TuningRecord(trace, workload, [secs], target,
                                                         ms.arg_info.ArgInfo.from_prim_func(func)))
    meta = {"preset": "host", "target": json.loads(str(target)), "isa": schedules.isa_for(HOST).name}
    (path / TARGET_FILE).write_text(json.dumps(meta))
    if measured is not None:  # as `tvmshuffle tune` notes it after measuring the hand schedule
        note_hand_measured(path, schedules.workload_key(kernel), measured)
    return path


def test_the_database_picks_the_faster_of_a_record_and_a_hand_schedule(tmp_path):
    """One database (the hand schedules' ScheduleFnDatabase, then the records' JSONDatabase):
    where the records measured the hand schedule (``hand_schedules.json``), the kernel carries
    the faster of its record and another record; with no record for it, the hand schedule;
    records that never measured it, or measured another version of it (an edited schedule file,
    another ISA's), let the hand schedule go first; ``--schedules none`` takes the records' best."""
    from tvm import s_tir
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    mod, _ = _lowered(*LAYERS["pw_v2_half_28"])
    (gv,) = [g for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and schedules.describe(f)]
    func = mod[gv]
    kernel = _normalize_mod(func)
    hand_trace = schedules.database(HOST).db.query_schedule(kernel, targets.tvm_target(HOST), gv.name_hint).trace
    other = s_tir.Schedule(kernel)  # another schedule: the bias add inlined into the ReLU
    other.compute_inline(other.get_sblock("T_add"))
    expected = {"hand": pipeline.schedule(mod, HOST)[0][gv], "other": other.mod["main"],
                "none": pipeline.schedule(mod, HOST, schedule_source="none")[0][gv]}
    hand_print = schedules.hand_fingerprint(kernel, HOST)
    stale = schedules.fingerprint(other.mod)  # a hand schedule that is not this one any more
    assert hand_print is not None and hand_print != stale

    def carried(scheduled):
        found = []
        for name, want in expected.items():
            try:
                tvm.ir.assert_structural_equal(scheduled[gv].body, want.body)
                found.append(name)
            except ValueError:
                pass
        return found

    cases = [  # (hand s, other s, measured, --schedules) → (carried, from records, hand-scheduled)
        ((5e-6, 1e-6, hand_print, "hand"), (["other"], 1, 0)),  # the other record is faster
        ((1e-6, 9e-6, hand_print, "hand"), (["hand"], 1, 0)),  # the hand schedule's record is faster
        ((5e-6, 1e-6, None, "hand"), (["hand"], 0, 1)),  # records without the hand schedule's time
        ((5e-6, 1e-6, hand_print, "none"), (["other"], 1, 0)),  # no hand schedules: the records' best
        ((5e-6, 1e-6, stale, "hand"), (["hand"], 0, 1)),  # they measured another version of it
    ]
    for i, ((hand_s, other_s, measured, source), want) in enumerate(cases):
        records = _records(tmp_path / str(i), kernel, func, [(hand_trace, hand_s), (other.trace, other_s)], measured)
        scheduled, tuned, hand = pipeline.schedule(mod, HOST, records, source)
        assert (carried(scheduled), tuned, hand) == want, (i, source)
    # negative: the check can tell them apart; no records, no hand schedules: TVM's own
    assert carried(pipeline.schedule(mod, HOST, schedule_source="none")[0]) == ["none"]
    assert carried(pipeline.schedule(mod, HOST)[0]) == ["hand"]


def test_the_duel_gives_the_hand_schedule_back_where_the_best_record_is_slower(tmp_path, caplog):
    """Records whose best by their own times is a serial schedule (TVM's lowering, the bias add
    inlined), recorded 5x faster than the hand schedule: a build takes it. The duel times both
    side by side, finds the hand schedule faster, notes it in ``hand_wins.json``, and the build
    then gives the kernel its hand schedule. Negative: records that never measured the hand
    schedule have no duel (and the hand schedule goes first anyway)."""
    from tvm import s_tir
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    from tvmshuffle import duel

    mod, _ = _lowered(*LAYERS["pw_v2_half_28"])
    (gv,) = [g for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and schedules.describe(f)]
    func = mod[gv]
    kernel = _normalize_mod(func)
    hand_trace = schedules.database(HOST).db.query_schedule(kernel, targets.tvm_target(HOST), gv.name_hint).trace
    serial = s_tir.Schedule(kernel)
    serial.compute_inline(serial.get_sblock("T_add"))
    hand_print = schedules.hand_fingerprint(kernel, HOST)
    records = _records(tmp_path / "r", kernel, func, [(hand_trace, 5e-6), (serial.trace, 1e-6)], hand_print)

    def carries(want) -> bool:
        try:
            tvm.ir.assert_structural_equal(pipeline.schedule(mod, HOST, records)[0][gv].body, want.body)
            return True
        except ValueError:
            return False

    hand_built = pipeline.schedule(mod, HOST)[0][gv]
    assert carries(serial.mod["main"]) and not carries(hand_built)  # the records' best, by their times
    (bout,) = duel.duel(mod, HOST, records)
    assert bout.kernel == gv.name_hint and bout.hand_wins and bout.hand_ms < bout.record_ms
    assert read_hand_wins(records) == {schedules.workload_key(kernel): hand_print}
    assert carries(hand_built)
    with caplog.at_level("INFO", logger="tvmshuffle.pipeline"):
        assert pipeline.schedule(mod, HOST, records)[1:] == (0, 1)
    assert "1 kernels get their hand schedule (1 won the duel against the records' best" in caplog.text

    never = _records(tmp_path / "never", kernel, func, [(serial.trace, 1e-6)], None)
    assert duel.duel(mod, HOST, never) == [] and read_hand_wins(never) == {}


def _mean_model():
    """A model of one kernel no hand schedule takes: the global mean before the classifier, lowered."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 24, 28, 28), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.mean(x, axis=[2, 3])))
        bb.emit_func_output(out)
    return pipeline.lower(bb.get(), HOST, fuse=False)


def test_a_kernel_whose_record_lost_to_tvms_own_schedule_keeps_it(tmp_path):
    """A kernel no hand schedule takes (the global mean) with a record: a build applies the
    record, unless ``hand_wins.json`` says TVM's own schedule won the duel (``"default"``): then
    the kernel stays as lowered, counted neither tuned nor hand-scheduled."""
    from tvm import s_tir
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    from tvmshuffle.records import DEFAULT, write_hand_wins

    mod = _mean_model()
    (gv,) = [g for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    kernel = _normalize_mod(mod[gv])
    assert schedules.hand_fingerprint(kernel, HOST) is None
    record = s_tir.Schedule(kernel)
    record.parallel(record.get_loops(record.get_sblock("x_red"))[1])
    records = _records(tmp_path / "r", kernel, mod[gv], [(record.trace, 1e-6)], None)

    scheduled, tuned, hand = pipeline.schedule(mod, HOST, records)
    tvm.ir.assert_structural_equal(scheduled[gv].body, record.mod["main"].body)
    assert (tuned, hand) == (1, 0)
    write_hand_wins(records, {schedules.workload_key(kernel): DEFAULT})
    scheduled, tuned, hand = pipeline.schedule(mod, HOST, records)
    tvm.ir.assert_structural_equal(scheduled[gv].body, mod[gv].body)
    assert (tuned, hand) == (0, 0)


@pytest.mark.parametrize("text", ["{", "[1, 2]"])
def test_an_unreadable_hand_schedules_json_is_one_line_naming_it(tmp_path, text):
    """A ``hand_schedules.json`` that is not a JSON object: a UserError naming the file (the CLI's
    one line, exit 2), not a guess at which schedules the records measured."""
    mod, _ = _lowered(*LAYERS["pw_v2_half_28"])
    (gv,) = [g for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and schedules.describe(f)]
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    records = _records(tmp_path / "r", _normalize_mod(mod[gv]), mod[gv], [], None)
    (records / "hand_schedules.json").write_text(text)
    with pytest.raises(UserError, match="hand_schedules.json: unreadable"):
        pipeline.schedule(mod, HOST, records)


def test_records_tuned_before_hand_schedules_json_get_it_from_their_traces(tmp_path):
    """``scripts/note_hand_schedules.py`` notes a kernel whose records hold its hand schedule
    (found by replaying their traces), and then the records go first; negative: records holding
    only another schedule are not noted, and the hand schedule goes first."""
    import importlib.util

    from tvm import s_tir
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    spec = importlib.util.spec_from_file_location("note_hand_schedules",
                                                  Path(__file__).parents[1] / "scripts" / "note_hand_schedules.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    mod, _ = _lowered(*LAYERS["pw_v2_half_28"])
    (gv,) = [g for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and schedules.describe(f)]
    kernel = _normalize_mod(mod[gv])
    hand_trace = schedules.database(HOST).db.query_schedule(kernel, targets.tvm_target(HOST), gv.name_hint).trace
    other = s_tir.Schedule(kernel)
    other.compute_inline(other.get_sblock("T_add"))
    with_hand = _records(tmp_path / "with", kernel, mod[gv], [(hand_trace, 5e-6), (other.trace, 1e-6)], None)
    without = _records(tmp_path / "without", kernel, mod[gv], [(other.trace, 1e-6)], None)
    assert pipeline.schedule(mod, HOST, with_hand)[1:] == (0, 1)  # not noted: the hand schedule first
    assert script.note(with_hand, HOST) == (1, 1)
    assert read_hand_measured(with_hand) == {schedules.workload_key(kernel): schedules.hand_fingerprint(kernel, HOST)}
    assert pipeline.schedule(mod, HOST, with_hand)[1:] == (1, 0)  # noted: the records' best
    assert script.note(without, HOST) == (0, 1)
    assert read_hand_measured(without) == {}
    assert pipeline.schedule(mod, HOST, without)[1:] == (0, 1)
    # a dir with no records: one line naming it, exit 2
    proc = subprocess.run([sys.executable, spec.origin, str(tmp_path / "nope")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "nope" in proc.stderr, proc.stderr


def test_a_hand_fingerprint_is_its_schedule():
    """The fingerprint a build compares with ``hand_schedules.json`` is the hand schedule
    itself: equal for the same kernel and ISA, another for another ISA's schedule (V2's
    116-channel 14x14 conv takes zmm vectors on AVX-512 only) and for another kernel; the same
    for AVX2 and AVX-512 where their schedules agree (232 channels at 7x7)."""
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    def kernel(layer):
        mod, _ = _lowered(*LAYERS[layer])
        (func,) = [f for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and schedules.describe(f)]
        return _normalize_mod(func)

    avx2, avx512 = X86_AVX2, X86_AVX512
    wide, narrow = kernel("pw_half_lanes"), kernel("pw_v2_7")
    assert schedules.hand_fingerprint(wide, avx2) == schedules.hand_fingerprint(wide, avx2)
    assert schedules.hand_fingerprint(wide, avx2) != schedules.hand_fingerprint(wide, avx512)
    assert schedules.hand_fingerprint(narrow, avx2) == schedules.hand_fingerprint(narrow, avx512)
    assert schedules.hand_fingerprint(narrow, avx2) != schedules.hand_fingerprint(wide, avx2)
    assert schedules.workload_key(wide) != schedules.workload_key(narrow)


# --------------------------------------------------------------------------- seeding MetaSchedule


FAST_TUNE = dict(search_population=32, number=1, repeat=1, min_repeat_ms=0, progress=False,
                 builder_timeout_sec=120, runner_timeout_sec=60, trials_per_batch=4, duel=False)


def _hand_records(records_dir: Path) -> int:
    """Records whose trace is a hand schedule (it flattens the conv's pixel or uses a phase
    layout: TransformBlockLayout / TransformLayout, which MetaSchedule's own rules never emit)."""
    lines = (records_dir / "database_tuning_record.json").read_text().splitlines()
    return sum(1 for line in lines if '"TransformBlockLayout"' in line or '"TransformLayout"' in line)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tuning_starts_from_the_hand_schedule(tmp_path, caplog):
    import logging

    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    from tvmshuffle import tuning

    mod, reference = _lowered(*LAYERS["pw_v2_half_28"])
    records = tmp_path / "host" / "layer"
    with caplog.at_level(logging.INFO, logger="tvmshuffle"):
        result = tuning.tune(mod, HOST, tuning.TuneConfig(trials=4, records_dir=records, **{**FAST_TUNE, "duel": True}))
    seed_log = [r.getMessage() for r in caplog.records if "hand schedule" in r.getMessage()]
    assert any("seeded with the hand schedule" in m for m in seed_log), seed_log
    assert any("measured again after the search" in m for m in seed_log), seed_log
    # the seed record and the search within the budget, then the hand schedule measured again
    # after the search (one record beyond the budget), so one unlucky timing does not lose it
    assert 3 <= result.trials_total <= 5
    assert result.trials_run == result.trials_total  # the seeds count as trials run
    assert _hand_records(records) >= 2
    assert json.loads((records / TARGET_FILE).read_text())["seed_schedules"] == "hand"
    (func,) = [f for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and schedules.describe(f)]
    kernel = _normalize_mod(func)
    measured = {schedules.workload_key(kernel): schedules.hand_fingerprint(kernel, HOST)}
    assert read_hand_measured(records) == measured
    # the duel at the end timed the best record against the hand schedule side by side: the
    # kernel gets the hand schedule where it was not slower (hand_wins.json), else the record
    assert "duel of each kernel's best record and its hand schedule" in caplog.text
    wins = read_hand_wins(records)
    assert wins in ({}, measured)
    executable, tuned, hand = pipeline.build(mod, HOST, records)
    assert (tuned, hand) == ((0, 1) if wins else (1, 0))
    data = np.random.default_rng(2).standard_normal(LAYERS["pw_v2_half_28"][0]).astype("float32")
    expected = reference(data)
    np.testing.assert_allclose(_run(executable, data), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())

    # negative: with --schedules none the search never proposes the hand structure
    plain = tmp_path / "host" / "plain"
    tuning.tune(mod, HOST, tuning.TuneConfig(trials=4, records_dir=plain, seed_schedules="none", **FAST_TUNE))
    assert _hand_records(plain) == 0
    assert "seed_schedules" not in json.loads((plain / TARGET_FILE).read_text())
    # resumed with the hand schedules, records tuned without them get the hand schedule's record
    tuning.tune(mod, HOST, tuning.TuneConfig(trials=6, records_dir=plain, **FAST_TUNE))
    assert _hand_records(plain) >= 1
    assert json.loads((plain / TARGET_FILE).read_text())["seed_schedules"] == "hand"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_hand_schedule_that_repacks_its_weight_is_seeded(tmp_path, caplog):
    """A hand schedule that repacks its weight (a ``layout_rewrite_preproc`` block: the 7x7
    channel-vector form) is measured with the weight as built, repacked. Measured with the
    weight's original shape, it failed ("expected 3") and the records never held it."""
    import logging

    from tvmshuffle import tuning

    mod, reference = _lowered(*LAYERS["pw_dense_7"])
    records = tmp_path / "host" / "layer"
    with caplog.at_level(logging.INFO, logger="tvmshuffle.tuning"):
        tuning.tune(mod, HOST, tuning.TuneConfig(trials=1, records_dir=records, **FAST_TUNE))
    assert "seeded with the hand schedule" in caplog.text and "did not run" not in caplog.text
    assert _hand_records(records) == 1
    executable, tuned, _ = pipeline.build(mod, HOST, records)
    assert tuned == 1
    data = np.random.default_rng(3).standard_normal(LAYERS["pw_dense_7"][0]).astype("float32")
    expected = reference(data)
    np.testing.assert_allclose(_run(executable, data), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_task_no_hand_schedule_fits_starts_from_tvms_default(tmp_path, caplog):
    """A kernel with no hand schedule (the global mean before the classifier) gets TVM's
    default schedule as its first record (an empty trace, measured), so a short run never leaves it with only a random
    candidate slower than what the untuned build runs."""
    import logging

    from tvmshuffle import tuning

    mod = _mean_model()
    records = tmp_path / "host" / "mean"
    with caplog.at_level(logging.INFO, logger="tvmshuffle.tuning"):
        tuning.tune(mod, HOST, tuning.TuneConfig(trials=1, records_dir=records, **FAST_TUNE))
    assert "seeded with TVM's default schedule (as lowered)" in caplog.text, caplog.text
    traces = [json.loads(line)[1][0] for line in (records / RECORD_FILE).read_text().splitlines()]  # [insts, decisions]
    # the default: nothing sampled, only what MetaSchedule's post-processors add
    # (DecomposeReduction); a searched candidate samples its tiles
    default = [insts for insts, decisions in traces if not decisions]
    assert len(default) == 1 and not any(inst[0].startswith("Sample") for inst in default[0]), traces
    executable, tuned, hand = pipeline.build(mod, HOST, records)
    assert (tuned, hand) == (1, 0)
    data = np.random.default_rng(4).standard_normal((1, 24, 28, 28)).astype("float32")
    np.testing.assert_allclose(_run(executable, data), data.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- plain convs (no shuffle in front)


# name → (data shape, weight shape, conv2d params, epilogue): LegalizeOps' conv2d, as V2's branch
# 1x1 convs, its depthwise 3x3 after a 1x1, and V1's grouped 1x1 after a depthwise conv are
PLAIN = {
    "pw_plain_28": ((1, 58, 28, 28), (58, 58, 1, 1), dict(), "bias_relu"),
    "pw_plain_7": ((1, 64, 7, 7), (32, 64, 1, 1), dict(), "bias_relu"),
    "pw_plain_grouped_14": ((1, 48, 14, 14), (48, 16, 1, 1), dict(groups=3), "bias_add"),
    # pixel-vector form with more output channels than pixels: the cores split channels first
    "pw_plain_channels_first_4": ((1, 32, 4, 4), (32, 32, 1, 1), dict(), "bias_relu"),
    "dw_plain_s1_14": ((1, 58, 14, 14), (58, 1, 3, 3), dict(groups=58, padding=1), "bias"),
    "dw_plain_s2_28": ((1, 24, 28, 28), (24, 1, 3, 3), dict(groups=24, strides=2, padding=1), "bias"),
    "dw_plain_s2_56": ((1, 24, 56, 56), (24, 1, 3, 3), dict(groups=24, strides=2, padding=1), "bias"),
}


def _plain(data_shape, weight_shape, params, epilogue, preset=HOST):
    """A lowered conv2d (+ epilogue) with no shuffle, and its NumPy reference."""
    rng = np.random.default_rng(sum(data_shape) + sum(weight_shape))
    weight = rng.standard_normal(weight_shape).astype("float32")
    bias = rng.standard_normal((1, weight_shape[0], 1, 1)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(data_shape), "float32"))
    residual = None
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), **params))
            y = bb.emit(relax.op.add(y, relax.const(bias)))
            if epilogue == "bias_relu":
                y = bb.emit(relax.op.nn.relu(y))
            if epilogue == "bias_add":
                residual = rng.standard_normal([int(d) for d in y.ty.shape]).astype("float32")
                y = bb.emit(relax.op.add(y, relax.const(residual)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = pipeline.lower(bb.get(), preset, fuse=True)

    def reference(data):
        import torch

        y = torch.nn.functional.conv2d(torch.from_numpy(data), torch.from_numpy(weight),
                                       stride=params.get("strides", 1), padding=params.get("padding", 0),
                                       groups=params.get("groups", 1)).numpy() + bias
        if epilogue == "bias_relu":
            y = np.maximum(y, 0)
        return y if residual is None else y + residual

    return mod, reference


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_conv_hand_schedule_matches_the_reference_and_the_none_build(name):
    data_shape, weight_shape, params, epilogue = PLAIN[name]
    mod, reference = _plain(data_shape, weight_shape, params, epilogue)
    (func,) = _fused_funcs(mod)
    layer = schedules.describe(func)
    assert not layer.shuffled and layer.conv_block in ("conv2d_nchw", "group_conv2d_nchw")
    assert layer.kind == name.split("_")[0].replace("pw", "pointwise").replace("dw", "depthwise")
    assert layer.stride == (params.get("strides", 1),) * 2 and layer.padded == ("padding" in params)
    assert layer.conv_groups == params.get("groups", 1)
    data = np.random.default_rng(1).standard_normal(data_shape).astype("float32")
    _hand_matches_reference_and_none(mod, data, reference(data))


@pytest.mark.parametrize("name, pixels_first", [("pw_plain_28", True), ("pw_plain_channels_first_4", False)])
def test_pixel_vector_tiles_go_to_the_cores_pixels_first_where_the_weights_are_smaller(name, pixels_first):
    """In the pixel-vector form the cores split the plane first where a conv group has fewer
    output channels than pixels (V2's 28x28 convs: 5-7% off the whole model), else the output
    channels (each core reads half the weights); both match the reference (the test above)."""
    (func,) = _fused_funcs(_plain(*PLAIN[name])[0])
    layer = schedules.describe(func)
    (pointwise,) = [m for m in schedules.load() if m.NAME == "pointwise"]
    assert pointwise._choose(layer, schedules.isa_for(HOST))[0] == "pixel"
    assert pointwise._pixels_first(layer) is pixels_first


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_conv_hand_schedule_builds_for_aarch64_neon(name, tmp_path):
    mod, _ = _plain(*PLAIN[name], preset=AARCH64)
    _hand_builds_aarch64_elf(mod, tmp_path / "layer.so")


#: the stem: a dense 3x3 conv on 3 channels (stride 2, as ShuffleNet's; stride 1 too)
STEM = {
    "stem_s2_64": ((1, 3, 64, 64), (24, 3, 3, 3), dict(strides=2, padding=1), "bias_relu"),
    "stem_s1_odd": ((1, 3, 20, 24), (12, 3, 3, 3), dict(padding=1), "bias"),
    # stride 2 with an odd padded width (33 columns: the two phases 17 and 16 wide)
    "stem_s2_odd_width": ((1, 3, 32, 31), (24, 3, 3, 3), dict(strides=2, padding=1), "bias_relu"),
}


@pytest.mark.parametrize("name", sorted(STEM))
def test_stem_hand_schedule_matches_the_reference_and_the_none_build(name):
    data_shape, weight_shape, params, epilogue = STEM[name]
    mod, reference = _plain(data_shape, weight_shape, params, epilogue)
    (func,) = _fused_funcs(mod)
    layer = schedules.describe(func)
    assert (layer.kind, layer.conv_groups, layer.group_in) == ("other", 1, 3)
    (module,) = [m for m in schedules.load() if m.matches(layer, schedules.isa_for(HOST))]
    assert module.NAME == "stem"
    data = np.random.default_rng(1).standard_normal(data_shape).astype("float32")
    _hand_matches_reference_and_none(mod, data, reference(data))


@pytest.mark.parametrize("name", sorted(STEM))
def test_stem_hand_schedule_builds_for_aarch64_neon(name, tmp_path):
    mod, _ = _plain(*STEM[name], preset=AARCH64)
    _hand_builds_aarch64_elf(mod, tmp_path / "stem.so")


def test_a_dense_3x3_conv_on_many_channels_is_left_alone():
    """Negative: a dense 3x3 conv on 16 channels is "other" and no schedule takes it (the stem's
    takes few input channels only)."""
    mod, _ = _plain((1, 16, 16, 16), (8, 16, 3, 3), dict(strides=2, padding=1), "bias_relu")
    (func,) = _fused_funcs(mod)
    assert schedules.describe(func).kind == "other"
    assert schedules.schedule_primfunc(func, HOST) is None
    assert pipeline.schedule(mod, HOST)[2] == 0


# --------------------------------------------------------------------------- depthwise + 1x1 in one kernel


# name → (data shape, 1x1 output channels, depthwise params, 1x1 groups, shuffle groups of the
# depthwise conv (None: a plain conv2d), epilogue after the 1x1 conv): FuseDepthwisePointwise's kernels
DW_PW = {
    # V2's branch at 28x28: the 1x1 conv in pixel vectors, 14 row blocks: interleaved
    "v2_28": ((1, 58, 28, 28), 58, dict(padding=1), 1, None, "relu"),
    # V2's 7x7 (232 channels): the 1x1 conv in channel vectors: stage after stage
    "v2_7": ((1, 232, 7, 7), 232, dict(padding=1), 1, None, "relu"),
    # stride 2, 28x28 -> 14x14 (V2's downsampling branch)
    "v2_s2_14": ((1, 116, 28, 28), 116, dict(padding=1, strides=2), 1, None, "relu"),
    # stride 2 on a 56x56 input: on x86 the depthwise rows are LLVM's (stage after stage)
    "v2_s2_56": ((1, 24, 56, 56), 58, dict(padding=1, strides=2), 1, None, "relu"),
    # V1 g3: the depthwise conv through the shuffle, a grouped 1x1, residual add and ReLU
    "v1_28": ((1, 60, 28, 28), 60, dict(padding=1), 3, 3, "add_relu"),
    # an odd plane (10x10, 36 channels) and a 1x1 conv that widens
    "odd_10": ((1, 36, 10, 10), 48, dict(padding=1), 1, None, "relu"),
}


def _dw_pw(data_shape, out_channels, dw_params, pw_groups, shuffle_groups, epilogue, preset=HOST):
    """A lowered depthwise 3x3 → bias → 1x1 → bias → epilogue (one kernel) and its reference."""
    import torch

    rng = np.random.default_rng(sum(data_shape) + out_channels)
    channels = data_shape[1]
    w_dw = rng.standard_normal((channels, 1, 3, 3)).astype("float32")
    b_dw = rng.standard_normal((1, channels, 1, 1)).astype("float32")
    w_pw = rng.standard_normal((out_channels, channels // pw_groups, 1, 1)).astype("float32")
    b_pw = rng.standard_normal((1, out_channels, 1, 1)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(data_shape), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if shuffle_groups:
                y = emit_shuffle_group_conv2d(bb, x, relax.const(w_dw), shuffle_groups=shuffle_groups,
                                              conv_groups=channels, **dw_params)
            else:
                y = bb.emit(relax.op.nn.conv2d(x, relax.const(w_dw), groups=channels, **dw_params))
            y = bb.emit(relax.op.add(y, relax.const(b_dw)))
            y = bb.emit(relax.op.nn.conv2d(y, relax.const(w_pw), groups=pw_groups))
            y = bb.emit(relax.op.add(y, relax.const(b_pw)))
            if epilogue == "add_relu":
                y = bb.emit(relax.op.add(y, x))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(y)))
        bb.emit_func_output(out)
    mod = pipeline.lower(bb.get(), preset)

    def reference(data):
        shuffled = channel_shuffle_ref(data, shuffle_groups) if shuffle_groups else data
        conv = torch.nn.functional.conv2d
        y = conv(torch.from_numpy(shuffled), torch.from_numpy(w_dw), stride=dw_params.get("strides", 1),
                 padding=dw_params["padding"], groups=channels).numpy() + b_dw
        y = conv(torch.from_numpy(y), torch.from_numpy(w_pw), groups=pw_groups).numpy() + b_pw
        return np.maximum(y + data if epilogue == "add_relu" else y, 0)

    return mod, reference


def _dw_pw_module():
    (module,) = [m for m in schedules.load() if m.NAME == "dw_pointwise"]
    return module


@pytest.mark.parametrize("name", sorted(DW_PW))
def test_depthwise_pointwise_hand_schedule_matches_the_reference_and_the_none_build(name):
    mod, reference = _dw_pw(*DW_PW[name])
    (func,) = _fused_funcs(mod)
    layer = schedules.describe(func)
    assert layer.kind == "dw_pointwise" and layer.depthwise.shuffled == (DW_PW[name][4] is not None)
    data = np.random.default_rng(1).standard_normal(DW_PW[name][0]).astype("float32")
    _hand_matches_reference_and_none(mod, data, reference(data))


@pytest.mark.parametrize("name, preset, interleaved", [
    ("v2_28", X86_AVX2, True), ("v1_28", X86_AVX2, True), ("v2_7", X86_AVX2, False), ("v2_s2_56", X86_AVX2, False),
    # 14x14 output: AVX2 takes channel vectors (stage after stage), AVX-512 14-float pixel vectors
    ("v2_s2_14", X86_AVX2, False), ("v2_s2_14", X86_AVX512, True)], ids=str)
def test_the_depthwise_output_is_computed_in_the_row_block_that_reads_it(name, preset, interleaved):
    """Interleaved (the 1x1 conv in pixel vectors, enough row blocks): the depthwise conv runs
    inside the 1x1 conv's parallel loop of row blocks; else (channel vectors, or x86's stride-2
    rows of two vectors) stage after stage, each conv parallel on its own."""
    (func,) = _fused_funcs(_dw_pw(*DW_PW[name], preset=preset)[0])
    layer = schedules.describe(func)
    pixel_form = _dw_pw_module()._block_rows(layer, schedules.isa_for(preset)) is not None
    assert pixel_form == (interleaved or name == "v2_s2_56")
    scheduled = schedules.schedule_primfunc(func, preset)
    sch = tvm.s_tir.Schedule(scheduled)

    def outermost_loop(conv_block):  # of the conv's update (decompose_reduction named it so)
        return sch.get(sch.get_loops(sch.get_sblock(f"{conv_block}_update"))[0])

    dw_outer, pw_outer = (outermost_loop(conv.conv_block) for conv in (layer.depthwise, layer.pointwise))
    assert pw_outer.kind == tvm.tirx.ForKind.PARALLEL
    assert dw_outer.same_as(pw_outer) is interleaved


@pytest.mark.parametrize("name", ["v2_28", "v1_28", "v2_7", "v2_s2_56"])
def test_depthwise_pointwise_hand_schedule_builds_for_aarch64_neon(name, tmp_path):
    mod, _ = _dw_pw(*DW_PW[name], preset=AARCH64)
    _hand_builds_aarch64_elf(mod, tmp_path / "layer.so")


# --------------------------------------------------------------------------- the stem conv + max pool in one kernel


# name → (data shape, conv output channels, conv params, ReLU or not, pool params): FuseConvPool's kernels
CONV_POOL = {
    # ShuffleNet's stem at 64x64: conv 3x3/2 → 32x32, max pool 3x3/2 → 16 rows, 4 blocks of 4
    "stem_64": ((1, 3, 64, 64), 24, dict(strides=2, padding=1), True, dict(pool_size=3, strides=2, padding=1)),
    # 36x64 → 18x32 → 9x16: blocks of 3 rows; no ReLU (the -inf border meets negative values)
    "stem_36x64_no_relu": ((1, 3, 36, 64), 24, dict(strides=2, padding=1), False,
                           dict(pool_size=3, strides=2, padding=1)),
    # a stride-1 conv (12 channels) on 48x48 and a 2x2/2 pool with no padding: 24 rows, blocks of 4
    "s1_pool2": ((1, 3, 48, 48), 12, dict(padding=1), True, dict(pool_size=2, strides=2)),
}


def _conv_pool(data_shape, out_channels, conv_params, relu, pool_params, preset=HOST):
    """A lowered conv 3x3 → bias → [ReLU] → max pool (one kernel) and its reference."""
    import torch

    rng = np.random.default_rng(sum(data_shape) + out_channels)
    weight = rng.standard_normal((out_channels, data_shape[1], 3, 3)).astype("float32")
    bias = rng.standard_normal((1, out_channels, 1, 1)).astype("float32")

    def chain(bb, x):
        y = bb.emit(relax.op.add(bb.emit(relax.op.nn.conv2d(x, relax.const(weight), **conv_params)), relax.const(bias)))
        if relu:
            y = bb.emit(relax.op.nn.relu(y))
        return relax.op.nn.max_pool2d(y, **pool_params)

    mod = pipeline.lower(chain_module(relax.TensorType(list(data_shape), "float32"), chain), preset)

    def reference(data):
        y = torch.nn.functional.conv2d(torch.from_numpy(data), torch.from_numpy(weight),
                                       stride=conv_params.get("strides", 1), padding=conv_params["padding"])
        y = y + torch.from_numpy(bias)
        y = torch.relu(y) if relu else y
        return torch.nn.functional.max_pool2d(y, pool_params["pool_size"], pool_params["strides"],
                                              pool_params.get("padding", 0)).numpy()

    return mod, reference


@pytest.mark.parametrize("name, preset", [*((name, HOST) for name in sorted(CONV_POOL)), ("stem_64", X86_AVX2)],
                         ids=str)
def test_conv_pool_hand_schedule_matches_the_reference_and_the_none_build(name, preset):
    """This CPU's ISA (AVX-512 here), and AVX2 (what an AVX2-only x86 CPU gets; it runs here too)."""
    mod, reference = _conv_pool(*CONV_POOL[name], preset=preset)
    (func,) = _fused_funcs(mod)
    layer = schedules.describe(func)
    assert layer.kind == "conv_pool" and layer.conv.kind == "other"
    (module,) = [m for m in schedules.load() if m.matches(layer, schedules.isa_for(preset))]
    assert module.NAME == "conv_pool"
    data = np.random.default_rng(1).standard_normal(CONV_POOL[name][0]).astype("float32")
    _hand_matches_reference_and_none(mod, data, reference(data), preset=preset)


@pytest.mark.parametrize("name", ["stem_64", "s1_pool2"])
def test_the_conv_rows_are_computed_in_the_block_of_pool_rows_that_reads_them(name):
    """The conv's update and the pool's windows run under one parallel loop (the blocks of pool
    rows): each block computes the conv rows its windows read."""
    (func,) = _fused_funcs(_conv_pool(*CONV_POOL[name])[0])
    layer = schedules.describe(func)
    sch = tvm.s_tir.Schedule(schedules.schedule_primfunc(func, HOST))
    conv_outer, pool_outer = (sch.get(sch.get_loops(sch.get_sblock(f"{block}_update"))[0])
                              for block in (layer.conv.conv_block, layer.pool.block))
    assert pool_outer.kind == tvm.tirx.ForKind.PARALLEL and conv_outer.same_as(pool_outer)
    blocks = int(pool_outer.extent)
    assert blocks > 1 and layer.pool.out_hw[0] % blocks == 0


@pytest.mark.parametrize("name", sorted(CONV_POOL))
def test_conv_pool_hand_schedule_builds_for_aarch64_neon(name, tmp_path):
    mod, _ = _conv_pool(*CONV_POOL[name], preset=AARCH64)
    _hand_builds_aarch64_elf(mod, tmp_path / "layer.so")


# --------------------------------------------------------------------------- the classifier's matmul


def _linear(n_out: int, k: int, preset=HOST):
    """A lowered nn.Linear (matmul + bias; the weight a constant [K, N]) and PyTorch's output."""
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    torch.manual_seed(n_out + k)
    linear = torch.nn.Linear(k, n_out).eval()
    x = torch.randn(1, k)
    mod = from_exported_program(torch.export.export(linear, (x,)))
    with torch.no_grad():
        return pipeline.lower(mod, preset, fuse=True), x.numpy(), linear(x).numpy()


def _out(value):
    return value.numpy() if hasattr(value, "numpy") else value[0].numpy()


@pytest.mark.parametrize("n_out, k", [(1000, 1024), (40, 64), (12, 20)])
def test_matmul_hand_schedule_matches_pytorch_and_the_none_build(n_out, k):
    mod, x, expected = _linear(n_out, k)
    (func,) = [f for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    layer = schedules.describe(func)
    assert (layer.kind, layer.m, layer.n, layer.k, layer.epilogue) == ("matmul", 1, n_out, k, ["T_add"])
    _hand_matches_reference_and_none(
        mod, x, expected, run=lambda exe, data: _out(relax.VirtualMachine(exe, tvm.cpu())["main"](tvm.runtime.tensor(data))))


def test_matmul_hand_schedule_builds_for_aarch64_neon(tmp_path):
    mod, _, _ = _linear(1000, 1024, preset=AARCH64)
    _hand_builds_aarch64_elf(mod, tmp_path / "fc.so")


def test_a_matmul_of_two_inputs_is_not_the_classifiers():
    """Negative: a matmul whose right operand is an input (not a constant [K, N] weight) is not described."""
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType([1, 16], "float32"))
    b = relax.Var("b", relax.TensorType([16, 8], "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(a, b))
        bb.emit_func_output(out)
    mod = pipeline.lower(bb.get(), HOST)
    (func,) = [f for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert schedules.describe(func) is None
    assert pipeline.schedule(mod, HOST)[2] == 0


@pytest.mark.parametrize("kind", ["pw_plain_28", "dw_plain_s2_28", "stem_s2_64", "matmul"])
def test_each_new_schedule_is_a_design_space_for_tuning(kind):
    """``tune`` seeds from the hand schedules with sampled tile sizes (``sample=True``): each new
    class yields one design space, which builds and computes what the none build does."""
    from tvm.s_tir import Schedule
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    if kind == "matmul":
        mod, x, _ = _linear(40, 64)
    else:
        spec = {**PLAIN, **STEM}[kind]
        mod, _ = _plain(*spec)
        x = np.random.default_rng(3).standard_normal(spec[0]).astype("float32")
    (gv,) = [g for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    spaces = schedules.space_fn(HOST)(Schedule(_normalize_mod(mod[gv])))
    assert len(spaces) == 1 and any(inst.kind.name == "SamplePerfectTile" for inst in spaces[0].trace.insts)
    scheduled = mod.clone()
    scheduled[gv] = spaces[0].mod["main"].with_attr("tirx.is_scheduled", True).with_attr("global_symbol", gv.name_hint)
    outs = [_out(relax.VirtualMachine(pipeline.build(m, HOST, schedule_source="none")[0], tvm.cpu())["main"](
        tvm.runtime.tensor(x))) for m in (scheduled, mod)]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5 * np.abs(outs[1]).max())


# --------------------------------------------------------------------------- stride-2 windows on x86


@pytest.mark.parametrize("cpu", ["znver4", "znver1"])
@pytest.mark.parametrize("kernel", ["max_pool_stem", "depthwise_s2_56", "stem_s2_64"])
def test_x86_stride2_windows_load_whole_vectors_not_lanes(kernel, cpu):
    """schedules/pool.py and depthwise.py on x86 leave a wide stride-2 window's row loop to LLVM's
    loop vectorizer, which loads whole vectors and de-interleaves them; TVM's vectorized strided
    loads became one scalar load and insert per lane (before: 43 ``vinsertps`` in the stem's max
    pool, 86 (Zen 4) and 142 (Zen 1) in the 56x56 stride-2 depthwise conv). The stem conv's
    padding stage (its columns in two phases) likewise
    (:func:`tvmshuffle.schedules.vectorize_padding`). Zen 4 with the host preset's features, and
    Zen 1; compiled only, not run (this CPU may be another)."""
    target = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": cpu, "mattr": list(targets.X86_HOST_FEATURES)}
    preset = targets.resolve(json.dumps(target))
    if kernel == "max_pool_stem":
        mod, vector_op = _pool_module(*POOLS["max_stem"], preset=preset), r"\bvmaxps\b"
    elif kernel == "depthwise_s2_56":
        mod, vector_op = _plain(*PLAIN["dw_plain_s2_56"], preset=preset)[0], r"\bvfmadd\w*ps\b"
    else:  # the stem conv's padding stage, its columns in two phases
        mod, vector_op = _plain(*STEM["stem_s2_64"], preset=preset)[0], r"\bvfmadd\w*ps\b"
    executable, _, n_hand = pipeline.build(mod, preset)
    assert n_hand == 1
    asm = "".join(m.inspect_source("asm") for m in [executable.mod, *executable.mod.imports] if m.kind == "llvm")
    assert len(re.findall(vector_op, asm)) > 0  # the windows computed in vectors
    assert len(re.findall(r"\bvinsertps\b|\bvpinsr", asm)) < 8
