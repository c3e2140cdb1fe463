"""Reproduce the bundled example weights: ``python -m edgepipe.models.train_example``.

Deterministic: seeded, single-process data order, CPU only. Trains on the digits training split
(never on the evaluation split) and writes ``digits_resnet.safetensors`` beside the model file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgepipe.data import digits, split
from edgepipe.models.example import INPUT_SHAPE, WEIGHTS, DigitsResNet


def _shift(x: torch.Tensor, gen: torch.Generator, max_px: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_px`` pixels (zero padding), one offset per batch."""
    dy, dx = (int(v) for v in torch.randint(-max_px, max_px + 1, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train(epochs: int = 15, seed: int = 0, out: Path = WEIGHTS) -> float:
    """Train the example and save its weights; returns held-out top-1 accuracy."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    splits = split(digits(INPUT_SHAPE[1:]))
    x = torch.from_numpy(splits.train.x)
    y = torch.from_numpy(splits.train.y)
    model = DigitsResNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = (len(x) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = loss_fn(model(_shift(x[idx], gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        acc = evaluate(model, splits.test.x, splits.test.y)
        print(f"epoch {epoch + 1:2d}/{epochs}  loss {loss.item():.4f}  eval top-1 {acc:.2%}  {time.perf_counter() - t0:.0f}s")
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    return evaluate(model, splits.test.x, splits.test.y)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 (0..1) through the metric registry."""
    from edgepipe.compress._stats import top1

    return top1(model, x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    acc = train(args.epochs, args.seed, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB), held-out top-1 {acc:.2%}")


if __name__ == "__main__":
    main()
