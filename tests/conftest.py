"""Shared fixtures: the trained example model, its data splits, and an exported ONNX of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need TensorRT and an NVIDIA GPU: skip them elsewhere, saying what is missing."""
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:
        return
    from edgepipe import backends

    avail = backends.get("tensorrt").check()
    if avail.run:
        return
    skip = pytest.mark.skip(reason=f"needs TensorRT and an NVIDIA GPU: {avail.reason}")
    for item in gpu:
        item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory):
    """Session-wide default, so that module- and session-scoped fixtures never touch the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEPIPE_CACHE_DIR", str(tmp_path_factory.mktemp("session-cache")))
        mp.setenv("OPENVINO_TELEMETRY_DISABLE", "1")
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own stage cache, so no test passes because of another's output."""
    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("OPENVINO_TELEMETRY_DISABLE", "1")


@pytest.fixture(scope="session")
def example_model():
    from edgepipe.models.example import digits_resnet

    return digits_resnet()


@pytest.fixture(scope="session")
def splits():
    from edgepipe.data import digits, split

    return split(digits((1, 32, 32)), calibration_samples=128)


@pytest.fixture(scope="session")
def example_onnx(tmp_path_factory: pytest.TempPathFactory, example_model):
    """The example exported once per session (dynamic batch)."""
    from edgepipe.export import export

    return export(example_model, (1, 1, 32, 32), tmp_path_factory.mktemp("onnx") / "example.onnx")


@pytest.fixture
def calibration(splits):
    from edgepipe.types import CalibrationSet

    return CalibrationSet(splits.calibration.x, "digits:calibration")


def no_temp_leftovers(root: Path) -> list[Path]:
    """Anything a failed stage left behind that looks like output."""
    return [p for p in root.rglob("*") if p.name != ".gitkeep"] if root.exists() else []


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())
