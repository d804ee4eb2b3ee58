"""FuseShuffleGroupConv: golden IR, IR left unchanged, and models imported from PyTorch/ONNX."""

import io

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from tvmshuffle.ops import call_shuffle_gather, call_shuffle_group_conv2d
from tvmshuffle.passes import FuseShuffleGroupConv


def _tensor(name, shape):
    return relax.Var(name, relax.TensorType(list(shape), "float32"))


def _assert_unchanged(mod):
    tvm.ir.assert_structural_equal(FuseShuffleGroupConv()(mod), mod)


# =========================================================================== golden IR


def test_shuffle_then_grouped_conv():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 6, 4, 4), "float32"), w: R.Tensor((6, 2, 1, 1), "float32")):
            with R.dataflow():
                r = R.reshape(x, R.shape([1, 3, 2, 4, 4]))
                t = R.permute_dims(r, axes=[0, 2, 1, 3, 4])
                s = R.reshape(t, R.shape([1, 6, 4, 4]))
                gv = R.nn.conv2d(s, w, groups=3)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def shuffle_group_conv2d(
            x: T.Buffer((T.int64(1), T.int64(6), T.int64(4), T.int64(4)), "float32"),
            w: T.Buffer((T.int64(6), T.int64(2), T.int64(1), T.int64(1)), "float32"),
            out: T.Buffer((T.int64(1), T.int64(6), T.int64(4), T.int64(4)), "float32"),
        ):
            T.func_attr({"tirx.noalias": True})
            for n, o, y, x_1, rc, ry, rx in T.grid(
                T.int64(1), T.int64(6), T.int64(4), T.int64(4), T.int64(2), T.int64(1), T.int64(1)
            ):
                with T.sblock("shuffle_group_conv2d"):
                    v_n, v_o, v_y, v_x, v_rc, v_ry, v_rx = T.axis.remap("SSSSRRR", [n, o, y, x_1, rc, ry, rx])
                    # conv input channel c = o // 2 * 2 + rc reads channel (c % 3) * 2 + c // 3 of x
                    T.reads(
                        x[
                            v_n,
                            (v_o // T.int64(2) * T.int64(2) + v_rc) % T.int64(3) * T.int64(2)
                            + (v_o // T.int64(2) * T.int64(2) + v_rc) // T.int64(3),
                            v_y + v_ry,
                            v_x + v_rx,
                        ],
                        w[v_o, v_rc, v_ry, v_rx],
                    )
                    T.writes(out[v_n, v_o, v_y, v_x])
                    with T.init():
                        out[v_n, v_o, v_y, v_x] = T.float32(0.0)
                    out[v_n, v_o, v_y, v_x] = (
                        out[v_n, v_o, v_y, v_x]
                        + x[
                            v_n,
                            (v_o // T.int64(2) * T.int64(2) + v_rc) % T.int64(3) * T.int64(2)
                            + (v_o // T.int64(2) * T.int64(2) + v_rc) // T.int64(3),
                            v_y + v_ry,
                            v_x + v_rx,
                        ]
                        * w[v_o, v_rc, v_ry, v_rx]
                    )

        @R.function
        def main(
            x: R.Tensor((1, 6, 4, 4), "float32"), w: R.Tensor((6, 2, 1, 1), "float32")
        ) -> R.Tensor((1, 6, 4, 4), "float32"):
            cls = Expected
            with R.dataflow():
                gv = R.call_tir(cls.shuffle_group_conv2d, (x, w), out_ty=R.Tensor((1, 6, 4, 4), "float32"))
                R.output(gv)
            return gv

    After = FuseShuffleGroupConv()(Before)
    tvm.ir.assert_structural_equal(After, Expected)
    _assert_unchanged(After)  # nothing left to fuse: the pass is idempotent


def test_v2_half_into_dense_conv_reads_affine_channels():
    """The conv half of a V2 split: a dense 1x1 conv reading shuffled channels 2..3 of 4 (g=2).

    Shuffled channel 2 + j*2 + i is source channel i*2 + j + 1: the reduction is split into
    (ri over groups, rj inside a group) so that no division or modulo is left in it.
    """

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 2, 2), "float32"), w: R.Tensor((3, 2, 1, 1), "float32")):
            with R.dataflow():
                r = R.reshape(x, R.shape([1, 2, 2, 2, 2]))
                t = R.permute_dims(r, axes=[0, 2, 1, 3, 4])
                s = R.reshape(t, R.shape([1, 4, 2, 2]))
                halves = R.split(s, indices_or_sections=[2], axis=1)
                right = halves[1]
                gv = R.nn.conv2d(right, w)
                R.output(gv)
            return gv

    @I.ir_module
    class Expected:
        @T.prim_func(private=True, s_tir=True)
        def shuffle_group_conv2d(
            x: T.Buffer((T.int64(1), T.int64(4), T.int64(2), T.int64(2)), "float32"),
            w: T.Buffer((T.int64(3), T.int64(2), T.int64(1), T.int64(1)), "float32"),
            out: T.Buffer((T.int64(1), T.int64(3), T.int64(2), T.int64(2)), "float32"),
        ):
            T.func_attr({"tirx.noalias": True})
            for n, o, y, x_1, ri, rj, ry, rx in T.grid(
                T.int64(1), T.int64(3), T.int64(2), T.int64(2), T.int64(2), T.int64(1), T.int64(1), T.int64(1)
            ):
                with T.sblock("shuffle_group_conv2d"):
                    v_n, v_o, v_y, v_x, v_ri, v_rj, v_ry, v_rx = T.axis.remap(
                        "SSSSRRRR", [n, o, y, x_1, ri, rj, ry, rx]
                    )
                    T.reads(
                        x[v_n, v_ri * T.int64(2) + v_rj + T.int64(1), v_y + v_ry, v_x + v_rx],
                        w[v_o, v_rj * T.int64(2) + v_ri, v_ry, v_rx],
                    )
                    T.writes(out[v_n, v_o, v_y, v_x])
                    with T.init():
                        out[v_n, v_o, v_y, v_x] = T.float32(0.0)
                    out[v_n, v_o, v_y, v_x] = (
                        out[v_n, v_o, v_y, v_x]
                        + x[v_n, v_ri * T.int64(2) + v_rj + T.int64(1), v_y + v_ry, v_x + v_rx]
                        * w[v_o, v_rj * T.int64(2) + v_ri, v_ry, v_rx]
                    )

        @R.function
        def main(
            x: R.Tensor((1, 4, 2, 2), "float32"), w: R.Tensor((3, 2, 1, 1), "float32")
        ) -> R.Tensor((1, 3, 2, 2), "float32"):
            cls = Expected
            with R.dataflow():
                gv = R.call_tir(cls.shuffle_group_conv2d, (x, w), out_ty=R.Tensor((1, 3, 2, 2), "float32"))
                R.output(gv)
            return gv

    After = FuseShuffleGroupConv()(Before)
    tvm.ir.assert_structural_equal(After, Expected)


def test_shuffle_then_depthwise_conv_bias_relu():
    """V1: the depthwise 3x3 (stride 2, padding 1) reads the shuffle; its epilogue stays."""

    @I.ir_module
    class Before:
        @R.function
        def main(
            x: R.Tensor((1, 12, 6, 6), "float32"),
            w: R.Tensor((12, 1, 3, 3), "float32"),
            b: R.Tensor((1, 12, 1, 1), "float32"),
        ):
            with R.dataflow():
                r = R.reshape(x, R.shape([1, 3, 4, 6, 6]))
                t = R.permute_dims(r, axes=[0, 2, 1, 3, 4])
                s = R.reshape(t, R.shape([1, 12, 6, 6]))
                c = R.nn.conv2d(s, w, strides=2, padding=1, groups=12)
                a = R.add(c, b)
                gv = R.nn.relu(a)
                R.output(gv)
            return gv

    bb = relax.BlockBuilder()
    x, w, b = _tensor("x", (1, 12, 6, 6)), _tensor("w", (12, 1, 3, 3)), _tensor("b", (1, 12, 1, 1))
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            conv = call_shuffle_group_conv2d(bb, x, w, shuffle_groups=3, conv_groups=12, strides=2, padding=1)
            c = bb.emit(conv)
            a = bb.emit(relax.op.add(c, b))
            gv = bb.emit_output(relax.op.nn.relu(a))
        bb.emit_func_output(gv)

    tvm.ir.assert_structural_equal(FuseShuffleGroupConv()(Before), bb.get())


def _v2_expected():
    """concat's identity half is a gather, the conv half a fused conv, both reading x."""
    bb = relax.BlockBuilder()
    x, w = _tensor("x", (1, 8, 4, 4)), _tensor("w", (4, 4, 1, 1))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            first = bb.emit(call_shuffle_gather(bb, x, shuffle_groups=2, channel_offset=0, count=4))
            conv = bb.emit(call_shuffle_group_conv2d(bb, x, w, shuffle_groups=2, channel_offset=4))
            gv = bb.emit_output(relax.op.concat([first, conv], axis=1))
        bb.emit_func_output(gv)
    return bb.get()


def test_v2_concat_shuffle_split():
    """V2 stride 1: shuffle → split (torch.chunk) → (identity, conv)."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 8, 4, 4), "float32"), w: R.Tensor((4, 4, 1, 1), "float32")):
            with R.dataflow():
                r = R.reshape(x, R.shape([1, 2, 4, 4, 4]))
                t = R.permute_dims(r, axes=[0, 2, 1, 3, 4])
                s = R.reshape(t, R.shape([1, 8, 4, 4]))
                halves = R.split(s, indices_or_sections=2, axis=1)
                identity = halves[0]
                branch = halves[1]
                c = R.nn.conv2d(branch, w)
                gv = R.concat((identity, c), axis=1)
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(FuseShuffleGroupConv()(Before), _v2_expected())


def test_v2_concat_shuffle_strided_slices():
    """The same unit written with x[:, :c//2] / x[:, c//2:] (R.strided_slice)."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 8, 4, 4), "float32"), w: R.Tensor((4, 4, 1, 1), "float32")):
            with R.dataflow():
                r = R.reshape(x, R.shape([1, 2, 4, 4, 4]))
                t = R.permute_dims(r, axes=[0, 2, 1, 3, 4])
                s = R.reshape(t, R.shape([1, 8, 4, 4]))
                identity = R.strided_slice(s, axes=[1], begin=[0], end=[4])
                branch = R.strided_slice(s, axes=[1], begin=[4], end=[8], strides=[1])
                c = R.nn.conv2d(branch, w)
                gv = R.concat((identity, c), axis=1)
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(FuseShuffleGroupConv()(Before), _v2_expected())


def test_v2_stride2_shuffle_feeds_two_convs():
    """V2 stride 2: both branches convolve the whole shuffled tensor; the shuffle dies."""

    @I.ir_module
    class Before:
        @R.function
        def main(
            x: R.Tensor((1, 8, 6, 6), "float32"),
            w_dw: R.Tensor((8, 1, 3, 3), "float32"),
            w_pw: R.Tensor((8, 8, 1, 1), "float32"),
        ):
            with R.dataflow():
                r = R.reshape(x, R.shape([1, 2, 4, 6, 6]))
                t = R.permute_dims(r, axes=[0, 2, 1, 3, 4])
                s = R.reshape(t, R.shape([1, 8, 6, 6]))
                left = R.nn.conv2d(s, w_dw, strides=2, padding=1, groups=8)
                right = R.nn.conv2d(s, w_pw)
                gv = R.concat((left, R.nn.max_pool2d(right, pool_size=1, strides=2)), axis=1)
                R.output(gv)
            return gv

    bb = relax.BlockBuilder()
    x, w_dw, w_pw = _tensor("x", (1, 8, 6, 6)), _tensor("w_dw", (8, 1, 3, 3)), _tensor("w_pw", (8, 8, 1, 1))
    with bb.function("main", [x, w_dw, w_pw]):
        with bb.dataflow():
            left = bb.emit(
                call_shuffle_group_conv2d(bb, x, w_dw, shuffle_groups=2, conv_groups=8, strides=2, padding=1)
            )
            right = bb.emit(call_shuffle_group_conv2d(bb, x, w_pw, shuffle_groups=2))
            pooled = bb.emit(relax.op.nn.max_pool2d(right, pool_size=1, strides=2))
            gv = bb.emit_output(relax.op.concat([left, pooled], axis=1))
        bb.emit_func_output(gv)

    tvm.ir.assert_structural_equal(FuseShuffleGroupConv()(Before), bb.get())


def test_shuffle_also_read_by_a_pooling_is_kept_for_it():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 4, 4), "float32"), w: R.Tensor((4, 1, 3, 3), "float32")):
            with R.dataflow():
                r = R.reshape(x, R.shape([1, 2, 2, 4, 4]))
                t = R.permute_dims(r, axes=[0, 2, 1, 3, 4])
                s = R.reshape(t, R.shape([1, 4, 4, 4]))
                c = R.nn.conv2d(s, w, padding=1, groups=4)
                p = R.nn.avg_pool2d(s, pool_size=3, padding=1)
                gv = R.add(c, p)
                R.output(gv)
            return gv

    bb = relax.BlockBuilder()
    x, w = _tensor("x", (1, 4, 4, 4)), _tensor("w", (4, 1, 3, 3))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            r = bb.emit(relax.op.reshape(x, [1, 2, 2, 4, 4]))
            t = bb.emit(relax.op.permute_dims(r, [0, 2, 1, 3, 4]))
            s = bb.emit(relax.op.reshape(t, [1, 4, 4, 4]))
            c = bb.emit(call_shuffle_group_conv2d(bb, x, w, shuffle_groups=2, conv_groups=4, padding=1))
            p = bb.emit(relax.op.nn.avg_pool2d(s, pool_size=3, padding=1))
            gv = bb.emit_output(relax.op.add(c, p))
        bb.emit_func_output(gv)

    tvm.ir.assert_structural_equal(FuseShuffleGroupConv()(Before), bb.get())


# =========================================================================== unchanged IR


@I.ir_module
class ShuffleThenPooling:
    @R.function
    def main(x: R.Tensor((1, 8, 4, 4), "float32")):
        with R.dataflow():
            r = R.reshape(x, R.shape([1, 2, 4, 4, 4]))
            t = R.permute_dims(r, axes=[0, 2, 1, 3, 4])
            s = R.reshape(t, R.shape([1, 8, 4, 4]))
            gv = R.nn.avg_pool2d(s, pool_size=2, strides=2)
            R.output(gv)
        return gv


@I.ir_module
class GroupsDoNotDivideChannels:
    """[1, 6, 4, 4] → [1, 4, 6, 2, 2]: element counts match, but 4 groups of 6 channels is no shuffle."""

    @R.function
    def main(x: R.Tensor((1, 6, 4, 4), "float32"), w: R.Tensor((6, 1, 3, 3), "float32")):
        with R.dataflow():
            r = R.reshape(x, R.shape([1, 4, 6, 2, 2]))
            t = R.permute_dims(r, axes=[0, 2, 1, 3, 4])
            s = R.reshape(t, R.shape([1, 6, 4, 4]))
            gv = R.nn.conv2d(s, w, padding=1, groups=6)
            R.output(gv)
        return gv


@I.ir_module
class SpatialTranspose:
    """The 5-D permutation swaps H and W: not the shuffle's transpose."""

    @R.function
    def main(x: R.Tensor((1, 8, 4, 4), "float32"), w: R.Tensor((8, 4, 1, 1), "float32")):
        with R.dataflow():
            r = R.reshape(x, R.shape([1, 2, 4, 4, 4]))
            t = R.permute_dims(r, axes=[0, 1, 2, 4, 3])
            s = R.reshape(t, R.shape([1, 8, 4, 4]))
            gv = R.nn.conv2d(s, w, groups=2)
            R.output(gv)
        return gv


@I.ir_module
class ChannelSpatialTranspose4D:
    """A 4-D transpose straight into a conv."""

    @R.function
    def main(x: R.Tensor((1, 4, 4, 4), "float32"), w: R.Tensor((4, 4, 1, 1), "float32")):
        with R.dataflow():
            t = R.permute_dims(x, axes=[0, 2, 1, 3])
            gv = R.nn.conv2d(t, w)
            R.output(gv)
        return gv


@I.ir_module
class ShuffleThenNHWCConv:
    """The shuffle is followed by a conv, but not an NCHW/OIHW one."""

    @R.function
    def main(x: R.Tensor((1, 8, 4, 4), "float32"), w: R.Tensor((4, 1, 1, 4), "float32")):
        with R.dataflow():
            r = R.reshape(x, R.shape([1, 2, 4, 4, 4]))
            t = R.permute_dims(r, axes=[0, 2, 1, 3, 4])
            s = R.reshape(t, R.shape([1, 8, 4, 4]))
            gv = R.nn.conv2d(s, w, data_layout="NHWC", kernel_layout="OHWI")
            R.output(gv)
        return gv


@pytest.mark.parametrize(
    "mod",
    [ShuffleThenPooling, GroupsDoNotDivideChannels, SpatialTranspose, ChannelSpatialTranspose4D, ShuffleThenNHWCConv],
    ids=lambda m: m.__name__,
)
def test_left_unchanged(mod):
    _assert_unchanged(mod)


# =========================================================================== from PyTorch and ONNX

RTOL = ATOL = 1e-4


def _shuffle_view(x, g):
    b, c, h, w = x.shape
    return x.view(b, g, c // g, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


def _shuffle_permute(x, g):
    b, c, h, w = x.shape
    return x.reshape(b, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(b, c, h, w)


def _shuffle_flatten(x, g):
    b, c, h, w = x.shape
    return x.view(b, g, c // g, h, w).transpose(1, 2).flatten(1, 2)


SPELLINGS = {
    "view_transpose_contiguous_view": _shuffle_view,
    "reshape_permute_reshape": _shuffle_permute,
    "view_transpose_flatten": _shuffle_flatten,
    "nn.ChannelShuffle": lambda x, g: nn.ChannelShuffle(g)(x),
    "F.channel_shuffle": F.channel_shuffle,
}


@pytest.fixture(autouse=True)
def _seed():
    """Deterministic weights and inputs in every test."""
    torch.manual_seed(0)


def _randomize(model: nn.Module) -> nn.Module:
    """Batch-norm statistics far from the identity, so folding them matters; eval mode."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def _conv_bn_relu(cin, cout, kernel=1, stride=1, groups=1, relu=True):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class V1Unit(nn.Module):
    """ShuffleNet V1 stride-1 unit: gconv 1x1 → BN → ReLU → shuffle → dw 3x3 → BN → gconv 1x1 → + x."""

    def __init__(self, shuffle, channels=24, mid=6, groups=3):
        super().__init__()
        self.shuffle, self.groups = shuffle, groups
        self.gconv1 = _conv_bn_relu(channels, mid, groups=groups)
        self.dw = _conv_bn_relu(mid, mid, 3, groups=mid, relu=False)
        self.gconv2 = _conv_bn_relu(mid, channels, groups=groups, relu=False)

    def forward(self, x):
        y = self.shuffle(self.gconv1(x), self.groups)
        return F.relu(self.gconv2(self.dw(y)) + x)


class V2Unit(nn.Module):
    """ShuffleNet V2 unit (torchvision's InvertedResidual): chunk/concat, shuffle at the end."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride == 2:
            self.branch1 = nn.Sequential(_conv_bn_relu(cin, cin, 3, 2, cin, relu=False), _conv_bn_relu(cin, half))
        b2_in = cin if stride == 2 else half
        self.branch2 = nn.Sequential(
            _conv_bn_relu(b2_in, half),
            _conv_bn_relu(half, half, 3, stride, half, relu=False),
            _conv_bn_relu(half, half),
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return _shuffle_view(out, 2)


class TinyV2(nn.Module):
    """stem → V2 unit (stride 2) → V2 unit (``stride``) → 1x1 conv: every shuffle feeds a unit or a conv."""

    def __init__(self, stride):
        super().__init__()
        self.stem = _conv_bn_relu(3, 8, 3, 2)
        self.units = nn.Sequential(V2Unit(8, 16, 2), V2Unit(16, 16 if stride == 1 else 24, stride))
        self.head = _conv_bn_relu(16 if stride == 1 else 24, 32)

    def forward(self, x):
        return self.head(self.units(self.stem(x)))


class ShuffleAtTheEnd(nn.Module):
    """A shuffle that no conv reads: before a pooling, at the output."""

    def __init__(self):
        super().__init__()
        self.conv = _conv_bn_relu(3, 8)

    def forward(self, x):
        return F.adaptive_avg_pool2d(_shuffle_view(self.conv(x), 4), 1)


def _prepare(mod):
    """What tvmshuffle's frontend does after import: fold batch norm (inference)."""
    return tvm.transform.Sequential(
        [
            relax.transform.FoldBatchnormToConv2D(),
            relax.transform.DecomposeOpsForInference(),
            relax.transform.FoldConstant(),
        ]
    )(mod)


def _import_torch(model, x):
    from tvm.relax.frontend.torch import from_exported_program

    exported = torch.export.export(model, (x,))
    mod = from_exported_program(exported, keep_params_as_input=True)
    mod, params = relax.frontend.detach_params(mod)
    weights = dict(zip(list(mod["main"].params)[1:], params["main"]))
    return _prepare(relax.transform.BindParams("main", weights)(mod))


def _import_onnx(model, x, opset, ort_fold=False):
    """Export with the TorchScript exporter; optionally let ONNX Runtime fold constants first."""
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=opset, input_names=["x"])
    proto = onnx.load_from_string(buffer.getvalue())
    if ort_fold:
        proto = _ort_basic_optimized(proto)
    return _prepare(from_onnx(proto, shape_dict={"x": list(x.shape)}, keep_params_in_input=False))


def _ort_basic_optimized(proto):
    """``torch.chunk`` exports as Shape/Gather/Div/Slice arithmetic, which TVM imports as
    ``R.dynamic_strided_slice`` of unknown shape; ONNX Runtime's basic level folds it to
    static Slices (→ ``R.strided_slice``)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = f"{tmp}/basic.onnx"
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def _count_calls(mod, op_name):
    op = tvm.ir.Op.get(op_name)
    count = 0

    def visit(expr):
        nonlocal count
        count += isinstance(expr, relax.Call) and expr.op.same_as(op)

    relax.analysis.post_order_visit(mod["main"], visit)
    return count


def _lower_and_run(mod, x):
    """FuseShuffleGroupConv, then TVM's lowering and fusion; build for llvm and run."""
    from tvmshuffle.pipeline import lower_passes

    lowered = tvm.transform.Sequential(lower_passes(fuse=True))(mod)
    vm = relax.VirtualMachine(tvm.compile(lowered, target="llvm"), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    out = out if isinstance(out, tvm.runtime.Tensor) else out[0]
    return lowered, out.numpy()


def _kernel_names(lowered):
    return [gv.name_hint for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


def _check_fused_and_equal(mod, model, x, shuffles):
    """``shuffles`` permute_dims before the pass, none after; outputs equal to PyTorch."""
    assert _count_calls(mod, "relax.permute_dims") == shuffles
    fused = FuseShuffleGroupConv()(mod)
    assert relax.analysis.check_well_formed(fused)  # (well_formed raises; this answers)
    assert _count_calls(fused, "relax.permute_dims") == 0
    assert "shuffle_group_conv2d" in [gv.name_hint for gv in fused.get_global_vars()]
    lowered, out = _lower_and_run(mod, x)
    assert not [k for k in _kernel_names(lowered) if "transpose" in k]
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=RTOL, atol=ATOL)
    return lowered


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_pytorch_spellings_are_fused(spelling):
    model = _randomize(V1Unit(SPELLINGS[spelling]))
    x = torch.randn(1, 24, 8, 8)
    lowered = _check_fused_and_equal(_import_torch(model, x), model, x, shuffles=1)
    # The depthwise conv that read the shuffle carries its folded BN bias and the 1x1 conv after
    # it in the same kernel (FuseDepthwisePointwise).
    assert any(k.startswith("fused_shuffle_group_conv2d_relax_add_relax_nn_conv2d") for k in _kernel_names(lowered))


@pytest.mark.parametrize("opset", [13, 18])
def test_onnx_reshape_transpose_reshape_is_fused(opset):
    model = _randomize(V1Unit(_shuffle_view))
    x = torch.randn(1, 24, 8, 8)
    _check_fused_and_equal(_import_onnx(model, x, opset), model, x, shuffles=1)


@pytest.mark.parametrize("stride", [1, 2])
def test_v2_units_keep_no_shuffle(stride):
    model = _randomize(TinyV2(stride))
    x = torch.randn(1, 3, 16, 16)
    mod = _import_torch(model, x)
    assert _count_calls(mod, "relax.split") == (1 if stride == 1 else 0)
    lowered = _check_fused_and_equal(mod, model, x, shuffles=2)
    if stride == 1:
        # The identity half became a gather and went into the next concat's kernel.
        assert [k for k in _kernel_names(lowered) if "shuffle_gather" in k] == ["fused_shuffle_gather_concatenate"]


def test_onnx_v2_unit_with_static_slices():
    model = _randomize(TinyV2(1))
    x = torch.randn(1, 3, 16, 16)
    mod = _import_onnx(model, x, 18, ort_fold=True)
    assert _count_calls(mod, "relax.strided_slice") == 2 and _count_calls(mod, "relax.split") == 0
    _check_fused_and_equal(mod, model, x, shuffles=2)


def test_shuffle_no_conv_reads_is_left_alone_and_correct():
    model = _randomize(ShuffleAtTheEnd())
    x = torch.randn(1, 3, 8, 8)
    mod = _import_torch(model, x)
    _assert_unchanged(mod)
    _, out = _lower_and_run(mod, x)
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=RTOL, atol=ATOL)
