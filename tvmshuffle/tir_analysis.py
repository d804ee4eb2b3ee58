"""Reading a lowered PrimFunc: its blocks, and what a conv or matmul kernel is made of.

One place for what ``inspect``/``profile`` (:mod:`tvmshuffle.kernels`), the hand schedules
(:mod:`tvmshuffle.schedules`) and the study (:mod:`tvmshuffle.study.layers`) read from TIR:

* :func:`blocks`: the SBlocks of a PrimFunc in program order (the one block walker; a
  scheduled PrimFunc, with blocks nested in blocks, is walked too);
* :func:`macs`: multiply-accumulates of the ``acc + a * b`` reduction blocks (conv, matmul);
* :func:`describe`: a conv kernel — the fused ``shuffle_group_conv2d`` or LegalizeOps'
  ``conv2d_nchw`` / ``group_conv2d_nchw`` — as a :class:`ConvLayer` (kind, stride, groups,
  shuffle, epilogue), a depthwise conv and the 1x1 conv after it in one kernel as a
  :class:`DwPointwiseLayer` (two ConvLayers), a conv and the max pool after it as a
  :class:`ConvPoolLayer`, a classifier's matmul as a :class:`MatmulLayer`, a pool as a
  :class:`PoolLayer`, a concatenation or gather as an :class:`InjectiveLayer`, anything else None;
* :func:`epilogue_name`, :func:`activation_param`, :func:`min_bytes`: the study's readings
  (epilogue labels, the activation a conv reads, minimum traffic);
* :func:`buffer_shape`, :func:`dtype_bytes`, :func:`walk`: the small helpers under them;
* :func:`is_scheduled`, :func:`scheduled_names`: whether a PrimFunc carries a schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

CONV_BLOCK = "shuffle_group_conv2d"
PAD_BLOCK = "shuffle_pad"
#: the conv blocks :func:`describe` reads: the fused operator's, and LegalizeOps' ``conv2d``
#: (dense) and grouped/depthwise ``conv2d`` (no shuffle in front: the shuffle is the identity)
CONV_BLOCKS = (CONV_BLOCK, "conv2d_nchw", "group_conv2d_nchw")
#: the padding stage before each: the fused operator's, LegalizeOps' (a copy where nothing is padded)
PAD_BLOCKS = (PAD_BLOCK, "pad_temp")


@dataclass
class ConvLayer:
    """One conv kernel (the fused ``shuffle_group_conv2d``, or a plain conv2d), as its PrimFunc spells it."""

    out_channels: int
    in_channels: int  # of the (unshuffled) data
    group_in: int  # input channels per conv group
    kernel: tuple[int, int]
    stride: tuple[int, int]
    out_hw: tuple[int, int]
    padded: bool  # a padding stage (shuffle_pad, pad_temp) that pads comes first
    reduction: tuple[str, ...]  # the conv block's reduction iterators, e.g. ("ri", "rj", "ry", "rx")
    out_per_group: int  # output channels per conv group (all of them: dense; 1: depthwise)
    epilogue: list[str] = field(default_factory=list)  # block names after the conv, in order
    conv_block: str = CONV_BLOCK  # the conv block's name (:data:`CONV_BLOCKS`)
    #: the padding block's name, if any; one that pads nothing (LegalizeOps' ``pad_temp`` of a
    #: 1x1 conv) is a copy, which a schedule inlines
    pad_block: str | None = None

    @property
    def shuffled(self) -> bool:
        """Whether a channel shuffle is in front (the fused operator) or not (a plain conv2d)."""
        return self.conv_block == CONV_BLOCK

    @property
    def kind(self) -> str:
        if self.group_in == 1 and self.kernel != (1, 1):
            return "depthwise"
        if self.kernel == (1, 1) and self.stride == (1, 1) and not self.padded:
            return "pointwise"
        return "other"

    @property
    def conv_groups(self) -> int:
        return self.out_channels // self.out_per_group


@dataclass
class DwPointwiseLayer:
    """A depthwise conv and the 1x1 conv that reads it in one PrimFunc (``FuseDepthwisePointwise``:
    the depthwise conv's stages, then the 1x1 conv's), each a :class:`ConvLayer` of its own
    blocks: the depthwise's ``epilogue`` is its bias, the 1x1's ``pad_block`` its LegalizeOps copy."""

    depthwise: ConvLayer
    pointwise: ConvLayer
    kind: str = "dw_pointwise"

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.pointwise.out_hw


@dataclass
class ConvPoolLayer:
    """A conv and the max pool that reads it in one PrimFunc (``FuseConvPool``: the conv's
    stages — padding, conv, bias, ReLU —, then the pool's), each of its own blocks; the pool
    is a max pool (``pool_max``), with no epilogue."""

    conv: ConvLayer
    pool: PoolLayer
    kind: str = "conv_pool"

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.pool.out_hw


@dataclass
class MatmulLayer:
    """A classifier's ``matmul`` (LegalizeOps' block: ``out[m, n] += x[m, k] * w[k, n]``, the
    weight a constant laid out ``[K, N]``) and its epilogue, as its PrimFunc spells it."""

    m: int
    n: int
    k: int
    epilogue: list[str] = field(default_factory=list)  # block names after the matmul, in order
    block: str = "matmul"
    kind: str = "matmul"


@dataclass
class PoolLayer:
    """A 2-D max or average pool (LegalizeOps' ``pool_max`` / ``pool_sum`` + ``pool_avg``), NCHW."""

    channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    out_hw: tuple[int, int]
    padded_hw: tuple[int, int]  # the plane the window slides over (after the padding stage)
    block: str  # ``pool_max`` or ``pool_sum``
    pad_block: str | None = None  # LegalizeOps' ``pad_temp``, if any
    epilogue: list[str] = field(default_factory=list)  # ``pool_avg`` (the division), …
    kind: str = "pool"


#: LegalizeOps' reduction block of a max / average pool
POOL_BLOCKS = ("pool_max", "pool_sum")


@dataclass
class InjectiveLayer:
    """A kernel of data movement and elementwise math only (no reduction) writing a 4-D NCHW
    tensor: a concatenation, V2's shuffle gather + concatenation, a lone add or ReLU."""

    out_shape: tuple[int, int, int, int]
    blocks: list[str]  # its stages in order; the last writes the output
    kind: str = "injective"


# --------------------------------------------------------------------------- blocks


def is_scheduled(func) -> bool:
    """Whether PrimFunc ``func`` (or a tuning task's IRModule) carries a schedule (attr
    ``tirx.is_scheduled``: a hand schedule or a record applied; MetaSchedule and TVM's lowering
    leave it alone then)."""
    return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))


def scheduled_names(mod) -> set[str]:
    """The names of the scheduled PrimFuncs of ``mod``."""
    import tvm

    return {gv.name_hint for gv, func in mod.functions.items()
            if isinstance(func, tvm.tirx.PrimFunc) and is_scheduled(func)}


def blocks(func, nested: bool = True) -> list:
    """The SBlocks of PrimFunc ``func`` in program order, the root excluded.

    ``nested=False``: only the root's own children — the stages of a lowered, unscheduled
    PrimFunc, where nothing else exists; in a scheduled one (blocks inside blockized blocks)
    they are what :func:`describe` must not mistake for a conv's stages. A PrimFunc TVM cannot
    schedule, or without a root block, has no blocks: [].
    """
    from tvm import s_tir

    try:
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")
    except Exception:  # noqa: BLE001 - no root block: nothing to read
        return []
    found = []

    def visit(rv):
        for child in sch.get_child_blocks(rv):
            found.append(sch.get(child))
            if nested:
                visit(child)

    visit(root)
    return found


def _iter_vars(block, iter_type: int) -> list:
    return [iv for iv in block.iter_vars if iv.iter_type == iter_type]


def is_multiply_accumulate(block) -> bool:
    """A reduction block whose update is ``acc + a * b`` (conv, matmul; not pooling)."""
    import tvm

    body = block.body
    if not _iter_vars(block, tvm.tirx.IterVar.CommReduce) or not isinstance(body, tvm.tirx.BufferStore) \
            or not isinstance(body.value, tvm.tirx.Add):
        return False
    return any(isinstance(operand, tvm.tirx.Mul) for operand in (body.value.a, body.value.b))


def macs(func_blocks: list) -> int:
    """Multiply-accumulates of ``func_blocks`` (:func:`blocks`): the iteration domain of each
    multiply-accumulate block."""
    return sum(
        math.prod(int(iv.dom.extent) for iv in block.iter_vars)
        for block in func_blocks
        if is_multiply_accumulate(block)
    )


# --------------------------------------------------------------------------- small readings


def walk(expr, kind: str) -> list:
    """Every sub-expression of ``expr`` whose class is named ``kind`` (pre-order)."""
    import tvm_ffi

    found: list = []
    tvm_ffi.structural_walk(expr, lambda x: found.append(x) if type(x).__name__ == kind else None, order="pre")
    return found


def int_value(expr) -> int | None:
    """The value of an integer constant, None for anything else."""
    return int(expr.value) if type(expr).__name__ == "IntImm" else None


def buffer_shape(buffer) -> list[int]:
    return [int(d) for d in buffer.shape]


def dtype_bytes(dtype) -> int:
    """Bytes of one element (at least 1: a bool is read as a byte)."""
    import tvm

    return max(1, tvm.runtime.DataType(str(dtype)).bits // 8)


# --------------------------------------------------------------------------- describe


def _describe_matmul(func, stages, names) -> MatmulLayer | None:
    if names[0] != "matmul" or any(n in names for n in CONV_BLOCKS):
        return None
    import tvm

    mm = stages[0]
    spatial = _iter_vars(mm, tvm.tirx.IterVar.DataPar)
    reduce_ = [iv for iv in mm.iter_vars if iv.iter_type != tvm.tirx.IterVar.DataPar]
    if len(spatial) != 2 or len(reduce_) != 1:
        return None
    params = {getattr(p, "name", None) for p in func.params}
    reads = [r for r in mm.reads if not r.source.same_as(mm.writes[0].source)]
    if len(reads) != 2 or any(len(r.source.shape) != 2 for r in reads):
        return None
    k_var, n_var = reduce_[0].var, spatial[1].var
    weight = next((r for r in reads if r.source.name in params and r.region[0].min.same_as(k_var)
                   and r.region[1].min.same_as(n_var)), None)
    if weight is None or not weight.source.name.startswith("param"):  # a bound constant [K, N]
        return None
    return MatmulLayer(m=int(spatial[0].dom.extent), n=int(spatial[1].dom.extent), k=int(reduce_[0].dom.extent),
                       epilogue=names[1:])


def _find(expr, match):
    """First ``match(node)`` that is not None in an index expression (+ - * // % nodes)."""
    found = match(expr)
    for child in (getattr(expr, "a", None), getattr(expr, "b", None)):
        if found is None and child is not None:
            found = _find(child, match)
    return found


def _factor_of(var, node_type):
    return lambda node: int(node.b) if isinstance(node, node_type) and node.a.same_as(var) else None


def _describe_pool(stages, names) -> PoolLayer | None:
    import tvm

    pool_name = next(n for n in names if _base(n) in POOL_BLOCKS)
    index = names.index(pool_name)
    if [_base(n) for n in names[:index]] not in ([], ["pad_temp"]):
        return None
    pool = stages[index]
    spatial = _iter_vars(pool, tvm.tirx.IterVar.DataPar)
    reduce_ = _iter_vars(pool, tvm.tirx.IterVar.CommReduce)
    reads = [r for r in pool.reads if not r.source.same_as(pool.writes[0].source)]
    if len(spatial) != 4 or len(reduce_) != 2 or len(reads) != 1 or len(reads[0].source.shape) != 4:
        return None
    # the window's index of y is ``v_y * stride + v_r`` (``v_y + v_r`` for stride 1)
    stride = tuple(_find(reads[0].region[d].min, _factor_of(spatial[d].var, tvm.tirx.Mul)) or 1 for d in (2, 3))
    _, channels, out_h, out_w = (int(iv.dom.extent) for iv in spatial)
    return PoolLayer(
        channels=channels,
        kernel=tuple(int(iv.dom.extent) for iv in reduce_),
        stride=stride,
        out_hw=(out_h, out_w),
        padded_hw=tuple(buffer_shape(reads[0].source)[2:]),
        block=pool_name,
        pad_block=names[0] if index else None,
        epilogue=names[index + 1:],
    )


def _describe_injective(func, stages, names) -> InjectiveLayer | None:
    """No reduction anywhere, one output (written by the last stage, 4-D): the stages before it
    write only the function's own buffers, so they can be inlined into it."""
    import tvm

    if any(iv.iter_type != tvm.tirx.IterVar.DataPar for b in stages for iv in b.iter_vars):
        return None
    params = {getattr(p, "name", None) for p in func.params}
    writers = [b for b in stages if any(w.source.name in params for w in b.writes)]
    last = stages[-1]
    if writers != [last] or len(last.writes) != 1 or len(last.writes[0].source.shape) != 4 \
            or len(last.iter_vars) != 4:
        return None
    return InjectiveLayer(tuple(buffer_shape(last.writes[0].source)), names)


def describe(func) -> (ConvLayer | DwPointwiseLayer | ConvPoolLayer | MatmulLayer | PoolLayer | InjectiveLayer
                      | None):
    """The :class:`ConvLayer` of a conv PrimFunc — the fused ``shuffle_group_conv2d``, or
    LegalizeOps' ``conv2d_nchw`` / ``group_conv2d_nchw`` with no shuffle in front —, the
    :class:`DwPointwiseLayer` of a depthwise conv and the 1x1 conv after it (two conv blocks), the
    :class:`ConvPoolLayer` of a conv and the max pool after it (kind ``"conv_pool"``), the
    :class:`MatmulLayer` of a classifier's matmul (kind ``"matmul"``), the :class:`PoolLayer` of
    a max / average pool (kind ``"pool"``), the :class:`InjectiveLayer` of a kernel with no
    reduction writing a 4-D tensor (kind ``"injective"``: concatenations, gathers), or None.

    Only a lowered, unscheduled PrimFunc is described: its stages are the root's children
    (``blocks(func, nested=False)``), a padding stage at most before the conv, the epilogue after.
    """
    stages = blocks(func, nested=False)
    names = [b.name_hint for b in stages]
    if names and names[0] == "matmul":
        return _describe_matmul(func, stages, names)
    if any(_base(n) in POOL_BLOCKS for n in names):
        if any(_base(n) in CONV_BLOCKS for n in names):
            return _describe_conv_pool(func, stages, names)
        return _describe_pool(stages, names)
    if stages and not any(n in CONV_BLOCKS for n in names):
        return _describe_injective(func, stages, names)
    convs = [i for i, n in enumerate(names) if _base(n) in CONV_BLOCKS]
    if len(convs) == 2:
        return _describe_dw_pointwise(func, stages, names, convs[1])
    return _describe_conv(func, stages, names)


def _base(name: str) -> str:
    """A block's name without the number FuseTIR appends to make it unique (``pad_temp1``)."""
    return name.rstrip("0123456789")


def _describe_dw_pointwise(func, stages, names, second: int) -> DwPointwiseLayer | None:
    """Two convs: the depthwise one's stages, then (from the second conv's copy stage on) the 1x1's."""
    split = second - 1 if second and _base(names[second - 1]) in PAD_BLOCKS else second
    depthwise = _describe_conv(func, stages[:split], names[:split])
    pointwise = _describe_conv(func, stages[split:], names[split:])
    if depthwise is None or pointwise is None or depthwise.kind != "depthwise" or pointwise.kind != "pointwise":
        return None
    return DwPointwiseLayer(depthwise, pointwise)


def _describe_conv_pool(func, stages, names) -> ConvPoolLayer | None:
    """A conv's stages, then (from the pool's padding stage on) a max pool's."""
    pool_index = next((i for i, n in enumerate(names) if _base(n) == "pool_max"), None)
    if pool_index is None:
        return None
    split = pool_index - 1 if pool_index and _base(names[pool_index - 1]) in PAD_BLOCKS else pool_index
    conv = _describe_conv(func, stages[:split], names[:split])
    pool = _describe_pool(stages[split:], names[split:])
    if conv is None or pool is None or conv.kind != "other" or not conv.epilogue or pool.epilogue:
        return None
    return ConvPoolLayer(conv, pool)


def _describe_conv(func, stages, names) -> ConvLayer | None:
    """A conv's stages (a padding stage at most, the conv, its epilogue) as a :class:`ConvLayer`."""
    import tvm

    conv_index = next((i for i, n in enumerate(names) if _base(n) in CONV_BLOCKS), None)
    if conv_index is None or any(_base(n) in CONV_BLOCKS for n in names[conv_index + 1:]):
        return None
    conv_name = names[conv_index]
    pads = [n for n in names[:conv_index] if _base(n) in PAD_BLOCKS]
    if conv_index != len(pads):  # only a padding stage may come before the conv
        return None
    conv = stages[conv_index]
    spatial = _iter_vars(conv, tvm.tirx.IterVar.DataPar)
    reduce_ = [iv for iv in conv.iter_vars if iv.iter_type != tvm.tirx.IterVar.DataPar]
    if len(spatial) != 4:
        return None
    _, out_c, out_h, out_w = (int(iv.dom.extent) for iv in spatial)
    params = {getattr(p, "name", None) for p in func.params}  # the buffers passed in
    reads = [r for r in conv.reads if not r.source.same_as(conv.writes[0].source)]
    if len(reads) != 2 or any(len(r.source.shape) != 4 for r in reads):
        return None
    pad = stages[conv_index - 1] if pads else None
    # the data: what the padding stage writes, else the input that is not a bound constant
    # (the weight: a parameter named param_N after FuseTIR)
    padded_data = [r.source for r in reads if pad is not None and r.source.same_as(pad.writes[0].source)]
    others = [r.source for r in reads if not any(r.source.same_as(d) for d in padded_data)]
    if padded_data and len(others) == 1:
        data, weight = padded_data[0], others[0]
    else:
        weight = next((b for b in others if b.name.startswith("param")), None)
        data = next((b for b in others if not b.same_as(weight)), None) if weight is not None else None
    if data is None or weight is None or weight.name not in params:
        return None
    _, group_in, kh, kw = (int(d) for d in weight.shape)
    source = pad.reads[0].source if pad is not None else data
    padded = pad is not None and buffer_shape(pad.writes[0].source) != buffer_shape(source)

    data_read = next(r for r in conv.reads if r.source.same_as(data))
    # a grouped conv's data index holds ``v_o // out_per_group``; a dense one none; depthwise: 1
    if group_in == 1 and (kh, kw) != (1, 1):
        out_per_group = 1
    else:
        out_per_group = _find(data_read.region[1].min, _factor_of(spatial[1].var, tvm.tirx.FloorDiv)) or out_c
    # the data index of y is ``v_y * stride + v_ry`` (``v_y + v_ry`` for stride 1)
    stride = tuple(_find(data_read.region[d].min, _factor_of(spatial[d].var, tvm.tirx.Mul)) or 1 for d in (2, 3))

    return ConvLayer(
        out_channels=out_c,
        in_channels=int(source.shape[1]),
        group_in=group_in,
        kernel=(kh, kw),
        stride=stride,
        out_hw=(out_h, out_w),
        padded=padded,
        reduction=tuple(iv.var.name.removeprefix("v_") for iv in reduce_),
        out_per_group=out_per_group,
        epilogue=names[conv_index + 1:],
        conv_block=conv_name,
        pad_block=pad.name_hint if pad is not None else None,
    )


# --------------------------------------------------------------------------- the study's readings


def epilogue_name(block, params) -> str:
    """What an epilogue block does: ``bias``, ``relu``, ``add`` (residual) or the block's own
    name without TVM's ``T_``/``compute_`` prefix and number suffix (``params``: the func's)."""
    value = getattr(block.body, "value", None)
    kind = type(value).__name__
    if kind == "Max" and (type(value.b).__name__ in ("FloatImm", "IntImm") and float(value.b.value) == 0.0):
        return "relu"
    if kind == "Add":
        loads = [v for v in (value.a, value.b) if type(v).__name__ == "TensorLoad"]
        out = buffer_shape(block.body.buffer)
        for load in loads:
            if any(load.source.same_as(p) for p in params):
                shape = buffer_shape(load.source)
                if len(shape) == len(out) and shape != out and math.prod(shape) < math.prod(out):
                    return "bias"  # a broadcast parameter smaller than the output
        return "add"  # a residual (or any other) addition
    name = block.name_hint
    for prefix in ("T_", "compute_"):
        name = name.removeprefix(prefix)
    return name.rstrip("0123456789").rstrip("_") or block.name_hint


def activation_param(data_load, before: list, inputs: list):
    """The function argument a convolution's data load ``data_load`` comes from: an argument
    itself, or what a stage of ``before`` (a padding stage) that writes it reads; else None."""
    for p in inputs:
        if data_load.source.same_as(p):
            return p
    for block in before:  # data read through a pad stage: what that stage reads
        if block.body is not None and hasattr(block.body, "buffer") and block.body.buffer.same_as(data_load.source):
            for load in walk(block.body.value, "TensorLoad"):
                for p in inputs:
                    if load.source.same_as(p):
                        return p
    return None


def min_bytes(inputs, outputs, activation=None, count: int = 0) -> int:
    """Minimum traffic of a kernel: every input read once (of ``activation`` only its first
    ``count`` channels' worth: a shuffle unit's conv reads half of its input), every output
    written once."""
    total = 0
    for p in inputs:
        shape = buffer_shape(p)
        if activation is not None and p.same_as(activation) and count and len(shape) == 4 and count < shape[1]:
            shape = [shape[0], count, *shape[2:]]  # only the channels the convolution reads
        total += math.prod(shape) * dtype_bytes(p.dtype)
    total += sum(math.prod(buffer_shape(p)) * dtype_bytes(p.dtype) for p in outputs)
    return total
