"""The real-model test case: EfficientNet-Lite0 with its real ImageNet weights (read offline from an
installed package) and the photos dataset built from scikit-image's bundled photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgepipe.data import PHOTO_SAMPLES, PHOTOS, load_dataset, photo_crops
from edgepipe.models.zoo import efficientnet_lite0, photos


@pytest.fixture(scope="module")
def lite0():
    return efficientnet_lite0()


def _whole(name: str) -> torch.Tensor:
    from pathlib import Path

    import skimage.data
    import skimage.io
    from skimage.transform import resize

    img = skimage.io.imread(Path(skimage.data.__file__).parent / name)[..., :3] / 255.0
    return torch.from_numpy(resize(img, (224, 224), anti_aliasing=True).transpose(2, 0, 1)[None].astype(np.float32))


def test_the_weights_are_the_real_imagenet_ones(lite0):
    assert sum(p.numel() for p in lite0.parameters()) == 4_652_008
    with torch.no_grad():
        cat = lite0(_whole("chelsea.png")).softmax(1)[0]
        coffee = lite0(_whole("coffee.png")).softmax(1)[0]
    assert int(cat.argmax()) in range(281, 286) and float(cat[281:286].sum()) > 0.8  # the cat classes
    assert int(coffee.argmax()) == 967 and float(coffee[967]) > 0.5  # espresso


def test_photos_are_fixed_crops_labelled_by_the_fp32_model(lite0, monkeypatch):
    """The dataset's first 64 crops (the full 1,000 label in ~2 min here; they are the first 64 of it, same seed)."""
    import inspect

    assert inspect.signature(photo_crops).parameters["n"].default == PHOTO_SAMPLES == 1000
    d = photos(n=64)
    assert d.x.shape == (64, 3, 224, 224) and d.x.dtype == np.float32
    assert d.x.min() >= 0.0 and d.x.max() <= 1.0
    assert np.array_equal(photo_crops(n=8), d.x[:8])  # seeded: the same crops every time
    with torch.no_grad():
        assert np.array_equal(lite0(torch.from_numpy(d.x[:16])).argmax(1).numpy(), d.y[:16])
    assert len(np.unique(d.y)) > len(PHOTOS)  # many ImageNet classes: crops of one photo differ too
    # `--data photos` is the same dataset, by its registered name (its labels now come from the cache)
    monkeypatch.setattr("edgepipe.data.PHOTO_SAMPLES", 64)
    named = load_dataset("photos", (3, 224, 224))
    assert named.name == "photos" and np.array_equal(named.x, d.x) and np.array_equal(named.y, d.y)
