"""Import: a zoo name, a ``.pt2`` file or an ``.onnx`` file → a Relax module ready to optimise.

Every form ends the same way: one Relax function ``main(x)`` with the weights bound as
constants and batch norm folded into the preceding convolutions (inference mode), plus a
host reference (PyTorch or ONNX Runtime) that tests and ``bench`` compare against.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import UserError, message_line, quiet_logger

if TYPE_CHECKING:
    from tvm import IRModule

log = logging.getLogger(__name__)

DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)


@dataclass
class ImportedModel:
    """A model in Relax, and how to compute its output on the host for checking."""

    name: str
    mod: IRModule
    input_shape: tuple[int, ...]
    #: x (numpy) → output (numpy), by PyTorch or ONNX Runtime
    reference: Callable[[np.ndarray], np.ndarray]
    source: str  # "zoo", "pt2" or "onnx"
    torch_module: object | None = None

    def random_input(self, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal(self.input_shape).astype("float32")


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """``"1,3,224,224"`` → ``(1, 3, 224, 224)``; errors name ``--input-shape``.

    Any C: a ``.pt2`` or ``.onnx`` file may take other than 3 channels; :func:`load` checks
    zoo models' (:func:`tvmshuffle.models.zoo.check_input_shape`).
    """
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise UserError(f"--input-shape: expected N,C,H,W integers, got {text!r}") from None
    if len(shape) != 4 or any(v <= 0 for v in shape):
        raise UserError(f"--input-shape: expected four positive integers N,C,H,W, got {text!r}")
    return shape


def load(model: str, input_shape: tuple[int, ...] | None = None, weights: str | None = None) -> ImportedModel:
    """Import ``model`` (zoo name, ``.pt2`` or ``.onnx`` path) into Relax, BN folded."""
    if model.endswith(".onnx"):
        if weights:
            raise UserError("--weights applies to zoo models only; an .onnx file carries its weights")
        return _load_onnx(model, input_shape)
    if model.endswith(".pt2"):
        if weights:
            raise UserError("--weights applies to zoo models only; a .pt2 file carries its weights")
        return _load_pt2(model, input_shape)
    if os.sep in model or os.path.exists(model):
        raise UserError(f"{model}: not a model file tvmshuffle reads (expected .pt2 or .onnx) nor a zoo name")
    from .models import zoo

    shape = input_shape or DEFAULT_INPUT_SHAPE
    zoo.check_input_shape(shape)
    module = zoo.get_model(model, weights=weights)
    return _from_torch(model, module, shape, "zoo")


def reference(model: str, weights: str | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The host reference for ``model`` (PyTorch, or ONNX Runtime for .onnx) without importing to Relax."""
    if model.endswith(".onnx"):
        import onnx

        _check_file(model)
        proto = onnx.load(model)
        init = {t.name for t in proto.graph.initializer}
        name = next(i.name for i in proto.graph.input if i.name not in init)
        return _ort_reference(model, name)
    if model.endswith(".pt2"):
        import torch

        _check_file(model)
        return _torch_reference(torch.export.load(model).module(check_guards=False))
    from .models import zoo

    return _torch_reference(zoo.get_model(model, weights=weights))


# --------------------------------------------------------------------------- PyTorch


def _torch_reference(module) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


def _from_torch(name: str, module, shape, source: str, where: str | None = None,
                exported=None) -> ImportedModel:
    """``module`` → Relax via torch.export (or the given ``exported`` program for ``shape``).

    Errors name ``where`` (the file) or the model.
    """
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    where = where or name
    if exported is None:
        try:
            with torch.no_grad():
                exported = torch.export.export(module, (torch.zeros(shape),))
        except Exception as err:  # noqa: BLE001 - torch.export raises many kinds
            raise UserError(f"{where}: torch.export failed for input shape {shape}: {message_line(err)}") from err
    try:
        mod = from_exported_program(exported, unwrap_unit_return_tuple=True)
    except AssertionError as err:  # the importer asserts on unsupported ops
        raise UserError(f"{where}: {message_line(err)} (the PyTorch importer cannot translate this op)") from err
    return ImportedModel(name, fold_batch_norm(mod), tuple(shape), _torch_reference(module), source, module)


def _load_pt2(path: str, input_shape) -> ImportedModel:
    import torch

    _check_file(path)
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a torch.export archive (a .pt2 is a zip file; this one is not)")
    try:
        with quiet_logger("torch.export", logging.CRITICAL):  # torch logs whole tracebacks on its way to raising
            exported = torch.export.load(path)
    except (zipfile.BadZipFile, RuntimeError, KeyError, ValueError, EOFError) as err:
        raise UserError(f"{path}: not a readable torch.export archive ({message_line(err)})") from err
    example = exported.example_inputs[0][0] if exported.example_inputs else None
    saved_shape = tuple(example.shape) if example is not None else None
    if input_shape is None and saved_shape is None:
        raise UserError(f"{path}: the archive stores no example input; pass --input-shape")
    name = os.path.splitext(os.path.basename(path))[0]
    module = exported.module(check_guards=False)
    if input_shape is None or input_shape == saved_shape:
        return _from_torch(name, module, saved_shape, "pt2", where=path, exported=exported)
    # Another input shape: re-export the archive's graph (works when its shapes are not baked in).
    try:
        with torch.no_grad():
            module(torch.zeros(input_shape))
    except Exception as err:  # noqa: BLE001
        raise UserError(
            f"--input-shape {','.join(map(str, input_shape))}: {path} was exported for {saved_shape} and "
            f"does not run at this shape ({message_line(err)}); export it with dynamic_shapes"
        ) from err
    return _from_torch(name, module, input_shape, "pt2", where=path)


# --------------------------------------------------------------------------- ONNX


def _load_onnx(path: str, input_shape) -> ImportedModel:
    import onnx
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    _check_file(path)
    try:
        proto = onnx.load(path)
        onnx.checker.check_model(proto)
    except Exception as err:  # noqa: BLE001 - protobuf / checker errors
        raise UserError(f"{path}: not a valid ONNX model ({message_line(err)})") from err
    graph_inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    if len(graph_inputs) != 1:
        raise UserError(f"{path}: expected one image input, the graph has {len(graph_inputs)}")
    inp = graph_inputs[0]
    dims = tuple(d.dim_value for d in inp.type.tensor_type.shape.dim)
    shape = input_shape or dims
    if not shape or any(d <= 0 for d in shape):
        raise UserError(f"{path}: input {inp.name!r} has a dynamic shape {dims}; pass --input-shape")
    proto = _simplify_onnx(path, proto)
    try:
        mod = from_onnx(proto, shape_dict={inp.name: list(shape)}, keep_params_in_input=False)
    except tvm.error.OpNotImplemented as err:
        raise UserError(f"{path}: {message_line(err)}") from err
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{path}: the ONNX importer failed: {message_line(err)}") from err
    name = os.path.splitext(os.path.basename(path))[0]
    return ImportedModel(name, fold_batch_norm(mod), tuple(shape), _ort_reference(path, inp.name), "onnx")


def _simplify_onnx(path: str, proto):
    """ONNX Runtime's basic graph optimisations (constant folding), offline.

    The TorchScript exporter writes ``torch.chunk`` as Shape/Gather/Div/Slice arithmetic,
    which TVM imports as dynamically shaped slices; folded, it is a static ``Slice``. A graph
    that ONNX Runtime cannot load is passed on unchanged (TVM's importer names the bad op).
    """
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = os.path.join(tmp, "basic.onnx")
        options.log_severity_level = 3
        try:
            ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            return onnx.load(options.optimized_model_filepath)
        except Exception as err:  # noqa: BLE001
            log.debug("%s: ONNX Runtime could not pre-optimise the graph (%s)", path, err)
            return proto


def _ort_reference(path: str, input_name: str) -> Callable[[np.ndarray], np.ndarray]:
    def run(x: np.ndarray) -> np.ndarray:
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return session.run(None, {input_name: x})[0]

    return run


# --------------------------------------------------------------------------- common


def fold_batch_norm(mod):
    """Fold inference batch norm into the convolution before it; decompose any left over.

    The arithmetic this leaves on constants is evaluated with NumPy (``FoldConstantArith``);
    TVM's ``FoldConstant`` would build every op with LLVM (most of an import's time).
    """
    import tvm
    from tvm import relax

    from .passes import FoldConstantArith

    seq = tvm.transform.Sequential(
        [
            relax.transform.FoldBatchnormToConv2D(),
            relax.transform.DecomposeOpsForInference(),
            FoldConstantArith(),
            relax.transform.FoldConstant(),
            relax.transform.CanonicalizeBindings(),
            relax.transform.DeadCodeElimination(),
        ]
    )
    return seq(mod)


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: the file is empty")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # TVM errors end with the useful line; Python ones start with it.
    return (lines[-1] if "Traceback" in text or "Check failed" in text else lines[0]) if lines else type(err).__name__
