"""OpenVINO int8 vs fp32 on this CPU, and edgepipe's harness against OpenVINO's own benchmark_app.

One run prints one table. For the bundled example (1x1x32x32) and ResNet-18 (``edgepipe.models.zoo``,
plain torch, random weights, batch-norm statistics re-estimated on images so that activations have
realistic ranges; 1x3x224x224 unless --resnet-size says otherwise), at batch 1, each exported and compiled
for the shipped ``intel-cpu-fp32`` and ``intel-cpu-int8`` targets by edgepipe's stages
(``_measure.Workspace``):

- top-1 of the fp32 and int8 IRs: on the example's held-out test split; for ResNet-18 (no trained
  weights, no labels) the share of held-out images where int8 picks the same class as fp32;
- latency: the harness's median (a fresh worker process timing edgepipe's Runner call from Python)
  and benchmark_app's median on the same IR with the same properties (PERFORMANCE_HINT,
  INFERENCE_NUM_THREADS and INFERENCE_PRECISION_HINT=f32 through -load_config; -ip f32,
  -infer_precision f32; synchronous API; -data_shape for the shipped targets' dynamic batch, since
  -shape would make benchmark_app reshape the IR to a static one first), and their ratio.
  benchmark_app records each infer request's own ``latency`` (timed inside OpenVINO), which leaves
  out the Python call and the copies in and out; so the table also shows the median of the same
  ``request.latency`` read after each call of edgepipe's Runner ("infer-only"), to tell a fixed
  per-call cost from a difference in configuration;
- int8 speed-up over fp32 by each tool.

The machine is shared: every configuration is measured --rounds times, interleaved (harness, infer-only
and benchmark_app one after the other; fp32 and int8 alternating which goes first each round), and the
table shows the median of the rounds; ratios are the median over rounds of each round's ratio.
Usage: ``python bench/bench_openvino.py [--rounds 5] [--threads 1] [--resnet-size 224] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _measure import Rounds, Subject, Workspace, add_arguments, interleave, side_by_side

from edgepipe import backends
from edgepipe.config import Target, load_target
from edgepipe.evaluate import predict
from edgepipe.harness import BenchSettings
from edgepipe.types import Artifact

# benchmark_app imports OpenVINO's converter, which sends telemetry and writes ~/intel/ unless the
# telemetry package is unimportable (its documented fallback): run it that way.
BENCHMARK_APP = ("import sys; sys.modules['openvino_telemetry'] = None; sys.argv[0] = 'benchmark_app'; "
                 "from openvino.tools.benchmark.main import main; sys.exit(main())")
PROPERTIES = ("PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "NUM_STREAMS",
              "ENABLE_CPU_PINNING", "ENABLE_HYPER_THREADING")
PRECISIONS = ("fp32", "int8")


@dataclass
class Case:
    model: str
    shape: tuple[int, ...]
    irs: dict[str, Artifact] = field(default_factory=dict)
    top1: dict[str, float] = field(default_factory=dict)
    top1_kind: str = "top-1"
    mismatches: dict[str, list[str]] = field(default_factory=dict)


def _target(precision: str, shape: tuple[int, ...]) -> Target:
    """The shipped target (intel-cpu-fp32 / intel-cpu-int8) at this input shape."""
    return load_target(f"intel-cpu-{precision}").with_input_shape(shape)


def example_case(ws: Workspace) -> Case:
    from edgepipe.models.example import digits_resnet

    shape = (1, 1, 32, 32)
    sp = ws.splits(shape, calibration_samples=256)
    case = Case("example (digits ResNet)", shape)
    onnx = ws.export(digits_resnet(), _target("fp32", shape), sp, "example")
    for p in PRECISIONS:
        built = ws.compile(onnx, _target(p, shape), sp, f"example-{p}")
        case.irs[p], case.top1[p] = built.artifact, built.top1
    case.top1_kind = f"top-1 on {len(sp.test)} held-out digits"
    return case


def resnet_case(ws: Workspace, size: int) -> Case:
    import torch

    from edgepipe.models.zoo import resnet18

    shape = (1, 3, size, size)
    # 640 digits upsampled: 128 held out for the agreement, 64 calibrate (and set batch-norm statistics)
    sp = ws.splits(shape, calibration_samples=64, samples=640)
    model = resnet18(seed=0)
    model.train()
    with torch.no_grad():  # batch-norm statistics from images, so activations have realistic ranges
        for i in range(0, len(sp.calibration.x), 16):
            model(torch.from_numpy(sp.calibration.x[i : i + 16]))
    model.eval()
    case = Case(f"ResNet-18 (random weights, {size}x{size})", shape)
    onnx = ws.export(model, _target("fp32", shape), sp, "resnet18")
    preds = {}
    for p in PRECISIONS:
        case.irs[p] = ws.compile(onnx, _target(p, shape), sp, f"resnet-{p}", evaluate=False).artifact
        preds[p] = predict(backends.get("openvino").load(case.irs[p]), sp.test.x, batch=8).argmax(1)
    case.top1 = {"int8": float((preds["int8"] == preds["fp32"]).mean())}  # fp32 is the reference
    case.top1_kind = f"agreement with fp32 on {len(sp.test)} held-out images"
    return case


def run_benchmark_app(ir: Path, shape: tuple[int, ...], threads: int, iterations: int, workdir: Path,
                      static: bool) -> tuple[float, dict[str, str]]:
    """benchmark_app's median latency (ms) and the compiled model's properties it reports.

    A dynamic-batch IR gets ``-data_shape`` (run as it is, like edgepipe's Runner does); ``-shape``
    would reshape it to a static model first, which is faster and so not like for like.
    """
    cfg = workdir / "benchmark_app.json"
    cfg.write_text(json.dumps({"CPU": {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(threads),
                                       "INFERENCE_PRECISION_HINT": "f32"}}))
    cmd = [sys.executable, "-c", BENCHMARK_APP, "-m", str(ir), "-d", "CPU", "-load_config", str(cfg),
           "-shape" if static else "-data_shape", "[" + ",".join(map(str, shape)) + "]",
           "-ip", "f32", "-infer_precision", "f32",
           "-api", "sync", "-niter", str(iterations)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark_app failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    m = re.search(r"Median:\s+([\d.]+)\s+(ms|us)", proc.stdout)
    if not m:
        raise RuntimeError(f"benchmark_app printed no median latency:\n{proc.stdout[-2000:]}")
    props = dict(re.findall(r"\[ INFO \]\s+([A-Z_]+): (.+)", proc.stdout))
    return float(m.group(1)) / (1000.0 if m.group(2) == "us" else 1.0), props


def runner_infer_only(art: Artifact, shape: tuple[int, ...], threads: int, iterations: int) -> float:
    """Median of OpenVINO's own per-request latency (ms) over calls of edgepipe's Runner."""
    runner = backends.get("openvino").load(art, threads)
    feeds = {runner.inputs[0].name: np.random.default_rng(0).random(shape, dtype=np.float32)}
    times = []
    for _ in range(max(10, iterations // 20) + iterations):
        runner(feeds)
        times.append(runner.request.latency)
    return float(np.median(times[-iterations:]))


def _same(a: str, b: str) -> bool:
    norm = {"float32": "f32", "<type: 'float32'>": "f32", "true": "yes", "false": "no", "performancemode.latency": "latency"}
    a, b = a.strip().lower(), b.strip().lower()
    return norm.get(a, a) == norm.get(b, b)


def config_mismatches(art: Artifact, threads: int, bapp_props: dict[str, str]) -> list[str]:
    """Properties of the harness's compiled model that differ from benchmark_app's."""
    runner = backends.get("openvino").load(art, threads)
    out = []
    for k in PROPERTIES:
        mine = str(runner.compiled.get_property(k))
        if k in bapp_props and not _same(mine, bapp_props[k]):
            out.append(f"{k}: harness {mine} / benchmark_app {bapp_props[k]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap, rounds=5, quick="2 rounds, 300/10 iterations, ResNet-18 at 64x64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resnet-size", type=int, default=224)
    ap.add_argument("--example-iterations", type=int, default=2000)
    ap.add_argument("--resnet-iterations", type=int, default=100)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.example_iterations, args.resnet_iterations, args.resnet_size = 2, 300, 10, 64
    t0 = time.perf_counter()
    with Workspace.temporary(args.no_cache) as ws:
        cases = [example_case(ws), resnet_case(ws, args.resnet_size)]
        by_key = {(c.model, p): c for c in cases for p in PRECISIONS}
        iters = {cases[0].model: args.example_iterations, cases[1].model: args.resnet_iterations}
        subjects = [Subject((c.model, p), c.irs[p], BenchSettings(threads=args.threads, warmup=max(10, n // 20),
                                                                   iterations=n), group=c.model)
                    for c in cases for n in [iters[c.model]] for p in PRECISIONS]

        def infer_only(s: Subject, r: int) -> float:
            return runner_infer_only(s.artifact, by_key[s.key].shape, args.threads, s.settings.iterations)

        def bapp(s: Subject, r: int) -> float:
            case, p = by_key[s.key], s.key[1]
            static = not _target(p, case.shape).dynamic_batch
            med, props = run_benchmark_app(s.artifact.path, case.shape, args.threads, s.settings.iterations,
                                           ws.root, static)
            if r == 0:
                case.mismatches[p] = config_mismatches(s.artifact, args.threads, props)
            return med

        rounds = interleave(subjects, args.rounds, {"infer_only": infer_only, "bapp": bapp})
        print_table(cases, rounds, args, time.perf_counter() - t0)


def print_table(cases: list[Case], r: Rounds, args: argparse.Namespace, seconds: float) -> None:
    import openvino

    print(f"OpenVINO {openvino.get_version().split('-')[0]}, batch 1, {args.threads} thread(s), latency hint, "
          f"f32 inference precision (int8 layers int8); median of {args.rounds} interleaved rounds "
          f"(shared machine); {seconds:.0f} s")
    head = (f"{'model':<36} {'prec':<5} {'top-1':>8} {'harness ms':>11} {'infer-only ms':>14} {'bench_app ms':>13} "
            f"{'harness/bapp':>13} {'infer-only/bapp':>16} {'int8 speed-up h/b':>18}")
    print(head)
    print("-" * len(head))

    def vs_bapp(k: tuple[str, str], metric: str = "p50_ms") -> float:
        """Median over rounds of this figure over benchmark_app's, taken one right after the other."""
        return side_by_side(r.series(k, metric), r.series(k, "bapp")).median

    for c in cases:
        fp32 = (c.model, "fp32")
        for p in PRECISIONS:
            k = (c.model, p)
            speed = (f"{r.ratio(fp32, k).median:.2f}x/{r.ratio(fp32, k, 'bapp').median:.2f}x"
                     if p == "int8" else "")
            acc = f"{c.top1[p]:.2%}" if p in c.top1 else "ref"
            print(f"{c.model:<36} {p:<5} {acc:>8} {r.median(k):>11.3f} {r.median(k, 'infer_only'):>14.3f} "
                  f"{r.median(k, 'bapp'):>13.3f} {vs_bapp(k):>13.3f} {vs_bapp(k, 'infer_only'):>16.3f} {speed:>18}")
        for p in PRECISIONS:
            k = (c.model, p)
            rounds = ", ".join(f"{h:.3f}/{i:.3f}/{b:.3f}" for h, i, b in
                               zip(r.series(k), r.series(k, "infer_only"), r.series(k, "bapp"), strict=True))
            print(f"{'':<36} {p} rounds (harness/infer-only/bench_app ms): {rounds}")
            if c.mismatches.get(p):
                print(f"{'':<36} {p} properties that differ: {'; '.join(c.mismatches[p])}")
            elif p in c.mismatches:
                print(f"{'':<36} {p} compiled-model properties equal in both: {', '.join(PROPERTIES)}")
    print()
    ex, rn = cases
    drop = (ex.top1["fp32"] - ex.top1["int8"]) * 100
    for c in cases:
        s = r.ratio((c.model, "fp32"), (c.model, "int8")).median
        print(f"goal int8 >= 2x faster than fp32, {c.model}: {s:.2f}x (harness) -> {'met' if s >= 2 else 'MISSED'}")
    print(f"goal <= 0.5 pt top-1 drop on the example: {drop:+.2f} pt -> {'met' if drop <= 0.5 else 'MISSED'}")
    print(f"top-1 column: example = {ex.top1_kind}; ResNet-18 = {rn.top1_kind}")
    print("goal harness within +-5% of benchmark_app: " + ", ".join(
        f"{c.model.split(' (')[0]} {p} {vs_bapp((c.model, p)) - 1:+.1%} "
        f"({r_diff_us(r, (c.model, p)):+.0f} us)"
        for c in cases for p in PRECISIONS))
    print("medians: of the rounds; ratios and differences: median over rounds of those within a round (side by side)")
    print("harness = a Python call of the Runner (copy in, infer, copy out) timed in a fresh worker; "
          "benchmark_app and infer-only = OpenVINO's request.latency, which leaves the Python call out")


def r_diff_us(r: Rounds, k: tuple[str, str]) -> float:
    """Median over rounds of harness minus benchmark_app, in microseconds."""
    return float(np.median([(h - b) * 1e3 for h, b in zip(r.series(k), r.series(k, "bapp"), strict=True)]))


if __name__ == "__main__":
    main()
