"""The release's choice against each vendor's default int8 path, per CPU target, side by side.

    python bench/bench_release.py [--rounds 5] [--search FILE] [--quick]

Runs `edgepipe release` on the bundled example for cpu-int8 (onnxruntime), intel-cpu-int8 (OpenVINO) and
arm64-cpu-int8 (TFLite, timed on this x86 machine), then builds the same original model with each
vendor's defaults, as a user would without edgepipe:

- onnxruntime: ``quantize_static(model, reader)`` with every default (QDQ, S8S8, per-tensor, MinMax);
- OpenVINO: ``nncf.quantize(ov.convert_model(onnx), nncf.Dataset(...))`` with every default;
- onnx2tf: full-integer int8 with its default per-channel quantization (edgepipe's tflite target without
  [options]), on the original model.

Both use the same calibration samples. Latency: the edgepipe harness (a fresh worker process each),
chosen and vendor artifacts measured one right after the other in every round, the order alternating;
speed-up = median over rounds of (vendor p50 / chosen p50) in the same round. Accuracy: test-split top-1
against the original model in fp32. Goal: the chosen candidate at least 1.5x faster than the vendor
default int8 at no more than 1 point below the original model, on every CPU target.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import tempfile
from pathlib import Path

from _measure import Subject, Workspace, add_arguments, interleave

from edgepipe import api
from edgepipe.config import load_target
from edgepipe.harness import BenchSettings
from edgepipe.models import load_model
from edgepipe.release import artifact_from_release
from edgepipe.types import Artifact, Manifest

TARGETS = ("cpu-int8", "intel-cpu-int8", "arm64-cpu-int8")


def _ort_default(onnx: Path, calib, out: Path) -> Artifact:
    from onnxruntime.quantization import quantize_static

    class Reader:
        def __init__(self) -> None:
            self.it = iter([{"input": calib[i : i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    with contextlib.redirect_stdout(io.StringIO()):
        quantize_static(str(onnx), str(out), Reader())
    return Artifact("onnxruntime", "int8", out)


def _nncf_default(onnx: Path, calib, out: Path) -> Artifact:
    import nncf
    import openvino as ov

    q = nncf.quantize(ov.convert_model(str(onnx)), nncf.Dataset([calib[i : i + 1] for i in range(len(calib))]))
    ov.save_model(q, str(out))
    return Artifact("openvino", "int8", out, [out, out.with_suffix(".bin")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, rounds=5, iterations=300, quick="2 rounds of 100 iterations")
    ap.add_argument("--search", type=Path, help="search space (default: the shipped one)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.iterations = 2, 100
    with tempfile.TemporaryDirectory(prefix="bench-release-") as tmp_s, Workspace.temporary(args.no_cache) as ws:
        tmp = Path(tmp_s)
        rel = api.release(None, list(TARGETS), out=tmp / "release", search=args.search, cache=not args.no_cache)
        rows, subjects = {}, []
        for o in rel.outcomes:
            t = o.target
            if o.release_dir is None:
                print(f"{t.name}: {o.status}: {o.reason}")
                continue
            m = Manifest.read(o.release_dir)
            chosen = artifact_from_release(o.release_dir)
            assert chosen is not None
            sp = ws.splits(t.input_shape, t.calibration.samples, t.calibration.seed)
            onnx = ws.export(ws.original(load_model(None)), dataclasses.replace(t, name=f"{t.name}-original"), sp,
                             "original")
            if t.backend == "onnxruntime":
                vendor = _ort_default(onnx.path, sp.calibration.x, tmp / f"{t.name}-vendor.onnx")
            elif t.backend == "openvino":
                vendor = _nncf_default(onnx.path, sp.calibration.x, tmp / f"{t.name}-vendor.xml")
            else:
                plain = dataclasses.replace(load_target("arm64-cpu-int8"), name=f"{t.name}-onnx2tf-default", options={})
                vendor = ws.compile(onnx, plain, sp, name="onnx2tf-default").artifact
            ev = ws.evaluate(vendor, t, sp)
            settings = BenchSettings(threads=t.runtime.threads, warmup=20, iterations=args.iterations)
            subjects += [Subject((t.name, "chosen"), chosen, settings, group=t.name),
                         Subject((t.name, "vendor"), vendor, settings, group=t.name)]
            rows[t.name] = (m, o.chosen.candidate.label if o.chosen else "", ev.test / 100, vendor.size_bytes)
        r = interleave(subjects, args.rounds)
        print(f"\nrelease choice vs vendor default int8, batch 1, median of {args.rounds} interleaved rounds "
              f"({rel.wall_seconds:.0f} s release, {rel.stages_cached}/{rel.stages_total} stages cached)")
        print(f"{'target':15s} {'chosen candidate':52s} {'p50 ms':>7s} {'vendor ms':>9s} {'speed-up':>15s} "
              f"{'top-1':>7s} {'vendor':>7s} {'orig.':>7s} {'drop':>6s} {'KiB':>5s} {'vendor':>6s}  goal")
        results = {}
        for name, (m, label, vendor_top1, vendor_size) in rows.items():
            sp_ratio = r.ratio((name, "vendor"), (name, "chosen"))
            acc = m.accuracy
            ok = sp_ratio.median >= 1.5 and acc.drop <= 1.0
            assert m.artifact is not None
            print(f"{name:15s} {label[:52]:52s} {r.median((name, 'chosen')):7.3f} {r.median((name, 'vendor')):9.3f} "
                  f"{sp_ratio.median:5.2f}x ({sp_ratio.min:.2f}-{sp_ratio.max:.2f}) {acc.value / 100:7.2%} {vendor_top1:7.2%} "
                  f"{acc.reference / 100:7.2%} {acc.drop:+6.2f} {m.artifact.size_bytes / 1024:5.0f} "
                  f"{vendor_size / 1024:6.0f}  {'met' if ok else 'MISSED'}")
            results[name] = {"speedup": sp_ratio.median, "drop_points": acc.drop, "goal_met": ok}
        print(json.dumps(results))


if __name__ == "__main__":
    main()
