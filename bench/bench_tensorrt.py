"""TensorRT: accuracy of the graphs engines are built from, and int8 vs fp16 engine latency.

    python bench/bench_tensorrt.py [--rounds 3] [--iterations 300] [--quick]

Everywhere: the bundled example is exported, then compiled for the ``nvidia-gpu-int8`` target (int8 Q/DQ by
modelopt, both calibration methods) and its fp16 twin (AutoCast) by edgepipe's stages
(``_measure.Workspace``); each graph is evaluated on onnxruntime's CPU provider against the fp32 export.
This is the accuracy the engines will have, up to kernel rounding; the check: every graph within 1 top-1
point of fp32.

Where TensorRT and an NVIDIA GPU exist, ``compile`` also builds the engines, and each is timed in a fresh
worker process at batch 1 and 32 (host latency: copies in, enqueue, copies out, stream synchronised),
fp16 and int8 interleaved over ``--rounds``; the check: int8 is not slower than fp16 (the median over
rounds of int8's p50 over fp16's in the same round at most 1.05, the noise band), a known trap when Q/DQ
is badly placed. Elsewhere the script says that engine timings need such a machine. Exit status 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from _measure import Subject, Workspace, add_arguments, interleave, target

from edgepipe import backends
from edgepipe.backends.tensorrt.engine import runtime_problem
from edgepipe.config import load_target
from edgepipe.harness import BenchSettings
from edgepipe.models.example import digits_resnet

NOISE = 1.05
VARIANTS = (("fp16", "-"), ("int8", "minmax"), ("int8", "entropy"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap, rounds=3, iterations=300, quick="2 rounds of 50 iterations")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.iterations = 2, 50

    trt = backends.get("tensorrt")
    avail = trt.check()
    if not avail.compile:
        print(f"cannot compile for TensorRT here: {avail.reason}")
        return 1
    base = load_target("nvidia-gpu-int8")
    ok = fast = True
    with Workspace.temporary(args.no_cache) as ws:
        sp = ws.splits(base.input_shape, base.calibration.samples, base.calibration.seed)
        onnx = ws.export(digits_resnet(), base, sp, "example")
        fp32 = ws.onnx_top1(onnx, sp)
        rows, built = [], {}
        for precision, method in VARIANTS:
            calibration = base.calibration if method == "-" else dataclasses.replace(base.calibration, method=method)
            t = dataclasses.replace(base, name=f"{base.name}-{precision}-{method}", precision=precision,
                                    calibration=calibration)
            b = built[(precision, method)] = ws.compile(onnx, t, sp, evaluate=False)
            stand_in = trt.stand_in(b.artifact)
            assert stand_in is not None
            # the graph on onnxruntime's CPU provider; and the engine itself where this machine runs it
            graph = target(f"{t.name}-graph", "onnxruntime", precision, t.input_shape)
            acc = ws.evaluate(stand_in.artifact, graph, sp).test / 100
            engine_acc = ws.evaluate(b.artifact, t, sp).test / 100 if avail.run else None
            size = (b.artifact.path.parent / b.artifact.metadata["onnx"]).stat().st_size
            rows.append((precision, method, acc, engine_acc, size, b))
            ok &= fp32 - acc <= 0.01 and (engine_acc is None or fp32 - engine_acc <= 0.01)

        print(f"\nAccuracy of the TensorRT graphs on onnxruntime CPU ({len(sp.test)} held-out digits); "
              f"fp32 export: {fp32:.2%}")
        print(f"{'graph':<18}{'calibration':<13}{'top-1':>8}{'vs fp32':>9}{'engine':>9}{'ONNX KiB':>10}{'compile s':>11}")
        for precision, method, acc, eng, size, b in rows:
            graph = "Q/DQ int8" if precision == "int8" else "AutoCast fp16"
            engine = f"{eng:.2%}" if eng is not None else "-"
            seconds = "cached" if b.compile_cached else f"{b.compile_seconds:.1f}"
            print(f"{graph:<18}{method:<13}{acc:>8.2%}{(acc - fp32) * 100:>+8.2f}p{engine:>9}{size / 1024:>10.0f}"
                  f"{seconds:>11}")
        print(f"check: every graph within 1 point of fp32: {'PASS' if ok else 'FAIL'}")

        if not avail.run:
            print("\nEngine timings (fp16 vs int8 at batch 1 and 32): not measured here; they need TensorRT and an "
                  f"NVIDIA GPU, and on this machine {runtime_problem()}.")
            print("Run this script on a Jetson (JetPack 6+) or an x86-64 GPU machine with `pip install tensorrt` "
                  "and `pip install 'edgepipe[tensorrt-run]'`.")
            return 0 if ok else 1

        subjects = [Subject((batch, name), built[variant].artifact,
                            BenchSettings(batch=batch, warmup=50, iterations=args.iterations), group=batch)
                    for batch in (1, 32) for name, variant in (("fp16", ("fp16", "-")), ("int8", ("int8", "minmax")))]
        r = interleave(subjects, args.rounds, label="engine latency")
    print(f"\nEngine latency, host p50 ms (median over {args.rounds} interleaved rounds of {args.iterations} "
          "iterations, fresh worker each; int8/fp16: median of the rounds' ratios)")
    print(f"{'batch':>6}{'fp16':>10}{'int8':>10}{'int8/fp16':>11}{'GPU MB int8':>13}")
    for batch in (1, 32):
        ratio = r.ratio((batch, "int8"), (batch, "fp16")).median
        mem = [m for m in r.series((batch, "int8"), "device_memory_mb") if m is not None]
        print(f"{batch:>6}{r.median((batch, 'fp16')):>10.3f}{r.median((batch, 'int8')):>10.3f}{ratio:>10.2f}x"
              f"{(mem[-1] if mem else 0.0):>13.1f}")
        fast &= ratio <= NOISE
    print(f"check: int8 not slower than fp16 (within {NOISE - 1:.0%}): {'PASS' if fast else 'FAIL'}")
    return 0 if ok and fast else 1


if __name__ == "__main__":
    sys.exit(main())
