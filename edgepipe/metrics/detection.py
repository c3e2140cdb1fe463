"""Boxes: COCO mean average precision, computed by pycocotools' own ``COCOeval``.

Input, after the user's postprocess: outputs ``[boxes [N, D, 4], scores [N, D], classes [N, D]]`` and
targets ``"boxes"`` ``[N, K, 4]``, ``"classes"`` ``[N, K]``. Boxes are ``x1, y1, x2, y2`` in pixels; a class
below 0 (``-1``) marks padding, in the detections and in the ground truth. The arrays become COCO's own
dicts in memory (``xywh``, ``area`` = box area, ``iscrowd`` 0; image ``i`` has id ``i + 1``, class ``c`` is
category ``c``), and COCO's own rules apply (at most 100 detections per image, 101 recall points).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np

from edgepipe.errors import ConfigError
from edgepipe.metrics._registry import register
from edgepipe.metrics.base import Metric, MetricError, integers, shape

INSTALL_HINT = "pip install 'edgepipe[metrics]'"


def _pycocotools(metric: str) -> tuple[Any, Any]:
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise ConfigError(f"metric {metric!r} needs pycocotools, which is not installed here: {INSTALL_HINT}") from e
    return COCO, COCOeval


def _boxes(metric: str, what: str, boxes: np.ndarray, classes: np.ndarray,
           scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kept (class >= 0) entries as (image index, xywh boxes, classes), checked."""
    keep = classes >= 0
    img, _ = np.nonzero(keep)
    b = boxes[keep].astype(np.float64)
    vals = b if scores is None else np.concatenate([b, scores[keep].astype(np.float64)[:, None]], axis=1)
    if not np.isfinite(vals).all():
        raise MetricError(f"metric {metric!r}: {what} hold nan or inf where the class is not padding (-1)")
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    if (w < 0).any() or (h < 0).any():
        i = int(np.nonzero((w < 0) | (h < 0))[0][0])
        raise MetricError(f"metric {metric!r}: {what} hold the box {b[i].tolist()} with x2 < x1 or y2 < y1; "
                          "boxes are x1, y1, x2, y2")
    return img, np.stack([b[:, 0], b[:, 1], w, h], axis=1), classes[keep]


class CocoMap(Metric):
    """COCO bbox mAP: ``stat`` 0 is mAP@0.5:0.95, 1 is mAP@0.5 (percent)."""

    higher_is_better = True
    unit = "%"
    targets = ("boxes", "classes")

    def __init__(self, name: str, stat: int) -> None:
        self.name = name
        self.stat = stat

    def _arrays(self, outputs: list[np.ndarray], targets: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        if (len(outputs) < 3 or outputs[0].ndim != 3 or outputs[0].shape[2] != 4
                or outputs[1].shape != outputs[0].shape[:2] or outputs[2].shape != outputs[0].shape[:2]):
            got = ", ".join(shape(o) for o in outputs)
            raise MetricError(f"metric {self.name!r} needs outputs [boxes [N, D, 4], scores [N, D], classes [N, D]] "
                              f"but they are [{got}]: give a postprocess that returns these")
        gb, gc = targets["boxes"], targets["classes"]
        if gb.ndim != 3 or gb.shape[2] != 4 or gc.shape != gb.shape[:2]:
            raise MetricError(f"metric {self.name!r} needs targets 'boxes' [N, K, 4] and 'classes' [N, K] "
                              f"but they are {shape(gb)} and {shape(gc)}")
        cls = integers(self.name, "outputs[2] (classes)", outputs[2])
        gcls = integers(self.name, "target 'classes'", gc)
        return outputs[0], outputs[1], cls, gb, gcls

    def __call__(self, outputs: list[np.ndarray], targets: dict[str, np.ndarray]) -> float:
        boxes, scores, cls, gb, gcls = self._arrays(outputs, targets)
        g_img, g_xywh, g_cls = _boxes(self.name, "target 'boxes'", gb, gcls)
        if not g_img.size:
            raise MetricError(f"metric {self.name!r}: the split has no ground-truth box (every target class is -1); "
                              "score detection on samples with boxes")
        d_img, d_xywh, d_cls = _boxes(self.name, "the detected boxes and scores", boxes, cls, scores)
        d_score = scores[cls >= 0].astype(np.float64)
        COCO, COCOeval = _pycocotools(self.name)
        images = [{"id": i + 1} for i in range(len(gb))]
        categories = [{"id": int(c)} for c in np.union1d(g_cls, d_cls)]
        gt = [{"id": j + 1, "image_id": int(i) + 1, "category_id": int(c), "bbox": b.tolist(),
               "area": float(b[2] * b[3]), "iscrowd": 0}
              for j, (i, b, c) in enumerate(zip(g_img, g_xywh, g_cls, strict=True))]
        dt = [{"image_id": int(i) + 1, "category_id": int(c), "bbox": b.tolist(), "score": float(s)}
              for i, b, c, s in zip(d_img, d_xywh, d_cls, d_score, strict=True)]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
            coco_gt = COCO()
            coco_gt.dataset = {"images": images, "categories": categories, "annotations": gt}
            coco_gt.createIndex()
            if dt:
                coco_dt = coco_gt.loadRes(dt)
            else:  # loadRes needs one detection at least; no detection scores 0 the COCO way
                coco_dt = COCO()
                coco_dt.dataset = {"images": images, "categories": categories, "annotations": []}
                coco_dt.createIndex()
            ev = COCOeval(coco_gt, coco_dt, "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return float(ev.stats[self.stat]) * 100.0


register(CocoMap("map", 0))
register(CocoMap("map50", 1))
