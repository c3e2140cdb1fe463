"""Small seeded models of the shapes edge users ship, and data for each: the fixtures of `bench/bench_tasks.py`.

Each task is a torch module (seeded, untrained: what matters here is the signature and how far int8 moves
its outputs), its input shapes, its metric, and data whose targets are the fp32 model's own answers (labels,
masks, boxes), so the fp32 model scores 100 and an artifact's drop is what compression and int8 cost.

- ``image_vector``: an image ``[N, 3, 16, 16]`` and a feature vector ``[N, 8]`` -> 10 class scores (top1)
- ``audio``: a 1-D waveform ``[N, 1, 4000]`` -> 6 keyword scores (top1)
- ``tokens``: int64 token ids ``[N, 16]`` through an ``nn.TransformerEncoder`` -> 4 class scores (top1)
- ``segmenter``: ``[N, 3, 32, 32]`` -> ``[N, 4, 32, 32]`` per-pixel scores (miou)
- ``detector``: ``[N, 3, 32, 32]`` -> boxes ``[N, 8, 4]`` and scores ``[N, 8]``, decoded by :func:`decode` (map50)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


class ImageVector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(32 + 8, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, image: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.conv(image), feats], dim=1))


class Audio(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(1, 16, 25, stride=4), nn.ReLU(), nn.Conv1d(16, 32, 9, stride=4), nn.ReLU(),
                                 nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 6))

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return self.net(wave)


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(32, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(tokens)).mean(dim=1))


class Segmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(16, 4, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


class Detector(nn.Module):
    """Eight anchors on a 32x32 image: a box (centre offset, size) and an objectness score each."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                  nn.Flatten())
        self.box = nn.Linear(64, 8 * 4)
        self.score = nn.Linear(64, 8)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(image)
        return self.box(f).reshape(-1, 8, 4), torch.sigmoid(self.score(f))


def decode(outputs: list[np.ndarray]) -> list[np.ndarray]:
    """The detector's postprocess: anchors on a 4x2 grid plus the predicted offsets, as (x1, y1, x2, y2) pixel
    boxes, their scores and one class (0), the layout the ``map`` metrics read."""
    raw, scores = outputs
    gx, gy = np.meshgrid(np.arange(4) * 8 + 4, np.arange(2) * 16 + 8)
    centre = np.stack([gx.ravel(), gy.ravel()], axis=-1)[None].astype(np.float32) + 4 * np.tanh(raw[..., :2])
    half = 3 + 3 * (1 + np.tanh(raw[..., 2:]))
    boxes = np.concatenate([centre - half, centre + half], axis=-1)
    return [boxes.astype(np.float32), scores.astype(np.float32), np.zeros(scores.shape, np.int64)]


@dataclass(frozen=True)
class Task:
    """A model of one shape, how it is judged, and its data."""

    name: str
    make: Callable[[], nn.Module]
    shapes: dict[str, tuple[int, ...]]  # by forward argument, batch first
    metric: str
    postprocess: str | None = None
    samples: int = 240

    def module(self) -> nn.Module:
        torch.manual_seed(0)
        return self.make().eval()

    def inputs(self, n: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        r = np.random.default_rng(seed)
        n = n or self.samples
        out: dict[str, np.ndarray] = {}
        for name, shape in self.shapes.items():
            if name == "tokens":
                out[name] = r.integers(0, 100, (n, *shape[1:])).astype(np.int64)
            else:
                out[name] = r.random((n, *shape[1:]), dtype=np.float32)
        return out

    def data(self) -> dict[str, np.ndarray]:
        """Inputs and the fp32 model's own answers as targets: what an .npz for ``--data`` holds."""
        x = self.inputs()
        with torch.no_grad():
            out = self.module()(*(torch.from_numpy(v) for v in x.values()))
        outs = [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]
        if self.metric in ("top1", "top5", "agreement"):
            return {**x, "y": outs[0].argmax(1)}
        if self.metric == "miou":
            return {**x, "y": outs[0].argmax(1)}
        boxes, scores, _ = decode(outs)
        keep = scores > 0.5
        gt = np.where(keep[..., None], boxes, -1).astype(np.float32)
        return {**x, "boxes": gt, "classes": np.where(keep, 0, -1).astype(np.int64)}


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("image_vector", ImageVector, {"image": (1, 3, 16, 16), "feats": (1, 8)}, "top1"),
    Task("audio", Audio, {"wave": (1, 1, 4000)}, "top1"),
    Task("tokens", Tokens, {"tokens": (1, 16)}, "top1"),
    Task("segmenter", Segmenter, {"image": (1, 3, 32, 32)}, "miou"),
    Task("detector", Detector, {"image": (1, 3, 32, 32)}, "map50", "edgepipe.models.tasks:decode"),
)}


def image_vector() -> nn.Module:
    return TASKS["image_vector"].module()


def audio() -> nn.Module:
    return TASKS["audio"].module()


def tokens() -> nn.Module:
    return TASKS["tokens"].module()


def segmenter() -> nn.Module:
    return TASKS["segmenter"].module()


def detector() -> nn.Module:
    return TASKS["detector"].module()
