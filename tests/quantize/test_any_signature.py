"""Per-layer sensitivity (``calibration.float_layers``) and the int8 fine-tune (``calibration.finetune``) on
models of other signatures than one NCHW image -> [N, C]: an image and a vector, a segmenter's per-pixel
scores, int64 tokens through a transformer encoder, a detector's two outputs. Real models (the seeded task
models), real onnxruntime; errors are measured on held-out samples, not the ones calibrated on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgepipe import backends
from edgepipe.config import load_target
from edgepipe.evaluate import outputs
from edgepipe.export import export
from edgepipe.models.tasks import TASKS
from edgepipe.quantize import keep_float, layer_sensitivity
from edgepipe.quantize.finetune import _feeds, _torch_graph, finetune
from edgepipe.quantize.sensitivity import LAYER_OPS, _outputs, output_error
from edgepipe.types import CalibrationSet, OnnxModel


@pytest.fixture(scope="module")
def task_onnx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, OnnxModel]:
    """Each seeded task model exported once (dynamic batch; the tokens as int64)."""
    root = tmp_path_factory.mktemp("tasks")
    out = {}
    for name in ("image_vector", "segmenter", "tokens", "detector", "audio"):
        t = TASKS[name]
        out[name] = export(t.module(), dict(t.shapes), root / f"{name}.onnx",
                           dtypes={"tokens": "int64"} if name == "tokens" else None)
    return out


def _int8_error(model: OnnxModel, calib: dict[str, np.ndarray], test: dict[str, np.ndarray], workdir: Path,
                keep: tuple[str, ...] = (), reference: Path | None = None) -> float:
    """The whole model quantized by onnxruntime (cpu-int8, ``keep`` in float): output NMSE on ``test`` against the
    fp32 ``reference`` (default: the model itself)."""
    t = load_target("cpu-int8")
    t = dataclasses.replace(t, calibration=dataclasses.replace(t.calibration, keep_float=keep))
    ort = backends.get("onnxruntime")
    workdir.mkdir(parents=True)
    runner = ort.load(ort.compile(model, t, CalibrationSet(calib), workdir))
    return output_error(outputs(runner, test), _outputs(reference or model.path, test))[0]


def _layers(model: OnnxModel) -> list[str]:
    return [n.name for n in onnx.load(str(model.path)).graph.node if n.op_type in LAYER_OPS]


@pytest.mark.parametrize("name", ["image_vector", "segmenter"])
def test_sensitivity_ranks_every_layer_and_keeping_the_worst_float_lowers_the_int8_error(name, task_onnx, tmp_path):
    model, task = task_onnx[name], TASKS[name]
    calib, test = task.inputs(128, seed=0), task.inputs(128, seed=1)
    errors = layer_sensitivity(model, calib, samples=32)
    assert sorted(e.name for e in errors) == sorted(_layers(model))  # one entry per quantizable layer
    nmse = [e.nmse for e in errors]
    assert nmse == sorted(nmse, reverse=True) and nmse[-1] > 0
    if name == "image_vector":  # [N, 10] class scores: top-1 agreement; per-pixel scores have none
        assert all(0.5 <= e.agreement <= 1.0 for e in errors)
    else:
        assert all(e.agreement is None for e in errors)
    plain = _int8_error(model, calib, test, tmp_path / "plain")
    worst = _int8_error(model, calib, test, tmp_path / "worst", keep_float(errors, 1))
    best = _int8_error(model, calib, test, tmp_path / "best", (errors[-1].name,))
    figures = f"all int8 {plain:.3e}, most sensitive layer float {worst:.3e}, least sensitive float {best:.3e}"
    assert worst < 0.8 * plain and worst < best, figures


def test_a_scorer_ranks_the_layers_and_sees_every_output(task_onnx):
    """The detector's two outputs (boxes [N, 8, 4], scores [N, 8]) reach the scorer; a scorer that calls a
    larger error better reverses the NMSE ranking, so the ranking is the scorer's."""
    model, task = task_onnx["detector"], TASKS["detector"]
    calib = task.inputs(64, seed=0)
    ref = _outputs(model.path, {k: v[:16] for k, v in calib.items()})
    calls: list[list[tuple[int, ...]]] = []

    def scorer(outs: list[np.ndarray]) -> float:
        calls.append([o.shape for o in outs])
        return output_error(outs, ref)[0]  # "higher is better": the opposite of the default ranking

    default = layer_sensitivity(model, calib, samples=16)
    ranked = layer_sensitivity(model, calib, samples=16, scorer=scorer)
    assert calls == [[(16, 8, 4), (16, 8)]] * len(_layers(model))
    assert [e.name for e in ranked] == [e.name for e in reversed(default)]
    assert [e.score for e in ranked] == sorted(e.score for e in ranked)
    assert all(e.score == pytest.approx(e.nmse) for e in ranked) and default[0].score is None


@pytest.mark.parametrize("name", ["image_vector", "tokens", "segmenter", "detector", "audio"])
def test_the_interpreter_computes_what_onnxruntime_computes_for_every_signature(name, task_onnx):
    model = task_onnx[name]
    x = TASKS[name].inputs(8, seed=2)
    net = _torch_graph(model.path)
    with torch.no_grad():
        ours = net.run(_feeds(net, x))
    ref = _outputs(model.path, x)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-4, atol=1e-5)


def test_finetune_of_a_two_input_model_lowers_the_int8_error_onnxruntime_gives(task_onnx, tmp_path):
    model, task = task_onnx["image_vector"], TASKS["image_vector"]
    calib, test = task.inputs(128, seed=0), task.inputs(128, seed=1)
    tuned = tmp_path / "tuned.onnx"
    rec = finetune(model.path, tuned, calib, model.path, epochs=3)
    assert rec["inputs"] == ["image", "feats"] and rec["samples"] == 128 and rec["layers_trained"] == 4
    sim = rec["simulated_int8_nmse"]
    plain = _int8_error(model, calib, test, tmp_path / "plain")
    after = _int8_error(dataclasses.replace(model, path=tuned), calib, test, tmp_path / "after", reference=model.path)
    figures = f"onnxruntime int8 NMSE {plain:.3e} -> {after:.3e} after the fine-tune (simulated {sim})"
    assert sim["after"] < sim["before"] and after < 0.85 * plain, figures


def test_finetune_of_int64_tokens_through_a_transformer_passes_the_ids_through(task_onnx, tmp_path):
    """Gather, LayerNormalization, Softmax, attention's activation x activation MatMuls: run; the token ids
    are never fake-quantized. (512 samples: with 128, held-out activations overrun the calibrated ranges and
    clipping, which no weight change fixes, is most of the int8 error.)"""
    model, task = task_onnx["tokens"], TASKS["tokens"]
    calib, test = task.inputs(512, seed=0), task.inputs(128, seed=1)
    net = _torch_graph(model.path)
    net.calibrate(_feeds(net, {k: v[:32] for k, v in calib.items()}), 16)
    assert "tokens" not in net.ranges and "embedding" in net.ranges
    tuned = tmp_path / "tuned.onnx"
    rec = finetune(model.path, tuned, calib, model.path, epochs=3)
    sim = rec["simulated_int8_nmse"]
    plain = _int8_error(model, calib, test, tmp_path / "plain")
    after = _int8_error(dataclasses.replace(model, path=tuned), calib, test, tmp_path / "after", reference=model.path)
    figures = f"onnxruntime int8 NMSE {plain:.3e} -> {after:.3e} after the fine-tune (simulated {sim})"
    assert rec["inputs"] == ["tokens"] and rec["layers_trained"] == 5, rec
    assert sim["after"] < sim["before"] and after < plain, figures


def test_a_build_of_a_two_input_model_with_a_float_layer_records_it(tmp_path):
    """`edgepipe build` to an int8 target asking for one float layer (and a fine-tune): the release's manifest
    names the layer, its sensitivity, and the artifact computes it in float."""
    from edgepipe import api

    data = tmp_path / "iv.npz"
    np.savez(data, **TASKS["image_vector"].data())
    target = tmp_path / "iv-int8.toml"
    target.write_text('backend = "onnxruntime"\nprecision = "int8"\n'
                      'input_shape = { image = [1, 3, 16, 16], feats = [1, 8] }\n'
                      '[calibration]\nsamples = 64\nfloat_layers = 1\nfinetune = 1\n')
    res = api.build("edgepipe.models.tasks:image_vector", [str(target)], out=tmp_path / "dist", data=str(data),
                    bench=False, allow_accuracy_drop=True)
    m = res.results[0].manifest
    plan = m.artifact.metadata["mixed_precision"]
    assert m.artifact.precision == "int8" and len(plan["kept_float"]) == 1
    assert [e["name"] for e in plan["sensitivity"]][:1] == plan["kept_float"] and len(plan["sensitivity"]) == 4
    assert m.artifact.metadata["finetune"]["inputs"] == ["image", "feats"]
    release = tmp_path / "dist" / "iv-int8"
    graph = onnx.load(str(release / m.artifact.file)).graph
    dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    float_layers = [n.name for n in graph.node if n.op_type in LAYER_OPS and n.input[1] not in dq]
    assert float_layers == plan["kept_float"], float_layers
    assert 15 < min(m.fidelity["sqnr_db"]) < 200
