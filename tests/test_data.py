from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgepipe.data import Dataset, digits, fit_to_shape, load_dataset, split
from edgepipe.errors import DataError


def test_digits_fitted_to_model_input():
    d = digits((3, 40, 24))
    assert d.x.shape == (1797, 3, 40, 24) and d.x.dtype == np.float32
    assert d.x.min() >= 0.0 and d.x.max() <= 1.0
    assert set(np.unique(d.y)) == set(range(10))


def test_calibration_never_sees_evaluation_and_split_is_deterministic():
    d = digits((1, 8, 8))
    a, b = split(d, 300), split(d, 300)
    assert np.array_equal(a.test.x, b.test.x) and np.array_equal(a.calibration.x, b.calibration.x)
    keys = lambda x: {row.tobytes() for row in x}  # noqa: E731
    # digits has a few duplicate images; compare by index through a tagged copy instead
    tagged = Dataset("t", np.arange(len(d), dtype=np.float32).reshape(-1, 1, 1, 1), d.y)
    s = split(tagged, 300, calibration_seed=7)
    ev, cal, tr = (set(keys(p.x)) for p in (s.test, s.calibration, s.train))
    assert not ev & cal and not ev & tr and cal <= tr
    assert len(s.calibration) == 300 and len(s.test) == round(len(d) * 0.2)
    # another calibration seed draws other calibration samples but keeps the evaluation split
    s2 = split(tagged, 300, calibration_seed=8)
    assert np.array_equal(s2.test.x, s.test.x) and not np.array_equal(s2.calibration.x, s.calibration.x)


def test_empty_calibration_set_is_refused():
    with pytest.raises(DataError, match="calibration set is empty"):
        split(digits((1, 8, 8)), 0)


def test_npz_dataset(tmp_path):
    x = np.random.default_rng(0).random((20, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20) % 3)
    d = load_dataset(str(tmp_path / "d.npz"), (1, 16, 16))
    assert d.x.shape == (20, 1, 16, 16) and d.y.tolist()[:4] == [0, 1, 2, 0]
    np.savez(tmp_path / "bad.npz", images=x)
    with pytest.raises(DataError, match="needs arrays 'x' and 'y'"):
        load_dataset(str(tmp_path / "bad.npz"), (1, 8, 8))


def test_image_folder_dataset(tmp_path):
    for label, value in (("cat", 0), ("dog", 255)):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 12, 3), value, np.uint8)).save(tmp_path / label / f"{i}.png")
    d = load_dataset(str(tmp_path), (3, 8, 8))
    assert d.x.shape == (6, 3, 8, 8) and d.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert d.x[0].max() == 0.0 and d.x[-1].min() == 1.0


def test_missing_dataset_names_what_to_give(tmp_path):
    with pytest.raises(DataError, match="not found: give 'digits'"):
        load_dataset(str(tmp_path / "nope.npz"), (1, 8, 8))


def test_fit_to_shape_is_identity_at_same_size():
    x = np.random.default_rng(1).random((2, 1, 8, 8), dtype=np.float32)
    assert np.allclose(fit_to_shape(x, (1, 8, 8)), x)


def test_mnist5k_is_real_mnist_padded_with_a_1000_sample_test_split():
    from edgepipe.data import load_dataset, split

    d = load_dataset("mnist5k", (1, 32, 32))
    assert d.x.shape == (5000, 1, 32, 32) and d.x.dtype == np.float32 and d.x.min() >= 0.0 and d.x.max() <= 1.0
    assert np.bincount(d.y).tolist() == [500] * 10
    assert not d.x[:, :, :2].any() and not d.x[:, :, -2:].any()  # 28x28 padded with 2 zero rows/columns
    ink = [float(d.x[d.y == k].mean()) for k in range(10)]
    assert ink[1] == min(ink) and ink[0] > 1.5 * ink[1]  # real handwriting: a "1" has the least ink
    s = split(d)
    assert s.counts()["test"] == 1000 and s.counts()["validation"] == 1000  # one sample = 0.1 point
    rgb = load_dataset("mnist5k", (3, 64, 64))
    assert rgb.x.shape == (5000, 3, 64, 64)


def test_mnist5k_through_a_build(tmp_path):
    from edgepipe import api

    r = api.build(None, ["cpu-fp32"], out=tmp_path / "dist", data="mnist5k", bench=False, allow_accuracy_drop=True)
    acc = r.results[0].manifest.accuracy
    assert acc.samples == 1000 and acc.dataset.startswith("mnist5k") and 0.0 <= acc.value <= 100.0
