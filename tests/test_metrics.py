"""The metric registry: every built-in against a value worked out by hand, COCO mAP against COCOeval run
directly, the user's own metrics and postprocesses, and each bad input's one-line error."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgepipe import metrics
from edgepipe.errors import ConfigError
from edgepipe.metrics import _registry
from edgepipe.metrics.base import Metric, MetricError

F = np.float32


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> None:
    assert "\n" not in str(exc.value), str(exc.value)


# ---------------------------------------------------------------- every built-in, worked out by hand

# top1: argmax per row is 1, 0, 2 and 0 (the tie 0.4/0.4 goes to the lower index, as argmax does);
# labels 1, 2, 2, 1 -> hits on rows 0 and 2 -> 2/4 = 50 %
TOP1 = ([np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [0.4, 0.4, 0.2]], F)],
        {"y": np.array([1, 2, 2, 1])}, 50.0)

# top5 over 6 classes:
#   [6,5,4,3,2,1], y=5: the label is 6th highest -> miss
#   [1,2,3,4,5,6], y=1: 4 classes ahead (3,4,5,6) -> 5th -> hit
#   all ones,      y=4: ties go by index, 0..3 ahead -> 5th -> hit
#   all ones,      y=5: 0..4 ahead -> 6th -> miss          => 2/4 = 50 %
TOP5 = ([np.array([[6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6], [1] * 6, [1] * 6], F)],
        {"y": np.array([5, 1, 4, 5])}, 50.0)

# miou, one 2x3 image (the pixel at (1,0) is ignored: label 255; its predicted class 3 must not count):
#   pred [[0,0,1],[3,2,2]]   truth [[0,1,1],[255,2,0]]
#   class 0: pred {00,01}, truth {00,12}: inter 1, union 3 -> 1/3
#   class 1: pred {02},    truth {01,02}: inter 1, union 2 -> 1/2
#   class 2: pred {11,12}, truth {11}:    inter 1, union 2 -> 1/2
#   mean = (1/3 + 1/2 + 1/2) / 3 = 4/9 = 44.44 %
MIOU_PRED = np.array([[[0, 0, 1], [3, 2, 2]]])
MIOU_Y = np.array([[[0, 1, 1], [255, 2, 0]]])
MIOU = ([MIOU_PRED], {"y": MIOU_Y}, 400 / 9)

# agreement: top-1 of the outputs 0, 1, 0; of the fp32 reference 0, 1, 1 -> 2/3 = 66.67 %
AGREE = ([np.array([[1, 0], [0, 1], [1, 0]], F)],
         {"fp32:0": np.array([[2, 1], [3, 4], [0, 5]], F)}, 200 / 3)

# sqnr, two outputs: output 0 ref [1,2,3,4] (signal 1+4+9+16 = 30), out [1,2,3,5] (noise 1) -> 10 log10 30
# = 14.77 dB; output 1 ref [3,4] (signal 25), out [3,4.5] (noise 0.25) -> 10 log10 100 = 20 dB; worst: 14.77
SQNR = ([np.array([[1], [2], [3], [5]], F), np.array([[3], [4.5], [0], [0]], F)],
        {"fp32:0": np.array([[1], [2], [3], [4]], F), "fp32:1": np.array([[3], [4], [0], [0]], F)},
        10 * math.log10(30))


def detections(boxes: list[list[list[float]]], scores: list[list[float]], classes: list[list[int]]) -> list[np.ndarray]:
    return [np.array(boxes, F), np.array(scores, F), np.array(classes)]


# map, one image, one ground-truth box [0,0,10,10] (area 100), one detection [0,0,10,6.2] of the same class:
# IoU = 62 / 100 = 0.62, so of the 10 thresholds 0.50, 0.55, ..., 0.95 the first three (0.50, 0.55, 0.60) match
# (AP 1 each) and seven do not (AP 0) -> mAP@0.5:0.95 = 3/10 = 30 %; mAP@0.5 = 100 %
ONE_GT = {"boxes": np.array([[[0, 0, 10, 10]]], F), "classes": np.array([[0]])}
MAP = (detections([[[0, 0, 10, 6.2]]], [[0.9]], [[0]]), ONE_GT, 30.0)
MAP50 = (MAP[0], ONE_GT, 100.0)

# exact_match and cer: CTC scores [N, T, C] read greedily (blank 0): sample 0 reads [1, 2] (true [1, 2]: exact),
# sample 1 reads [3] (true [3, 1]: one deletion) -> exact match 50 %, CER 1 edit / 4 true symbols = 25 %
CTC = np.zeros((2, 4, 4), F)
CTC[0, np.arange(4), [1, 0, 2, 2]] = 1.0
CTC[1, np.arange(4), [3, 3, 0, 0]] = 1.0
TEXT = {"text": np.array([[1, 2], [3, 1]])}
EXACT, CER = ([CTC], TEXT, 50.0), ([CTC], TEXT, 25.0)

CASES = {"top1": TOP1, "top5": TOP5, "miou": MIOU, "agreement": AGREE, "sqnr": SQNR, "map": MAP, "map50": MAP50,
         "exact_match": EXACT, "cer": CER}


def test_every_registered_metric_has_a_hand_computed_case() -> None:
    assert set(metrics.names()) == set(CASES)


@pytest.mark.parametrize("name", metrics.names())
def test_builtin_matches_hand_computed_value(name: str) -> None:
    outputs, targets, expected = CASES[name]
    m = metrics.get(name)
    assert m.name == name
    assert isinstance(m.higher_is_better, bool) and isinstance(m.unit, str)
    assert set(m.targets) <= set(targets)
    assert m.reference == any(k.startswith("fp32:") for k in targets)
    assert metrics.score(name, outputs, targets) == pytest.approx(expected, abs=1e-9)


def test_units() -> None:
    assert {n: metrics.get(n).unit for n in metrics.names()} == {
        "agreement": "%", "map": "%", "map50": "%", "miou": "%", "sqnr": "dB", "top1": "%", "top5": "%",
        "exact_match": "%", "cer": "%"}


def test_miou_from_scores_and_negative_ignore_label() -> None:
    # the same case as scores [N, K, H, W] (argmax over K gives MIOU_PRED), and -1 instead of 255
    scores = np.eye(4, dtype=F)[MIOU_PRED].transpose(0, 3, 1, 2)
    y = np.where(MIOU_Y == 255, -1, MIOU_Y)
    assert metrics.score("miou", [scores], {"y": y}) == pytest.approx(400 / 9)


def test_miou_over_the_split_not_per_image() -> None:
    # two 1x2 images: image 0 pred [0,0] truth [0,1]; image 1 pred [1,1] truth [1,1]
    # over the split: class 0 inter 1 union 2 -> 1/2; class 1 inter 2 union 3 -> 2/3; mean 7/12 = 58.33 %
    # (averaging per-image mIoUs would give (1/4 + 1) / 2 = 62.5 % instead)
    pred = np.array([[[0, 0]], [[1, 1]]])
    y = np.array([[[0, 1]], [[1, 1]]])
    assert metrics.score("miou", [pred], {"y": y}) == pytest.approx(700 / 12)


def test_sqnr_identical_is_capped_and_zero_reference_floors() -> None:
    a = np.arange(6, dtype=F).reshape(3, 2)
    assert metrics.score("sqnr", [a], {"fp32:0": a}) == metrics.SQNR_CAP_DB == 200.0
    assert metrics.sqnr_per_output([a, a + 1], [a, np.zeros_like(a)]) == [200.0, -200.0]


# ---------------------------------------------------------------- map: by hand and against COCOeval itself


def test_map_false_positive_ranked_first() -> None:
    # one GT [0,0,10,10]; detection A [20,20,30,30] (IoU 0, a false positive) scored 0.9, detection B = the
    # GT box (IoU 1) scored 0.8. In score order: A (precision 0, recall 0), B (precision 1/2, recall 1);
    # interpolated precision at every recall point is 1/2, at every IoU threshold -> 50 % for both
    dets = detections([[[20, 20, 30, 30], [0, 0, 10, 10]]], [[0.9, 0.8]], [[0, 0]])
    assert metrics.score("map", dets, ONE_GT) == pytest.approx(50.0)
    assert metrics.score("map50", dets, ONE_GT) == pytest.approx(50.0)
    # the same two detections with the true one ranked first: precision 1 up to recall 1 -> 100 %
    dets[1] = np.array([[0.7, 0.8]], F)
    assert metrics.score("map", dets, ONE_GT) == pytest.approx(100.0)


def test_map_padding_and_no_detection() -> None:
    # padding (class -1, any box, even nan) changes nothing; no detection at all scores 0
    boxes = np.array([[[0, 0, 10, 6.2], [np.nan, 0, 0, 0], [5, 5, 1, 1]]], F)
    dets = [boxes, np.array([[0.9, 0.99, np.inf]], F), np.array([[0, -1, -1]])]
    gt = {"boxes": np.array([[[0, 0, 10, 10], [0, 0, 0, 0]]], F), "classes": np.array([[0, -1]])}
    assert metrics.score("map", dets, gt) == pytest.approx(30.0)
    none = [boxes, dets[1], np.full((1, 3), -1)]
    assert metrics.score("map", none, gt) == 0.0


def _random_split(seed: int) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    n, k, d, classes = 8, 4, 6, 3
    xy = rng.uniform(0, 80, (n, k, 2))
    wh = rng.uniform(5, 40, (n, k, 2))
    gt_boxes = np.concatenate([xy, xy + wh], axis=2).astype(F)
    gt_classes = rng.integers(0, classes, (n, k))
    gt_classes[rng.random((n, k)) < 0.25] = -1
    # detections: jittered copies of ground-truth boxes (their class sometimes wrong), the last two random
    src = rng.integers(0, k, (n, d))
    det = np.take_along_axis(gt_boxes, src[..., None], axis=1) + rng.normal(0, 4, (n, d, 4))
    det[:, -2:, :2] = rng.uniform(0, 80, (n, 2, 2))
    det[:, -2:, 2:] = det[:, -2:, :2] + rng.uniform(5, 40, (n, 2, 2))
    det = np.concatenate([np.minimum(det[..., :2], det[..., 2:]), np.maximum(det[..., :2], det[..., 2:])],
                         axis=2).astype(F)
    det_classes = np.take_along_axis(np.maximum(gt_classes, 0), src, axis=1)
    wrong = rng.random((n, d)) < 0.2
    det_classes[wrong] = rng.integers(0, classes, int(wrong.sum()))
    det_classes[rng.random((n, d)) < 0.15] = -1
    scores = rng.random((n, d)).astype(F)
    return [det, scores, det_classes], {"boxes": gt_boxes, "classes": gt_classes}


def _cocoeval_from_files(outputs: list[np.ndarray], targets: dict[str, np.ndarray], tmp_path: Path) -> list[float]:
    """COCO's own route: an annotation JSON file for COCO(), a results JSON file for loadRes()."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    boxes, scores, classes = outputs
    anns, results = [], []
    for i in range(len(boxes)):
        for b, c in zip(targets["boxes"][i].tolist(), targets["classes"][i].tolist(), strict=True):
            if c >= 0:
                w, h = b[2] - b[0], b[3] - b[1]
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c,
                             "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": 0})
        for b, s, c in zip(boxes[i].tolist(), scores[i].tolist(), classes[i].tolist(), strict=True):
            if c >= 0:
                results.append({"image_id": i + 1, "category_id": c,
                                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})
    cats = sorted({a["category_id"] for a in anns})
    (tmp_path / "gt.json").write_text(json.dumps({
        "images": [{"id": i + 1} for i in range(len(boxes))], "annotations": anns,
        "categories": [{"id": c} for c in cats]}))
    (tmp_path / "dt.json").write_text(json.dumps(results))
    gt = COCO(str(tmp_path / "gt.json"))
    ev = COCOeval(gt, gt.loadRes(str(tmp_path / "dt.json")), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [float(ev.stats[0]) * 100, float(ev.stats[1]) * 100]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_equals_cocoeval_run_directly(seed: int, tmp_path: Path) -> None:
    outputs, targets = _random_split(seed)
    want = _cocoeval_from_files(outputs, targets, tmp_path)
    got = [metrics.score("map", outputs, targets), metrics.score("map50", outputs, targets)]
    assert 0 < want[0] < want[1] < 100  # a case where every part of the computation matters
    assert got == pytest.approx(want, abs=1e-9)


def test_map_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    metrics.score("map", *MAP[:2])
    assert capsys.readouterr().out == ""


def test_map_without_pycocotools(monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in ("pycocotools", "pycocotools.coco", "pycocotools.cocoeval"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ConfigError, match=r"metric 'map' needs pycocotools.*pip install 'edgepipe\[metrics\]'") as e:
        metrics.score("map", *MAP[:2])
    one_line(e)


# ---------------------------------------------------------------- fidelity and the default metric


def test_fidelity_on_class_scores() -> None:
    ref = np.array([[3.0, 1.0, 0.0],    # top-1 0, top1-top2 gap 2.0 -> confident
                    [0.0, 1.0, 0.9],    # top-1 1, gap 0.1 -> not confident
                    [0.0, 2.0, 1.0]], F)  # top-1 1, gap 1.0 -> confident
    out = np.array([[2.0, 2.5, 0.0],    # top-1 1: flipped (a confident sample)
                    [0.0, 0.8, 0.9],    # top-1 2: flipped (not confident)
                    [0.0, 2.0, 1.0]], F)  # top-1 1: kept
    # flips 2/3 = 66.67 %; confident samples 0 and 2, of which 1 flipped -> 50 %
    # signal 9+1 + 1+0.81 + 4+1 = 16.81; noise 1 + 1.5^2 + 0.2^2 = 3.29 -> 10 log10(16.81 / 3.29) = 7.08 dB
    f = metrics.fidelity([out], [ref], margin=0.25)
    assert f["sqnr_db"] == pytest.approx([10 * math.log10(16.81 / 3.29)], rel=1e-6)
    assert f["flip_rate"] == pytest.approx(200 / 3)
    assert f["confident_samples"] == 2
    assert f["confident_flip_rate"] == pytest.approx(50.0)
    assert f["margin"] == 0.25
    # a margin above every gap: no confident sample
    f = metrics.fidelity([out], [ref], margin=5.0)
    assert (f["confident_samples"], f["confident_flip_rate"]) == (0, None)


@pytest.mark.parametrize("out", [np.ones((3, 2, 2), F), np.ones((3, 1), F), np.ones((3, 4), np.int64)],
                         ids=["4-d", "one-class", "integers"])
def test_fidelity_without_class_scores(out: np.ndarray) -> None:
    f = metrics.fidelity([out], [out])
    assert f["sqnr_db"] == [200.0]
    assert f["flip_rate"] is f["confident_flip_rate"] is f["confident_samples"] is None


def test_sqnr_bad_inputs() -> None:
    with pytest.raises(MetricError, match=r"output 0 is \[3, 2\] but the fp32 reference's is \[3, 3\]") as e:
        metrics.sqnr_per_output([np.ones((3, 2))], [np.ones((3, 3))])
    one_line(e)
    with pytest.raises(MetricError, match="the model has 1 outputs but the fp32 reference has 2"):
        metrics.sqnr_per_output([np.ones(3)], [np.ones(3), np.ones(3)])
    with pytest.raises(MetricError, match="the model's output 0 holds 1 nan or inf"):
        metrics.sqnr_per_output([np.array([1.0, np.nan])], [np.ones(2)])


def test_default_for_classifier_only() -> None:
    y = np.array([0, 1, 2])
    assert metrics.default_for([("N", 10)], {"y": y}) == "top1"
    for shapes, targets in [([("N", 4, 8, 8)], {"y": y}), ([("N", 10), ("N", 4)], {"y": y}),
                            ([("N", 10)], {"y": y.astype(F)}), ([("N", 10)], {"labels": y}),
                            ([("N", 10, 4), ("N", 10), ("N", 10)], {"boxes": np.zeros((3, 1, 4))})]:
        with pytest.raises(ConfigError, match=r"give --metric, one of: agreement, cer, exact_match, map, map50, miou, sqnr, "
                                              r"top1, top5, or give your own as package.module:object") as e:
            metrics.default_for(shapes, targets)
        one_line(e)


# ---------------------------------------------------------------- the user's own metrics


USER_MODULE = '''
import numpy as np

from edgepipe.metrics import Metric


class MeanAbs(Metric):
    name = "meanabs"
    higher_is_better = False
    unit = "points"
    targets = ("y",)

    def __call__(self, outputs, targets):
        return float(np.abs(outputs[0][:, 0] - targets["y"]).mean())


instance = MeanAbs()


class Unnamed(Metric):
    def __call__(self, outputs, targets):
        return 7.0


class NeedsArgs(Metric):
    name = "needs"

    def __init__(self, k):
        self.k = k


class BadFields(Metric):
    name = "bad"
    unit = 3


class NotAMetric:
    pass


def first_mean(outputs, targets):
    return outputs[0].mean()


def boom(outputs, targets):
    raise ValueError("bad thing\\nsecond line")


def nan(outputs, targets):
    return float("nan")


def text(outputs, targets):
    return "high"


def flatten(outputs):
    return [o.reshape(len(o), -1) for o in outputs]


def pp_raises(outputs):
    raise KeyError("nope")


def pp_dict(outputs):
    return {"scores": outputs[0]}


def pp_float(outputs):
    return [outputs[0], 1.0]


not_callable = 3
'''


@pytest.fixture
def usermod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "ep_user_metrics.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / "ep_broken_metrics.py").write_text("import numpy\nraise RuntimeError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in ("ep_user_metrics", "ep_broken_metrics"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    return "ep_user_metrics"


OUT = [np.array([[1.0], [2.0], [4.0]], F)]
Y = {"y": np.array([1.0, 1.0, 1.0], F)}


def test_user_metric_instance(usermod: str) -> None:
    m = metrics.get(f"{usermod}:instance")
    assert (m.name, m.higher_is_better, m.unit, m.targets) == ("meanabs", False, "points", ("y",))
    assert metrics.score(m, OUT, Y) == pytest.approx((0 + 1 + 3) / 3)


def test_user_metric_subclass(usermod: str) -> None:
    m = metrics.get(f"{usermod}:MeanAbs")
    assert isinstance(m, Metric) and m.name == "meanabs"
    assert metrics.score(f"{usermod}:MeanAbs", OUT, Y) == pytest.approx(4 / 3)
    unnamed = metrics.get(f"{usermod}:Unnamed")
    assert unnamed.name == f"{usermod}:Unnamed"  # named after its spec
    assert metrics.score(unnamed, OUT, {}) == 7.0


def test_user_metric_function(usermod: str) -> None:
    m = metrics.get(f"{usermod}:first_mean")
    assert (m.name, m.higher_is_better, m.unit, m.targets, m.reference) == (
        f"{usermod}:first_mean", True, "", (), False)
    assert metrics.score(m, OUT, {}) == pytest.approx(7 / 3)  # (1 + 2 + 4) / 3


@pytest.mark.parametrize(("attr", "match"), [
    ("NeedsArgs", r"metric 'ep_user_metrics:NeedsArgs': NeedsArgs\(\) raised TypeError: .*made with no arguments"),
    ("BadFields", r"metric 'ep_user_metrics:BadFields': wrong unit 3"),
    ("NotAMetric", r"class NotAMetric is not an edgepipe.metrics.Metric subclass"),
    ("not_callable", r"int is neither a Metric nor a function"),
    ("missing", r"metric 'ep_user_metrics:missing': module 'ep_user_metrics' has no attribute 'missing'"),
])
def test_user_metric_bad_object(usermod: str, attr: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        metrics.get(f"{usermod}:{attr}")
    one_line(e)


def test_user_metric_bad_module(usermod: str) -> None:
    with pytest.raises(ConfigError, match=r"metric 'ep_no_such_mod:f': cannot import module 'ep_no_such_mod'") as e:
        metrics.get("ep_no_such_mod:f")
    one_line(e)
    with pytest.raises(ConfigError, match=r"metric 'ep_broken_metrics:f': importing module 'ep_broken_metrics' "
                                          r"raised RuntimeError: broken at import") as e:
        metrics.get("ep_broken_metrics:f")
    one_line(e)
    with pytest.raises(ConfigError, match=r"metric ':f': give package.module:object"):
        metrics.get(":f")


def test_unknown_metric_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown metric 'accuracy'; choose one of: agreement, cer, exact_match, map, map50, miou, "
                                          r"sqnr, top1, top5, or give your own as package.module:object") as e:
        metrics.get("accuracy")
    one_line(e)


def test_register(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))

    @metrics.register
    class Ones(Metric):
        name = "ones"

        def __call__(self, outputs, targets):
            return 1.0

    assert "ones" in metrics.names()
    assert metrics.score("ones", OUT, {}) == 1.0
    with pytest.raises(ConfigError, match="metric 'top1' is registered already"):
        metrics.register(metrics.TopK(1))
    with pytest.raises(ConfigError, match="cannot hold ':'"):
        metrics.register(metrics.FunctionMetric(lambda o, t: 0.0, "a:b"))


# ---------------------------------------------------------------- postprocess


def test_postprocess_applies_to_outputs_and_reference(usermod: str) -> None:
    # [N, C, 1, 1] scores: top1 refuses them, the flatten postprocess makes them [N, C]
    scores = TOP1[0][0][:, :, None, None]
    with pytest.raises(MetricError, match=r"needs outputs\[0\] as class scores \[N, C\] but it is \[4, 3, 1, 1\]"):
        metrics.score("top1", [scores], TOP1[1])
    assert metrics.score("top1", [scores], TOP1[1], postprocess=f"{usermod}:flatten") == 50.0
    # the fp32 reference goes through the same postprocess
    out, ref = AGREE[0][0][:, :, None], AGREE[1]["fp32:0"][:, :, None]
    assert metrics.score("agreement", [out], {"fp32:0": ref}, postprocess=f"{usermod}:flatten") == pytest.approx(200 / 3)
    # a function works as well as a spec
    assert metrics.score("top1", [scores], TOP1[1], postprocess=lambda o: [o[0][:, :, 0, 0]]) == 50.0


@pytest.mark.parametrize(("fn", "match"), [
    ("pp_raises", r"postprocess 'ep_user_metrics:pp_raises' raised KeyError on the outputs: 'nope'"),
    ("pp_dict", r"postprocess 'ep_user_metrics:pp_dict' returned dict on the outputs; return a list of numpy arrays"),
    ("pp_float", r"postprocess 'ep_user_metrics:pp_float' returned no list of numpy arrays on the outputs "
                 r"\(item 1 is float\)"),
    ("missing", r"postprocess 'ep_user_metrics:missing': module 'ep_user_metrics' has no attribute 'missing'"),
    ("not_callable", r"postprocess 'ep_user_metrics:not_callable': int is not a function"),
])
def test_bad_postprocess(usermod: str, fn: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        metrics.score("top1", *TOP1[:2], postprocess=f"{usermod}:{fn}")
    one_line(e)


# ---------------------------------------------------------------- bad inputs to score


def test_metric_that_raises_or_returns_no_number(usermod: str) -> None:
    with pytest.raises(MetricError, match=r"metric 'ep_user_metrics:boom' raised ValueError: bad thing$") as e:
        metrics.score(f"{usermod}:boom", OUT, {})
    one_line(e)
    with pytest.raises(MetricError, match=r"metric 'ep_user_metrics:nan' returned nan, not a finite number") as e:
        metrics.score(f"{usermod}:nan", OUT, {})
    one_line(e)
    with pytest.raises(MetricError, match=r"metric 'ep_user_metrics:text' returned str, not a number"):
        metrics.score(f"{usermod}:text", OUT, {})


def test_missing_targets() -> None:
    with pytest.raises(MetricError, match=r"metric 'top1' needs targets 'y'; missing 'y'; the data has: 'labels'") as e:
        metrics.score("top1", TOP1[0], {"labels": TOP1[1]["y"]})
    one_line(e)
    with pytest.raises(MetricError, match=r"metric 'sqnr' needs targets 'fp32:0', 'fp32:1'; missing 'fp32:1' "
                                          r"\(fp32:i are the fp32 model's outputs.*; the data has: 'fp32:0'") as e:
        metrics.score("sqnr", SQNR[0], {"fp32:0": SQNR[1]["fp32:0"]})
    one_line(e)


def test_target_of_other_samples() -> None:
    with pytest.raises(MetricError, match=r"target 'y' holds 3 samples but the outputs hold 4") as e:
        metrics.score("top1", TOP1[0], {"y": np.array([1, 2, 2])})
    one_line(e)
    with pytest.raises(MetricError, match=r"output 1 holds 3 samples but output 0 holds 4"):
        metrics.score("sqnr", [SQNR[0][0], SQNR[0][1][:3]], SQNR[1])


@pytest.mark.parametrize(("name", "outputs", "targets", "match"), [
    ("top1", [np.zeros((2, 3, 4, 4), F)], {"y": np.array([0, 1])},
     r"metric 'top1' needs outputs\[0\] as class scores \[N, C\] but it is \[2, 3, 4, 4\]: choose the model's "
     r"metric with --metric, or a postprocess"),
    ("top1", TOP1[0], {"y": np.array([0, 1, 2, 3])}, r"label 3 is outside the 3 classes 0..2"),
    ("top1", TOP1[0], {"y": np.array([0, 1, 2, 0.5])}, r"target 'y' must hold whole numbers.*0.5"),
    ("top1", TOP1[0], {"y": np.zeros((4, 3))}, r"needs target 'y' as class labels \[N\] but it is \[4, 3\]"),
    ("top5", [np.zeros((2, 5), F)], {"y": np.array([0, 1])}, r"metric 'top5' needs more than 5 classes"),
    ("agreement", [np.zeros((2, 3), F)], {"fp32:0": np.zeros((2, 4), F)},
     r"outputs\[0\] is \[2, 3\] but the fp32 reference is \[2, 4\]"),
    ("miou", [np.zeros((2, 4), F)], {"y": np.zeros((2, 4))},
     r"metric 'miou' needs outputs\[0\] as scores \[N, K, H, W\] or labels \[N, H, W\] but it is \[2, 4\]"),
    ("miou", [MIOU_PRED], {"y": np.full_like(MIOU_Y, 255)}, r"every pixel of target 'y' is ignored"),
    ("miou", [MIOU_PRED], {"y": MIOU_Y[:, :, :2]}, r"needs target 'y' as masks \[1, 2, 3\].*it is \[1, 2, 2\]"),
    ("map", MAP[0][:2], ONE_GT, r"metric 'map' needs outputs \[boxes \[N, D, 4\], scores \[N, D\], classes \[N, D\]\] "
                                r"but they are \[\[1, 1, 4\], \[1, 1\]\]: give a postprocess"),
    ("map", MAP[0], {"boxes": ONE_GT["boxes"], "classes": np.array([[-1]])},
     r"metric 'map': the split has no ground-truth box"),
    ("map", MAP[0], {"boxes": np.array([[[10, 0, 0, 10]]], F), "classes": np.array([[0]])},
     r"target 'boxes' hold the box \[10.0, 0.0, 0.0, 10.0\] with x2 < x1"),
    ("map50", [MAP[0][0], np.array([[np.nan]], F), MAP[0][2]], ONE_GT,
     r"the detected boxes and scores hold nan or inf where the class is not padding"),
])
def test_bad_inputs_one_line(name: str, outputs: list[np.ndarray], targets: dict[str, np.ndarray], match: str) -> None:
    with pytest.raises(MetricError, match=match) as e:
        metrics.score(name, outputs, targets)
    one_line(e)
