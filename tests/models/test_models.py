from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from edgepipe.errors import ModelLoadError
from edgepipe.models import EXAMPLE, load_model, state_dict_sha256
from edgepipe.models.example import WEIGHTS, DigitsResNet


def test_bundled_example_reaches_97_percent_on_held_out_digits(example_model, splits):
    with torch.no_grad():
        pred = example_model(torch.from_numpy(splits.test.x)).argmax(1).numpy()
    assert (pred == splits.test.y).mean() >= 0.97


def test_bundled_weights_are_small_safetensors():
    assert WEIGHTS.suffix == ".safetensors" and WEIGHTS.stat().st_size < 2 * 2**20


def test_default_model_is_the_example():
    src = load_model(None)
    assert src.spec == EXAMPLE and src.kind == "torch" and isinstance(src.module, DigitsResNet)
    assert src.weights_sha256 == state_dict_sha256(src.module)


def test_factory_with_weights_file(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    pkg = tmp_path / "mymodels.py"
    pkg.write_text("from edgepipe.models.example import DigitsResNet\ndef net():\n    return DigitsResNet()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    trained = load_model(None).module
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    for w in ("w.safetensors", "w.pt"):
        src = load_model("mymodels:net", tmp_path / w)
        assert src.weights_sha256 == state_dict_sha256(trained)
    sys.modules.pop("mymodels", None)


def test_factory_that_does_not_import():
    with pytest.raises(ModelLoadError, match="cannot import module 'no_such_pkg.models'"):
        load_model("no_such_pkg.models:net")


def test_factory_attribute_missing():
    with pytest.raises(ModelLoadError, match="has no callable 'nope'"):
        load_model("edgepipe.models.example:nope")


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "model.onnx"))


def test_onnx_that_is_not_onnx(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelLoadError, match="is not a valid ONNX model"):
        load_model(str(f))


def test_weights_that_do_not_fit(tmp_path):
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.zeros(3, 3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelLoadError, match="do not fit the model"):
        load_model(EXAMPLE, tmp_path / "w.safetensors")


def test_pt2_exported_program(tmp_path, example_model, splits):
    x = torch.from_numpy(splits.test.x[:4])
    ep = torch.export.export(example_model, (x,))
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    src = load_model(str(tmp_path / "m.pt2"), trust_code=True)
    with torch.no_grad():
        assert np.allclose(src.module(x).numpy(), example_model(x).numpy(), atol=1e-5)


def test_pt2_program_as_weights_for_a_factory(tmp_path):
    """`edgepipe compress` writes a .pt2; its weights load into the factory's model like a state dict."""
    from edgepipe.models import save_program

    trained = load_model(None).module
    save_program(trained, (1, 1, 32, 32), tmp_path / "m.pt2")
    src = load_model(EXAMPLE, tmp_path / "m.pt2", trust_code=True)
    assert src.weights_sha256 == state_dict_sha256(trained)
    small = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 10))
    save_program(small, (1, 1, 32, 32), tmp_path / "small.pt2")
    with pytest.raises(ModelLoadError, match="do not fit the model.*no longer fits its factory"):
        load_model(EXAMPLE, tmp_path / "small.pt2", trust_code=True)
