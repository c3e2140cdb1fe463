"""int8 that keeps accuracy: plain int8, + equalization/bias correction, + mixed precision, + quantization-aware
fine-tuning, per backend.

    python bench/bench_quantization.py [--k 4] [--finetune 8] [--rounds 3] [--iterations 100] [--quick] [--no-cache]

For the real model (EfficientNet-Lite0, real ImageNet weights, on the ``photos`` data: crops of real
photos labelled by the fp32 model, so top-1 = agreement with fp32) and for the bundled example (digits),
and for every backend: fp32, plain int8, int8 + cross-layer equalization and bias correction
(``calibration.equalize``), and that + the ``--k`` most int8-sensitive layers kept in float
(``calibration.float_layers``; not on TFLite, whose converter has no per-layer fallback here); then both
again after ``--finetune`` epochs of quantization-aware fine-tuning (``calibration.finetune``: int8
simulated, against the fp32 logits), which calibrate and fine-tune on every training sample (600 crops
for the real model) where the others calibrate on 128. Columns:
test top-1 (agreement), top-5 containment of the fp32 answer, ``clear``: agreement with the fp32 model's
answer on the test samples that are not near-ties (fp32's top-1 logit at least ``NEAR_TIE`` above its
top-2), which tells real damage from a near-tie that rounding noise tips over, logit NMSE against fp32, p50 latency at
batch 1 / 1 thread and speed-up over the same backend's fp32, measured side by side in interleaved
rounds in one run. TensorRT's Q/DQ graph is evaluated on onnxruntime (no GPU here; no latency).

Every artifact is built by edgepipe's stages (``_measure.Workspace``), cached between runs.
"""

from __future__ import annotations

import argparse

import numpy as np
from _measure import Subject, Workspace, add_arguments, interleave, target

from edgepipe import backends
from edgepipe.evaluate import predict
from edgepipe.harness import BenchSettings
from edgepipe.models.example import digits_resnet
from edgepipe.pipeline import stages

#: backend -> the shipped int8 target it stands for
BACKENDS = {"onnxruntime": "cpu-int8", "openvino": "intel-cpu-int8", "tflite": "arm64-cpu-int8",
            "tensorrt": "jetson-orin-nano-int8"}
#: an fp32 top-1 logit less than this above the top-2 makes a test sample a near-tie
NEAR_TIE = 0.25


def _variants(backend: str, k: int, epochs: int) -> dict[str, dict]:
    out: dict[str, dict] = {"fp32": {"precision": "fp32"}, "int8": {"precision": "int8"},
                            "int8 +eq/bc": {"precision": "int8", "calibration": {"equalize": True}}}
    if backend == "tensorrt":
        del out["fp32"]  # the fp32 reference is onnxruntime's
    if backend != "tflite":
        out[f"int8 +eq/bc +{k} float"] = {"precision": "int8", "calibration": {"equalize": True, "float_layers": k}}
    if epochs:
        qat = {"equalize": True, "finetune": epochs}
        out["int8 +eq/bc +QAT"] = {"precision": "int8", "calibration": qat, "all_training_samples": True}
        if backend != "tflite":
            out[f"int8 +eq/bc +QAT +{k} float"] = {"precision": "int8", "calibration": {**qat, "float_layers": k},
                                                  "all_training_samples": True}
    return out


def _logits(built, splits) -> np.ndarray:
    art, _ = stages.runnable(built.artifact)
    return predict(backends.get(art.backend).load(art, 1), splits.test.x).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, rounds=3, iterations=100, quick="the example only, 2 rounds of 30 iterations")
    ap.add_argument("--k", type=int, default=4, help="layers kept in float by the mixed-precision variant")
    ap.add_argument("--finetune", type=int, default=8,
                    help="epochs of quantization-aware fine-tuning in the +QAT variants (0: leave them out)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated (default: all four)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.iterations = 2, 30
    from edgepipe.config import load_target
    from edgepipe.models.zoo import efficientnet_lite0

    models = {"example": ("digits", digits_resnet, (1, 1, 32, 32))}
    if not args.quick:
        models["efficientnet-lite0"] = ("photos", efficientnet_lite0, (1, 3, 224, 224))
    chosen = [b.strip() for b in args.backends.split(",") if b.strip()]
    rows, subjects = [], []
    for mname, (data, factory, shape) in models.items():
        with Workspace.temporary(args.no_cache, data=data) as ws:
            sp = ws.splits(shape, calibration_samples=128)
            sp_all = ws.splits(shape, calibration_samples=len(sp.train.y))  # the +QAT variants' data
            ref_t = target(f"{mname}-ref", "onnxruntime", "fp32", shape)
            onnx = ws.export(factory(), ref_t, sp, mname)
            ref = ws.compile(onnx, ref_t, sp, evaluate=False)
            ref_logits = _logits(ref, sp)
            gap = np.diff(np.sort(ref_logits, axis=1)[:, -2:], axis=1).ravel()
            not_tie = gap >= NEAR_TIE
            for backend in chosen:
                shipped = load_target(BACKENDS[backend])
                for vname, fields in _variants(backend, args.k, 2 if args.quick else args.finetune).items():
                    cal = {"method": shipped.calibration.method, **fields.get("calibration", {})}
                    t = target(f"{mname}-{backend}-{vname}".replace(" ", "").replace("/", "-").replace("+", "_"),
                               backend, fields["precision"], shape, calibration=cal,
                               options=shipped.options.__dict__ if fields["precision"] == "int8" else {})
                    b = ws.compile(onnx, t, sp_all if fields.get("all_training_samples") else sp, evaluate=False)
                    y = _logits(b, sp)
                    agree = float(np.mean(y.argmax(1) == sp.test.y))
                    top5 = float(np.mean([lab in np.argsort(-v)[:5] for lab, v in zip(sp.test.y, y, strict=True)]))
                    nmse = float(np.mean((y - ref_logits) ** 2) / np.mean(ref_logits ** 2))
                    clear = float(np.mean(y.argmax(1)[not_tie] == ref_logits.argmax(1)[not_tie]))
                    rows.append((mname, backend, vname, agree, top5, nmse, b, len(sp.test.y), clear))
                    if backend != "tensorrt":
                        it = args.iterations if mname == "example" else max(20, args.iterations // 4)
                        subjects.append(Subject((mname, backend, vname), b.artifact,
                                                BenchSettings(threads=1, warmup=10, iterations=it),
                                                group=(mname, backend)))
            r = interleave([s for s in subjects if s.key[0] == mname], args.rounds)
            what = "top-1 = agreement with the fp32 model" if data == "photos" else "top-1 on the true labels"
            print(f"\n{mname} ({data}, {rows[-1][7]} test samples; {what}), batch 1, 1 thread, median of "
                  f"{args.rounds} interleaved rounds; +QAT: {len(sp_all.calibration.y)} calibration samples, "
                  f"the others {len(sp.calibration.y)}")
            print(f"fp32 top-1 minus top-2 logit on the test samples: median {np.median(gap):.2f}, "
                  f"{np.mean(gap < 0.1):.1%} of them below 0.1, {np.mean(gap < NEAR_TIE):.1%} below {NEAR_TIE} (near-ties); "
                  f"clear: agreement with fp32 on the other {int(not_tie.sum())}")
            print(f"{'backend':12s} {'variant':26s} {'top-1':>7s} {'drop':>6s} {'top-5':>7s} {'clear':>7s} {'NMSE':>9s} "
                  f"{'p50 ms':>8s} {'vs fp32':>8s}")
            for m, backend, vname, agree, top5, nmse, _b, _n, clear in rows:
                if m != mname:
                    continue
                fp32 = next((a for mm, bb, vv, a, *_ in rows if mm == m and bb == "onnxruntime" and vv == "fp32"), agree)
                key = (m, backend, vname)
                lat = f"{r.median(key):8.3f}" if key in r.measurements else f"{'-':>8s}"
                speed = (f"{r.ratio((m, backend, 'fp32'), key).median:7.2f}x"
                         if key in r.measurements and (m, backend, "fp32") in r.measurements else f"{'-':>8s}")
                print(f"{backend:12s} {vname:26s} {agree:7.2%} {(fp32 - agree) * 100:+6.2f} {top5:7.2%} {clear:7.2%} {nmse:9.2e} "
                      f"{lat} {speed}")


if __name__ == "__main__":
    main()
