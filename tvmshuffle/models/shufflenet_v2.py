"""ShuffleNet V2 (Ma et al., arXiv 1807.11164), Table 5, in plain PyTorch.

Network: conv1 3×3 stride 2 + BN + ReLU → max pool 3×3 stride 2 → stages 2, 3, 4 (4, 8
and 4 units; the first unit of each stage has stride 2) → conv5 1×1 + BN + ReLU → global
average pool → FC 1000.

Units (paper Fig. 3c/d), as torchvision writes them::

    stride 1: x1, x2 = x.chunk(2, dim=1);  out = cat(x1, branch2(x2))
    stride 2: out = cat(branch1(x), branch2(x))
    every unit: channel_shuffle(out, 2)

    branch1 = dw3×3 s2 → BN → 1×1 → BN → ReLU
    branch2 = 1×1 → BN → ReLU → dw3×3 (stride) → BN → 1×1 → BN → ReLU

Stage channels (Table 5): 48/96/192 + conv5 1024 at 0.5×, 116/232/464/1024 at 1×,
176/352/704/1024 at 1.5×, 244/488/976/2048 at 2×.

conv1 has **24 channels at every width**, as Table 5 lists (and torchvision and Megvii's
reference code build). Checked against the paper's complexities (41/146/299/591 MFLOPs at
224²): 24 everywhere gives 40.5/144.9/295.8/583.3 MMACs (−1.3%, −0.8%, −1.1%, −1.3%);
scaling conv1 like V1 instead (12 at 0.5×, 48 at 2×) gives 35.2 MMACs at 0.5× (−14%) and
603.0 at 2× (+2.0%), so it misses both. The parameter counts equal torchvision's
(1,366,792 / 2,278,604 / 3,503,624 / 7,393,996).

Module and parameter names follow torchvision's ``ShuffleNetV2`` (``conv1``, ``stage2``…
``stage4``, ``conv5``, ``fc``; units with ``branch1``/``branch2`` Sequentials), so a
torchvision ``state_dict`` for the same width loads with ``get_model(..., weights=...)``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import channel_shuffle  # called as a module global, so tests can patch it here

WIDTHS = (0.5, 1.0, 1.5, 2.0)
STAGE_REPEATS = (4, 8, 4)
CONV1_CHANNELS = 24
#: stage 2/3/4 and conv5 output channels (paper, Table 5)
STAGE_CHANNELS = {
    0.5: (48, 96, 192, 1024),
    1.0: (116, 232, 464, 1024),
    1.5: (176, 352, 704, 1024),
    2.0: (244, 488, 976, 2048),
}


def _depthwise(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False)


class InvertedResidual(nn.Module):
    """One ShuffleNet V2 unit (torchvision's name for it)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        branch = out_channels // 2
        if stride == 1 and in_channels != 2 * branch:
            raise ValueError("a stride-1 unit needs in_channels == out_channels, even")
        self.stride = stride
        if stride == 2:
            self.branch1 = nn.Sequential(
                _depthwise(in_channels, stride),
                nn.BatchNorm2d(in_channels),
                nn.Conv2d(in_channels, branch, 1, bias=False),
                nn.BatchNorm2d(branch),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(in_channels if stride == 2 else branch, branch, 1, bias=False),
            nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True),
            _depthwise(branch, stride),
            nn.BatchNorm2d(branch),
            nn.Conv2d(branch, branch, 1, bias=False),
            nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNet V2 with ``width`` ∈ {0.5, 1.0, 1.5, 2.0}."""

    def __init__(self, width: float = 1.0, num_classes: int = 1000):
        super().__init__()
        if width not in STAGE_CHANNELS:
            raise ValueError(f"ShuffleNet V2: width must be one of {WIDTHS}, got {width}")
        self.width = width
        *stages, last = STAGE_CHANNELS[width]
        c_in = CONV1_CHANNELS
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, c_in, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        for index, (c, repeats) in enumerate(zip(stages, STAGE_REPEATS)):
            units = [InvertedResidual(c_in, c, 2)] + [InvertedResidual(c, c, 1) for _ in range(repeats - 1)]
            setattr(self, f"stage{index + 2}", nn.Sequential(*units))
            c_in = c
        self.conv5 = nn.Sequential(
            nn.Conv2d(c_in, last, 1, bias=False),
            nn.BatchNorm2d(last),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        x = self.conv5(x)
        x = x.mean([2, 3])
        return self.fc(x)
