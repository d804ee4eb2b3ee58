"""The layers studied: the distinct fused ``shuffle_group_conv2d`` PrimFuncs of the chosen models,
with their MACs, minimum traffic and epilogue, read from the TIR (by :mod:`tvmshuffle.tir_analysis`;
what is the study's own here is the layer's label)."""

from __future__ import annotations

import difflib
import logging
import os
import time
from dataclasses import dataclass, field

from .. import frontend, kernels, pipeline
from ..errors import UserError
from ..tir_analysis import (CONV_BLOCK, activation_param, blocks, buffer_shape, describe, epilogue_name, int_value,
                            min_bytes, walk)

from .config import FAMILIES, StudyConfig, _bar, _preset

log = logging.getLogger(__name__)

@dataclass
class Layer:
    """One distinct fused ``shuffle_group_conv2d`` PrimFunc and where the zoo uses it."""

    #: readable unique id, e.g. ``pw 58/116>58 28x28 g2 +bias+relu``
    layer: str
    kind: str  # "pointwise", "depthwise" or "other"
    func: object  # tvm.tirx.PrimFunc, as lowered
    macs: int
    #: minimum traffic in bytes (see the module docstring)
    bytes: int
    models: list[str]
    calls: int  # calls over all the models read
    name: str = ""  # the kernel's name in the first model that has it
    inputs: list[list[int]] = field(default_factory=list)  # shapes of the arguments read
    outputs: list[list[int]] = field(default_factory=list)  # shapes of the outputs written
    dtypes: list[str] = field(default_factory=list)  # of inputs then outputs
    shuffle_groups: int | None = None
    epilogue: list[str] = field(default_factory=list)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def ai(self) -> float:
        """Arithmetic intensity, flop per byte of minimum traffic."""
        return self.flops / self.bytes if self.bytes else 0.0


# --------------------------------------------------------------------------- models, layers


def study_models() -> list[str]:
    """Every ShuffleNet V1 and V2 model of the zoo, in zoo order."""
    from ..models import zoo

    return [name for name, spec in zoo.MODELS.items() if spec.family in FAMILIES]


def _model_names(config: StudyConfig) -> list[str]:
    from ..models import zoo

    if config.models is None:
        return study_models()
    names = list(dict.fromkeys(config.models))
    for name in names:  # every name before the slow part
        if name.endswith((".pt2", ".onnx")):
            if not os.path.isfile(name):
                raise UserError(f"--model {name}: no such file")
            continue
        if name not in zoo.MODELS:
            close = difflib.get_close_matches(name, list(zoo.MODELS), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"--model: unknown model {name!r}{hint} (`tvmshuffle models` lists them)")
    return names


def fused_layers(config: StudyConfig) -> list[Layer]:
    """Import and lower every model; the distinct fused ``shuffle_group_conv2d`` PrimFuncs.

    Layers are deduplicated by structural equality: one :class:`Layer` per distinct PrimFunc,
    with the models that call it and the number of calls over all of them.
    """
    import tvm_ffi
    from tqdm.contrib.logging import logging_redirect_tqdm

    preset = _preset(config)
    names = _model_names(config)
    layers: list[Layer] = []
    by_hash: dict[int, list[Layer]] = {}
    start = time.perf_counter()
    models_read = 0
    with logging_redirect_tqdm():
        bar = _bar(names, config, desc="lowering", unit="model")
        for name in bar:
            bar.set_postfix_str(name)
            models_read += 1
            imported = frontend.load(name, config.input_shape)
            mod = pipeline.lower(imported.mod, preset, fuse=True, across_layers=False)
            found = 0
            for kernel in kernels.list_kernels(mod):
                if not kernel.fused_shuffle_conv:
                    continue
                func = mod[kernel.name]
                shape = _analyse(func, len(kernel.outputs))
                if shape is None:
                    continue
                found += 1
                h = tvm_ffi.structural_hash(func)
                same = next((l for l in by_hash.get(h, []) if tvm_ffi.structural_equal(l.func, func)), None)
                if same is not None:
                    if imported.name not in same.models:
                        same.models.append(imported.name)
                    same.calls += kernel.calls
                    continue
                if config.layers_limit is not None and len(layers) >= config.layers_limit:
                    continue
                layer = Layer(layer=shape["label"], kind=shape["kind"], func=func, macs=kernel.macs,
                              bytes=shape["bytes"], models=[imported.name], calls=kernel.calls,
                              name=kernel.name, inputs=shape["inputs"], outputs=shape["outputs"],
                              dtypes=shape["dtypes"], shuffle_groups=shape["shuffle_groups"],
                              epilogue=shape["epilogue"])
                layers.append(layer)
                by_hash.setdefault(h, []).append(layer)
            log.debug("%s: %d fused shuffle_group_conv2d kernels", imported.name, found)
            if config.layers_limit is not None and len(layers) >= config.layers_limit:
                break
        bar.close()
    _unique_labels(layers)
    log.info("%d distinct fused shuffle_group_conv2d layers, used by %d of the %d models read (%.0f s)",
             len(layers), len({m for l in layers for m in l.models}), models_read, time.perf_counter() - start)
    return layers


def _unique_labels(layers: list[Layer]) -> None:
    seen: dict[str, int] = {}
    for layer in layers:
        base = layer.layer
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            layer.layer = f"{base} #{seen[base]}"


# --------------------------------------------------------------------------- a layer's facts and label


def _analyse(func, n_outputs: int) -> dict | None:
    """Shape facts of a fused layer; None if it has no ``shuffle_group_conv2d`` block."""
    stages = blocks(func)
    index = next((i for i, b in enumerate(stages) if b.name_hint == CONV_BLOCK), None)
    if index is None:
        return None
    conv = stages[index]
    params = list(func.params)
    inputs, outputs = params[: len(params) - n_outputs], params[len(params) - n_outputs:]
    loads = walk(conv.body.value, "TensorLoad")
    _, out_c, out_h, out_w = buffer_shape(conv.body.buffer)
    facts = {
        "inputs": [buffer_shape(p) for p in inputs],
        "outputs": [buffer_shape(p) for p in outputs],
        "dtypes": [str(p.dtype) for p in params],
        "shuffle_groups": None,
        "epilogue": [epilogue_name(b, params) for b in stages[index + 1:]],
    }
    # the reads of acc + data * weight (the accumulator is the output itself)
    reads = [ld for ld in loads if not ld.source.same_as(conv.body.buffer)]
    if len(reads) < 2 or len(buffer_shape(reads[-1].source)) != 4:
        facts.update(kind="other", label=f"conv {out_c} {out_h}x{out_w}", bytes=min_bytes(inputs, outputs))
        return facts
    data_load = reads[0]
    layer = describe(func)  # kind, kernel, stride, groups: as the hand schedules see it
    kh, kw = layer.kernel
    activation = activation_param(data_load, stages[:index], inputs)
    c_total, height, width = (buffer_shape(activation)[1:4] if activation is not None else (0, 0, 0))
    groups = [int_value(m.b) for m in walk(data_load.indices[1], "FloorMod") if int_value(m.b)]
    ri = [int(iv.dom.extent) for iv in conv.iter_vars if iv.var.name in ("v_ri", "ri")]
    facts["shuffle_groups"] = groups[0] if groups else (ri[0] if ri else None)
    conv_groups = layer.conv_groups
    count = layer.group_in * conv_groups  # channels the convolution reads
    stride = layer.stride[0]
    spatial = f"{height}x{width}" + (f">{out_h}x{out_w}" if (height, width) != (out_h, out_w) else "")
    read = f"{count}/{c_total}" if c_total and c_total != count else f"{count}"
    kind = layer.kind
    if kind == "pointwise":
        label = f"pw {read}>{out_c}" + (f" grp{conv_groups}" if conv_groups > 1 else "") + f" {spatial}"
    elif kind == "depthwise":
        label = f"dw{kh}x{kw} s{stride} {read}" + (f">{out_c}" if out_c != count else "") + f" {spatial}"
    else:
        label = f"conv{kh}x{kw} s{stride} {read}>{out_c}" + (f" grp{conv_groups}" if conv_groups > 1 else "") \
            + f" {spatial}"
    if facts["shuffle_groups"]:
        label += f" g{facts['shuffle_groups']}"
    if facts["epilogue"]:
        label += " +" + "+".join(facts["epilogue"])
    facts.update(kind=kind, label=label,
                 bytes=min_bytes(inputs, outputs, activation, count))
    return facts
