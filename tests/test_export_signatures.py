"""Export and parity for models that are not one NCHW input with one ``[N, C]`` output: several inputs,
1-D audio, int64 token ids, dense (segmentation) outputs, several outputs."""

from __future__ import annotations

import numpy as np
import onnx as onnx_lib
import pytest
import torch
from torch import nn

from edgepipe.errors import ExportError
from edgepipe.export import Parity, check_parity, export, forward_input_names, onnx_model, parity
from edgepipe.types import TensorSpec


class ImageAndFeats(nn.Module):
    """An image and a feature vector into one ``[N, 10]`` head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feat = nn.Linear(6, 8)
        self.head = nn.Linear(16, 10)

    def forward(self, image: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.conv(image), torch.relu(self.feat(feats))], dim=1))


class Audio(nn.Module):
    """1-D audio ``[N, 1, 16000]`` into 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(1, 8, 64, stride=16), nn.ReLU(), nn.Conv1d(8, 8, 9, stride=4),
                                 nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.net(wave)


class Tokens(nn.Module):
    """int64 token ids ``[N, 16]`` through an embedding and one transformer layer into 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(32, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(input_ids)).mean(1))


class Segmenter(nn.Module):
    """``[N, 3, 16, 16]`` into per-pixel scores ``[N, 4, 16, 16]``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TwoHeads(nn.Module):
    """One input, two outputs: class scores ``[N, 3]`` and a box ``[N, 4]``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(12, 16)
        self.cls = nn.Linear(16, 3)
        self.box = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.body(x))
        return self.cls(h), self.box(h)


class VarArgs(nn.Module):
    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return args[0]


def _seeded(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The exporter and onnxruntime oversubscribe a small, busy machine; one thread is faster there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_two_inputs(tmp_path):
    model = _seeded(ImageAndFeats)
    m = export(model, {"image": (1, 3, 32, 32), "feats": (1, 6)}, tmp_path / "m.onnx")
    sig = onnx_model(m.path).signature
    assert sig is not None
    assert sig.inputs == (TensorSpec("image", ("batch", 3, 32, 32), "float32"),
                          TensorSpec("feats", ("batch", 6), "float32"))
    assert sig.outputs == (TensorSpec("logits", ("batch", 10), "float32"),)
    rng = np.random.default_rng(0)
    x = {"feats": rng.normal(size=(70, 6)).astype(np.float32),
         "image": rng.normal(size=(70, 3, 32, 32)).astype(np.float32)}
    p = parity(model, m, x, batch=32)  # 70 in batches of 32: the last one has 6
    assert p.samples == 70 and p.max_abs_error < 1e-4 and p.top1_agreement == 1.0
    check_parity(p)


def test_inputs_take_forward_order_whatever_the_table_order(tmp_path):
    m = export(_seeded(ImageAndFeats), {"feats": (1, 6), "image": (1, 3, 32, 32)}, tmp_path / "m.onnx")
    assert m.signature is not None and m.signature.input_names == ["image", "feats"]


def test_one_input_of_rank_3(tmp_path):
    """A tuple shape of any rank goes through the one-input path: input "input", output "logits"."""
    model = _seeded(Audio)
    m = export(model, (1, 1, 16000), tmp_path / "audio.onnx")
    assert m.signature is not None
    assert m.signature.inputs == (TensorSpec("input", ("batch", 1, 16000), "float32"),)
    assert m.signature.outputs == (TensorSpec("logits", ("batch", 5), "float32"),)
    x = np.random.default_rng(1).normal(size=(9, 1, 16000)).astype(np.float32)
    p = parity(model, m, x)
    assert p.samples == 9 and p.max_abs_error < 1e-4 and p.top1_agreement == 1.0


def test_int64_token_ids(tmp_path):
    model = _seeded(Tokens)
    m = export(model, {"input_ids": (1, 16)}, tmp_path / "tokens.onnx", dtypes={"input_ids": "int64"})
    assert m.signature is not None
    assert m.signature.inputs == (TensorSpec("input_ids", ("batch", 16), "int64"),)
    assert m.signature.outputs == (TensorSpec("logits", ("batch", 4), "float32"),)
    ids = np.random.default_rng(2).integers(0, 100, size=(20, 16))
    p = parity(model, m, ids.astype(np.int32))  # fed as the input's dtype (int64), whatever the data's
    assert p.samples == 20 and p.max_abs_error < 1e-4 and p.top1_agreement is not None
    check_parity(p)


def test_float_dtypes_export_as_float32(tmp_path):
    """dtypes taken from float64 data must not make a float64 model (the weights are float32)."""
    model = _seeded(ImageAndFeats)
    m = export(model, {"image": (1, 3, 32, 32), "feats": (1, 6)}, tmp_path / "m.onnx",
               dtypes={"image": "float64", "feats": "float64"})
    assert m.signature is not None and [t.dtype for t in m.signature.inputs] == ["float32", "float32"]
    rng = np.random.default_rng(6)
    x = {"image": rng.normal(size=(4, 3, 32, 32)), "feats": rng.normal(size=(4, 6))}  # float64 data
    assert parity(model, m, x).max_abs_error < 1e-4


def test_segmenter_has_no_top1(tmp_path):
    model = _seeded(Segmenter)
    m = export(model, (1, 3, 16, 16), tmp_path / "seg.onnx")
    assert m.signature is not None and m.signature.outputs[0].shape == ("batch", 4, 16, 16)
    p = parity(model, m, np.random.default_rng(3).normal(size=(5, 3, 16, 16)).astype(np.float32))
    assert p.samples == 5 and p.max_abs_error < 1e-4 and p.top1_agreement is None
    check_parity(p)  # no agreement to check: passes on the error alone
    with pytest.raises(ExportError, match=r"max abs error 0.5 \(tolerance 0.001\); check") as e:
        check_parity(Parity(samples=5, max_abs_error=0.5, top1_agreement=None))
    assert "top-1" not in str(e.value)


def test_two_outputs_are_named_and_both_compared(tmp_path):
    model = _seeded(TwoHeads)
    m = export(model, (1, 12), tmp_path / "two.onnx")
    assert m.signature is not None
    assert m.signature.outputs == (TensorSpec("output_0", ("batch", 3), "float32"),
                                   TensorSpec("output_1", ("batch", 4), "float32"))
    x = np.random.default_rng(4).normal(size=(8, 12)).astype(np.float32)
    p = parity(model, m, x)
    assert p.max_abs_error < 1e-4 and p.top1_agreement == 1.0

    # break only the second output (the box head's bias): parity must see it, the top-1 must not move
    proto = onnx_lib.load(str(m.path))
    bias = next(i for i in proto.graph.initializer if "box" in i.name and "bias" in i.name)
    values = onnx_lib.numpy_helper.to_array(bias) + 0.25
    bias.CopyFrom(onnx_lib.numpy_helper.from_array(values.astype(np.float32), bias.name))
    onnx_lib.save(proto, str(m.path))
    p = parity(model, m, x)
    assert p.max_abs_error == pytest.approx(0.25, abs=1e-5) and p.top1_agreement == 1.0
    with pytest.raises(ExportError, match="max abs error 0.25"):
        check_parity(p)


def test_names_that_are_not_the_forward_arguments(tmp_path):
    with pytest.raises(ExportError) as e:
        export(_seeded(ImageAndFeats), {"img": (1, 3, 32, 32), "feats": (1, 6)}, tmp_path / "m.onnx")
    msg = str(e.value)
    assert "\n" not in msg and "['img', 'feats']" in msg and "['image', 'feats']" in msg
    with pytest.raises(ExportError, match="not inputs of the model"):
        export(_seeded(ImageAndFeats), {"image": (1, 3, 32, 32), "feats": (1, 6)}, tmp_path / "m.onnx",
               dtypes={"ids": "int64"})
    assert not list(tmp_path.iterdir())


def test_forward_with_varargs_is_refused(tmp_path):
    assert forward_input_names(_seeded(ImageAndFeats)) == ["image", "feats"]
    with pytest.raises(ExportError, match=r"takes \*args.*wrap the model in a module whose forward names"):
        forward_input_names(VarArgs())
    with pytest.raises(ExportError, match=r"\*args") as e:
        export(VarArgs(), {"x": (1, 4)}, tmp_path / "m.onnx")
    assert "\n" not in str(e.value)


def test_shapes_the_model_does_not_accept(tmp_path):
    with pytest.raises(ExportError, match=r"does not accept inputs of shapes image \[1, 3, 32, 32\], feats \[1, 5\]"):
        export(_seeded(ImageAndFeats), {"image": (1, 3, 32, 32), "feats": (1, 5)}, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="must agree"):
        export(_seeded(ImageAndFeats), {"image": (1, 3, 32, 32), "feats": (2, 6)}, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_static_batch_with_two_inputs(tmp_path):
    model = _seeded(ImageAndFeats)
    m = export(model, {"image": (4, 3, 32, 32), "feats": (4, 6)}, tmp_path / "m.onnx", dynamic_batch=False)
    assert m.signature is not None and [t.shape[0] for t in m.signature.inputs] == [4, 4]
    rng = np.random.default_rng(5)
    x = {"image": rng.normal(size=(10, 3, 32, 32)).astype(np.float32),
         "feats": rng.normal(size=(10, 6)).astype(np.float32)}
    assert parity(model, m, x).samples == 8  # whole static batches only


def test_parity_needs_every_input(tmp_path):
    model = _seeded(ImageAndFeats)
    m = export(model, {"image": (1, 3, 32, 32), "feats": (1, 6)}, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="no samples for input"):
        parity(model, m, {"image": np.zeros((2, 3, 32, 32), np.float32)})


def test_save_program_with_two_inputs(tmp_path):
    from edgepipe.models import save_program

    model = _seeded(ImageAndFeats)
    out = save_program(model, {"image": (1, 3, 32, 32), "feats": (1, 6)}, tmp_path / "m.pt2")
    program = torch.export.load(str(out))
    image, feats = torch.randn(3, 3, 32, 32), torch.randn(3, 6)
    with torch.no_grad():
        got = program.module()(image, feats)
        torch.testing.assert_close(got, model(image, feats))


def test_save_program_with_token_ids(tmp_path):
    from edgepipe.models import save_program

    model = _seeded(Tokens)
    out = save_program(model, {"input_ids": (1, 16)}, tmp_path / "t.pt2", dtypes={"input_ids": "int64"})
    ids = torch.randint(0, 100, (5, 16))
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(out)).module()(ids), model(ids))


def test_one_input_path_keeps_its_names(tmp_path, example_model):
    m = export(example_model, (1, 1, 32, 32), tmp_path / "m.onnx")
    assert m.input_name == "input" and m.signature is not None
    assert m.signature.input_names == ["input"] and m.signature.output_names == ["logits"]
