"""Text: PaddleOCR's PP-OCRv4 recognizer (CTC) and text detector (DBNet), as their ONNX files ship in the
``rapidocr_onnxruntime`` wheel, and data rendered here with the true strings.

* :func:`ppocr_rec`: ``x [1, 3, 48, 320]`` (RGB, ``(v / 255 - 0.5) / 0.5``) -> ``[1, 40, 6625]`` CTC scores over
  6,623 Chinese and Latin symbols, a space and the blank (id 0). ``--data text-lines --metric exact_match``
  (or ``cer``) ``--postprocess edgepipe.models.zoo:ocr_text`` (the greedy CTC path without the spaces the model
  writes around a line).
* :func:`ppocr_det`: ``x [1, 3, 320, 320]`` (same normalisation) -> ``[1, 1, 320, 320]`` text probability.
  ``--data text-pages --metric miou --postprocess edgepipe.models.zoo:text_mask``.

The strings are drawn from Latin letters and digits that no font confuses (no ``0/O/o``, ``1/l/I``, ...),
rendered in Pillow's built-in scalable font at random sizes, positions, grey levels, with noise; seeded, so the
same samples every time.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from edgepipe.data import Dataset
from edgepipe.models.zoo._wheels import metadata, packaged_file, with_shapes

DIST = "rapidocr_onnxruntime==1.4.4"
#: symbols no common font confuses with another
ALPHABET = "abdefghjkmnpqrtyABDEFGHJKLMNPQRTY23456789"
REC_SHAPE = (3, 48, 320)
DET_SHAPE = (3, 320, 320)
#: DBNet's own binarisation threshold on the probability map (PaddleOCR's and RapidOCR's default)
DB_THRESHOLD = 0.3
MAX_LEN = 12


def _model(name: str) -> Path:
    return packaged_file("rapidocr_onnxruntime", f"models/{name}", DIST)


def ppocr_rec() -> Path:
    """PP-OCRv4's text-line recognizer (CTC), with a fixed input of ``[1, 3, 48, 320]`` (batch 1: onnx2tf cannot
    convert its Flatten at an unknown batch). Model spec: ``edgepipe.models.zoo:ppocr_rec``."""
    return with_shapes(_model("ch_PP-OCRv4_rec_infer.onnx"), "ppocr-rec", {"x": [1, *REC_SHAPE]})


def ppocr_det() -> Path:
    """PP-OCRv4's text detector (DBNet: a per-pixel text probability), with a fixed input of
    ``[1, 3, 320, 320]``. Model spec: ``edgepipe.models.zoo:ppocr_det``."""
    return with_shapes(_model("ch_PP-OCRv4_det_infer.onnx"), "ppocr-det", {"x": [1, *DET_SHAPE]})


@cache
def rec_vocabulary() -> tuple[str, ...]:
    """The recognizer's symbols by id: the blank (0), the 6,623 characters of its metadata, then the space."""
    chars = metadata(_model("ch_PP-OCRv4_rec_infer.onnx")).get("character", "").split("\n")
    return ("<blank>", *chars, " ")


def encode(strings: list[str], vocab: tuple[str, ...], width: int = MAX_LEN) -> np.ndarray:
    """Strings as symbol ids ``[N, width]`` padded with -1 (the ``"text"`` target of the text metrics)."""
    index = {c: i for i, c in enumerate(vocab)}
    out = np.full((len(strings), width), -1, np.int64)
    for i, s in enumerate(strings):
        out[i, :len(s)] = [index[c] for c in s]
    return out


def decode(ids: list[int], vocab: tuple[str, ...]) -> str:
    """Symbol ids back to a string."""
    return "".join(vocab[i] for i in ids).strip()


def _font(size: int):  # noqa: ANN202 (PIL type)
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _normalise(rgb: np.ndarray) -> np.ndarray:
    return ((np.clip(rgb, 0, 255) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1).astype(np.float32)


def _word(rng: np.random.Generator, low: int = 4, high: int = 10) -> str:
    return "".join(rng.choice(list(ALPHABET), int(rng.integers(low, high + 1))))


def render_lines(n: int, chw: tuple[int, int, int] = REC_SHAPE, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``n`` text lines ``[n, 3, H, W]`` (normalised as PP-OCR expects) and their true strings."""
    from PIL import Image, ImageDraw

    _, h, w = chw
    rng = np.random.default_rng(seed)
    xs, strings = np.empty((n, 3, h, w), np.float32), []
    for i in range(n):
        s = _word(rng)
        font = _font(int(rng.integers(int(h * 0.5), int(h * 0.75) + 1)))
        bg, fg = int(rng.integers(170, 256)), int(rng.integers(0, 90))
        img = Image.new("RGB", (w, h), (bg, bg, bg))
        box = font.getbbox(s)
        while box[2] - box[0] > w - 4 and len(s) > 1:  # a long word in a big font: shorten it to fit
            s = s[:-1]
            box = font.getbbox(s)
        x0 = int(rng.integers(2, max(3, w - (box[2] - box[0]) - 2)))
        y0 = (h - (box[3] - box[1])) // 2 - box[1]
        ImageDraw.Draw(img).text((x0, y0), s, fill=(fg, fg, fg), font=font)
        xs[i] = _normalise(np.asarray(img, np.float32) + rng.normal(0, 6, (h, w, 3)))
        strings.append(s)
    return xs, strings


def text_lines(chw: tuple[int, int, int] = REC_SHAPE, n: int = 1000) -> Dataset:
    """Rendered text lines with their true strings as target ``"text"`` (the recognizer's symbol ids).
    ``--data text-lines``; judge with ``--metric exact_match`` or ``cer``."""
    x, strings = render_lines(n, chw)
    return Dataset("text-lines", x, None, {"text": encode(strings, rec_vocabulary())})


def render_pages(n: int, chw: tuple[int, int, int] = DET_SHAPE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pages ``[n, 3, H, W]`` holding 2 to 5 words each, and their text masks ``[n, H, W]`` (1 inside
    a word's box, 0 elsewhere)."""
    from PIL import Image, ImageDraw

    _, h, w = chw
    rng = np.random.default_rng(seed)
    xs, masks = np.empty((n, 3, h, w), np.float32), np.zeros((n, h, w), np.int64)
    for i in range(n):
        bg = rng.integers(150, 256, 3)
        ramp = rng.normal(0, 1, (1, 1, 3)) * np.linspace(0, 50, w)[None, :, None]
        img = Image.fromarray(np.clip(np.ones((h, w, 3)) * bg + ramp, 0, 255).astype(np.uint8))
        draw, boxes = ImageDraw.Draw(img), []
        for _ in range(int(rng.integers(2, 6))):
            font, s = _font(int(rng.integers(16, 34))), _word(rng, 3, 8)
            x, y = int(rng.integers(0, w // 2)), int(rng.integers(0, h - 36))
            b = draw.textbbox((x, y), s, font=font)
            if b[2] >= w - 1 or b[3] >= h - 1 or any(_overlap(b, o, 6) for o in boxes):
                continue
            col = tuple(int(c) for c in rng.integers(0, 90, 3))
            draw.text((x, y), s, fill=col, font=font)
            boxes.append(b)
            masks[i, b[1]:b[3], b[0]:b[2]] = 1
        xs[i] = _normalise(np.asarray(img, np.float32) + rng.normal(0, 5, (h, w, 3)))
    return xs, masks


def _overlap(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    return not (a[0] > b[2] + gap or a[2] < b[0] - gap or a[1] > b[3] + gap or a[3] < b[1] - gap)


def text_pages(chw: tuple[int, int, int] = DET_SHAPE, n: int = 500) -> Dataset:
    """Rendered pages with each word's box as the text mask (target ``"y"``). ``--data text-pages``; judge with
    ``--metric miou --postprocess edgepipe.models.zoo:text_mask``."""
    x, masks = render_pages(n, chw)
    return Dataset("text-pages", x, masks)


def text_mask(outputs: list[np.ndarray]) -> list[np.ndarray]:
    """DBNet's probability ``[N, 1, H, W]`` as a text/background label map ``[N, H, W]`` (DBNet's own threshold,
    :data:`DB_THRESHOLD`), the postprocess for ``miou``."""
    p = np.asarray(outputs[0])
    if p.ndim != 4 or p.shape[1] != 1:
        from edgepipe.metrics import MetricError

        raise MetricError(f"text_mask needs outputs[0] as a probability map [N, 1, H, W] but it is {list(p.shape)}")
    return [(p[:, 0] > DB_THRESHOLD).astype(np.int64)]


def ocr_text(outputs: list[np.ndarray]) -> list[np.ndarray]:
    """The recognizer's CTC scores ``[N, T, C]`` as symbol ids ``[N, T]`` padded with -1: the greedy path, less
    the spaces at either end of the line (PP-OCR writes one after the last word); the postprocess for
    ``exact_match`` and ``cer``."""
    from edgepipe.metrics import MetricError, ctc_greedy

    p = np.asarray(outputs[0])
    if p.ndim != 3:
        raise MetricError(f"ocr_text needs outputs[0] as CTC scores [N, T, C] but it is {list(p.shape)}")
    if not np.isfinite(p).all():
        raise MetricError("ocr_text: the CTC scores hold nan or inf")
    space = p.shape[2] - 1
    out = np.full(p.shape[:2], -1, np.int64)
    for i, ids in enumerate(ctc_greedy(p)):
        while ids and ids[-1] == space:
            ids.pop()
        while ids and ids[0] == space:
            ids.pop(0)
        out[i, :len(ids)] = ids
    return [out]
