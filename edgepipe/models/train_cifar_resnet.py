"""Train the case-study ResNets on mnist5k: ``python -m edgepipe.models.train_cifar_resnet --depth 56``.

Deterministic: seeded, one data order, CPU only, ``torch.use_deterministic_algorithms``; the same thread
count gives the same bytes. Trains on mnist5k's training split only (3,000 samples; never on validation
or test), SGD with Nesterov momentum and a one-cycle schedule, random shifts of up to 2 pixels, and
writes ``resnet<depth>_mnist5k.safetensors`` beside the model file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgepipe.data import mnist5k, split
from edgepipe.models.cifar_resnet import INPUT_SHAPE, CifarResNet, weights_path


def _shift(x: torch.Tensor, gen: torch.Generator, max_px: int = 2) -> torch.Tensor:
    """Each sample translated by up to ``max_px`` pixels (zeros come in at the border)."""
    n = x.shape[0]
    pad = nn.functional.pad(x, (max_px,) * 4)
    dy = torch.randint(0, 2 * max_px + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_px + 1, (n,), generator=gen)
    h, w = x.shape[2], x.shape[3]
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 (0..1) through the metric registry."""
    from edgepipe.compress._stats import top1

    return top1(model, x, y, batch=500)


def train(depth: int = 56, epochs: int = 12, seed: int = 0, out: Path | None = None, batch: int = 64,
          limit: int | None = None, lr: float = 0.1) -> dict[str, float]:
    """Train and save; returns validation and test top-1 and the seconds it took."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    splits = split(mnist5k(INPUT_SHAPE[1:]))
    keep = np.sort(np.random.default_rng(seed).permutation(len(splits.train))[:limit])  # (the file is class-ordered)
    x = torch.from_numpy(splits.train.x[keep])
    y = torch.from_numpy(splits.train.y[keep])
    model = CifarResNet(depth)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = loss_fn(model(_shift(x[idx], gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        val = evaluate(model, splits.validation.x, splits.validation.y)
        print(f"resnet{depth} epoch {epoch + 1:2d}/{epochs}  loss {loss.item():.4f}  validation top-1 {val:.2%}  "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
    model.eval()
    dest = out or weights_path(depth)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dest))
    return {"validation_top1": evaluate(model, splits.validation.x, splits.validation.y),
            "test_top1": evaluate(model, splits.test.x, splits.test.y), "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depth", type=int, default=56, help="6n+2: 56 (the case-study model) or 20 (the student)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="default: beside the model file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    r = train(args.depth, args.epochs, args.seed, args.out)
    out = args.out or weights_path(args.depth)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB): validation top-1 {r['validation_top1']:.2%}, "
          f"test top-1 {r['test_top1']:.2%} ({r['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
