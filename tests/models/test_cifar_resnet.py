"""The case-study models: CIFAR-style ResNet-56 and ResNet-20 (He et al. 2016) trained on mnist5k, weights
shipped, training reproducible byte for byte."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch


def test_architecture_is_he_et_al_cifar_resnet():
    from edgepipe.models.cifar_resnet import CifarResNet

    for depth, blocks, params in ((20, 3, 272_186), (56, 9, 855_482)):
        m = CifarResNet(depth)
        assert len(m.layer1) == len(m.layer2) == len(m.layer3) == blocks
        convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d) and x.kernel_size == (3, 3)]
        assert len(convs) + 1 == depth  # 6n+1 3x3 convolutions and the linear head
        assert sum(p.numel() for p in m.parameters()) == params
        assert m(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(51)


@pytest.mark.parametrize("factory,floor", [("resnet56", 0.975), ("resnet20", 0.975)])
def test_shipped_weights_are_trained_on_mnist5k(factory, floor):
    from edgepipe.data import load_dataset, split
    from edgepipe.models import cifar_resnet

    s = split(load_dataset("mnist5k", (1, 32, 32)))
    model = getattr(cifar_resnet, factory)()
    with torch.no_grad():
        pred = model(torch.from_numpy(s.test.x)).argmax(1).numpy()
    assert float((pred == s.test.y).mean()) >= floor  # 1,000 held-out samples
    untrained = getattr(cifar_resnet, factory)(pretrained=False)
    with torch.no_grad():
        assert float((untrained(torch.from_numpy(s.test.x)).argmax(1).numpy() == s.test.y).mean()) < 0.3


def test_training_is_reproducible_byte_for_byte(tmp_path):
    from edgepipe.models.train_cifar_resnet import train

    torch.set_num_threads(1)
    digests = []
    for name in ("a", "b"):
        r = train(20, epochs=1, seed=3, out=tmp_path / f"{name}.safetensors", limit=192)
        assert 0.0 <= r["test_top1"] <= 1.0
        digests.append(hashlib.sha256((tmp_path / f"{name}.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    other = train(20, epochs=1, seed=4, out=tmp_path / "c.safetensors", limit=192)
    assert np.isfinite(other["validation_top1"])
    assert hashlib.sha256((tmp_path / "c.safetensors").read_bytes()).hexdigest() != digests[0]
