"""TFLite fp32 vs full-integer int8 on ai-edge-litert (XNNPACK), batch 1: the example and a ResNet-18.

    python bench/bench_tflite.py [--iterations 300] [--rounds 3] [--threads N] [--resnet-size 224] [--quick]

Each model is exported to ONNX and compiled by the tflite backend (onnx2tf in its toolchain, offline;
int8 calibrated on the digits calibration split) through edgepipe's stages (``_measure.Workspace``; a
rerun reuses the compiles from the stage cache, and the compile column then says ``cached``). Latency and
memory come from the edgepipe harness: a fresh worker process per measurement that imports only the
runtime. Every configuration (model x precision x threads) is measured once per round, interleaved, over
several rounds; the table shows the median of the per-round p50s, the int8 speed-up over fp32 at the same
thread count (median over rounds of the two measured side by side), and the largest peak resident memory
of the worker above its baseline. Top-1 is measured on the held-out digits split for the example (the
ResNet-18 has random weights: latency, size and memory only).
"""

from __future__ import annotations

import argparse
import os

from _measure import Subject, Workspace, add_arguments, interleave, target

from edgepipe import backends
from edgepipe.harness import BenchSettings
from edgepipe.models.example import digits_resnet
from edgepipe.models.zoo import resnet18

PRECISIONS = ("fp32", "int8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, rounds=3, iterations=300, quick="2 rounds of 50 iterations, ResNet-18 at 64x64")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="N of the N-thread rows")
    ap.add_argument("--resnet-size", type=int, default=224, help="ResNet-18 input height and width")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.iterations, args.resnet_size = 2, 50, 64
    avail = backends.get("tflite").check()
    if not avail.compile:
        raise SystemExit(f"cannot compile for tflite here: {avail.reason}")
    s = args.resnet_size
    models = {"example": (digits_resnet(), (1, 1, 32, 32)), f"resnet18@{s}": (resnet18(), (1, 3, s, s))}
    threads = sorted({1, args.threads})
    with Workspace.temporary(args.no_cache) as ws:
        built, subjects, reference = {}, [], None
        for n, (model, shape) in models.items():
            example = n == "example"
            # ResNet-18: a 512-image subset (at 3x224x224 the whole digits set would take a gigabyte)
            sp = ws.splits(shape, calibration_samples=256 if example else 32, samples=None if example else 512)
            onnx = None
            for p in PRECISIONS:
                t = target(f"{n}-{p}", "tflite", p, shape)
                onnx = onnx or ws.export(model, t, sp, n)
                if example and reference is None:
                    reference = ws.onnx_top1(onnx, sp)
                built[(n, p)] = b = ws.compile(onnx, t, sp, evaluate=example)
                print(f"compiled {n} {p} in {b.compile_time()} s ({b.artifact.size_bytes / 1024:.0f} KiB)",
                      flush=True)
                for th in threads:
                    iters = args.iterations if example else max(10, args.iterations // 15)
                    subjects.append(Subject((n, p, th), b.artifact, BenchSettings(
                        threads=th, warmup=20 if example else 5, iterations=iters), group=(n, th)))
        r = interleave(subjects, args.rounds)

        print()
        print(f"TFLite on ai-edge-litert (XNNPACK), batch 1, median p50 of {args.rounds} interleaved rounds; "
              f"{os.cpu_count()} CPU cores, shared")
        hdr = (f"{'model':14s} {'prec':5s} {'thr':>3s} {'p50 ms':>9s} {'int8 vs fp32':>12s} {'top-1':>7s} "
               f"{'drop pts':>8s} {'size KiB':>9s} {'worker MB':>9s} {'compile s':>9s}")
        print(hdr)
        print("-" * len(hdr))
        goal = {}
        for n in models:
            for th in threads:
                for p in PRECISIONS:
                    b, base = built[(n, p)], built[(n, "fp32")]
                    speed = r.ratio((n, "fp32", th), (n, p, th)).median
                    acc = b.top1
                    drop = (base.top1 - acc) * 100 if acc is not None and base.top1 is not None else None
                    if n == "example" and p == "int8":
                        goal[th] = (speed, drop)
                    print(f"{n:14s} {p:5s} {th:3d} {r.median((n, p, th)):9.3f} {speed:11.2f}x "
                          f"{f'{acc:.2%}' if acc is not None else '-':>7s} "
                          f"{f'{drop:+.2f}' if drop is not None else '-':>8s} "
                          f"{b.artifact.size_bytes / 1024:9.0f} {r.max((n, p, th), 'peak_rss_above_baseline_mb'):9.1f} "
                          f"{b.compile_time(9)}")
    print(f"\nexample fp32 reference on onnxruntime: top-1 {reference:.2%}. worker MB: peak resident memory of the "
          "fresh worker (numpy + ai-edge-litert + the model) above its baseline, largest over the rounds.")
    for th, (speed, drop) in goal.items():
        ok = speed >= 2.5 and drop is not None and drop <= 1.0
        print(f"goal (example, {th} thread{'s' if th > 1 else ''}): int8 >= 2.5x fp32 with <= 1 pt drop: "
              f"{speed:.2f}x, {drop:+.2f} pts -> {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
