"""``shuffle_group_conv2d``: a 2-D convolution that reads its input through a channel shuffle.

ShuffleNet's channel shuffle is ``reshape(x, [N, g, C/g, H, W]) → transpose(1, 2) →
reshape([N, C, H, W])``. Channel ``c`` of the shuffled tensor is channel

    (c % g) * (C / g) + c // g

of ``x`` (:func:`shuffle_source_channel`). The operator here computes

    conv2d(channel_shuffle(data, g)[:, offset : offset + count], weight, groups=conv_groups)

in one TE compute whose input read goes through that index, so the shuffled tensor is never
written to memory. ``count`` is ``conv_groups * weight.shape[1]``; the offset lets a
convolution read one half of a shuffled tensor, as ShuffleNet V2's ``chunk`` does.

Provided:

* :func:`shuffle_group_conv2d` — the TE compute (NCHW data, OIHW weight; grouped 1x1,
  depthwise 3x3 and dense convolutions alike, any strides, padding and dilation);
* :func:`shuffle_gather` — the same channel read without the convolution: an injective
  gather for a shuffled slice consumed by something other than a convolution;
* :func:`call_shuffle_group_conv2d` / :func:`emit_shuffle_group_conv2d` and
  :func:`call_shuffle_gather` / :func:`emit_shuffle_gather` — put them into a Relax function
  through a :class:`tvm.relax.BlockBuilder` (PrimFuncs named ``shuffle_group_conv2d`` and
  ``shuffle_gather``);
* :func:`channel_shuffle_ref`, :func:`conv2d_ref`, :func:`shuffle_group_conv2d_ref` — NumPy
  references for tests, written from the reshape/transpose definition (not from the index).

The conv's PrimFunc is a plain TE-derived function: ``AnnotateTIROpPattern`` gives it
``kOutEWiseFusable`` (4), so ``FuseOps`` puts bias adds, ReLUs and residual adds behind it,
and MetaSchedule tunes it like any other convolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tvm import relax, te, tirx

IntOrPair = int | Sequence[int]

#: The names of the generated PrimFuncs (and of their compute blocks).
CONV_NAME = "shuffle_group_conv2d"
GATHER_NAME = "shuffle_gather"


# --------------------------------------------------------------------------- index


def shuffle_source_channel(channel, groups: int, channels: int):
    """Channel of ``x`` that channel ``channel`` of ``channel_shuffle(x, groups)`` holds.

    Works on Python ints, NumPy arrays and TIR expressions alike.
    """
    return (channel % groups) * (channels // groups) + channel // groups


# --------------------------------------------------------------------------- TE computes


def _pair(value: IntOrPair) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = (int(v) for v in value)
    return first, second


def _padding(value: IntOrPair) -> tuple[int, int, int, int]:
    """``p``, ``(ph, pw)`` or ``(top, left, bottom, right)`` → ``(top, left, bottom, right)``."""
    if isinstance(value, int):
        return value, value, value, value
    values = [int(v) for v in value]
    if len(values) == 2:
        return values[0], values[1], values[0], values[1]
    if len(values) == 4:
        return tuple(values)  # type: ignore[return-value]
    raise ValueError(f"padding must have 1, 2 or 4 values, got {value}")


def _static_shape(tensor: te.Tensor) -> list[int]:
    try:
        return [int(d) for d in tensor.shape]
    except TypeError:
        raise ValueError(f"{tensor.name}: only static shapes are supported, got {tensor.shape}") from None


def _check_slice(channels: int, groups: int, offset: int, count: int) -> None:
    if groups <= 0 or channels % groups:
        raise ValueError(f"shuffle_groups={groups} does not divide the {channels} channels")
    if offset < 0 or count <= 0 or offset + count > channels:
        raise ValueError(f"channels [{offset}, {offset + count}) are not inside the {channels} channels")


def _shuffled_reader(data: te.Tensor, groups: int, offset: int):
    """``(n, c, y, x) → channel_shuffle(data, groups)[n, offset + c, y, x]`` as a TE read."""
    channels = int(data.shape[1])

    def read(n, c, y, x):
        return data[n, shuffle_source_channel(offset + c, groups, channels), y, x]

    return read


def _zero_padded(read, shape, pads, dtype: str):
    """A ``shuffle_pad`` stage holding ``read`` (of ``shape``) with a zero border; its reader.

    (Named for the operator it belongs to; it pads the unshuffled data.)
    """
    batch, count, height, width = shape
    top, left, bottom, right = pads
    padded = te.compute(
        (batch, count, height + top + bottom, width + left + right),
        lambda n, c, y, x: tirx.if_then_else(
            tirx.all(y >= top, y < height + top, x >= left, x < width + left),
            read(n, c, y - top, x - left),
            tirx.const(0, dtype),
        ),
        name="shuffle_pad",
    )
    return lambda n, c, y, x: padded[n, c, y, x]


def shuffle_group_conv2d(
    data: te.Tensor,
    weight: te.Tensor,
    shuffle_groups: int,
    conv_groups: int = 1,
    strides: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    channel_offset: int = 0,
    out_dtype: str | None = None,
) -> te.Tensor:
    """``conv2d(channel_shuffle(data, shuffle_groups)[:, offset:offset+count], weight)``.

    Parameters
    ----------
    data : te.Tensor
        ``[N, C, H, W]``, the tensor *before* the shuffle.
    weight : te.Tensor
        ``[O, count / conv_groups, KH, KW]`` (OIHW).
    shuffle_groups : int
        ``g`` of the channel shuffle; must divide ``C``.
    conv_groups : int
        Groups of the convolution: 1 (dense), a divisor (grouped) or ``count`` (depthwise).
    strides, dilation : int or (int, int)
    padding : int, (ph, pw) or (top, left, bottom, right)
    channel_offset : int
        First channel of the shuffled tensor the convolution reads; it reads
        ``count = conv_groups * weight.shape[1]`` channels from there.
    out_dtype : str, optional
        Accumulation and output type; the data type by default.

    Returns
    -------
    te.Tensor
        ``[N, O, OH, OW]``, computed by the block ``shuffle_group_conv2d``. With non-zero
        padding a ``shuffle_pad`` stage (the *unshuffled* data with a zero border, like
        TOPI's ``pad_temp``) comes first; the convolution always reads through the shuffle
        index. Where every convolution group's channels are whole multiples of the shuffle
        groups (dense and grouped 1x1 convs, V2's halves) the reduction is split in two
        (``ri`` over shuffle groups, ``rj`` inside one) so the index is affine; depthwise
        convolutions read ``(c % g) * (C / g) + c // g`` per output channel.
    """
    batch, channels, height, width = _static_shape(data)
    out_channels, group_in, kernel_h, kernel_w = _static_shape(weight)
    count = group_in * conv_groups
    _check_slice(channels, shuffle_groups, channel_offset, count)
    if out_channels % conv_groups:
        raise ValueError(f"conv_groups={conv_groups} does not divide the {out_channels} output channels")
    stride_h, stride_w = _pair(strides)
    dilation_h, dilation_w = _pair(dilation)
    pad_top, pad_left, pad_bottom, pad_right = _padding(padding)
    out_dtype = out_dtype or data.dtype
    out_h = (height + pad_top + pad_bottom - dilation_h * (kernel_h - 1) - 1) // stride_h + 1
    out_w = (width + pad_left + pad_right - dilation_w * (kernel_w - 1) - 1) // stride_w + 1

    source = (lambda n, c, y, x: data[n, c, y, x])
    if pad_top or pad_left or pad_bottom or pad_right:
        # Zero border around the *unshuffled* data: the permutation stays in the conv's read.
        source = _zero_padded(source, (batch, channels, height, width),
                              (pad_top, pad_left, pad_bottom, pad_right), data.dtype)
    ry = te.reduce_axis((0, kernel_h), name="ry")
    rx = te.reduce_axis((0, kernel_w), name="rx")
    out_per_group = out_channels // conv_groups
    g, per_group = shuffle_groups, channels // shuffle_groups

    def _cast(value):
        return value if value.dtype == out_dtype else value.astype(out_dtype)

    def first_channel(o):
        """First shuffled channel that output channel ``o``'s convolution group reads."""
        return channel_offset if conv_groups == 1 else channel_offset + o // out_per_group * group_in

    if group_in % g == 0 and channel_offset % g == 0:
        # Affine form: split the reduction over the group's channels as rc = j * g + i.
        # Shuffled channel first + j*g + i is source channel i * (C/g) + first/g + j: no
        # division or modulo in the reduction, and consecutive j read consecutive channels.
        ri = te.reduce_axis((0, g), name="ri")
        rj = te.reduce_axis((0, group_in // g), name="rj")

        def first_source(o):
            return channel_offset // g + (0 if conv_groups == 1 else o // out_per_group * (group_in // g))

        def compute(n, o, y, x):
            pixel = source(n, ri * per_group + first_source(o) + rj,
                           y * stride_h + ry * dilation_h, x * stride_w + rx * dilation_w)
            return te.sum(_cast(pixel) * _cast(weight[o, rj * g + ri, ry, rx]), axis=[ri, rj, ry, rx])

    else:
        # Depthwise (one channel a group) and uneven slices: the shuffle index per channel.
        rc = te.reduce_axis((0, group_in), name="rc")

        def compute(n, o, y, x):
            channel = shuffle_source_channel(first_channel(o) + rc, g, channels)
            pixel = source(n, channel, y * stride_h + ry * dilation_h, x * stride_w + rx * dilation_w)
            return te.sum(_cast(pixel) * _cast(weight[o, rc, ry, rx]), axis=[rc, ry, rx])

    return te.compute((batch, out_channels, out_h, out_w), compute, name=CONV_NAME)


def shuffle_gather(
    data: te.Tensor, shuffle_groups: int, channel_offset: int = 0, count: int | None = None
) -> te.Tensor:
    """``channel_shuffle(data, shuffle_groups)[:, offset:offset+count]`` as one injective gather.

    ``count`` defaults to the rest of the channels. The block is named ``shuffle_gather``
    (not ``transpose``): ``FuseOps`` fuses it into its consumer like any injective op.
    """
    batch, channels, height, width = _static_shape(data)
    count = channels - channel_offset if count is None else count
    _check_slice(channels, shuffle_groups, channel_offset, count)
    read = _shuffled_reader(data, shuffle_groups, channel_offset)
    return te.compute((batch, count, height, width), read, name=GATHER_NAME)


# --------------------------------------------------------------------------- Relax


def call_shuffle_group_conv2d(bb: relax.BlockBuilder, data: relax.Expr, weight: relax.Expr, **params) -> relax.Call:
    """A ``call_tir`` of :func:`shuffle_group_conv2d` (PrimFunc added to ``bb``'s module).

    ``params`` are :func:`shuffle_group_conv2d`'s keyword arguments.
    """
    return bb.call_te(shuffle_group_conv2d, data, weight, primfunc_name_hint=CONV_NAME, **params)


def emit_shuffle_group_conv2d(bb: relax.BlockBuilder, data: relax.Expr, weight: relax.Expr, **params) -> relax.Var:
    """Emit :func:`shuffle_group_conv2d` into the function ``bb`` is building (``emit_te``)."""
    return bb.emit_te(shuffle_group_conv2d, data, weight, primfunc_name_hint=CONV_NAME, **params)


def call_shuffle_gather(bb: relax.BlockBuilder, data: relax.Expr, **params) -> relax.Call:
    """A ``call_tir`` of :func:`shuffle_gather` (PrimFunc added to ``bb``'s module)."""
    return bb.call_te(shuffle_gather, data, primfunc_name_hint=GATHER_NAME, **params)


def emit_shuffle_gather(bb: relax.BlockBuilder, data: relax.Expr, **params) -> relax.Var:
    """Emit :func:`shuffle_gather` into the function ``bb`` is building (``emit_te``)."""
    return bb.emit_te(shuffle_gather, data, primfunc_name_hint=GATHER_NAME, **params)


# --------------------------------------------------------------------------- NumPy references


def channel_shuffle_ref(x: np.ndarray, groups: int) -> np.ndarray:
    """ShuffleNet's channel shuffle, by its definition: reshape → swap axes 1, 2 → reshape."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)


def conv2d_ref(
    x: np.ndarray,
    weight: np.ndarray,
    strides: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
) -> np.ndarray:
    """Grouped NCHW/OIHW 2-D convolution in NumPy (float64 accumulation)."""
    stride_h, stride_w = _pair(strides)
    dilation_h, dilation_w = _pair(dilation)
    top, left, bottom, right = _padding(padding)
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, c, h, w = x.shape
    o, group_in, kh, kw = weight.shape
    out_h = (h - dilation_h * (kh - 1) - 1) // stride_h + 1
    out_w = (w - dilation_w * (kw - 1) - 1) // stride_w + 1
    w_grouped = weight.astype(np.float64).reshape(groups, o // groups, group_in, kh, kw)
    out = np.zeros((n, groups, o // groups, out_h, out_w))
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * dilation_h, kx * dilation_w
            rows = slice(y0, y0 + stride_h * (out_h - 1) + 1, stride_h)
            cols = slice(x0, x0 + stride_w * (out_w - 1) + 1, stride_w)
            patch = x[:, :, rows, cols]
            patch = patch.reshape(n, groups, group_in, out_h, out_w)
            out += np.einsum("ngchw,goc->ngohw", patch, w_grouped[:, :, :, ky, kx])
    return out.reshape(n, o, out_h, out_w).astype(weight.dtype)


def shuffle_group_conv2d_ref(
    data: np.ndarray,
    weight: np.ndarray,
    shuffle_groups: int,
    conv_groups: int = 1,
    strides: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    channel_offset: int = 0,
) -> np.ndarray:
    """What :func:`shuffle_group_conv2d` computes, as shuffle → slice → convolution."""
    count = weight.shape[1] * conv_groups
    shuffled = channel_shuffle_ref(data, shuffle_groups)[:, channel_offset : channel_offset + count]
    return conv2d_ref(shuffled, weight, strides, padding, dilation, conv_groups)
