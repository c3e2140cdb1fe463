"""fp32 vs int8 on onnxruntime, batch 1, for the bundled example and a ResNet-18-sized model.

    python bench/bench_int8_speedup.py [--iterations 300] [--rounds 3] [--threads 1] [--quick]

Each model is exported, compiled for three onnxruntime targets and evaluated by edgepipe's stages
(``_measure.Workspace``). Latency comes from the edgepipe harness (a fresh worker process per
measurement), interleaved over several rounds; the table shows the median of each configuration's
per-round p50, and its speed-up over fp32: the median over rounds of fp32's p50 over its p50 in the same
round. int8 is shown with unsigned activations (U8S8, what `cpu-int8` ships) and signed activations
(S8S8, onnxruntime's default) so the choice is visible. Accuracy is top-1 of each artifact on the
held-out digits split (the ResNet-18 has random weights: latency only).
"""

from __future__ import annotations

import argparse

from _measure import Subject, Workspace, add_arguments, interleave, target

from edgepipe.harness import BenchSettings
from edgepipe.models.example import digits_resnet
from edgepipe.models.zoo import resnet18

CONFIGS = {
    "fp32": {"precision": "fp32"},
    "int8 U8S8": {"precision": "int8", "options": {"activation_type": "uint8"}},
    "int8 S8S8": {"precision": "int8", "options": {"activation_type": "int8"}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, rounds=3, iterations=300, quick="2 rounds of 50 iterations, ResNet-18 at 64x64")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    size = 224
    if args.quick:
        args.rounds, args.iterations, size = 2, 50, 64
    models = {"example": (digits_resnet(), (1, 1, 32, 32)), "resnet18" if size == 224 else f"resnet18@{size}": (resnet18(), (1, 3, size, size))}
    with Workspace.temporary(args.no_cache) as ws:
        built, subjects = {}, []
        for n, (model, shape) in models.items():
            example = n == "example"
            # ResNet-18: a 512-image subset (at 3x224x224 the whole digits set would take a gigabyte)
            sp = ws.splits(shape, calibration_samples=128 if example else 32, samples=None if example else 512)
            onnx = None
            for c, cfg in CONFIGS.items():
                t = target(f"{n}-{c.replace(' ', '-')}", "onnxruntime", shape=shape, **cfg)
                onnx = onnx or ws.export(model, t, sp, n)
                built[(n, c)] = b = ws.compile(onnx, t, sp, evaluate=example)
                iters = args.iterations if example else max(20, args.iterations // 10)
                subjects.append(Subject((n, c), b.artifact, BenchSettings(threads=args.threads, warmup=10,
                                                                         iterations=iters), group=n))
        r = interleave(subjects, args.rounds)
        print(f"onnxruntime, batch 1, {args.threads} thread(s), median of {args.rounds} interleaved rounds")
        print(f"{'model':10s} {'config':10s} {'p50 ms':>9s} {'vs fp32':>8s} {'size KiB':>9s} {'top-1':>7s} {'drop pts':>9s}")
        for (n, c), b in built.items():
            acc, ref = b.top1, built[(n, "fp32")].top1
            drop = f"{(ref - acc) * 100:+.2f}" if acc is not None and ref is not None else "-"
            acc_s = f"{acc:.2%}" if acc is not None else "-"
            speed = r.ratio((n, "fp32"), (n, c)).median
            print(f"{n:10s} {c:10s} {r.median((n, c)):9.3f} {speed:7.2f}x {b.artifact.size_bytes / 1024:9.0f} "
                  f"{acc_s:>7s} {drop:>9s}")


if __name__ == "__main__":
    main()
