"""The bundled example: a small ResNet for scikit-learn's digits at 1x32x32.

The weights beside this file were produced by ``python -m edgepipe.models.train_example`` (seeded,
CPU, under two minutes on two cores).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgepipe.models._blocks import BasicBlock
from edgepipe.types import DEFAULT_INPUT_SHAPE

WEIGHTS = Path(__file__).with_name("digits_resnet.safetensors")
INPUT_SHAPE = DEFAULT_INPUT_SHAPE
NUM_CLASSES = 10


class DigitsResNet(nn.Module):
    """ResNet-10-style CNN: stem, three stages of two residual blocks, global pool, linear head."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w)))
            cin = w
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def digits_resnet(pretrained: bool = True) -> DigitsResNet:
    """The bundled example model, with its trained weights unless ``pretrained=False``."""
    model = DigitsResNet()
    if pretrained:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(WEIGHTS))
    return model.eval()


def digits_student() -> nn.Module:
    """A distillation student for the example (``edgepipe.models.example:digits_student``), untrained.

    The digits are 8x8 images upsampled to 32x32, so the student averages 4x4 blocks first and runs a
    ResNet-8 (one basic block per stage, 16/32/64 channels) at the digits' own resolution: 1/4 of the
    example's blocks on 1/16 of its pixels. It learns from the example by distillation
    (``recipes/digits-student.toml``).
    """
    from edgepipe.models.cifar_resnet import CifarResNet

    with torch.random.fork_rng():  # the same starting weights every time, the caller's RNG left as it was
        torch.manual_seed(0)
        return CifarResNet(depth=8, in_channels=1, num_classes=NUM_CLASSES, pool=4).eval()
