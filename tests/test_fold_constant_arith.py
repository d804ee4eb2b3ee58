"""FoldConstantArith: float32 arithmetic on constants evaluated with NumPy; everything else kept.

Golden (Before → Expected, built with the BlockBuilder since the constants are tensors), the
batch-norm chain a real import leaves, and near-miss negatives that must come out unchanged.
Numerics of whole models against PyTorch are in test_compile.py (every import runs the pass).
"""

import numpy as np
import tvm
from tvm import relax

from tvmshuffle.passes import FoldConstantArith

RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 2, 3, 3)).astype("float32")
VAR = RNG.random(4).astype("float32") + 0.5
GAMMA = RNG.standard_normal(4).astype("float32")


def _module(body) -> tvm.IRModule:
    """``main(x: (1, 2, 8, 8))`` whose dataflow block is what ``body(bb, x)`` emits."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 2, 8, 8], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def _conv(bb, x, weight):
    return bb.emit(relax.op.nn.conv2d(x, weight, padding=1))


def test_batch_norm_scale_chain_folds_into_one_weight():
    def before(bb, x):
        std = bb.emit(relax.op.sqrt(bb.emit(relax.op.add(relax.const(VAR), relax.const(1e-5, "float32")))))
        scale = bb.emit(relax.op.reshape(bb.emit(relax.op.divide(relax.const(GAMMA), std)), (4, 1, 1, 1)))
        return _conv(bb, x, bb.emit(relax.op.multiply(relax.const(W), scale)))

    folded = (W * (GAMMA / np.sqrt(VAR + np.float32(1e-5))).reshape(4, 1, 1, 1)).astype("float32")

    def expected(bb, x):  # the folded weight stays bound to a variable; FoldConstant inlines it
        return _conv(bb, x, bb.emit(relax.const(folded)))

    after = relax.transform.DeadCodeElimination()(FoldConstantArith()(_module(before)))
    tvm.ir.assert_structural_equal(after, _module(expected))


def test_permute_dims_and_subtract_of_constants_fold():
    a = RNG.standard_normal((3, 5)).astype("float32")

    def before(bb, x):
        t = bb.emit(relax.op.permute_dims(relax.const(a)))
        return bb.emit(relax.op.subtract(relax.const(np.ones((5, 3), "float32")), t))

    def expected(bb, x):
        return bb.emit(relax.const(np.ones((5, 3), "float32") - a.T))

    after = relax.transform.DeadCodeElimination()(FoldConstantArith()(_module(before)))
    tvm.ir.assert_structural_equal(after, _module(expected))


def test_arithmetic_on_the_input_is_left_alone():
    def body(bb, x):
        return bb.emit(relax.op.multiply(x, relax.const(np.float32(2.0))))

    before = _module(body)
    tvm.ir.assert_structural_equal(FoldConstantArith()(before), before)


def test_other_ops_and_dtypes_are_left_for_fold_constant():
    def body(bb, x):
        ints = bb.emit(relax.op.add(relax.const(np.arange(4, dtype="int32")), relax.const(np.int32(1))))
        exp = bb.emit(relax.op.exp(relax.const(VAR)))  # not an op this pass evaluates
        return bb.emit(relax.op.add(bb.emit(relax.op.astype(ints, "float32")), exp))

    before = _module(body)
    tvm.ir.assert_structural_equal(FoldConstantArith()(before), before)


def test_result_matches_tvm_fold_constant():
    """The same numbers as TVM's own FoldConstant (which builds each op with LLVM)."""
    def body(bb, x):
        std = bb.emit(relax.op.sqrt(bb.emit(relax.op.add(relax.const(VAR), relax.const(1e-5, "float32")))))
        return _conv(bb, x, bb.emit(relax.op.multiply(relax.const(W), bb.emit(relax.op.reshape(
            bb.emit(relax.op.divide(relax.const(GAMMA), std)), (4, 1, 1, 1))))))

    ours = relax.transform.FoldConstant()(FoldConstantArith()(_module(body)))
    theirs = relax.transform.FoldConstant()(_module(body))
    tvm.ir.assert_structural_equal(ours, theirs)
