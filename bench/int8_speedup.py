"""fp32 vs int8 on onnxruntime, batch 1, for the bundled example and a ResNet-18-sized model.

    python bench/int8_speedup.py [--iterations 300] [--rounds 3] [--threads 1]

Everything is measured in one run with the edgepipe harness (a fresh worker process per measurement),
interleaved over several rounds; the table shows the median of each configuration's per-round p50 and
the ratio to fp32. int8 is shown with unsigned activations (U8S8, what `cpu-int8` ships) and signed
activations (S8S8, onnxruntime's default) so the choice is visible. Accuracy is top-1 of each artifact
on the held-out digits split (the ResNet-18 has random weights: latency only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
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

CONFIGS = {
    "fp32": {"precision": "fp32"},
    "int8 U8S8": {"precision": "int8", "options": {"activation_type": "uint8"}},
    "int8 S8S8": {"precision": "int8", "options": {"activation_type": "int8"}},
}


def build(name: str, model, shape: tuple[int, ...], work: Path) -> tuple[dict[str, Artifact], dict[str, float | None]]:
    sp = split(digits(shape[1:]), calibration_samples=128 if shape[2] <= 64 else 32)
    onnx = export(model, shape, work / f"{name}.onnx")
    be = backends.get("onnxruntime")
    arts, accs = {}, {}
    for cfg_name, cfg in CONFIGS.items():
        t = target_from_dict({"name": cfg_name, "backend": "onnxruntime", "input_shape": list(shape), **cfg}, "bench")
        arts[cfg_name] = be.compile(onnx, t, CalibrationSet(sp.calibration.x), work / name / cfg_name.replace(" ", "_"))
        accs[cfg_name] = top1(be.load(arts[cfg_name]), sp.evaluation.x, sp.evaluation.y) if name == "example" else None
    return arts, accs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    models = {
        "example": (digits_resnet(), (1, 1, 32, 32)),
        "resnet18": (resnet18(), (1, 3, 224, 224)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        built = {n: build(n, m, s, Path(tmp)) for n, (m, s) in models.items()}
        p50: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):  # interleaved: every configuration once per round
            for n, (arts, _) in built.items():
                for c, art in arts.items():
                    iters = args.iterations if n == "example" else max(20, args.iterations // 10)
                    m = measure(art, BenchSettings(threads=args.threads, warmup=10, iterations=iters))
                    p50.setdefault((n, c), []).append(m.p50_ms)
        print(f"onnxruntime, batch 1, {args.threads} thread(s), median of {args.rounds} interleaved rounds")
        print(f"{'model':10s} {'config':10s} {'p50 ms':>9s} {'vs fp32':>8s} {'size KiB':>9s} {'top-1':>7s} {'drop pts':>9s}")
        for n, (arts, accs) in built.items():
            base = statistics.median(p50[(n, "fp32")])
            for c, art in arts.items():
                med = statistics.median(p50[(n, c)])
                acc = accs[c]
                drop = f"{(accs['fp32'] - acc) * 100:+.2f}" if acc is not None else "-"
                acc_s = f"{acc:.2%}" if acc is not None else "-"
                print(f"{n:10s} {c:10s} {med:9.3f} {base / med:7.2f}x {art.size_bytes / 1024:9.0f} {acc_s:>7s} {drop:>9s}")


if __name__ == "__main__":
    main()
