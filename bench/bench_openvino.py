"""OpenVINO int8 vs fp32 on this CPU, and edgepipe's harness against OpenVINO's own benchmark_app.

One run prints one table. For the bundled example (1x1x32x32) and ResNet-18 (``edgepipe.models.zoo``,
plain torch, random weights, batch-norm statistics re-estimated on images so that activations have
realistic ranges; 1x3x224x224 unless --resnet-size says otherwise), at batch 1:

- top-1 of the fp32 and int8 IRs: on the example's evaluation split; for ResNet-18 (no trained
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

The machine is shared: every configuration is measured --rounds times, interleaved (harness and
benchmark_app, fp32 and int8, alternating order each round), and the table shows the median of the
rounds, and ratios are the median over rounds of each round's ratio.
Usage: ``PYTHONPATH=. python bench/openvino.py [--rounds 5] [--threads 1] [--resnet-size 224]``
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# this file is called openvino.py: keep its folder off the path, or `import openvino` finds it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from edgepipe import backends  # noqa: E402
from edgepipe.types import Artifact, OnnxModel  # noqa: E402
from edgepipe.config import Target, load_target  # noqa: E402
from edgepipe.data import digits, fit_to_shape, split  # noqa: E402
from edgepipe.evaluate import predict  # noqa: E402
from edgepipe.harness import BenchSettings, measure  # noqa: E402

# benchmark_app imports OpenVINO's converter, which sends telemetry and writes ~/intel/ unless the
# telemetry package is unimportable (its documented fallback): run it that way.
BENCHMARK_APP = ("import sys; sys.modules['openvino_telemetry'] = None; sys.argv[0] = 'benchmark_app'; "
                 "from openvino.tools.benchmark.main import main; sys.exit(main())")
PROPERTIES = ("PERFORMANCE_HINT", "INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "NUM_STREAMS",
              "ENABLE_CPU_PINNING", "ENABLE_HYPER_THREADING")


@dataclass
class Case:
    model: str
    shape: tuple[int, ...]
    onnx: OnnxModel
    irs: dict[str, Artifact] = field(default_factory=dict)
    top1: dict[str, float] = field(default_factory=dict)
    top1_kind: str = "top-1"
    harness: dict[str, list[float]] = field(default_factory=dict)
    infer_only: dict[str, list[float]] = field(default_factory=dict)
    bapp: dict[str, list[float]] = field(default_factory=dict)
    mismatches: dict[str, list[str]] = field(default_factory=dict)


def _target(precision: str, shape: tuple[int, ...]) -> Target:
    """The shipped target (intel-cpu-fp32 / intel-cpu-int8) at this input shape."""
    return load_target(f"intel-cpu-{precision}").with_input_shape(shape)


def example_case(work: Path) -> Case:
    from edgepipe.export import export
    from edgepipe.models.example import digits_resnet

    shape = (1, 1, 32, 32)
    s = split(digits(shape[1:]), 256)
    case = Case("example (digits ResNet)", shape, export(digits_resnet(), shape, work / "example.onnx",
                                                         dynamic_batch=_target("fp32", shape).dynamic_batch))
    calib = CalibrationSet(s.calibration.x, "minmax", s.calibration.name)
    for p in ("fp32", "int8"):
        case.irs[p] = backends.get("openvino").compile(case.onnx, _target(p, shape), calib, work / f"example-{p}")
        logits = predict(backends.get("openvino").load(case.irs[p]), s.evaluation.x)
        case.top1[p] = float((logits.argmax(1) == s.evaluation.y).mean())
    case.top1_kind = f"top-1 on {len(s.evaluation)} held-out digits"
    return case


def resnet_case(work: Path, size: int) -> Case:
    import torch

    from edgepipe.export import export
    from edgepipe.models.zoo import resnet18

    shape = (1, 3, size, size)
    model = resnet18(seed=0)
    d = digits((1, 8, 8))
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(d))
    calib_x = fit_to_shape(d.x[idx[:64]], shape[1:])
    held_x = fit_to_shape(d.x[idx[64:192]], shape[1:])
    model.train()
    with torch.no_grad():  # batch-norm statistics from images, so activations have realistic ranges
        for i in range(0, len(calib_x), 16):
            model(torch.from_numpy(calib_x[i : i + 16]))
    model.eval()
    case = Case(f"ResNet-18 (random weights, {size}x{size})", shape,
                export(model, shape, work / "resnet18.onnx", dynamic_batch=_target("fp32", shape).dynamic_batch))
    calib = CalibrationSet(calib_x, "minmax", "digits upsampled")
    preds = {}
    for p in ("fp32", "int8"):
        case.irs[p] = backends.get("openvino").compile(case.onnx, _target(p, shape), calib, work / f"resnet-{p}")
        preds[p] = predict(backends.get("openvino").load(case.irs[p]), held_x, batch=8).argmax(1)
    case.top1 = {"int8": float((preds["int8"] == preds["fp32"]).mean())}  # fp32 is the reference
    case.top1_kind = f"agreement with fp32 on {len(held_x)} held-out images"
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
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resnet-size", type=int, default=224)
    ap.add_argument("--example-iterations", type=int, default=2000)
    ap.add_argument("--resnet-iterations", type=int, default=100)
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as tmp:
        work = Path(tmp)
        cases = [example_case(work), resnet_case(work, args.resnet_size)]
        iters = {cases[0].model: args.example_iterations, cases[1].model: args.resnet_iterations}
        for r in range(args.rounds):
            for case in cases:
                order = ("fp32", "int8") if r % 2 == 0 else ("int8", "fp32")
                for p in order:
                    n = iters[case.model]
                    m = measure(case.irs[p], BenchSettings(threads=args.threads, warmup=max(10, n // 20), iterations=n))
                    case.harness.setdefault(p, []).append(m.p50_ms)
                    case.infer_only.setdefault(p, []).append(runner_infer_only(case.irs[p], case.shape, args.threads, n))
                    static = not _target(p, case.shape).dynamic_batch
                    med, props = run_benchmark_app(case.irs[p].path, case.shape, args.threads, n, work, static)
                    case.bapp.setdefault(p, []).append(med)
                    if r == 0:
                        case.mismatches[p] = config_mismatches(case.irs[p], args.threads, props)
        print_table(cases, args, time.perf_counter() - t0)


def print_table(cases: list[Case], args: argparse.Namespace, seconds: float) -> None:
    import openvino

    def med(v: list[float]) -> float:
        return float(np.median(v))

    print(f"OpenVINO {openvino.get_version().split('-')[0]}, batch 1, {args.threads} thread(s), latency hint, "
          f"f32 inference precision (int8 layers int8); median of {args.rounds} interleaved rounds "
          f"(shared machine); {seconds:.0f} s")
    head = (f"{'model':<36} {'prec':<5} {'top-1':>8} {'harness ms':>11} {'infer-only ms':>14} {'bench_app ms':>13} "
            f"{'harness/bapp':>13} {'infer-only/bapp':>16} {'int8 speed-up h/b':>18}")
    print(head)
    print("-" * len(head))
    def ratio(a: list[float], b: list[float]) -> float:
        """Median over rounds of a/b: each round's two figures were measured next to each other."""
        return med([x / y for x, y in zip(a, b, strict=True)])

    for c in cases:
        for p in ("fp32", "int8"):
            h, i, b = med(c.harness[p]), med(c.infer_only[p]), med(c.bapp[p])
            speed = (f"{ratio(c.harness['fp32'], c.harness[p]):.2f}x/{ratio(c.bapp['fp32'], c.bapp[p]):.2f}x"
                     if p == "int8" else "")
            acc = f"{c.top1[p]:.2%}" if p in c.top1 else "ref"
            print(f"{c.model:<36} {p:<5} {acc:>8} {h:>11.3f} {i:>14.3f} {b:>13.3f} "
                  f"{ratio(c.harness[p], c.bapp[p]):>13.3f} {ratio(c.infer_only[p], c.bapp[p]):>16.3f} {speed:>18}")
        for p in ("fp32", "int8"):
            rounds = ", ".join(f"{h:.3f}/{i:.3f}/{b:.3f}" for h, i, b in
                               zip(c.harness[p], c.infer_only[p], c.bapp[p], strict=True))
            print(f"{'':<36} {p} rounds (harness/infer-only/bench_app ms): {rounds}")
            if c.mismatches.get(p):
                print(f"{'':<36} {p} properties that differ: {'; '.join(c.mismatches[p])}")
            elif p in c.mismatches:
                print(f"{'':<36} {p} compiled-model properties equal in both: {', '.join(PROPERTIES)}")
    print()
    ex, rn = cases
    drop = (ex.top1["fp32"] - ex.top1["int8"]) * 100
    for c in cases:
        s = ratio(c.harness["fp32"], c.harness["int8"])
        print(f"goal int8 >= 2x faster than fp32, {c.model}: {s:.2f}x (harness) -> {'met' if s >= 2 else 'MISSED'}")
    print(f"goal <= 0.5 pt top-1 drop on the example: {drop:+.2f} pt -> {'met' if drop <= 0.5 else 'MISSED'}")
    print(f"top-1 column: example = {ex.top1_kind}; ResNet-18 = {rn.top1_kind}")
    print("goal harness within +-5% of benchmark_app: " + ", ".join(
        f"{c.model.split(' (')[0]} {p} {ratio(c.harness[p], c.bapp[p]) - 1:+.1%} "
        f"({med([(h - b) * 1e3 for h, b in zip(c.harness[p], c.bapp[p], strict=True)]):+.0f} us)"
        for c in cases for p in ("fp32", "int8")))
    print("medians: of the rounds; ratios and differences: median over rounds of those within a round (side by side)")
    print("harness = a Python call of the Runner (copy in, infer, copy out) timed in a fresh worker; "
          "benchmark_app and infer-only = OpenVINO's request.latency, which leaves the Python call out")


if __name__ == "__main__":
    main()
