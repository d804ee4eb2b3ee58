"""FuseShuffleGroupConv: put every channel shuffle into the convolutions that read it.

Pattern matched (Relax, before ``LegalizeOps``; every tensor statically shaped)::

    r = R.reshape(x, [N, g, C/g, H, W])           # x: [N, C, H, W]
    t = R.permute_dims(r, axes=[0, 2, 1, 3, 4])
    s = R.reshape(t, [N, C, H, W])                 # s = channel_shuffle(x, g)

This is what PyTorch's ``view/transpose/contiguous/view``, ``reshape/permute/reshape``,
``view/transpose/flatten(1, 2)``, ``nn.ChannelShuffle`` and ``F.channel_shuffle`` import as
through ``torch.export``, and what ONNX ``Reshape → Transpose(perm=[0,2,1,3,4]) → Reshape``
imports as. A channel slice of ``s`` is a ``R.split(s, axis=1)`` output (``torch.chunk``
imports as ``R.split`` + tuple items) or a ``R.strided_slice(s)`` along axis 1 with stride 1.

Rewrite, for each shuffle that some ``R.nn.conv2d`` (NCHW data, OIHW weight, NCHW output)
reads, directly or through a channel slice:

* ``R.nn.conv2d(s, w)`` and ``R.nn.conv2d(slice of s, w)`` become one call of
  ``shuffle_group_conv2d(x, w)`` (:mod:`tvmshuffle.ops.shuffle_group_conv2d`), which reads
  ``x`` through the shuffle index (plus the slice's channel offset);
* a slice of ``s`` that something other than a convolution also reads (ShuffleNet V2's
  identity half, going into the next ``concat``) becomes ``shuffle_gather(x)``, an
  injective gather that ``FuseOps`` fuses into its consumer;
* ``r``, ``t``, ``s`` and the split are then removed if nothing reads them any more
  (``remove_all_unused`` on each rewritten function: unused dataflow bindings go).

So ShuffleNet V1's ``gconv → shuffle → depthwise conv`` and V2's ``concat → shuffle →
split → (identity, conv)`` / ``concat → shuffle → (conv, conv)`` keep no transpose. A shuffle
that no convolution reads (before a pooling, at the network's end) is left as it is, and so
is the shuffle itself when a non-convolution reads it whole (the convolutions reading it
are still fused). Reshape/permute chains that are not a channel shuffle (the group count
does not divide the channels, other axes, other shapes) are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..ops.shuffle_group_conv2d import call_shuffle_gather, call_shuffle_group_conv2d

_SHUFFLE_AXES = [0, 2, 1, 3, 4]


def _op(name: str) -> tvm.ir.Op:
    return tvm.ir.Op.get(name)


def _is_call(expr: relax.Expr | None, op_name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.same_as(_op(op_name))


def static_shape(expr: relax.Expr) -> list[int] | None:
    """The shape of a tensor-typed expression if every dimension is a constant."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return None
    if not all(isinstance(d, tvm.tirx.IntImm) for d in ty.shape.values):
        return None
    return [int(d) for d in ty.shape.values]


def _static_ints(expr: relax.Expr) -> list[int] | None:
    """The integers of a ``(1, 2)`` tuple or a shape, if all are constants."""
    if isinstance(expr, relax.ShapeExpr):
        values = list(expr.values)
    elif isinstance(expr, relax.Tuple):
        values = list(expr.fields)
    else:
        return None
    if not all(isinstance(v, tvm.tirx.IntImm) for v in values):
        return None
    return [int(v) for v in values]


# --------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class ShuffledChannels:
    """Channels ``[offset, offset + count)`` of ``channel_shuffle(source, groups)``."""

    source: relax.Var
    groups: int
    offset: int
    count: int


def match_channel_shuffle(value: relax.Expr, var2val: dict) -> ShuffledChannels | None:
    """``value`` = reshape(permute_dims(reshape(x, [N,g,C/g,H,W]), [0,2,1,3,4]), [N,C,H,W])?"""
    if not _is_call(value, "relax.reshape"):
        return None
    permuted = var2val.get(value.args[0])
    if not _is_call(permuted, "relax.permute_dims") or permuted.attrs.axes is None:
        return None
    if [int(a) for a in permuted.attrs.axes] != _SHUFFLE_AXES:
        return None
    grouped = var2val.get(permuted.args[0])
    if not _is_call(grouped, "relax.reshape") or not isinstance(grouped.args[0], relax.Var):
        return None
    source = grouped.args[0]
    x_shape, g_shape, s_shape = static_shape(source), static_shape(grouped), static_shape(value)
    if x_shape is None or g_shape is None or len(x_shape) != 4 or len(g_shape) != 5:
        return None
    n, c, h, w = x_shape
    groups = g_shape[1]
    if c % groups or g_shape != [n, groups, c // groups, h, w] or s_shape != x_shape:
        return None
    return ShuffledChannels(source, groups, 0, c)


def _split_ranges(call: relax.Call, channels: int) -> list[tuple[int, int]] | None:
    """``[start, stop)`` of each output of ``R.split`` along axis 1, or None."""
    if int(call.attrs.axis) % 4 != 1:
        return None
    sections = call.attrs.indices_or_sections
    if isinstance(sections, tvm.tirx.IntImm):
        if channels % int(sections):
            return None
        step = channels // int(sections)
        bounds = list(range(0, channels + 1, step))
    else:
        bounds = [0] + [min(max(int(i), 0), channels) for i in sections] + [channels]
    return list(zip(bounds[:-1], bounds[1:]))


def _strided_slice_range(call: relax.Call, channels: int) -> tuple[int, int] | None:
    """``[start, stop)`` of a stride-1 ``R.strided_slice`` along axis 1 only, or None."""
    axes, begin, end = (_static_ints(arg) for arg in call.args[1:4])
    strides = _static_ints(call.args[4]) if len(call.args) > 4 else [1]
    if axes is None or begin is None or end is None or strides is None:
        return None
    if [a % 4 for a in axes] != [1] or strides != [1]:
        return None
    start, stop, _ = slice(begin[0], end[0]).indices(channels)
    return (start, stop) if stop > start else None


def _sub_slice(channels: ShuffledChannels, start: int, stop: int) -> ShuffledChannels:
    return ShuffledChannels(channels.source, channels.groups, channels.offset + start, stop - start)


def _is_fusable_conv(value: relax.Expr, data: relax.Var) -> bool:
    """An NCHW/OIHW/NCHW ``R.nn.conv2d`` of static shapes whose data (only) is ``data``."""
    if not _is_call(value, "relax.nn.conv2d") or not value.args[0].same_as(data) or value.args[1].same_as(data):
        return False
    attrs = value.attrs
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return False
    dtype = str(data.ty.dtype)
    if attrs.out_dtype is not None and str(attrs.out_dtype) not in ("", dtype):
        return False
    weight_shape = static_shape(value.args[1])
    return weight_shape is not None and len(weight_shape) == 4 and static_shape(value) is not None


def _uses(func: relax.Function) -> dict[relax.Var, list[relax.VarBinding]]:
    """For every variable, the bindings of ``func`` (outermost blocks) that read it."""
    uses: dict[relax.Var, list[relax.VarBinding]] = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            for var in relax.analysis.free_vars(binding.value):
                uses.setdefault(var, []).append(binding)
    return uses


def _channel_slices(
    shuffled: relax.Var, channels: ShuffledChannels, uses: dict
) -> list[tuple[relax.Var, ShuffledChannels]]:
    """The variables holding channel slices of ``shuffled`` (split outputs, strided slices).

    A split is only looked through when all its uses are tuple items.
    """
    slices = []
    for binding in uses.get(shuffled, []):
        value = binding.value
        if _is_call(value, "relax.split"):
            ranges = _split_ranges(value, channels.count)
            items = uses.get(binding.var, [])
            if ranges is None or not all(isinstance(b.value, relax.TupleGetItem) for b in items):
                continue
            slices += [(b.var, _sub_slice(channels, *ranges[b.value.index])) for b in items]
        elif _is_call(value, "relax.strided_slice"):
            bounds = _strided_slice_range(value, channels.count)
            if bounds is not None:
                slices.append((binding.var, _sub_slice(channels, *bounds)))
    return slices


@dataclass(frozen=True)
class _FusedConv:
    """Replace the ``R.nn.conv2d`` call ``conv`` by ``shuffle_group_conv2d`` over ``channels``."""

    conv: relax.Call
    channels: ShuffledChannels

    def build(self, bb: relax.BlockBuilder, visit) -> relax.Expr:
        attrs = self.conv.attrs
        return call_shuffle_group_conv2d(
            bb,
            visit(self.channels.source),
            visit(self.conv.args[1]),
            shuffle_groups=self.channels.groups,
            conv_groups=int(attrs.groups),
            strides=[int(v) for v in attrs.strides],
            padding=[int(v) for v in attrs.padding],
            dilation=[int(v) for v in attrs.dilation],
            channel_offset=self.channels.offset,
        )


@dataclass(frozen=True)
class _Gather:
    """Replace a channel slice of a shuffle by ``shuffle_gather`` over ``channels``."""

    channels: ShuffledChannels

    def build(self, bb: relax.BlockBuilder, visit) -> relax.Expr:
        c = self.channels
        return call_shuffle_gather(
            bb, visit(c.source), shuffle_groups=c.groups, channel_offset=c.offset, count=c.count
        )


def plan_rewrites(func: relax.Function) -> dict[relax.Expr, _FusedConv | _Gather]:
    """Binding value (a conv2d call or a channel slice) → what replaces it.

    Shuffles no convolution reads get no entry; a slice gets a gather only when something
    other than a fused convolution reads it.
    """
    var2val = relax.analysis.get_var2val(func)
    uses = _uses(func)
    plan: dict[relax.Expr, _FusedConv | _Gather] = {}
    for var, value in var2val.items():
        channels = match_channel_shuffle(value, var2val)
        if channels is None:
            continue
        readers = [(var, channels)] + _channel_slices(var, channels, uses)
        convs = {
            b.value: _FusedConv(b.value, sliced)
            for reader, sliced in readers
            for b in uses.get(reader, [])
            if _is_fusable_conv(b.value, reader)
        }
        if not convs:
            continue
        plan.update(convs)
        for reader, sliced in readers[1:]:
            if any(b.value not in convs for b in uses.get(reader, [])):
                plan[var2val[reader]] = _Gather(sliced)
    return plan


# --------------------------------------------------------------------------- rewrite


@mutator
class _Rewriter(PyExprMutator):
    """Swap the planned binding values for their replacements."""

    def __init__(self, mod: tvm.IRModule, plan: dict):
        super().__init__(mod)
        self.plan = plan

    def _replace(self, expr: relax.Expr) -> relax.Expr | None:
        rewrite = self.plan.get(expr)
        return None if rewrite is None else self.builder_.normalize(rewrite.build(self.builder_, self.visit_expr))

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # pylint: disable=arguments-renamed
        replaced = self._replace(call)
        return super().visit_call_(call) if replaced is None else replaced

    def visit_tuple_getitem_(self, op: relax.TupleGetItem) -> relax.Expr:
        replaced = self._replace(op)
        return super().visit_tuple_getitem_(op) if replaced is None else replaced


@tvm.transform.module_pass(opt_level=0, name="FuseShuffleGroupConv")
class _FuseShuffleGroupConv:
    """See the module docstring."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        plans = {
            gvar: plan
            for gvar, func in mod.functions_items()
            if isinstance(func, relax.Function) and (plan := plan_rewrites(func))
        }
        if not plans:
            return mod
        rewriter = _Rewriter(mod, {expr: r for plan in plans.values() for expr, r in plan.items()})
        for gvar in plans:
            func = rewriter.visit_expr(mod[gvar])
            rewriter.builder_.update_func(gvar, relax.analysis.remove_all_unused(func))
        return rewriter.builder_.get()


def FuseShuffleGroupConv() -> tvm.ir.transform.Pass:  # pylint: disable=invalid-name
    """The pass (see the module docstring); run it before ``LegalizeOps``."""
    return _FuseShuffleGroupConv()
