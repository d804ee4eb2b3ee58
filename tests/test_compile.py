"""import → lower → build → export, checked against PyTorch, for every zoo model and target kind."""

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import ZOO_MODELS, kernel_layers, zoo_import

from tvmshuffle import frontend, pipeline, runtime, targets
from tvmshuffle.models import zoo

# Reduced input keeps CI bounded; the network is the same at any resolution.
SHAPE = (1, 3, 64, 64)
SMALL = "shufflenet_v1_g3_x0_25"


def compile_and_run(imported, tmp_path, fuse=True):
    preset = targets.resolve("host")
    mod = pipeline.lower(imported.mod, preset, fuse=fuse)
    executable, _, _ = pipeline.build(mod, preset)
    lib = pipeline.export(executable, preset, tmp_path / f"{imported.name}.so")
    x = imported.random_input()
    out = runtime.run(runtime.load_library(lib), x).output
    return out, imported.reference(x)


def assert_close(out, expected):
    assert out.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max()))
    assert float(np.abs(out - expected).max()) <= 1e-4 * scale


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_MODELS)
def test_zoo_model_matches_pytorch(name, tmp_path):
    imported = zoo_import(name, SHAPE)
    out, expected = compile_and_run(imported, tmp_path)
    assert_close(out, expected)


def test_batch_norm_is_folded():
    imported = frontend.load(SMALL, SHAPE)
    text = imported.mod.script()
    assert "batch_norm" not in text
    assert "R.nn.conv2d" in text


def test_pt2_file(tmp_path):
    import torch

    model = zoo.get_model(SMALL)
    path = tmp_path / "small.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 32, 32),)), path)
    imported = frontend.load(str(path))
    assert imported.input_shape == (1, 3, 32, 32) and imported.source == "pt2"
    out, expected = compile_and_run(imported, tmp_path)
    assert_close(out, expected)


def test_pt2_file_with_dynamic_shape_takes_input_shape(tmp_path):
    import torch

    model = zoo.get_model(SMALL)
    path = tmp_path / "dyn.pt2"
    k = torch.export.Dim("k", min=1, max=16)
    exported = torch.export.export(model, (torch.randn(1, 3, 64, 64),), dynamic_shapes=({2: 32 * k, 3: 32 * k},))
    torch.export.save(exported, path)
    imported = frontend.load(str(path), (1, 3, 96, 96))
    assert imported.input_shape == (1, 3, 96, 96)
    out, expected = compile_and_run(imported, tmp_path)
    assert_close(out, expected)


def test_pt2_file_with_static_shape_rejects_other_input_shape(tmp_path):
    import torch

    from tvmshuffle.errors import UserError

    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(zoo.get_model(SMALL), (torch.randn(1, 3, 32, 32),)), path)
    with pytest.raises(UserError, match="--input-shape 1,3,48,48.*static.pt2"):
        frontend.load(str(path), (1, 3, 48, 48))


@pytest.mark.parametrize("opset", [13, 18])
def test_onnx_file(tmp_path, opset):
    import torch

    model = zoo.get_model(SMALL)
    path = tmp_path / f"small{opset}.onnx"
    torch.onnx.export(model, (torch.randn(*SHAPE),), path, dynamo=False, opset_version=opset,
                      input_names=["image"])
    imported = frontend.load(str(path))
    assert imported.input_shape == SHAPE and imported.source == "onnx"
    # the ONNX graph's stem fuses as the zoo's does: conv, bias, ReLU and max pool in one kernel
    lowered = pipeline.lower(imported.mod, targets.resolve("host"))
    assert len(kernel_layers(lowered, "conv_pool")) == 1
    out, expected = compile_and_run(imported, tmp_path)
    assert_close(out, expected)
    # ONNX Runtime and PyTorch agree too, so the reference is the model's.
    with torch.no_grad():
        assert_close(expected, model(torch.from_numpy(imported.random_input())).numpy())


def _elf_machine_and_type(path):
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert header[4] == 2, "not a 64-bit ELF"
    e_type, e_machine = struct.unpack("<HH", header[16:20])
    return e_machine, e_type


ET_DYN, EM_AARCH64, EM_X86_64 = 3, 183, 62


@pytest.mark.parametrize("target", ["aarch64", "rpi4", '{"kind":"llvm","mtriple":"aarch64-linux-gnu","mattr":["+neon"]}'])
def test_aarch64_library(tmp_path, target):
    result = pipeline.compile_model(SMALL, tmp_path / "m.so", pipeline.CompileConfig(
        target=target, input_shape=SHAPE, dump_code=("asm",)))
    assert _elf_machine_and_type(result.output) == (EM_AARCH64, ET_DYN)
    # --dump-code asm: the user sees NEON was emitted (fused multiply-add on v registers)
    assert result.dumps == {"asm": tmp_path / "m.so.s"}
    asm = result.dumps["asm"].read_text()
    assert re.search(r"\bfmla\s+v\d+\.[24]s, v\d+\.[24]s, v\d+\.", asm), "no NEON fmla in the aarch64 assembly"
    assert "%xmm" not in asm and "%ymm" not in asm
    nm = shutil.which("aarch64-linux-gnu-nm")
    assert nm, "binutils-aarch64-linux-gnu comes with g++-aarch64-linux-gnu"
    symbols = subprocess.run([nm, "-D", "--defined-only", result.output], capture_output=True, text=True,
                             check=True).stdout
    assert "__tvm_ffi__library_bin" in symbols  # the serialized module (Relax VM + kernels)
    assert "__tvm_ffi_" in symbols.replace("__tvm_ffi__library_bin", "")  # kernels exported


def test_host_library_is_native(tmp_path):
    result = pipeline.compile_model(SMALL, tmp_path / "m.so", pipeline.CompileConfig(input_shape=SHAPE))
    assert _elf_machine_and_type(result.output) == (EM_X86_64, ET_DYN)
    assert result.kernels > 10


def test_x86_host_preset_keeps_llvm_from_gathering(tmp_path):
    """The host preset's LLVM features (targets.X86_HOST_FEATURES) on x86: the stride-2 loads of
    the stem and the pools, and a channel vector of an NCHW tensor, are not AVX-512 gathers.
    Without them LLVM makes gathers for Zen 4 (and Intel's AVX-512 CPUs): compiled for znver4
    both ways, the code not run (this CPU may lack AVX-512)."""
    if targets.host_is_x86():
        assert list(targets.X86_HOST_FEATURES) == targets.resolve("host").target["mattr"]
    zen4 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"}
    gathers = {}
    for name, target in [("llvm's", zen4), ("host's", {**zen4, "mattr": list(targets.X86_HOST_FEATURES)})]:
        result = pipeline.compile_model(SMALL, tmp_path / f"{name}.so", pipeline.CompileConfig(
            target=json.dumps(target), input_shape=SHAPE, dump_code=("asm",)))
        asm = result.dumps["asm"].read_text()
        assert "%zmm" in asm or "%ymm" in asm  # vector code either way
        gathers[name] = len(re.findall(r"\bvgather", asm))
    assert gathers["llvm's"] > 0 and gathers["host's"] == 0, gathers


def test_run_rejects_wrong_input_shape(tmp_path):
    from tvmshuffle.errors import UserError

    result = pipeline.compile_model(SMALL, tmp_path / "m.so", pipeline.CompileConfig(input_shape=SHAPE))
    vm = runtime.load_library(result.output)
    with pytest.raises(UserError, match="--input"):
        runtime.run(vm, np.zeros((1, 3, 32, 32), "float32"))


def test_parse_dump_code():
    assert pipeline.parse_dump_code(["asm,tir", "relax", "asm"]) == ("asm", "tir", "relax")
    assert pipeline.parse_dump_code("TIR") == ("tir",)
    assert pipeline.parse_dump_code(()) == ()
    assert pipeline.dump_paths(Path("out/m.so"), ["relax", "asm"]) == {
        "relax": Path("out/m.so.relax.py"), "asm": Path("out/m.so.s")}
    from tvmshuffle.errors import UserError

    with pytest.raises(UserError, match="--dump-code asm,ll: 'll' is not one of asm, tir, relax"):
        pipeline.parse_dump_code(["asm,ll"])
