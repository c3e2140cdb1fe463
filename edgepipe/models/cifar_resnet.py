"""The case-study models: CIFAR-style ResNets (He et al. 2016, section 4.2) on ``--data mnist5k``.

ResNet-56 (the model Torch-Pruning reports 2.1x fewer MACs at +0.38 points on CIFAR-10) is the teacher
and the model every technique is applied to; ResNet-20 is the distillation student. Depth 6n+2: a 3x3
stem of 16 channels, three stages of n basic blocks (16, 32, 64 channels; stride 2 entering stages 2 and
3, with a 1x1 convolution + BN projection on the shortcut), global average pooling, a linear head. Input
1x32x32 (MNIST padded from 28x28), 10 classes.

The weights beside this file were produced by ``python -m edgepipe.models.train_cifar_resnet`` (seeded,
CPU; see that module for the settings and the time it took).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgepipe.models._blocks import BasicBlock

INPUT_SHAPE = (1, 1, 32, 32)
NUM_CLASSES = 10
HERE = Path(__file__).resolve().parent


def weights_path(depth: int) -> Path:
    return HERE / f"resnet{depth}_mnist5k.safetensors"


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs, as in He et al. 2016 (projection shortcuts where the shape changes)."""

    def __init__(self, depth: int = 56, in_channels: int = 1, num_classes: int = NUM_CLASSES,
                 widths: tuple[int, int, int] = (16, 32, 64), pool: int = 1) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth {depth}: a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.depth = depth
        # pool > 1: average-pool the input first (a student for inputs upsampled from a lower resolution)
        self.stem = nn.Sequential(*([nn.AvgPool2d(pool)] if pool > 1 else []),
                                  nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks = [BasicBlock(cin, w, 1 if i == 0 else 2)] + [BasicBlock(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _load(depth: int, pretrained: bool) -> CifarResNet:
    model = CifarResNet(depth)
    if pretrained:
        from safetensors.torch import load_file

        path = weights_path(depth)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: train it with python -m edgepipe.models.train_cifar_resnet --depth {depth}")
        model.load_state_dict(load_file(path))
    return model.eval()


def resnet56(pretrained: bool = True) -> CifarResNet:
    """ResNet-56 trained on mnist5k (``edgepipe.models.cifar_resnet:resnet56``)."""
    return _load(56, pretrained)


def resnet20(pretrained: bool = True) -> CifarResNet:
    """ResNet-20 trained on mnist5k: the distillation student (``edgepipe.models.cifar_resnet:resnet20``)."""
    return _load(20, pretrained)
