"""Graph passes tvmshuffle runs on the imported Relax module (before ``LegalizeOps``)."""

from .fuse_shuffle_group_conv import FuseShuffleGroupConv

__all__ = ["FuseShuffleGroupConv"]
