"""FuseDepthwisePointwise: golden IR, chains it must leave alone, and the zoo models' kernels."""

import numpy as np
import pytest

import tvm
from tvm import relax

from tvmshuffle import pipeline, targets
from tvmshuffle.ops import emit_shuffle_group_conv2d
from tvmshuffle.passes import FuseDepthwisePointwise

from conftest import chain_module, composite_module, kernel_layers, zoo_import

FUSED_NAME = "fused_relax_nn_conv2d_relax_add_relax_nn_conv2d_relax_add_relax_nn_relu"


def _const(rng, *shape):
    return relax.const(rng.standard_normal(shape).astype("float32"))


def _weights(channels=4, out=8, seed=0):
    rng = np.random.default_rng(seed)
    return (_const(rng, channels, 1, 3, 3), _const(rng, 1, channels, 1, 1),
            _const(rng, out, channels, 1, 1), _const(rng, 1, out, 1, 1))


def _chain(bb, x, weights, between=None, pw_strides=1):
    """dw3x3 → bias → [between] → 1x1 → bias, emitted into ``bb``'s dataflow block; → ReLU (to emit)."""
    w_dw, b_dw, w_pw, b_pw = weights
    channels = int(w_dw.ty.shape.values[0])
    y = bb.emit(relax.op.nn.conv2d(x, w_dw, padding=[1, 1, 1, 1], groups=channels))
    y = bb.emit(relax.op.add(y, b_dw))
    if between is not None:
        y = bb.emit(between(y))
    y = bb.emit(relax.op.nn.conv2d(y, w_pw, strides=pw_strides))
    y = bb.emit(relax.op.add(y, b_pw))
    return relax.op.nn.relu(y)


def _module(weights, **chain):
    return chain_module(relax.TensorType([1, 4, 6, 6], "float32"), lambda bb, x: _chain(bb, x, weights, **chain))


# =========================================================================== golden IR


def test_a_depthwise_conv_and_the_1x1_conv_after_it_become_one_function():
    weights = _weights()
    before = _module(weights)
    expected = composite_module(FUSED_NAME, "dw_pointwise", relax.TensorType([1, 4, 6, 6], "float32"),
                                list(weights), _chain)
    tvm.ir.assert_structural_equal(FuseDepthwisePointwise()(before), expected)


@pytest.mark.parametrize("case", ["relu_between", "pointwise_strided", "depthwise_read_twice"])
def test_chains_the_fused_kernel_does_not_compute_are_left_alone(case):
    """A ReLU between the two convs, a strided 1x1 conv, a depthwise output something else reads."""
    weights = _weights()
    if case == "relu_between":
        mod = _module(weights, between=relax.op.nn.relu)
    elif case == "pointwise_strided":
        mod = _module(weights, pw_strides=2)
    else:
        w_dw, b_dw, w_pw, b_pw = weights

        def read_twice(bb, x):
            d = bb.emit(relax.op.nn.conv2d(x, w_dw, padding=[1, 1, 1, 1], groups=4))
            d = bb.emit(relax.op.add(d, b_dw))
            return relax.Tuple([bb.emit(relax.op.add(bb.emit(relax.op.nn.conv2d(d, w_pw)), b_pw)), d])

        mod = chain_module(relax.TensorType([1, 4, 6, 6], "float32"), read_twice)
    tvm.ir.assert_structural_equal(FuseDepthwisePointwise()(mod), mod)


# =========================================================================== after lowering


def test_a_shuffled_depthwise_conv_fuses_with_the_grouped_1x1_after_it():
    """ShuffleNet V1's unit: ``shuffle_group_conv2d`` (depthwise, through the shuffle) → bias →
    grouped 1x1 → bias → residual add → ReLU: one kernel, the shuffle's depthwise stages first."""
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 12, 8, 8], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = emit_shuffle_group_conv2d(bb, x, _const(rng, 12, 1, 3, 3), shuffle_groups=3, conv_groups=12, padding=1)
            y = bb.emit(relax.op.add(y, _const(rng, 1, 12, 1, 1)))
            y = bb.emit(relax.op.nn.conv2d(y, _const(rng, 12, 4, 1, 1), groups=3))
            y = bb.emit(relax.op.add(y, _const(rng, 1, 12, 1, 1)))
            y = bb.emit(relax.op.add(y, x))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(y)))
        bb.emit_func_output(out)
    (layer,) = kernel_layers(pipeline.lower(bb.get(), targets.resolve("host")), "dw_pointwise")
    assert layer.depthwise.shuffled and layer.depthwise.kind == "depthwise"
    assert layer.pointwise.kind == "pointwise" and layer.pointwise.conv_groups == 3
    assert [b.rstrip("0123456789") for b in layer.pointwise.epilogue] == ["T_add", "T_add", "compute"]


@pytest.mark.parametrize("model, count", [("shufflenet_v2_x1_0", 9), ("shufflenet_v1_g3_x1_0", 6)])
def test_every_depthwise_conv_of_the_zoo_models_is_fused_with_its_1x1_conv(model, count):
    """Distinct kernels (FuseTIR shares equal ones): V2 3 stride-1 shapes and 6 stride-2 (each
    downsampling unit's two branches; branch 1 of the last two reads the shuffle), V1 g3 3
    stride-1 and 3 stride-2; no depthwise kernel is left alone."""
    lowered = pipeline.lower(zoo_import(model, (1, 3, 224, 224)).mod, targets.resolve("host"))
    assert len(kernel_layers(lowered, "dw_pointwise")) == count
    assert not kernel_layers(lowered, "depthwise")
    unfused = pipeline.lower(zoo_import(model, (1, 3, 224, 224)).mod, targets.resolve("host"), across_layers=False)
    assert not kernel_layers(unfused, "dw_pointwise")
