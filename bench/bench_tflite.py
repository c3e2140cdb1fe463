"""TFLite fp32 vs full-integer int8 on ai-edge-litert (XNNPACK), batch 1: the example and a ResNet-18.

    python bench/tflite.py [--iterations 300] [--rounds 3] [--threads N] [--resnet-size 224]

Each model is exported to ONNX and compiled by the tflite backend (onnx2tf in its toolchain, offline;
int8 calibrated on the digits calibration split). Latency and memory come from the edgepipe harness: a
fresh worker process per measurement that imports only the runtime. Every configuration (model x
precision x threads) is measured once per round, interleaved, over several rounds; the table shows the
median of the per-round p50s, the int8 speed-up over fp32 at the same thread count, and the largest peak
resident memory of the worker above its baseline. Top-1 is measured on the held-out digits split for the
example (the ResNet-18 has random weights: latency, size and memory only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# run as a script, bench/ would be first on sys.path and its files could shadow packages (bench/openvino.py)
sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from edgepipe import backends
from edgepipe.types import Artifact, CalibrationSet
from edgepipe.config import target_from_dict
from edgepipe.data import digits, split
from edgepipe.evaluate import top1
from edgepipe.export import export
from edgepipe.harness import BenchSettings, measure
from edgepipe.models.example import digits_resnet
from edgepipe.models.zoo import resnet18

PRECISIONS = ("fp32", "int8")


def build(name: str, model, shape: tuple[int, ...], work: Path) -> dict:
    sp = split(digits(shape[1:]), calibration_samples=256 if shape[2] <= 64 else 32)
    onnx = export(model, shape, work / f"{name}.onnx")
    be = backends.get("tflite")
    out: dict = {"arts": {}, "top1": {}, "compile_s": {}, "size": {}}
    if name == "example":
        ort = backends.get("onnxruntime").load(Artifact("onnxruntime", "fp32", onnx.path))
        out["top1"]["onnxruntime fp32"] = top1(ort, sp.evaluation.x, sp.evaluation.y)
    for p in PRECISIONS:
        t = target_from_dict({"name": f"{name}-{p}", "backend": "tflite", "precision": p, "input_shape": list(shape)},
                             "bench")
        t0 = time.perf_counter()
        art = be.compile(onnx, t, CalibrationSet(sp.calibration.x), work / name / p)
        out["compile_s"][p] = time.perf_counter() - t0
        out["arts"][p], out["size"][p] = art, art.size_bytes
        if name == "example":
            out["top1"][p] = top1(be.load(art, 1), sp.evaluation.x, sp.evaluation.y)
        print(f"compiled {name} {p} in {out['compile_s'][p]:.0f} s ({art.size_bytes / 1024:.0f} KiB)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=300, help="timed iterations per measurement (example)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="N of the N-thread rows")
    ap.add_argument("--resnet-size", type=int, default=224, help="ResNet-18 input height and width")
    args = ap.parse_args()
    s = args.resnet_size
    models = {"example": (digits_resnet(), (1, 1, 32, 32)), f"resnet18@{s}": (resnet18(), (1, 3, s, s))}
    threads = sorted({1, args.threads})
    with tempfile.TemporaryDirectory() as tmp:
        built = {n: build(n, m, shape, Path(tmp)) for n, (m, shape) in models.items()}
        p50: dict[tuple[str, str, int], list[float]] = {}
        mem: dict[tuple[str, str, int], list[float]] = {}
        for r in range(args.rounds):  # interleaved: every configuration once per round
            for n, b in built.items():
                iters = args.iterations if n == "example" else max(10, args.iterations // 15)
                for th in threads:
                    for p in PRECISIONS:
                        m = measure(b["arts"][p], BenchSettings(threads=th, warmup=5 if n != "example" else 20,
                                                                iterations=iters))
                        p50.setdefault((n, p, th), []).append(m.p50_ms)
                        mem.setdefault((n, p, th), []).append(m.peak_rss_above_baseline_mb)
            print(f"round {r + 1}/{args.rounds} done", flush=True)

    print()
    print(f"TFLite on ai-edge-litert (XNNPACK), batch 1, median p50 of {args.rounds} interleaved rounds; "
          f"{os.cpu_count()} CPU cores, shared")
    hdr = (f"{'model':14s} {'prec':5s} {'thr':>3s} {'p50 ms':>9s} {'int8 vs fp32':>12s} {'top-1':>7s} "
           f"{'drop pts':>8s} {'size KiB':>9s} {'worker MB':>9s} {'compile s':>9s}")
    print(hdr)
    print("-" * len(hdr))
    goal = {}
    for n, b in built.items():
        for th in threads:
            base = statistics.median(p50[(n, "fp32", th)])
            for p in PRECISIONS:
                med = statistics.median(p50[(n, p, th)])
                acc = b["top1"].get(p)
                drop = (b["top1"]["fp32"] - acc) * 100 if acc is not None else None
                speed = base / med
                if n == "example" and p == "int8":
                    goal[th] = (speed, drop)
                print(f"{n:14s} {p:5s} {th:3d} {med:9.3f} {speed:11.2f}x "
                      f"{f'{acc:.2%}' if acc is not None else '-':>7s} "
                      f"{f'{drop:+.2f}' if drop is not None else '-':>8s} "
                      f"{b['size'][p] / 1024:9.0f} {max(mem[(n, p, th)]):9.1f} {b['compile_s'][p]:9.0f}")
    ref = built["example"]["top1"]["onnxruntime fp32"]
    print(f"\nexample fp32 reference on onnxruntime: top-1 {ref:.2%}. worker MB: peak resident memory of the "
          "fresh worker (numpy + ai-edge-litert + the model) above its baseline, largest over the rounds.")
    for th, (speed, drop) in goal.items():
        ok = speed >= 2.5 and drop is not None and drop <= 1.0
        print(f"goal (example, {th} thread{'s' if th > 1 else ''}): int8 >= 2.5x fp32 with <= 1 pt drop: "
              f"{speed:.2f}x, {drop:+.2f} pts -> {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
