"""Models of every shape through every CPU backend: fp32 and int8 metric, SQNR, flip rate, int8/fp32 speed-up.

    python bench/bench_tasks.py [--rounds 3] [--iterations 100] [--quick] [--tasks audio,tokens]
    python bench/bench_tasks.py --real [--models ppocr_rec,yolox_chars] [--backends onnxruntime,openvino]

``--real``: the zoo's real models (ONNX from their wheels, data rendered with true labels): per model x backend
the fp32 metric, the vendor's default int8 (the backend's quantizer with its defaults: the shipped target,
nothing edgepipe adds) and what ``edgepipe release --search recipes/search/real-model.toml`` chooses on its own
under a 1-point budget in the model's metric (settings, metric on the test split, SQNR, flip rate, speed-up
over fp32 and over the vendor default, the release's wall time; a release that finds nothing within budget
shows its closest candidate and why).

The models are the seeded task models of ``edgepipe.models.tasks`` (two inputs; 1-D audio; int64 tokens into a
transformer; a segmenter scored by mIoU; a two-output detector with a decode postprocess scored by mAP@0.5), their
targets the fp32 model's own answers, so fp32 scores 100 and the int8 column is what int8 costs. Each
(task, backend) pair is built with ``edgepipe.api.build`` (fp32 and int8 targets, ``--metric`` and
``--postprocess`` as a user would pass them); fp32 and int8 are then timed side by side in interleaved rounds
(a fresh worker each, batch 1, 1 thread) and the speed-up is the median of the per-round ratios. A pair a
backend cannot build prints its one-line reason instead of figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from _measure import Subject, add_arguments, interleave

from edgepipe import api
from edgepipe.errors import EdgepipeError
from edgepipe.harness import BenchSettings
from edgepipe.models.tasks import TASKS
from edgepipe.release import artifact_from_release
from edgepipe.types import Artifact

BACKENDS = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tflite": "tflite"}


def _target(path: Path, backend: str, precision: str) -> Path:
    extra = '[options]\nruntime = "litert"\n' if backend == "tflite" else ""
    path.write_text(f'backend = "{backend}"\nprecision = "{precision}"\n[runtime]\nthreads = 1\n'
                    f'[calibration]\nsamples = 64\n{extra}')
    return path


#: the zoo's real models: spec, --data, --metric, --postprocess
REAL = {
    "ppocr_rec": ("edgepipe.models.zoo:ppocr_rec", "text-lines", "exact_match", "edgepipe.models.zoo:ocr_text"),
    "ppocr_det": ("edgepipe.models.zoo:ppocr_det", "text-pages", "miou", "edgepipe.models.zoo:text_mask"),
    "yolox_chars": ("edgepipe.models.zoo:yolox_chars", "char-scenes", "map50", "edgepipe.models.zoo:yolox_boxes"),
}
#: each CPU backend's shipped int8 target
REAL_TARGETS = {"onnxruntime": "cpu-int8", "openvino": "intel-cpu-int8", "tflite": "arm64-cpu-int8"}
SPACE = Path(__file__).resolve().parent.parent / "recipes" / "search" / "real-model.toml"
#: the issue's budget: 1 point of the model's metric on the validation split
BUDGET = 1.0


def _vendor_target(path: Path, name: str) -> Path:
    """The shipped target with nothing edgepipe adds before the backend's quantizer (no equalization)."""
    from edgepipe.config import load_target

    t = load_target(name)
    opts = "".join(f"{k} = {json.dumps(v)}\n" for k, v in dataclasses.asdict(t.options).items() if v is not None)
    path.write_text(f'backend = "{t.backend}"\nprecision = "int8"\n[calibration]\nmethod = "minmax"\n'
                    f'samples = {t.calibration.samples}\nequalize = false\n[budgets]\nmax_accuracy_drop = 100.0\n'
                    f'[runtime]\nthreads = 1\n[options]\n{opts}')
    return path


def real(args: argparse.Namespace) -> int:
    """The ``--real`` table (see the module docstring)."""
    import time

    rounds, iterations = (1, 20) if args.quick else (args.rounds, args.iterations)
    rows: list[dict] = []
    subjects = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        spec, data, metric, post = REAL[name]
        for backend in args.backends.split(","):
            tname = REAL_TARGETS[backend]
            row: dict = {"model": name, "backend": backend, "metric": metric}
            rows.append(row)
            try:
                vt = _vendor_target(out / f"{backend}-vendor.toml", tname)
                vendor = api.build(spec, [str(vt)], out=out / "vendor" / name / backend, data=data, metric=metric,
                                   postprocess=post, bench=False, cache=not args.no_cache, allow_accuracy_drop=True)
                v = vendor.results[0]
                row["vendor"] = v.manifest.accuracy.value
                row["fp32"] = v.manifest.accuracy.reference
                t0 = time.perf_counter()
                rel = api.release(spec, [tname], out=out / "release" / name / backend, search=str(SPACE),
                                  data=data, metric=metric, postprocess=post, cache=not args.no_cache,
                                  max_metric_drop=BUDGET)
                row["wall_s"] = time.perf_counter() - t0
            except EdgepipeError as e:
                row["error"] = str(e).splitlines()[0][:160]
                continue
            o = rel.outcomes[0]
            pick = o.chosen or min((t for t in o.tried if t.result is not None),
                                   key=lambda t: abs(t.result.manifest.accuracy.drop or 0.0), default=None)
            row["status"] = o.status if o.chosen else f"closest ({o.reason or o.status})"[:90]
            if pick is None:
                row["error"] = (o.reason or "no candidate was built")[:160]
                continue
            m = pick.result.manifest
            fid = m.fidelity or {}
            row.update(settings=" ".join(f"{k}={v}" for k, v in sorted(pick.candidate.settings.items())
                                        if k != "recipe"),
                       chosen=m.accuracy.value, sqnr=min(fid.get("sqnr_db") or [float("nan")]),
                       flips=fid.get("flip_rate"))
            settings = BenchSettings(threads=1, warmup=10, iterations=iterations)
            key = (name, backend)
            source = next(iter(sorted(Path(v.release_dir).glob("*.onnx"))), None)
            if source is not None and backend == "onnxruntime":  # fp32 on the same runtime, side by side
                subjects.append(Subject((name, backend, "fp32"), Artifact("onnxruntime", "fp32", source), settings,
                                        group=key))
            for label, d in (("vendor", v.release_dir), ("chosen", o.release_dir if o.chosen else None)):
                if d is not None:
                    subjects.append(Subject((name, backend, label), artifact_from_release(d), settings, group=key))
            row["fp32_ms"] = m.reference_latency.p50_ms if m.reference_latency else None
            row["chosen_ms"] = m.latency.p50_ms if m.latency else None
    timing = interleave(subjects, rounds) if subjects else None
    print(f"\nreal models x CPU backends (batch 1, 1 thread): fp32, the vendor's default int8, and the release's "
          f"choice under a 1-point budget in the model's metric (test split); speed-ups: medians of {rounds} "
          "interleaved rounds for chosen/vendor, the release's own fp32 reference timing for chosen/fp32")
    head = (f"{'model':12s} {'backend':11s} {'metric':11s} {'fp32':>6s} {'vendor':>7s} {'chosen':>7s} {'SQNR':>6s} "
            f"{'flips%':>7s} {'x fp32':>7s} {'x vendor':>9s} {'wall s':>7s}  settings / status")
    print(head)
    for r in rows:
        if "error" in r and "chosen" not in r:
            print(f"{r['model']:12s} {r['backend']:11s} {r['metric']:11s} not built: {r['error']}")
            continue
        vs, key = "-", (r["model"], r["backend"])
        if timing and (*key, "chosen") in timing.measurements:
            vs = f"{timing.ratio((*key, 'vendor'), (*key, 'chosen')).median:.2f}x"
        if timing and (*key, "chosen") in timing.measurements and (*key, "fp32") in timing.measurements:
            xf = f"{timing.ratio((*key, 'fp32'), (*key, 'chosen')).median:.2f}x"
        else:  # the release's own fp32 reference timing (OpenVINO and TFLite time it on their own runtime)
            xf = (f"{r['fp32_ms'] / r['chosen_ms']:.2f}x*" if r.get("fp32_ms") and r.get("chosen_ms") else "-")
        flips = "-" if r.get("flips") is None else f"{r['flips']:.2f}"
        print(f"{r['model']:12s} {r['backend']:11s} {r['metric']:11s} {r['fp32']:6.2f} {r['vendor']:7.2f} "
              f"{r['chosen']:7.2f} {r['sqnr']:6.1f} {flips:>7s} {xf:>7s} {vs:>9s} {r.get('wall_s', 0):7.0f}  "
              f"{r['settings']} [{r['status']}]")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap, rounds=3, iterations=100)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated backends")
    ap.add_argument("--real", action="store_true", help="the zoo's real models, each released by the search")
    ap.add_argument("--models", default=",".join(REAL), help="with --real: comma-separated zoo models")
    ap.add_argument("--out", default="bench-real", help="with --real: where the builds and releases go (kept)")
    args = ap.parse_args()
    if args.real:
        return real(args)
    rounds, iterations = (1, 20) if args.quick else (args.rounds, args.iterations)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-tasks-") as tmp:
        root = Path(tmp)
        subjects, built = [], {}
        for name in args.tasks.split(","):
            task = TASKS[name]
            data = root / f"{name}.npz"
            np.savez(data, **task.data())
            for backend in args.backends.split(","):
                targets = [_target(root / f"{backend}-{p}.toml", backend, p) for p in ("fp32", "int8")]
                key = (name, backend)
                try:
                    res = api.build(f"edgepipe.models.tasks:{name}", [str(t) for t in targets],
                                    out=root / "dist" / name / backend, data=str(data), input_shape=task.shapes,
                                    metric=task.metric, postprocess=task.postprocess, bench=False,
                                    cache=not args.no_cache, allow_accuracy_drop=True)
                except EdgepipeError as e:
                    rows.append((name, backend, None, str(e).splitlines()[0][:120]))
                    continue
                by = {r.manifest.artifact.precision: r for r in res.results}
                built[key] = by
                settings = BenchSettings(threads=1, warmup=10, iterations=iterations,
                                         shapes=dict(task.shapes))
                for p, r in by.items():
                    subjects.append(Subject((name, backend, p), artifact_from_release(r.release_dir), settings,
                                            group=key))
                rows.append((name, backend, by, None))
        timing = interleave(subjects, rounds) if subjects else None
    print(f"\ntasks x CPU backends, batch 1, 1 thread, median of {rounds} interleaved rounds "
          f"({iterations} iterations each); targets are the fp32 model's own answers (fp32 scores 100)")
    print(f"{'task':13s} {'backend':12s} {'metric':7s} {'fp32':>7s} {'int8':>7s} {'drop':>6s} {'SQNR dB':>8s} "
          f"{'flips %':>8s} {'conf. %':>8s} {'fp32 ms':>8s} {'int8 ms':>8s} {'int8/fp32 speed-up':>20s}")
    for name, backend, by, error in rows:
        if by is None:
            print(f"{name:13s} {backend:12s} not built: {error}")
            continue
        f, i = by["fp32"].manifest, by["int8"].manifest
        fid = i.fidelity or {}
        sp = timing.ratio((name, backend, "fp32"), (name, backend, "int8")) if timing else None
        flips = "-" if fid.get("flip_rate") is None else f"{fid['flip_rate']:.2f}"
        conf = "-" if fid.get("confident_flip_rate") is None else f"{fid['confident_flip_rate']:.2f}"
        print(f"{name:13s} {backend:12s} {i.accuracy.metric:7s} {f.accuracy.value:7.2f} {i.accuracy.value:7.2f} "
              f"{i.accuracy.drop:+6.2f} {min(fid.get('sqnr_db') or [float('nan')]):8.1f} {flips:>8s} {conf:>8s} "
              f"{timing.median((name, backend, 'fp32')):8.3f} {timing.median((name, backend, 'int8')):8.3f} "
              f"{sp.median:7.2f}x ({sp.min:.2f}-{sp.max:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
