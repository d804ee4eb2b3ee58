"""FuseConvPool: put the stem conv and the max pool that reads it in one kernel.

Pattern matched (Relax, before ``LegalizeOps``; NCHW, statically shaped, constant weights)::

    c = R.nn.conv2d(x, w)                # dense (groups=1) KxK, K > 1, no dilation
    b = R.add(c, bias)                   # its folded batch norm
    [b = R.nn.relu(b)]
    p = R.nn.max_pool2d(b, ...)          # NCHW, no dilation, no ceil_mode

Both ShuffleNets open with ``conv3x3/2 → BN → ReLU → maxpool3x3/2``: the conv writes a
24 x 112 x 112 plane (1.2 MB) that the pool reads once and shrinks four times. Apart, the conv
writes it all to memory and the pool reads it back. ``profile --in-model`` put the stem conv at
0.29 ms of V1 g3 1x's 2.68 ms and 0.17 of V2 1x's 2.56 (Xeon, LLVM ``rocketlake``, 2 threads),
where alone, even with cold caches, it takes 0.10 ms.

Rewrite: the chain becomes one function (``FuseOpsByPattern``, the composite ``conv_pool``,
marked primitive) that ``LegalizeOps`` lowers and ``FuseTIR`` makes one PrimFunc — the conv's
stages (padding, conv, bias, ReLU), then the pool's (padding, ``pool_max``). A schedule can then
compute the conv's rows a block of pool rows at a time, right where the pool reads them
(``schedules/conv_pool.py``), so the conv's plane never goes to memory.

A conv output something else also reads, a grouped conv, or anything but bias and ReLU between
conv and pool does not match.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from .fuse_depthwise_pointwise import nchw_conv, read_once
from .fuse_shuffle_group_conv import static_shape

#: the composite's name
COMPOSITE = "conv_pool"


def _check(context) -> bool:
    """A dense NCHW float32 KxK conv, a plain max pool, and nothing outside the chain reads
    the conv's output (or its bias's)."""
    conv, pool = context.annotated_expr["conv"], context.annotated_expr["pool"]
    data, weight = static_shape(conv.args[0]), static_shape(conv.args[1])
    if str(conv.ty.dtype) != "float32" or data is None or weight is None or len(weight) != 4:
        return False
    if not nchw_conv(conv.attrs) or int(conv.attrs.groups) != 1 or weight[2] == 1:
        return False
    attrs = pool.attrs
    if attrs.layout != "NCHW" or attrs.out_layout != "NCHW" or bool(attrs.ceil_mode) \
            or any(int(d) != 1 for d in attrs.dilation):
        return False
    return read_once(context, [name for name in ("conv", "bias", "relu") if name in context.annotated_expr])


def patterns() -> list[tuple]:
    """The fusion patterns, with the ReLU first (``FuseOpsByPattern`` takes the first that matches)."""
    conv = is_op("relax.nn.conv2d")(wildcard(), is_const())
    bias = is_op("relax.add")(conv, is_const())
    relu = is_op("relax.nn.relu")(bias)
    with_relu = is_op("relax.nn.max_pool2d")(relu)
    without = is_op("relax.nn.max_pool2d")(bias)
    return [
        (COMPOSITE, with_relu, {"conv": conv, "bias": bias, "relu": relu, "pool": with_relu}, _check),
        (COMPOSITE, without, {"conv": conv, "bias": bias, "pool": without}, _check),
    ]


def FuseConvPool() -> tvm.ir.transform.Pass:  # noqa: N802 - TVM's pass naming
    """The pass (``FuseOpsByPattern`` with :func:`patterns`; constants stay arguments)."""
    return relax.transform.FuseOpsByPattern(patterns(), bind_constants=False)
