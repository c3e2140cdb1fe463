"""TensorRT: accuracy of the graphs engines are built from, and int8 vs fp16 engine latency.

    python bench/tensorrt.py [--rounds 3] [--iterations 300]

Everywhere: the bundled example is exported, then compiled for the ``nvidia-gpu-int8`` target (int8 Q/DQ by
modelopt, both calibration methods) and its fp16 twin (AutoCast); each graph is evaluated on onnxruntime's
CPU provider against the fp32 export. This is the accuracy the engines will have, up to kernel rounding;
the check: every graph within 1 top-1 point of fp32.

Where TensorRT and an NVIDIA GPU exist, ``compile`` also builds the engines, and each is timed in a fresh
worker process at batch 1 and 32 (host latency: copies in, enqueue, copies out, stream synchronised),
fp16 and int8 interleaved over ``--rounds``; the check: int8 is not slower than fp16 (median int8 p50 at
most 5 % above fp16's, the noise band), a known trap when Q/DQ is badly placed. Elsewhere the script says
that engine timings need such a machine. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# This file is called tensorrt.py: its own directory must not stay on sys.path, or `import tensorrt` finds it.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from edgepipe import backends  # noqa: E402
from edgepipe.backends.tensorrt.engine import runtime_problem  # noqa: E402
from edgepipe.types import Artifact, CalibrationSet  # noqa: E402
from edgepipe.config import load_target, target_from_dict  # noqa: E402
from edgepipe.data import digits, split  # noqa: E402
from edgepipe.evaluate import top1  # noqa: E402
from edgepipe.export import export  # noqa: E402
from edgepipe.harness import BenchSettings, measure  # noqa: E402
from edgepipe.models.example import digits_resnet  # noqa: E402

NOISE = 1.05


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=300)
    args = ap.parse_args()

    trt, ort = backends.get("tensorrt"), backends.get("onnxruntime")
    avail = trt.check()
    if not avail.compile:
        print(f"cannot compile for TensorRT here: {avail.reason}")
        return 1
    base = load_target("nvidia-gpu-int8")
    data = split(digits(base.chw), calibration_samples=base.calibration.samples,
                 calibration_seed=base.calibration.seed)
    ok = fast = True
    with tempfile.TemporaryDirectory(prefix="bench-trt-") as tmp_str:
        tmp = Path(tmp_str)
        src = export(digits_resnet(), base.input_shape, tmp / "example.onnx")
        fp32 = top1(ort.load(Artifact("onnxruntime", "fp32", src.path)), data.evaluation.x, data.evaluation.y)
        variants = [("fp16", "-"), ("int8", "minmax"), ("int8", "entropy")]
        rows, artifacts = [], {}
        for precision, method in variants:
            d = base.to_dict()
            d.update(name=f"{base.name}-{precision}-{method}", precision=precision)
            if method != "-":
                d["calibration"]["method"] = method
            t = target_from_dict(d, "bench")
            calib = CalibrationSet(data.calibration.x, t.calibration.method, data.calibration.name)
            t0 = time.perf_counter()
            art = trt.compile(src, t, calib, tmp / t.name)
            seconds = time.perf_counter() - t0
            onnx_file = art.path.parent / art.metadata["onnx"]
            stand_in = trt.stand_in(art)
            assert stand_in is not None
            acc = top1(ort.load(stand_in.artifact), data.evaluation.x, data.evaluation.y)
            engine_acc = (top1(trt.load(art), data.evaluation.x, data.evaluation.y)
                          if avail.run else None)
            rows.append((precision, method, acc, engine_acc, onnx_file.stat().st_size, seconds))
            artifacts[(precision, method)] = art
            ok &= fp32 - acc <= 0.01 and (engine_acc is None or fp32 - engine_acc <= 0.01)

        print(f"\nAccuracy of the TensorRT graphs on onnxruntime CPU ({len(data.evaluation)} held-out digits); "
              f"fp32 export: {fp32:.2%}")
        print(f"{'graph':<18}{'calibration':<13}{'top-1':>8}{'vs fp32':>9}{'engine':>9}{'ONNX KiB':>10}{'compile s':>11}")
        for precision, method, acc, eng, size, seconds in rows:
            graph = "Q/DQ int8" if precision == "int8" else "AutoCast fp16"
            engine = f"{eng:.2%}" if eng is not None else "-"
            print(f"{graph:<18}{method:<13}{acc:>8.2%}{(acc - fp32) * 100:>+8.2f}p{engine:>9}{size / 1024:>10.0f}"
                  f"{seconds:>11.1f}")
        print(f"check: every graph within 1 point of fp32: {'PASS' if ok else 'FAIL'}")

        if not avail.run:
            print("\nEngine timings (fp16 vs int8 at batch 1 and 32): not measured here; they need TensorRT and an "
                  f"NVIDIA GPU, and on this machine {runtime_problem()}.")
            print("Run this script on a Jetson (JetPack 6+) or an x86-64 GPU machine with `pip install tensorrt` "
                  "and `pip install 'edgepipe[tensorrt-run]'`.")
            return 0 if ok else 1

        fp16_art, int8_art = artifacts[("fp16", "-")], artifacts[("int8", "minmax")]
        print(f"\nEngine latency, host p50 ms (median over {args.rounds} interleaved rounds of {args.iterations} "
              "iterations, fresh worker each)")
        print(f"{'batch':>6}{'fp16':>10}{'int8':>10}{'int8/fp16':>11}{'GPU MB int8':>13}")
        for batch in (1, 32):
            p50 = {"fp16": [], "int8": []}
            mem = 0.0
            for _ in range(args.rounds):
                for name, art in (("fp16", fp16_art), ("int8", int8_art)):
                    m = measure(art, BenchSettings(batch=batch, warmup=50, iterations=args.iterations))
                    p50[name].append(m.p50_ms)
                    if name == "int8" and m.device_memory_mb is not None:
                        mem = m.device_memory_mb
            f, i = statistics.median(p50["fp16"]), statistics.median(p50["int8"])
            print(f"{batch:>6}{f:>10.3f}{i:>10.3f}{i / f:>10.2f}x{mem:>13.1f}")
            fast &= i <= f * NOISE
        print(f"check: int8 not slower than fp16 (within {NOISE - 1:.0%}): {'PASS' if fast else 'FAIL'}")
    return 0 if ok and fast else 1


if __name__ == "__main__":
    sys.exit(main())
