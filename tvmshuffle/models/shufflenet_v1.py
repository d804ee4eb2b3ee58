"""ShuffleNet V1 (Zhang et al., arXiv 1707.01083), Table 1, in plain PyTorch.

Network: conv1 3×3 stride 2 + BN + ReLU → max pool 3×3 stride 2 → stages 2, 3, 4 (4, 8
and 4 units; the first unit of each stage has stride 2) → global average pool → FC 1000.

Unit (paper Fig. 2b/c)::

    1×1 GConv (groups=g) → BN → ReLU → channel shuffle (g) → 3×3 depthwise (stride s) → BN
    → 1×1 GConv (groups=g) → BN
    stride 1: ReLU(x + branch)
    stride 2: concat([avgpool 3×3 s2 pad 1 (x), ReLU(branch)])   # branch has c - c_in channels

The bottleneck width is a quarter of the *stage* output channels (``c // 4``), also in the
stride-2 units, whose branch outputs only ``c - c_in`` channels (this reproduces the
paper's complexities). The very first pointwise layer of stage 2 is not grouped (its input
is the 24-channel conv1 output); the shuffle after it still uses ``g`` groups. For
``g = 1`` the shuffle is the identity and is left out of the graph.

Stage output channels at 1×: g1 144/288/576, g2 200/400/800, g3 240/480/960,
g4 272/544/1088, g8 384/768/1536.

Width scaling (the paper's "ShuffleNet s×" scales the number of filters by s):

* conv1 has 24 channels at 1× and 1.5×, 48 at 2×, 12 at 0.5× and — our choice, the paper
  does not say — also 12 at 0.25× (halving again to 6 would not divide by 4 or 8 groups,
  and conv1 is ~0.5 MMACs at 224², so it hardly matters for the complexity).
* Every stride-2 unit's branch outputs ``c - c_in`` channels through a ``g``-group
  convolution, and the stage-2 shortcut passes conv1's channels through, so for any stage
  width to work conv1's channels must be divisible by ``g``. 12 is not divisible by 8:
  **conv1 is rounded up to a multiple of g**, which only changes g8 at 0.5× and 0.25×
  (12 → 16; Megvii's reference ShuffleNetV1 uses 16 for g8 0.5× as well).
* Stage channels are ``round(paper channels × width)``; where that does not suit the group
  convolutions, **each stage is rounded up to the smallest count c ≥ the scaled value
  with c % g == 0 (stride-1 GConv output), (c // 4) % g == 0 (bottleneck, input and output
  of grouped convs) and (c − c_in) % g == 0 (stride-2 branch output)**, where c_in is the
  previous stage's (already rounded) width. At 1× and 2× the paper's numbers already
  satisfy this; the rule changes g2 0.25× (stage 3: 100 → 104), g2 0.5× (stage 2:
  100 → 104), g2 1.5× (stage 2: 300 → 304), g4 0.25× (68/136 → 80/144), g4 0.5×
  (stage 2: 136 → 144) and g4 1.5× (stage 2: 408 → 416). :func:`stage_channels` returns
  the result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import channel_shuffle  # called as a module global, so tests can patch it here

GROUPS = (1, 2, 3, 4, 8)
WIDTHS = (0.25, 0.5, 1.0, 1.5, 2.0)
STAGE_REPEATS = (4, 8, 4)
#: stage 2/3/4 output channels at width 1.0 (paper, Table 1)
PAPER_CHANNELS = {
    1: (144, 288, 576),
    2: (200, 400, 800),
    3: (240, 480, 960),
    4: (272, 544, 1088),
    8: (384, 768, 1536),
}
#: conv1 channels by width, before rounding up to a multiple of the group count
CONV1_CHANNELS = {0.25: 12, 0.5: 12, 1.0: 24, 1.5: 24, 2.0: 48}


def _fits(c: int, c_in: int, groups: int) -> bool:
    mid = c // 4
    return c > c_in and mid >= groups and c % groups == 0 and mid % groups == 0 and (c - c_in) % groups == 0


def stage_channels(groups: int, width: float) -> tuple[int, tuple[int, int, int]]:
    """``(conv1 channels, (stage2, stage3, stage4) channels)`` after the rounding rule above."""
    if groups not in PAPER_CHANNELS:
        raise ValueError(f"ShuffleNet V1: groups must be one of {GROUPS}, got {groups}")
    if width not in CONV1_CHANNELS:
        raise ValueError(f"ShuffleNet V1: width must be one of {WIDTHS}, got {width}")
    conv1 = -(-CONV1_CHANNELS[width] // groups) * groups  # round up to a multiple of g
    stages = []
    c_in = conv1
    for paper in PAPER_CHANNELS[groups]:
        c = int(round(paper * width))
        while not _fits(c, c_in, groups):  # terminates: any multiple of 4g above c_in fits
            c += 1
        stages.append(c)
        c_in = c
    return conv1, tuple(stages)


class ShuffleUnitV1(nn.Module):
    """One ShuffleNet V1 unit (Fig. 2b for stride 1, Fig. 2c for stride 2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int, first_groups: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if stride == 1 and in_channels != out_channels:
            raise ValueError("a stride-1 unit keeps its channel count")
        mid = out_channels // 4
        branch_out = out_channels - in_channels if stride == 2 else out_channels
        self.stride = stride
        self.groups = groups
        self.gconv1 = nn.Conv2d(in_channels, mid, 1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.dwconv = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.gconv2 = nn.Conv2d(mid, branch_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_out)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.gconv1(x)))
        if self.groups > 1:
            out = channel_shuffle(out, self.groups)
        out = self.bn2(self.dwconv(out))
        out = self.bn3(self.gconv2(out))
        if self.shortcut is not None:
            return torch.cat([self.shortcut(x), F.relu(out)], dim=1)
        return F.relu(x + out)


class ShuffleNetV1(nn.Module):
    """ShuffleNet V1 with ``groups`` ∈ {1, 2, 3, 4, 8} and ``width`` ∈ {0.25, 0.5, 1, 1.5, 2}."""

    def __init__(self, groups: int = 3, width: float = 1.0, num_classes: int = 1000):
        super().__init__()
        conv1, stages = stage_channels(groups, width)
        self.groups = groups
        self.width = width
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, conv1, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(conv1),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c_in = conv1
        for index, (c, repeats) in enumerate(zip(stages, STAGE_REPEATS)):
            units = []
            for i in range(repeats):
                first_groups = 1 if (index == 0 and i == 0) else groups
                units.append(ShuffleUnitV1(c_in, c, 2 if i == 0 else 1, groups, first_groups))
                c_in = c
            setattr(self, f"stage{index + 2}", nn.Sequential(*units))
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        x = x.mean([2, 3])
        return self.fc(x)
