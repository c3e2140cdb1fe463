"""What every registered backend promises, whatever this machine has.

Parametrized over ``edgepipe.backends.names()``: a new backend is held to these without a line here. A
backend that cannot compile here is skipped with the reason its ``check()`` gives; one that compiles but
cannot run (TensorRT without a GPU) is evaluated through its stand-in, and must refuse ``load`` clearly.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgepipe import backends
from edgepipe.config import Target
from edgepipe.config import options as config_options
from edgepipe.config.target import PRECISIONS, Calibration
from edgepipe.errors import BackendUnavailable, ConfigError
from edgepipe.evaluate import predict, top1
from edgepipe.types import Artifact, CalibrationSet

NAMES = backends.names()
METHODS = ("minmax", "entropy", "percentile")
ORT = backends.get("onnxruntime")


def _target(name: str, precision: str, **kw: Any) -> Target:
    be = backends.get(name)
    methods = be.capabilities.calibration_methods
    method = "minmax" if "minmax" in methods or not methods else methods[0]
    return Target(name=f"contract-{name}-{precision}", backend=name, precision=precision,  # type: ignore[arg-type]
                  calibration=Calibration(method=method, samples=128), **kw)


def _int8_or_fp32(name: str) -> str:
    return "int8" if "int8" in backends.get(name).capabilities.precisions else "fp32"


class Compiler:
    """Compiles (backend, precision, attempt) once per module; snapshots the inputs around every compile."""

    def __init__(self, onnx: Any, calib: CalibrationSet, root: Path) -> None:
        self.onnx, self.calib, self.root = onnx, calib, root
        self.done: dict[tuple[str, str, int], Artifact] = {}
        self.snapshots: list[tuple[str, dict[str, Any], dict[str, Any]]] = []

    def snapshot(self) -> dict[str, Any]:
        c = self.calib
        return {
            "onnx_sha256": hashlib.sha256(self.onnx.path.read_bytes()).hexdigest(),
            "onnx_dir": sorted(p.name for p in self.onnx.path.parent.iterdir()),
            "x": c.x.copy(), "validation_x": c.validation_x.copy(), "validation_y": c.validation_y.copy(),
            "dtypes": (c.x.dtype, c.validation_x.dtype, c.validation_y.dtype),
        }

    def __call__(self, name: str, precision: str, attempt: int = 0) -> Artifact:
        key = (name, precision, attempt)
        if key not in self.done:
            be = backends.get(name)
            avail = be.check()
            if not avail.compile:
                pytest.skip(f"{name} cannot compile here: {avail.reason}")
            before = self.snapshot()
            self.done[key] = be.compile(self.onnx, _target(name, precision), self.calib,
                                        self.root / f"{name}-{precision}-{attempt}")
            self.snapshots.append((f"{name} {precision} #{attempt}", before, self.snapshot()))
        return self.done[key]


@pytest.fixture(scope="module")
def compiled(example_onnx, splits, tmp_path_factory) -> Compiler:
    from edgepipe.export import onnx_model

    src = tmp_path_factory.mktemp("contract-src") / "model.onnx"  # alone in its directory: nothing may appear
    shutil.copyfile(example_onnx.path, src)
    calib = CalibrationSet(splits.calibration.x, "digits:calibration", splits.validation.x, splits.validation.y,
                           "digits:validation")
    return Compiler(onnx_model(src), calib, tmp_path_factory.mktemp("contract"))


@pytest.fixture(scope="module")
def fp32_reference(example_onnx, splits) -> dict[str, Any]:
    runner = ORT.load(Artifact("onnxruntime", "fp32", example_onnx.path))
    return {"logits": predict(runner, splits.test.x[:128]),
            **{s: top1(runner, getattr(splits, s).x, getattr(splits, s).y) for s in ("validation", "test")}}


def _engine_here(name: str) -> bool:
    """Whether this backend's artifacts run here on a GPU (their numbers are the GPU's, not the CPU's)."""
    be = backends.get(name)
    return be.capabilities.needs_gpu and be.check().run


def _runner(name: str, art: Artifact) -> Any:
    """A runner of ``art``: the artifact itself where this machine runs it, else the backend's stand-in."""
    be = backends.get(name)
    avail = be.check()
    if avail.run:
        return be.load(art)
    with pytest.raises(BackendUnavailable):  # cannot run here: a clear error, never a crash
        be.load(art)
    stand_in = be.stand_in(art)
    if stand_in is None:
        pytest.skip(f"{name} cannot run here and has no stand-in: {avail.reason}")
    assert stand_in.evaluates and stand_in.bench
    return backends.get(stand_in.artifact.backend).load(stand_in.artifact)


# ---------------------------------------------------------------------------------------------------------
# capabilities are data


def test_the_config_knows_exactly_the_registered_backends():
    assert config_options.backend_names() == NAMES
    with pytest.raises(ConfigError, match="unknown backend 'nope'; known backends: " + ", ".join(NAMES)):
        Target(name="t", backend="nope", precision="fp32")


@pytest.mark.parametrize("name", NAMES)
def test_options_class_is_registered_for_the_backend(name):
    be = backends.get(name)
    assert be.name == name
    assert config_options.options_class(name) is type(be).Options
    t = Target(name="t", backend=name, precision=be.capabilities.precisions[0], options={})
    assert type(t.options) is type(be).Options and be.options(t) is t.options  # parsed once, at construction
    with pytest.raises(ConfigError, match=f"backend {name}: unknown key 'options.no_such_option'"):
        Target(name="t", backend=name, precision="fp32", options={"no_such_option": 1})


@pytest.mark.parametrize("name", NAMES)
def test_capabilities_are_checked_before_any_work(name, tmp_path, compiled):
    be = backends.get(name)
    caps = be.capabilities
    assert caps.precisions and set(caps.precisions) <= set(PRECISIONS)
    assert set(caps.calibration_methods) <= set(METHODS) and caps.artifact_suffixes
    assert ("int8" in caps.precisions) == bool(caps.calibration_methods)
    for p in set(PRECISIONS) - set(caps.precisions):
        with pytest.raises(ConfigError, match=f"does not support precision '{p}'"):
            be.compile(compiled.onnx, _target(name, p), compiled.calib, tmp_path / p)
    unsupported_methods = sorted(set(METHODS) - set(caps.calibration_methods)) if "int8" in caps.precisions else []
    for m in unsupported_methods:
        t = Target(name="t", backend=name, precision="int8", calibration=Calibration(method=m))  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match=m):
            be.compile(compiled.onnx, t, compiled.calib, tmp_path / m)
    assert not any(tmp_path.iterdir())  # refused before a file was written


# ---------------------------------------------------------------------------------------------------------
# compile, run, agree


@pytest.mark.parametrize("name", NAMES)
def test_fp32_matches_onnxruntime(name, compiled, fp32_reference, splits):
    art = compiled(name, "fp32")
    assert art.backend == name and art.precision == "fp32" and all(p.is_file() for p in art.files)
    assert art.path.is_file()
    assert type(backends.for_artifact(art.path)) is type(backends.get(name))  # `edgepipe bench FILE` finds it
    runner = _runner(name, art)
    logits = predict(runner, splits.test.x[:128])
    ref = fp32_reference["logits"]
    if _engine_here(name):
        # a GPU engine: fp32 layers may run in TF32 (TensorRT's default), ~1e-3 relative
        assert np.abs(logits - ref).max() < 2e-2 * max(1.0, float(np.abs(ref).max()))
        assert (logits.argmax(1) == ref.argmax(1)).mean() >= 0.99
    else:
        assert np.abs(logits - ref).max() < 1e-4
        assert (logits.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("name", NAMES)
def test_int8_stays_within_the_accuracy_budget(name, compiled, fp32_reference, splits):
    if "int8" not in backends.get(name).capabilities.precisions:
        pytest.skip(f"{name} has no int8")
    art = compiled(name, "int8")
    budget = _target(name, "int8").budgets.max_accuracy_drop
    assert art.precision == "int8" and budget is not None
    runner = _runner(name, art)
    for split in ("validation", "test"):  # validation: what the build's budget check uses; test: the report
        acc = top1(runner, getattr(splits, split).x, getattr(splits, split).y)
        assert (fp32_reference[split] - acc) * 100 <= budget, (split, acc, fp32_reference[split])
    assert _calibration_records(art.metadata, compiled.calib), "int8 metadata names the samples it calibrated on"


def _calibration_records(meta: Any, calib: CalibrationSet) -> list[dict[str, Any]]:
    """Every record in ``meta`` (nested anywhere) of the calibration set: its sample count and hash."""
    found = []
    if isinstance(meta, dict):
        if meta.get("sha256") == calib.sha256 and meta.get("samples") == len(calib.x):
            found.append(meta)
        for v in meta.values():
            found += _calibration_records(v, calib)
    elif isinstance(meta, list):
        for v in meta:
            found += _calibration_records(v, calib)
    return found


@pytest.mark.parametrize("name", NAMES)
def test_compiling_twice_gives_the_same_artifact(name, compiled, splits):
    precision = _int8_or_fp32(name)
    a, b = compiled(name, precision, 0), compiled(name, precision, 1)
    assert [p.name for p in a.files] == [p.name for p in b.files]
    differ = [p.name for p, q in zip(a.files, b.files, strict=True) if p.read_bytes() != q.read_bytes()]
    # a CPU backend's artifact is a function of its inputs: the same bytes, always. Only an engine built on a GPU
    # (whose builder times kernels) may differ, and then it must give the same outputs
    assert not differ or _engine_here(name), f"{name}: compiling twice gave different bytes in {differ}"
    if differ:
        x = splits.test.x[:64]
        ya, yb = predict(_runner(name, a), x), predict(_runner(name, b), x)
        assert (ya.argmax(1) == yb.argmax(1)).all(), differ
        atol = 1e-2 if _engine_here(name) else 1e-5  # two engines may pick different kernels
        np.testing.assert_allclose(ya, yb, rtol=0, atol=atol, err_msg=f"files that differ: {differ}")


@pytest.mark.parametrize("name", NAMES)
def test_compile_never_changes_its_inputs(name, compiled):
    compiled(name, "fp32")
    compiled(name, _int8_or_fp32(name))
    mine = [s for s in compiled.snapshots if s[0].startswith(f"{name} ")]
    assert mine
    for what, before, after in mine:
        assert after["onnx_sha256"] == before["onnx_sha256"], f"{what} changed the ONNX file"
        assert after["onnx_dir"] == before["onnx_dir"], f"{what} wrote beside the ONNX file"
        assert after["dtypes"] == before["dtypes"], what
        for key in ("x", "validation_x", "validation_y"):
            assert np.array_equal(getattr(compiled.calib, key), before[key]), f"{what} changed {key}"
