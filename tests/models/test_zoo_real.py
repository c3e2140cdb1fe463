"""The zoo's real models, whose ONNX files ship in PyPI wheels (the ``zoo`` extra), scored in fp32 on data rendered
with true labels, through the one evaluation path; and their metrics' one-line errors on broken outputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edgepipe import metrics
from edgepipe.errors import ModelLoadError
from edgepipe.metrics import MetricError
from edgepipe.models import load_model, zoo
from edgepipe.pipeline.stages import own_input_shape


def _outputs(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name, batch = s.get_inputs()[0].name, s.get_inputs()[0].shape[0]
    step = 1 if batch == 1 else 8
    parts = [s.run(None, {name: x[i:i + step]}) for i in range(0, len(x), step)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


@pytest.mark.parametrize("name, data, metric, post, floor", [
    ("ppocr_rec", zoo.text_lines, "exact_match", zoo.ocr_text, 80.0),
    ("ppocr_det", zoo.text_pages, "miou", zoo.text_mask, 60.0),
    ("yolox_chars", zoo.char_scenes, "map50", zoo.yolox_boxes, 60.0),
])
def test_each_real_model_reads_its_rendered_data_in_fp32(name, data, metric, post, floor):
    src = load_model(f"edgepipe.models.zoo:{name}")
    assert src.is_onnx and src.spec == f"edgepipe.models.zoo:{name}"
    shape = own_input_shape(src)  # every size but the batch is fixed: no --input-shape needed
    assert isinstance(shape, tuple) and shape[0] == 1
    ds = data(shape[1:], n=24)
    value = metrics.score(metric, post(_outputs(src.onnx_path, ds.x)), ds.all_targets)
    assert floor <= value <= 100.0, (name, value)


def test_the_rendered_data_is_seeded_and_its_labels_are_the_true_strings():
    a, b = zoo.text_lines(n=6), zoo.text_lines(n=6)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.targets["text"], b.targets["text"])
    vocab = zoo.text.rec_vocabulary()
    _, strings = zoo.text.render_lines(6)
    assert [zoo.text.decode([i for i in row if i >= 0], vocab) for row in a.targets["text"]] == strings
    scenes = zoo.char_scenes(n=4)
    k = scenes.targets["classes"] >= 0
    assert k.sum(1).min() >= 1 and (scenes.targets["boxes"][k][:, 2:] > scenes.targets["boxes"][k][:, :2]).all()


def test_text_metrics_on_ctc_scores_and_on_ids():
    scores = np.zeros((2, 6, 4), np.float32)
    for i, best in enumerate([[1, 1, 0, 2, 2, 3], [0, 3, 3, 0, 3, 0]]):
        scores[i, np.arange(6), best] = 1.0  # greedy path: [1, 2, 3] and [3, 3]
    assert metrics.ctc_greedy(scores) == [[1, 2, 3], [3, 3]]
    text = np.array([[1, 2, 3], [3, -1, -1]])
    assert metrics.score("exact_match", [scores], {"text": text}) == 50.0
    assert metrics.score("cer", [scores], {"text": text}) == pytest.approx(100 * 1 / 4)
    assert metrics.score("cer", [np.array([[1, 2, 3], [3, -1, -1]])], {"text": text}) == 0.0
    assert not metrics.get("cer").higher_is_better


def test_broken_outputs_are_one_line_naming_the_postprocess_or_metric():
    nan = np.full((1, 3549, 6), np.nan, np.float32)
    boxes = zoo.yolox_boxes([nan])  # NaN detections are dropped, not scored: an empty image
    assert (boxes[2] == -1).all()
    with pytest.raises(MetricError, match="yolox_boxes needs outputs\\[0\\] as \\[N, 3549"):
        zoo.yolox_boxes([np.zeros((1, 10, 6), np.float32)])
    with pytest.raises(MetricError, match="ocr_text: the CTC scores hold nan"):
        zoo.ocr_text([np.full((1, 4, 5), np.nan, np.float32)])
    with pytest.raises(MetricError, match="exact_match.*CTC scores .* hold nan"):
        metrics.score("exact_match", [np.full((1, 4, 5), np.nan, np.float32)], {"text": np.array([[1]])})


def test_a_factory_giving_an_onnx_path_refuses_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="holds its weights; drop --weights"):
        load_model("edgepipe.models.zoo:ppocr_det", tmp_path / "w.safetensors")
