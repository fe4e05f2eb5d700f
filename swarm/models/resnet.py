"""ResNet-18/34/50/101 for CIFAR-size images (3x3 stem, no max-pool), in plain torch."""
from __future__ import annotations

import torch
from torch import nn


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width * self.expansion
        self.body = nn.Sequential(*_conv_bn(c_in, width, 3, stride), nn.ReLU(), *_conv_bn(width, c_out, 3))
        self.shortcut = nn.Sequential(*_conv_bn(c_in, c_out, 1, stride)) if stride != 1 or c_in != c_out else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class Bottleneck(BasicBlock):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__(c_in, width, stride)
        self.body = nn.Sequential(*_conv_bn(c_in, width, 1), nn.ReLU(),
                                  *_conv_bn(width, width, 3, stride), nn.ReLU(),
                                  *_conv_bn(width, width * self.expansion, 1))


_LAYOUT = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
           50: (Bottleneck, [3, 4, 6, 3]), 101: (Bottleneck, [3, 4, 23, 3])}


class ResNet(nn.Module):
    """Images (B, C, H, W) -> class logits (B, num_classes)."""

    def __init__(self, depth: int = 18, num_classes: int = 10, image_size: int = 32, in_channels: int = 3):
        super().__init__()
        block, counts = _LAYOUT[depth]
        self.image_shape = (in_channels, image_size, image_size)
        self.stem = nn.Sequential(*_conv_bn(in_channels, 64, 3), nn.ReLU())
        layers, c = [], 64
        for i, n in enumerate(counts):
            width = 64 * 2 ** i
            for j in range(n):
                layers.append(block(c, width, stride=2 if i > 0 and j == 0 else 1))
                c = width * block.expansion
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor]:
        return (torch.randn(batch_size, *self.image_shape),)
