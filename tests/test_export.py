from __future__ import annotations

import pytest
import torch

from edgepipe.errors import ExportError
from edgepipe.export import Parity, check_parity, export, parity


def test_export_matches_torch(example_model, example_onnx, splits):
    assert example_onnx.input_shape[0] == "batch" and example_onnx.input_shape[1:] == (1, 32, 32)
    p = parity(example_model, example_onnx, splits.test.x)
    assert p.samples == len(splits.test) and p.max_abs_error < 1e-4 and p.top1_agreement == 1.0
    check_parity(p)


def test_export_is_byte_identical(example_model, example_onnx, tmp_path):
    again = export(example_model, (1, 1, 32, 32), tmp_path / "again.onnx")
    assert again.sha256 == example_onnx.sha256


def test_export_carries_no_local_paths(example_onnx):
    """The exporter's stack traces name this checkout's paths: stripped, so bytes don't depend on them."""
    import onnx

    data = example_onnx.path.read_bytes()
    assert b"stack_trace" not in data and b".py" not in data
    m = onnx.load(str(example_onnx.path))
    assert all(len(n.metadata_props) == 0 for n in m.graph.node)


def test_static_batch(example_model, tmp_path, splits):
    m = export(example_model, (1, 1, 32, 32), tmp_path / "static.onnx", dynamic_batch=False)
    assert m.input_shape == (1, 1, 32, 32)
    assert parity(example_model, m, splits.test.x[:5]).samples == 5


def test_input_shape_that_does_not_fit_the_model(example_model, tmp_path):
    with pytest.raises(ExportError, match=r"does not accept input of shape \[1, 3, 32, 32\]"):
        export(example_model, (1, 3, 32, 32), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_parity_failure_reports_numbers():
    with pytest.raises(ExportError, match=r"max abs error 0.5 .*top-1 agreement 90.00%"):
        check_parity(Parity(samples=10, max_abs_error=0.5, top1_agreement=0.9))


def test_train_mode_model_fails_parity(tmp_path, splits):
    """Dropout left in train mode makes torch and ONNX disagree: the check must catch it."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 10), torch.nn.Dropout(0.5))
    onnx = export(model.eval(), (1, 1, 32, 32), tmp_path / "m.onnx")
    model.train()
    with pytest.raises(ExportError, match="differs from torch"):
        check_parity(parity(model, onnx, splits.test.x[:64]))
