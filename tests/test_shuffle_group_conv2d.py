"""The fused ``shuffle_group_conv2d`` operator: numerics, op pattern, epilogue fusion."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tvm
from tvm import relax, te

from tvmshuffle.ops import (
    channel_shuffle_ref,
    emit_shuffle_gather,
    emit_shuffle_group_conv2d,
    shuffle_gather,
    shuffle_group_conv2d,
    shuffle_group_conv2d_ref,
    shuffle_source_channel,
)

RTOL = ATOL = 1e-4


def _tensor(shape):
    return relax.Var("v", relax.TensorType(list(shape), "float32"))


def _conv_module(data_shape, weight_shape, **params):
    """``main(x, w) = shuffle_group_conv2d(x, w, **params)``."""
    bb = relax.BlockBuilder()
    x, w = _tensor(data_shape), _tensor(weight_shape)
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(emit_shuffle_group_conv2d(bb, x, w, **params))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, *inputs):
    executable = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy()


def _random(*shape, seed=0):
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype("float32")


def _torch_reference(x, w, shuffle_groups, conv_groups, strides, padding, channel_offset=0):
    count = w.shape[1] * conv_groups
    shuffled = F.channel_shuffle(torch.from_numpy(x), shuffle_groups)[:, channel_offset : channel_offset + count]
    return F.conv2d(shuffled, torch.from_numpy(w), stride=strides, padding=padding, groups=conv_groups).numpy()


# --------------------------------------------------------------------------- the index


@pytest.mark.parametrize("groups,channels", [(2, 8), (3, 12), (4, 8), (8, 24), (1, 5), (6, 6)])
def test_shuffle_index_is_the_pytorch_shuffle(groups, channels):
    index = shuffle_source_channel(np.arange(channels), groups, channels)
    x = np.arange(channels, dtype="float32").reshape(1, channels, 1, 1)
    np.testing.assert_array_equal(channel_shuffle_ref(x, groups)[0, :, 0, 0], index)
    np.testing.assert_array_equal(F.channel_shuffle(torch.from_numpy(x), groups)[0, :, 0, 0].numpy(), index)


# --------------------------------------------------------------------------- numerics

CASES = {
    # name: (data shape, weight shape, shuffle_groups, conv_groups, strides, padding, channel_offset)
    "grouped_1x1_g2": ((1, 8, 5, 5), (8, 4, 1, 1), 2, 2, 1, 0, 0),
    "grouped_1x1_g3": ((1, 12, 5, 5), (24, 4, 1, 1), 3, 3, 1, 0, 0),
    "grouped_1x1_g4": ((1, 16, 4, 6), (8, 4, 1, 1), 4, 4, 1, 0, 0),
    "grouped_1x1_g8": ((1, 32, 3, 3), (16, 4, 1, 1), 8, 8, 1, 0, 0),
    "depthwise_3x3_s1": ((1, 12, 7, 7), (12, 1, 3, 3), 3, 12, 1, 1, 0),
    "depthwise_3x3_s2": ((1, 12, 7, 7), (12, 1, 3, 3), 3, 12, 2, 1, 0),
    "dense_1x1": ((2, 12, 4, 4), (10, 12, 1, 1), 4, 1, 1, 0, 0),
    "dense_3x3_s2_pad": ((1, 8, 9, 9), (6, 8, 3, 3), 2, 1, 2, 1, 0),
    "offset_second_half_1x1": ((1, 16, 5, 5), (8, 8, 1, 1), 2, 1, 1, 0, 8),
    "offset_first_half_depthwise": ((1, 16, 5, 5), (8, 1, 3, 3), 2, 8, 1, 1, 0),
    "offset_middle_grouped": ((1, 12, 4, 4), (6, 2, 1, 1), 3, 3, 1, 0, 3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_and_pytorch(case):
    data_shape, weight_shape, shuffle_groups, conv_groups, strides, padding, offset = CASES[case]
    x, w = _random(*data_shape), _random(*weight_shape, seed=1)
    params = dict(shuffle_groups=shuffle_groups, conv_groups=conv_groups, strides=strides, padding=padding)
    out = _run(_conv_module(data_shape, weight_shape, channel_offset=offset, **params), x, w)
    expected = shuffle_group_conv2d_ref(x, w, channel_offset=offset, **params)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out, _torch_reference(x, w, channel_offset=offset, **params), rtol=RTOL, atol=ATOL)


def test_asymmetric_padding_and_dilation():
    x, w = _random(1, 8, 9, 8), _random(8, 4, 3, 3, seed=1)
    params = dict(shuffle_groups=4, conv_groups=2, strides=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2))
    out = _run(_conv_module(x.shape, w.shape, **params), x, w)
    np.testing.assert_allclose(out, shuffle_group_conv2d_ref(x, w, **params), rtol=RTOL, atol=ATOL)


def test_gather_matches_the_shuffled_slice():
    x = _random(1, 12, 3, 3)
    bb = relax.BlockBuilder()
    data = _tensor(x.shape)
    with bb.function("main", [data]):
        with bb.dataflow():
            out = bb.emit_output(emit_shuffle_gather(bb, data, shuffle_groups=3, channel_offset=4, count=6))
        bb.emit_func_output(out)
    np.testing.assert_array_equal(_run(bb.get(), x), channel_shuffle_ref(x, 3)[:, 4:10])


@pytest.mark.parametrize(
    "weight_shape,params,message",
    [
        ((8, 4, 1, 1), dict(shuffle_groups=3, conv_groups=2), "does not divide"),
        ((8, 4, 1, 1), dict(shuffle_groups=2, conv_groups=2, channel_offset=4), "not inside"),
        ((6, 2, 1, 1), dict(shuffle_groups=2, conv_groups=4), "output channels"),
    ],
)
def test_invalid_parameters_are_rejected(weight_shape, params, message):
    data = te.placeholder((1, 8, 4, 4), name="data")
    weight = te.placeholder(weight_shape, name="weight")
    with pytest.raises(ValueError, match=message):
        shuffle_group_conv2d(data, weight, **params)
    with pytest.raises(ValueError, match="does not divide"):
        shuffle_gather(data, 3)


# --------------------------------------------------------------------------- fusion


@pytest.mark.parametrize("padding", [0, 1])
def test_op_pattern_is_out_elementwise_fusable(padding):
    mod = _conv_module((1, 12, 6, 6), (12, 1, 3, 3), shuffle_groups=3, conv_groups=12, padding=padding)
    mod = relax.transform.AnnotateTIROpPattern()(mod)
    assert int(mod["shuffle_group_conv2d"].attrs["op_pattern"]) == 4  # kOutEWiseFusable


def test_bias_relu_and_residual_add_fuse_behind_it():
    """conv → + bias → + residual → ReLU lowers to a single fused kernel."""
    bb = relax.BlockBuilder()
    x, w, b = _tensor((1, 12, 6, 6)), _tensor((12, 4, 1, 1)), _tensor((1, 12, 1, 1))
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            conv = emit_shuffle_group_conv2d(bb, x, w, shuffle_groups=3, conv_groups=3)
            biased = bb.emit(relax.op.add(conv, b))
            residual = bb.emit(relax.op.add(biased, x))
            out = bb.emit_output(relax.op.nn.relu(residual))
        bb.emit_func_output(out)
    lowered = tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(),
        ]
    )(bb.get())

    kernels = [gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 1 and "shuffle_group_conv2d" in kernels[0], kernels
    text = lowered[kernels[0]].script()
    assert text.count("T.max(") == 1 and 'T.sblock("shuffle_group_conv2d")' in text

    xs, ws, bs = _random(1, 12, 6, 6), _random(12, 4, 1, 1, seed=1), _random(1, 12, 1, 1, seed=2)
    expected = np.maximum(shuffle_group_conv2d_ref(xs, ws, 3, 3) + bs + xs, 0)
    np.testing.assert_allclose(_run(lowered, xs, ws, bs), expected, rtol=RTOL, atol=ATOL)
