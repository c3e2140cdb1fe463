"""Models of every shape through every CPU backend: fp32 and int8 metric, SQNR, flip rate, int8/fp32 speed-up.

    python bench/bench_tasks.py [--rounds 3] [--iterations 100] [--quick] [--tasks audio,tokens]

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

BACKENDS = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tflite": "tflite"}


def _target(path: Path, backend: str, precision: str) -> Path:
    extra = '[options]\nruntime = "litert"\n' if backend == "tflite" else ""
    path.write_text(f'backend = "{backend}"\nprecision = "{precision}"\n[runtime]\nthreads = 1\n'
                    f'[calibration]\nsamples = 64\n{extra}')
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap, rounds=3, iterations=100)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated backends")
    args = ap.parse_args()
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
