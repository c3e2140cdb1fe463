"""A YOLOX character detector (ddddocr's ``common_det.onnx``, from the ``ddddocr`` wheel) and scenes rendered
here with every character's true box.

* :func:`yolox_chars`: ``images [1, 3, 416, 416]`` (BGR, 0..255, letterboxed on grey 114, as YOLOX expects) ->
  ``[1, 3549, 6]``: per anchor point of the stride 8, 16 and 32 grids, box offsets ``x, y, log w, log h``, an
  objectness and one class score (both sigmoids): the single concatenated output of YOLO-family heads, whose
  parts have very different ranges. ``--data char-scenes --metric map50 --postprocess
  edgepipe.models.zoo:yolox_boxes``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgepipe.data import Dataset
from edgepipe.models.zoo._wheels import packaged_file

DIST = "ddddocr==1.6.1"
SHAPE = (3, 416, 416)
STRIDES = (8, 16, 32)
#: YOLOX's demo thresholds, with a low score floor so mAP sees the whole precision/recall curve
SCORE_FLOOR = 0.01
NMS_IOU = 0.45
MAX_DETECTIONS = 100
CHARACTERS = "ABDEFGHJKLMNPQRTY2345789"


def yolox_chars() -> Path:
    """ddddocr's YOLOX character detector as shipped (batch 1). Model spec: ``edgepipe.models.zoo:yolox_chars``."""
    return packaged_file("ddddocr", "common_det.onnx", DIST)


def render_scenes(n: int, chw: tuple[int, int, int] = SHAPE,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` scenes ``[n, 3, H, W]`` (BGR 0..255) of 2 to 5 characters on noisy gradients, and each
    character's box ``[n, 5, 4]`` (``x1, y1, x2, y2``) and class ``[n, 5]`` (0; -1 pads)."""
    from PIL import Image, ImageDraw, ImageFont

    _, h, w = chw
    rng = np.random.default_rng(seed)
    xs, boxes = np.empty((n, 3, h, w), np.float32), np.zeros((n, 5, 4), np.float32)
    classes = np.full((n, 5), -1, np.int64)
    for i in range(n):
        base = np.ones((h, w, 3)) * rng.integers(120, 256, 3)
        base += rng.normal(0, 1, (1, 1, 3)) * np.linspace(0, 60, w)[None, :, None]
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw, k = ImageDraw.Draw(img), 0
        for _ in range(int(rng.integers(2, 6))):
            size = int(rng.integers(36, 72))
            font, ch = ImageFont.load_default(size=size), str(rng.choice(list(CHARACTERS)))
            x, y = int(rng.integers(0, w - size)), int(rng.integers(0, h - size))
            b = draw.textbbox((x, y), ch, font=font)
            if b[2] >= w - 2 or b[3] >= h - 2 or any(
                    not (b[0] > o[2] + 4 or b[2] < o[0] - 4 or b[1] > o[3] + 4 or b[3] < o[1] - 4) for o in boxes[i, :k]):
                continue
            draw.text((x, y), ch, fill=tuple(int(c) for c in rng.integers(0, 100, 3)), font=font)
            boxes[i, k], classes[i, k] = b, 0
            k += 1
        rgb = np.clip(np.asarray(img, np.float32) + rng.normal(0, 8, (h, w, 3)), 0, 255)
        xs[i] = rgb[:, :, ::-1].transpose(2, 0, 1)
    return xs, boxes, classes


def char_scenes(chw: tuple[int, int, int] = SHAPE, n: int = 500) -> Dataset:
    """Rendered character scenes with the true boxes (targets ``"boxes"``, ``"classes"``). ``--data char-scenes``."""
    x, boxes, classes = render_scenes(n, chw)
    return Dataset("char-scenes", x, None, {"boxes": boxes, "classes": classes})


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    grids, strides = [], []
    for s in STRIDES:
        xv, yv = np.meshgrid(np.arange(w // s), np.arange(h // s))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((grids[-1].shape[0], 1), s))
    return np.concatenate(grids).astype(np.float32), np.concatenate(strides).astype(np.float32)


def _nms(b: np.ndarray, s: np.ndarray, iou: float) -> list[int]:
    order, keep = s.argsort()[::-1], []
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        xx1, yy1 = np.maximum(b[i, 0], b[rest, 0]), np.maximum(b[i, 1], b[rest, 1])
        xx2, yy2 = np.minimum(b[i, 2], b[rest, 2]), np.minimum(b[i, 3], b[rest, 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        order = rest[inter / np.maximum(area[i] + area[rest] - inter, 1e-9) <= iou]
    return keep


def yolox_boxes(outputs: list[np.ndarray], image_hw: tuple[int, int] = SHAPE[1:]) -> list[np.ndarray]:
    """YOLOX's raw head ``[N, A, 5 + C]`` decoded (grid offsets, ``exp`` sizes, objectness x class score) and
    non-maximum suppressed: ``[boxes [N, D, 4], scores [N, D], classes [N, D]]`` with ``D`` =
    :data:`MAX_DETECTIONS`, padded with class -1; the postprocess for ``map``/``map50``."""
    from edgepipe.metrics import MetricError

    out = np.asarray(outputs[0], np.float32)
    grid, stride = _grid(*image_hw)
    if out.ndim != 3 or out.shape[1] != len(grid) or out.shape[2] < 6:
        raise MetricError(f"yolox_boxes needs outputs[0] as [N, {len(grid)}, 5 + classes] (a YOLOX head at "
                          f"{image_hw[0]}x{image_hw[1]}) but it is {list(out.shape)}")
    n, d = len(out), MAX_DETECTIONS
    boxes, scores, classes = np.zeros((n, d, 4), np.float32), np.zeros((n, d), np.float32), np.full((n, d), -1)
    with np.errstate(over="ignore", invalid="ignore"):
        for i, o in enumerate(out):
            xy, wh = (o[:, :2] + grid) * stride, np.exp(np.minimum(o[:, 2:4], 20.0)) * stride
            cls = o[:, 5:].argmax(1)
            sc = o[:, 4] * o[np.arange(len(o)), 5 + cls]
            b = np.concatenate([xy - wh / 2, xy + wh / 2], 1)
            ok = (sc > SCORE_FLOOR) & np.isfinite(b).all(1) & np.isfinite(sc)
            b, sc, cls = b[ok], sc[ok], cls[ok]
            keep = _nms(b, sc, NMS_IOU)[:d]
            boxes[i, :len(keep)], scores[i, :len(keep)], classes[i, :len(keep)] = b[keep], sc[keep], cls[keep]
    return [boxes, scores, classes]
