"""The model zoo: ShuffleNet V1 and V2 in plain PyTorch (no torchvision).

* :mod:`tvmshuffle.models.shufflenet_v1` — ShuffleNet V1 (arXiv 1707.01083), groups
  1/2/3/4/8 × width 0.25/0.5/1.0/1.5/2.0.
* :mod:`tvmshuffle.models.shufflenet_v2` — ShuffleNet V2 (arXiv 1807.11164), width
  0.5/1.0/1.5/2.0, torchvision's layout.
* :mod:`tvmshuffle.models.zoo` — the name → model table, ``get_model``, MAC/parameter
  counting.

:func:`channel_shuffle` is the one shuffle both versions call, written the usual way
(reshape to ``(b, g, c/g, h, w)``, swap the two channel axes, flatten back), so that the
importer sees the same ``reshape → transpose → reshape`` pattern in every model. The
networks look it up as a module global at call time, so tests can count calls by patching
``tvmshuffle.models.shufflenet_v1.channel_shuffle`` / ``...shufflenet_v2.channel_shuffle``.
"""

from __future__ import annotations

__all__ = ["channel_shuffle"]


def channel_shuffle(x, groups: int):
    """Shuffle the channels of an NCHW tensor across ``groups`` groups.

    Channel ``i * (c // groups) + j`` of the input becomes channel ``j * groups + i`` of the
    output: each group of the next grouped convolution then sees channels from every group
    of the previous one (ShuffleNet V1 paper, Fig. 1c).
    """
    b, c, h, w = x.shape
    if c % groups:
        raise ValueError(f"channel_shuffle: {c} channels do not split into {groups} groups")
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
