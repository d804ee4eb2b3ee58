"""The TIR analysis (:mod:`tvmshuffle.tir_analysis`) on small kernels whose numbers are worked
out by hand: MACs, minimum bytes, the conv description, the epilogue names; and what it must
not read as a conv."""

import numpy as np

import tvm
from tvm import relax

from tvmshuffle import pipeline, schedules, targets, tir_analysis
from tvmshuffle.ops import emit_shuffle_group_conv2d

HOST = targets.resolve("host")


def _primfuncs(mod):
    return [f for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]


def _fused_conv(data_shape, weight_shape, relu: bool, **params):
    """The one PrimFunc of shuffle_group_conv2d + bias (+ ReLU), as the compiler fuses it."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(list(data_shape), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = emit_shuffle_group_conv2d(bb, x, relax.const(np.ones(weight_shape, "float32")), **params)
            y = bb.emit(relax.op.add(y, relax.const(np.ones((1, weight_shape[0], 1, 1), "float32"))))
            if relu:
                y = bb.emit(relax.op.nn.relu(y))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    (func,) = _primfuncs(pipeline.lower(bb.get(), HOST, fuse=False))
    return func


def _pointwise():
    """V2's 1x1 on the second half of a shuffled (g=2) 16-channel 8x8 tensor: 8 → 8 channels."""
    return _fused_conv((1, 16, 8, 8), (8, 8, 1, 1), relu=True, shuffle_groups=2, channel_offset=8)


def test_describe_reads_a_fused_shuffle_pointwise_conv():
    layer = tir_analysis.describe(_pointwise())
    assert isinstance(layer, schedules.ConvLayer)  # the class the schedule files are given
    assert (layer.kind, layer.shuffled, layer.kernel, layer.stride, layer.out_hw) == \
        ("pointwise", True, (1, 1), (1, 1), (8, 8))
    assert (layer.in_channels, layer.group_in, layer.out_channels, layer.conv_groups) == (16, 8, 8, 1)
    assert not layer.padded and layer.pad_block is None
    assert layer.epilogue == ["T_add", "compute"]


def test_macs_and_minimum_bytes_of_the_pointwise_conv_by_hand():
    func = _pointwise()
    blocks = tir_analysis.blocks(func)
    assert [b.name_hint for b in blocks] == ["shuffle_group_conv2d", "T_add", "compute"]
    # 8 outputs x 8x8 pixels x 8 input channels x 1x1
    assert tir_analysis.macs(blocks) == 8 * 8 * 8 * 8
    params = list(func.params)
    inputs, outputs = params[:-1], params[-1:]
    assert [tir_analysis.epilogue_name(b, params) for b in blocks[1:]] == ["bias", "relu"]
    conv = blocks[0]
    (data_load,) = [ld for ld in tir_analysis.walk(conv.body.value, "TensorLoad")
                    if ld.source.same_as(params[0])]
    activation = tir_analysis.activation_param(data_load, [], inputs)
    assert activation.same_as(params[0])
    # fp32: 8 of the 16 input channels read (8*64), weight 8*8, bias 8, output 8*64
    assert tir_analysis.min_bytes(inputs, outputs, activation, count=8) == 4 * (8 * 64 + 8 * 8 + 8 + 8 * 64)
    # every input channel counted when the activation is not named
    assert tir_analysis.min_bytes(inputs, outputs) == 4 * (16 * 64 + 8 * 8 + 8 + 8 * 64)


def test_a_strided_depthwise_conv_through_a_pad_stage():
    func = _fused_conv((1, 12, 8, 8), (12, 1, 3, 3), relu=False, shuffle_groups=3, conv_groups=12,
                       strides=2, padding=1)
    layer = tir_analysis.describe(func)
    assert (layer.kind, layer.stride, layer.out_hw, layer.conv_groups) == ("depthwise", (2, 2), (4, 4), 12)
    assert layer.padded and layer.pad_block == tir_analysis.PAD_BLOCK and layer.epilogue == ["T_add"]
    # 12 channels x 4x4 outputs x 3x3 taps; the pad stage and the bias add are no MACs
    assert tir_analysis.macs(tir_analysis.blocks(func)) == 12 * 4 * 4 * 9


def test_a_scheduled_kernel_is_walked_but_not_described():
    """A hand-scheduled kernel (its reduction split into init and update blocks): its blocks are
    still found, its MACs are the same, and describe() does not take it for a lowered conv."""
    func = _pointwise()
    scheduled = schedules.schedule_primfunc(func, HOST)
    assert scheduled is not None
    assert "shuffle_group_conv2d_update" in [b.name_hint for b in tir_analysis.blocks(scheduled)]
    assert tir_analysis.macs(tir_analysis.blocks(scheduled)) == tir_analysis.macs(tir_analysis.blocks(func))
    assert tir_analysis.describe(scheduled) is None


def test_a_pool_is_described_as_a_pool_and_a_sum_not_at_all():
    """A max pool + ReLU has a reduction (max) but no multiply-accumulate: described as a pool
    (its ReLU the epilogue), 0 MACs. Negative: a ReLU + sum (no conv, matmul or pool): None."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 8, 8, 8], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.max_pool2d(x, pool_size=3, strides=2, padding=1))
            out = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(out)
    (pool,) = _primfuncs(pipeline.lower(bb.get(), HOST, fuse=True))
    layer = tir_analysis.describe(pool)
    assert (layer.kind, layer.channels, layer.kernel, layer.stride, layer.out_hw, layer.padded_hw) == (
        "pool", 8, (3, 3), (2, 2), (4, 4), (10, 10))
    assert (layer.block, layer.pad_block, len(layer.epilogue)) == ("pool_max", "pad_temp", 1)
    assert tir_analysis.macs(tir_analysis.blocks(pool)) == 0

    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(x))
            out = bb.emit_output(relax.op.sum(y, axis=[2, 3]))
        bb.emit_func_output(out)
    funcs = _primfuncs(pipeline.lower(bb.get(), HOST, fuse=True))
    assert funcs
    for func in funcs:
        assert tir_analysis.blocks(func)  # it has blocks, just none to describe
        assert tir_analysis.describe(func) is None
        assert tir_analysis.macs(tir_analysis.blocks(func)) == 0
