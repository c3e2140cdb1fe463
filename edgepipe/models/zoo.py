"""Reference architectures for benchmarks, in plain torch (there is no CPU torchvision here).

Random weights: these measure latency and size, not accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

from edgepipe.models.example import BasicBlock


class ResNet18(nn.Module):
    """The ResNet-18 of He et al. (11.7 M parameters at 1000 classes, 1.8 GMACs at 224x224)."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        stages, cin = [], 64
        for i, w in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18(num_classes: int = 1000, in_channels: int = 3, seed: int = 0) -> ResNet18:
    """A seeded, randomly initialised ResNet-18 in eval mode, with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = ResNet18(num_classes, in_channels)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()
