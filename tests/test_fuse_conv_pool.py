"""FuseConvPool: golden IR, chains it must leave alone, and the zoo models' stems."""

import numpy as np
import pytest

import tvm
from tvm import relax

from tvmshuffle import pipeline, targets
from tvmshuffle.passes import FuseConvPool

from conftest import chain_module, composite_module, kernel_layers, zoo_import

FUSED_NAME = "fused_relax_nn_conv2d_relax_add_relax_nn_relu_relax_nn_max_pool2d"
SHAPE = [1, 3, 16, 16]


def _weights(out=8, groups=1, seed=0):
    rng = np.random.default_rng(seed)
    return (relax.const(rng.standard_normal((out, 3 // groups, 3, 3)).astype("float32")),
            relax.const(rng.standard_normal((1, out, 1, 1)).astype("float32")))


def _chain(bb, x, weights, groups=1, pool=relax.op.nn.max_pool2d):
    """conv3x3/2 → bias → ReLU, emitted into ``bb``'s dataflow block; → the pool 3x3/2 (to emit)."""
    weight, bias = weights
    y = bb.emit(relax.op.nn.conv2d(x, weight, strides=2, padding=1, groups=groups))
    y = bb.emit(relax.op.add(y, bias))
    y = bb.emit(relax.op.nn.relu(y))
    return pool(y, pool_size=3, strides=2, padding=1)


def _module(weights, **chain):
    return chain_module(relax.TensorType(SHAPE, "float32"), lambda bb, x: _chain(bb, x, weights, **chain))


# =========================================================================== golden IR


def test_the_stem_conv_and_the_max_pool_after_it_become_one_function():
    weights = _weights()
    before = _module(weights)
    expected = composite_module(FUSED_NAME, "conv_pool", relax.TensorType(SHAPE, "float32"), list(weights), _chain)
    tvm.ir.assert_structural_equal(FuseConvPool()(before), expected)


@pytest.mark.parametrize("case", ["grouped_conv", "average_pool", "conv_output_read_twice"])
def test_chains_the_fused_kernel_does_not_compute_are_left_alone(case):
    """A grouped conv, an average pool, a conv output something else also reads."""
    if case == "grouped_conv":
        mod = _module(_weights(out=6, groups=3), groups=3)
    elif case == "average_pool":
        mod = _module(_weights(), pool=relax.op.nn.avg_pool2d)
    else:
        weight, bias = _weights()

        def read_twice(bb, x):
            y = bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(
                bb.emit(relax.op.nn.conv2d(x, weight, strides=2, padding=1)), bias))))
            return relax.Tuple([bb.emit(relax.op.nn.max_pool2d(y, pool_size=3, strides=2, padding=1)), y])

        mod = chain_module(relax.TensorType(SHAPE, "float32"), read_twice)
    tvm.ir.assert_structural_equal(FuseConvPool()(mod), mod)


# =========================================================================== after lowering


@pytest.mark.parametrize("model", ["shufflenet_v2_x1_0", "shufflenet_v1_g3_x1_0"])
def test_the_zoo_models_stem_is_one_kernel_with_its_max_pool(model):
    """Lowered, each model has one conv_pool kernel (its stem: 3 → 24 channels, 3x3/2, bias and
    ReLU, max pool 3x3/2) and no max pool of its own; the unfused lowering keeps them apart."""
    lowered = pipeline.lower(zoo_import(model, (1, 3, 224, 224)).mod, targets.resolve("host"))
    (layer,) = kernel_layers(lowered, "conv_pool")
    conv, pool = layer.conv, layer.pool
    assert (conv.in_channels, conv.out_channels, conv.kernel, conv.stride, conv.out_hw) == (3, 24, (3, 3), (2, 2), (112, 112))
    assert [b.rstrip("0123456789") for b in conv.epilogue] == ["T_add", "compute"]
    assert (pool.block, pool.kernel, pool.stride, pool.out_hw) == ("pool_max", (3, 3), (2, 2), (56, 56))
    assert not [x for x in kernel_layers(lowered, "pool") if x.block == "pool_max"]
    unfused = pipeline.lower(zoo_import(model, (1, 3, 224, 224)).mod, targets.resolve("host"), fuse=False)
    assert not kernel_layers(unfused, "conv_pool")
