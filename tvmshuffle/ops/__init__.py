"""Custom operators: TE computes that tvmshuffle's passes put into Relax graphs."""

from .shuffle_group_conv2d import (
    call_shuffle_gather,
    call_shuffle_group_conv2d,
    channel_shuffle_ref,
    conv2d_ref,
    emit_shuffle_gather,
    emit_shuffle_group_conv2d,
    shuffle_gather,
    shuffle_group_conv2d,
    shuffle_group_conv2d_ref,
    shuffle_source_channel,
)

__all__ = [
    "call_shuffle_gather",
    "call_shuffle_group_conv2d",
    "channel_shuffle_ref",
    "conv2d_ref",
    "emit_shuffle_gather",
    "emit_shuffle_group_conv2d",
    "shuffle_gather",
    "shuffle_group_conv2d",
    "shuffle_group_conv2d_ref",
    "shuffle_source_channel",
]
