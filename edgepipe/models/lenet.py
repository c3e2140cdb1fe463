"""LeNet-300-100 (LeCun et al. 1998; Deep Compression's MLP case) for the digits data at 1x32x32.

The input is flattened: 1,024 -> 300 -> 100 -> 10 (the paper's is 784 -> 300 -> 100 -> 10 on MNIST).
No weights ship with it; ``bench/bench_compression.py`` trains it (seeded, seconds).
"""

from __future__ import annotations

from torch import nn


def lenet_300_100(in_features: int = 1024, num_classes: int = 10) -> nn.Sequential:
    """The LeNet-300-100 MLP, untrained."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, num_classes))
