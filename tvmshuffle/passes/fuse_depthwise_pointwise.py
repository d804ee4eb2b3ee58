"""FuseDepthwisePointwise: put a depthwise 3x3 conv and the 1x1 conv that reads it in one kernel.

Pattern matched (Relax, before ``LegalizeOps``; NCHW, statically shaped, constant weights)::

    d = R.nn.conv2d(x, w_dw, groups=C)            # depthwise KxK: C -> C channels, or
                                                  # a call_tir of shuffle_group_conv2d with a
                                                  # [C, 1, K, K] weight (it reads a shuffle)
    b = R.add(d, bias_dw)                         # its folded batch norm
    p = R.nn.conv2d(b, w_pw)                      # 1x1, stride 1, no padding (dense or grouped)
    e = R.add(p, bias_pw)                         # its batch norm,
    [e = R.add(e, residual)] [e = R.nn.relu(e)]   # and the epilogue FuseOps would fuse behind it

ShuffleNet V2's branch ``1x1 → dw3x3 → 1x1`` (the depthwise conv and the second 1x1) and the
downsampling branches ``dw3x3/2 → 1x1``; ShuffleNet V1's ``dw3x3 → grouped 1x1``, whose
depthwise conv reads the shuffle and so is already a ``shuffle_group_conv2d``
(:class:`FuseShuffleGroupConv` runs first).

Rewrite: the matched chain becomes one function (``FuseOpsByPattern``, the composite
``dw_pointwise``, marked primitive), which ``LegalizeOps`` lowers to TIR and ``FuseTIR`` makes
one PrimFunc: the depthwise conv's stages (padding, conv, bias), then the 1x1 conv's (its
LegalizeOps copy ``pad_temp``, conv, epilogue). A schedule can then compute the depthwise
output a tile at a time right where the 1x1 conv reads it, so it never goes to memory
(``schedules/dw_pointwise.py``); scheduled stage after stage, it is the two kernels in one call.

A depthwise conv that something else also reads, a 1x1 conv with padding or stride, or a
nonlinearity between the two (where the bias is not the only thing in between) do not match.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from ..ops.shuffle_group_conv2d import CONV_NAME
from .fuse_shuffle_group_conv import static_shape

#: the composite's name (and the fused PrimFunc's name prefix after FuseTIR: ``fused_relax_nn_conv2d_…``)
COMPOSITE = "dw_pointwise"


def _is_depthwise(call: relax.Call) -> bool:
    """A depthwise KxK conv: ``R.nn.conv2d`` (NCHW, OIHW, ``groups`` = channels, no dilation) or a
    ``call_tir`` of the fused ``shuffle_group_conv2d`` whose weight is ``[C, 1, K, K]``."""
    if call.op.same_as(tvm.ir.Op.get("relax.call_tir")):
        callee, args = call.args[0], call.args[1]
        if not isinstance(callee, tvm.ir.GlobalVar) or not callee.name_hint.startswith(CONV_NAME) \
                or not isinstance(args, relax.Tuple) or len(args.fields) != 2:
            return False
        data, weight = static_shape(args.fields[0]), static_shape(args.fields[1])
        out = static_shape(call)
        return (data is not None and weight is not None and out is not None and len(weight) == 4
                and weight[1] == 1 and weight[0] == out[1] and weight[2] == weight[3] > 1)
    attrs = call.attrs
    data, weight = static_shape(call.args[0]), static_shape(call.args[1])
    if data is None or weight is None or len(data) != 4 or not nchw_conv(attrs):
        return False
    channels = data[1]
    return int(attrs.groups) == channels and weight[:2] == [channels, 1] and weight[2] == weight[3] > 1


def nchw_conv(attrs) -> bool:
    """A conv2d's attrs say NCHW data, an OIHW weight, an NCHW output and no dilation."""
    return (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) == ("NCHW", "OIHW", "NCHW") \
        and all(int(d) == 1 for d in attrs.dilation)


def _is_pointwise(call: relax.Call) -> bool:
    """A 1x1 ``R.nn.conv2d`` (dense or grouped) with stride 1 and no padding, NCHW."""
    weight = static_shape(call.args[1])
    return (weight is not None and weight[2:] == [1, 1] and nchw_conv(call.attrs)
            and all(int(v) == 1 for v in call.attrs.strides) and not any(int(v) for v in call.attrs.padding))


def _check(context) -> bool:
    """The two convs are what the fused kernel computes (float32), and nothing outside the
    chain reads the depthwise output."""
    dw, pw = context.annotated_expr["dw"], context.annotated_expr["pw"]
    if str(dw.ty.dtype) != "float32" or not _is_depthwise(dw) or not _is_pointwise(pw):
        return False
    return read_once(context, ("dw", "dw_bias"))


def read_once(context, names) -> bool:
    """Whether each of the matched expressions ``names`` (of a ``FuseOpsByPattern`` check's
    ``context``) is bound to a variable that one expression alone reads: the next op of the chain,
    so that fusing the chain hides no value anything else needs."""
    for name in names:
        var = context.value_to_bound_var.get(context.annotated_expr[name])
        if var is None or len(context.var_usages.get(var, [])) != 1:
            return False
    return True


def patterns() -> list[tuple]:
    """The fusion patterns, longest epilogue first (``FuseOpsByPattern`` takes the first that matches)."""
    dw = is_op("relax.nn.conv2d")(wildcard(), is_const()) | is_op("relax.call_tir")(wildcard(), wildcard())
    dw_bias = is_op("relax.add")(dw, is_const())
    pw = is_op("relax.nn.conv2d")(dw_bias, is_const())
    bias = is_op("relax.add")(pw, is_const())
    residual = is_op("relax.add")(bias, wildcard())
    chains = [
        is_op("relax.nn.relu")(residual),
        is_op("relax.nn.relu")(bias),
        residual,
        bias,
    ]
    annotations = {"dw": dw, "dw_bias": dw_bias, "pw": pw}
    return [(COMPOSITE, chain, annotations, _check) for chain in chains]


def FuseDepthwisePointwise() -> tvm.ir.transform.Pass:  # noqa: N802 - TVM's pass naming
    """The pass (``FuseOpsByPattern`` with :func:`patterns`; constants stay arguments, as
    ``FuseOps`` leaves them, so the weights are ``param_N`` buffers of the fused PrimFunc)."""
    return relax.transform.FuseOpsByPattern(patterns(), bind_constants=False)
