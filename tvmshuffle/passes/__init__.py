"""Graph passes tvmshuffle runs on the imported Relax module (before ``LegalizeOps``)."""

from .fold_constant_arith import FoldConstantArith
from .fuse_conv_pool import FuseConvPool
from .fuse_depthwise_pointwise import FuseDepthwisePointwise
from .fuse_shuffle_group_conv import FuseShuffleGroupConv

__all__ = ["FoldConstantArith", "FuseConvPool", "FuseDepthwisePointwise", "FuseShuffleGroupConv"]
