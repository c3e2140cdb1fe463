"""The survey's case study, generated: every compression technique alone and combined, through every CPU backend.

    python bench/case_study.py [--study resnet56,example,resnet18] [--rounds 3] [--iterations 200]
                               [--json out.json] [--markdown out.md] [--quick] [--no-cache]

Three studies, each a model with its data:

- ``resnet56``: ``edgepipe.models.cifar_resnet:resnet56`` (He et al. 2016) on ``--data mnist5k`` (1,000 test
  samples: one sample is 0.1 point); its student is the shipped ResNet-20.
- ``example``: the bundled example on the digits (359 test samples: one is 0.28 point); its student is
  ``edgepipe.models.example:digits_student`` (a ResNet-8 at the digits' native 8x8).
- ``resnet18``: a ResNet-18 at 3x224x224 with **random weights**, for latency only (no accuracy column).

Each row is a recipe (``stages.compress``; the techniques of ``edgepipe compress --list``) and a precision,
compiled by edgepipe's own stages for onnxruntime, OpenVINO and TFLite/LiteRT with the shipped targets'
settings (int8: ``cpu-int8``, ``intel-cpu-int8``, ``arm64-cpu-int8``: minmax, equalization and bias
correction, per-channel weights), evaluated on the held-out test split by each backend, and timed by the
edgepipe harness: batch 1, **one thread on every backend**, a fresh worker per measurement, every artifact
of a study once per round, the rounds interleaved. p50 is the median over rounds; the speed-up is the
median over rounds of the original model's onnxruntime fp32 p50 over the cell's, measured in the same
round. Columns: parameters, MACs, the artifact's bytes and gzip -9 bytes (onnxruntime's file; OpenVINO's
IR for fp16 and bf16), the ``.epk`` archive's bytes (``edgepipe pack``: sparse, shared and hashed weights
stored as such; fp32 rows whose model the study's factory can rebuild), test top-1 per backend and the worst drop, p50 and speed-up per backend.

The goal line (issue 16): the fastest row within 1 point of the original's test top-1, per backend, and
whether it is at least 6x the original's onnxruntime fp32 speed.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _measure import Built, Rounds, Subject, Workspace, add_arguments, interleave, stored_params, target

from edgepipe.compress import recipe_from_dict
from edgepipe.compress._stats import count_macs
from edgepipe.config import Target
from edgepipe.errors import EdgepipeError
from edgepipe.harness import BenchSettings
from edgepipe.models import load_model
from edgepipe.package import archive

BACKENDS = ("onnxruntime", "openvino", "tflite")
SHORT = {"onnxruntime": "ORT", "openvino": "OV", "tflite": "TFL"}
GOAL_SPEEDUP, GOAL_DROP = 6.0, 1.0

# ---------------------------------------------------------------------------------------------------------
# precisions: the shipped targets' settings, one thread everywhere

_INT8_CAL = {"method": "minmax", "samples": 256, "equalize": True}
PRECISIONS: dict[str, dict[str, dict[str, Any]]] = {
    "fp32": {
        "onnxruntime": {"precision": "fp32"},
        "openvino": {"precision": "fp32", "options": {"performance_hint": "latency"}},
        "tflite": {"precision": "fp32", "options": {"runtime": "litert", "delegate": "xnnpack"}},
    },
    "fp16": {
        "openvino": {"precision": "fp16", "options": {"performance_hint": "latency"}},
        "tflite": {"precision": "fp16", "options": {"runtime": "litert", "delegate": "xnnpack"}},
    },
    "bf16": {"openvino": {"precision": "bf16", "options": {"performance_hint": "latency"}}},
    "int8": {
        "onnxruntime": {"precision": "int8", "calibration": _INT8_CAL,
                        "options": {"activation_type": "uint8", "per_channel": True}},
        "openvino": {"precision": "int8", "calibration": _INT8_CAL,
                     "options": {"preset": "performance", "performance_hint": "latency"}},
        "tflite": {"precision": "int8", "calibration": _INT8_CAL,
                   "options": {"runtime": "litert", "delegate": "xnnpack", "quant_type": "per-channel",
                               "io_dtype": "int8"}},
    },
    "int8 per-tensor": {
        "onnxruntime": {"precision": "int8", "calibration": _INT8_CAL,
                        "options": {"activation_type": "uint8", "per_channel": False}},
        "tflite": {"precision": "int8", "calibration": _INT8_CAL,
                   "options": {"runtime": "litert", "delegate": "xnnpack", "quant_type": "per-tensor",
                               "io_dtype": "int8"}},
    },
    # mixed precision: the 2 layers most sensitive to int8 stay float (TFLite's converter has no per-layer
    # float: docs/techniques/quantization.md)
    "int8 mixed (2 float)": {
        "onnxruntime": {"precision": "int8", "calibration": {**_INT8_CAL, "float_layers": 2},
                        "options": {"activation_type": "uint8", "per_channel": True}},
        "openvino": {"precision": "int8", "calibration": {**_INT8_CAL, "float_layers": 2},
                     "options": {"preset": "performance", "performance_hint": "latency"}},
    },
}

# ---------------------------------------------------------------------------------------------------------
# recipes (TOML-shaped dicts, as `edgepipe compress --recipe` reads them)

SOFT = {"kind": "soft", "temperature": 4.0, "alpha": 0.7}


def _ft(epochs: int, lr: float = 1e-3) -> dict[str, Any]:
    return {"epochs": epochs, "lr": lr}


def _unstructured(technique: str, ft: int, **params: Any) -> dict[str, Any]:
    return {"finetune": _ft(ft), "steps": [{"technique": technique, **params, "finetune": True}]}


def _structured(ft: int, distill: dict[str, Any] | None = None, ratio: float = 0.5) -> dict[str, Any]:
    r: dict[str, Any] = {"finetune": _ft(ft, 2e-3),
                         "steps": [{"technique": "structured_prune", "ratio": ratio, "round_to": 8, "finetune": True}]}
    if distill:
        r["distill"] = distill
    return r


def _student(spec: str, ft: int, lr: float, prune: float | None = None) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"technique": "student", "model": spec, "finetune": True}]
    if prune:
        steps.append({"technique": "structured_prune", "ratio": prune, "round_to": 8,
                      "finetune": {"epochs": ft, "lr": 2e-3}})
    return {"finetune": _ft(ft, lr), "distill": SOFT, "steps": steps}


def _deep_compression(ft: int) -> dict[str, Any]:
    return {"finetune": _ft(ft), "steps": [
        {"technique": "magnitude_prune", "sparsity": 0.8, "finetune": True},
        {"technique": "magnitude_prune", "sparsity": 0.9, "finetune": True},
        {"technique": "weight_share", "bits": {"conv": 4, "linear": 4}, "codebook": "float16", "others": "float16",
         "finetune": True}]}


@dataclass(frozen=True)
class Row:
    """One line of the study: a technique (a recipe, or none) compiled at one precision."""

    technique: str
    recipe: dict[str, Any] | None
    precision: str = "fp32"
    group: str = "alone"  # "alone" | "combined" | "precision"
    live: bool = False  # compress outside the stage cache (a hashed model's seed must reach the archive)


def _technique_rows(ft: int, student: str, student_ft: tuple[int, float], hints: list[list[str]]) -> list[Row]:
    sft, slr = student_ft
    return [
        Row("original", None),
        Row("magnitude 80 % (global)", _unstructured("magnitude_prune", ft, sparsity=0.8)),
        Row("magnitude 80 % (layer-wise)", _unstructured("magnitude_prune", ft, sparsity=0.8, scope="layer")),
        Row("magnitude threshold |w| < 0.02", _unstructured("magnitude_prune", ft, threshold=0.02)),
        Row("L1-regularised 80 %", _unstructured("regularized_prune", ft, penalty="l1", sparsity=0.8)),
        Row("L2-regularised 80 %", _unstructured("regularized_prune", ft, penalty="l2", sparsity=0.8)),
        Row("gradient (Taylor) 80 %", _unstructured("taylor_prune", ft, sparsity=0.8)),
        Row("structured 50 %", _structured(ft)),
        Row("structured 50 % + soft KD", _structured(ft, SOFT)),
        Row("structured 50 % + hard KD", _structured(ft, {"kind": "hard", "alpha": 0.7})),
        Row("structured 50 % + hints KD", _structured(ft, {**SOFT, "kind": "intermediate", "layers": hints})),
        Row(f"student {student.rsplit(':', 1)[1]} (soft KD)", _student(student, sft, slr)),
        Row("low-rank (1/2 MACs)", _unstructured("lowrank", ft, macs=0.5)),
        Row("prune + share + Huffman", _deep_compression(ft)),
        Row("hashing (1/8 params)", _unstructured("hashing", 2 * ft, ratio=0.125), live=True),
    ]


def _precision_rows() -> list[Row]:
    return [Row("original", None, p, "precision") for p in ("fp16", "bf16", "int8 per-tensor", "int8",
                                                            "int8 mixed (2 float)")]


def _combined_rows(ft: int, student: str, student_ft: tuple[int, float]) -> list[Row]:
    sft, slr = student_ft
    name = student.rsplit(":", 1)[1]
    return [
        Row("structured 50 % + soft KD", _structured(ft, SOFT), "int8", "combined"),
        Row(f"student {name} (soft KD)", _student(student, sft, slr), "int8", "combined"),
        Row(f"student {name} + structured 50 % (soft KD)", _student(student, sft, slr, 0.5), "fp32", "combined"),
        Row(f"student {name} + structured 50 % (soft KD)", _student(student, sft, slr, 0.5), "int8", "combined"),
    ]


@dataclass(frozen=True)
class Study:
    name: str
    spec: str
    data: str
    shape: tuple[int, ...]
    rows: list[Row]
    accuracy: bool = True  # False: random weights, latency only
    samples: int | None = None  # a subset of the data (224x224 inputs)
    note: str = ""


def studies(quick: bool) -> dict[str, Study]:
    r56_student = "edgepipe.models.cifar_resnet:resnet20"
    ex_student = "edgepipe.models.example:digits_student"
    hints = [["layer2", "layer2"], ["layer3", "layer3"]]
    if quick:  # a smoke run: the example, the goal's rows, tiny fine-tunes
        rows = [Row("original", None), Row("original", None, "int8", "precision"),
                *_combined_rows(1, ex_student, (1, 3e-3))[:2]]
        return {"example": Study("example", "edgepipe.models.example:digits_resnet", "digits", (1, 1, 32, 32),
                                 rows, note="--quick: fine-tunes of 3 batches, so accuracy is not the point")}
    r18_rows = [Row("original", None), Row("original", None, "int8", "precision"),
                Row("structured 50 % (no fine-tune)", {"steps": [{"technique": "structured_prune", "ratio": 0.5,
                                                                  "round_to": 8}]}, "fp32", "combined"),
                Row("structured 50 % (no fine-tune)", {"steps": [{"technique": "structured_prune", "ratio": 0.5,
                                                                  "round_to": 8}]}, "int8", "combined")]
    return {
        "resnet56": Study("resnet56", "edgepipe.models.cifar_resnet:resnet56", "mnist5k", (1, 1, 32, 32),
                          _technique_rows(3, r56_student, (6, 1e-3), hints) + _precision_rows()
                          + _combined_rows(6, r56_student, (6, 1e-3))),
        "example": Study("example", "edgepipe.models.example:digits_resnet", "digits", (1, 1, 32, 32),
                         [Row("original", None), Row("original", None, "int8", "precision"),
                          Row("structured 50 % + soft KD", _structured(16, SOFT), "fp32"),
                          Row("student digits_student (soft KD)", _student(ex_student, 30, 3e-3))]
                         + _combined_rows(16, ex_student, (30, 3e-3))[:2]),
        "resnet18": Study("resnet18", "edgepipe.models.zoo:resnet18", "digits", (1, 3, 224, 224), r18_rows,
                          accuracy=False, samples=256, note="random weights: latency only"),
    }


# ---------------------------------------------------------------------------------------------------------
# running it


@dataclass
class Cell:
    built: Built | None = None
    error: str = ""
    top1: float | None = None
    p50: float | None = None
    speedup: float | None = None


@dataclass
class Result:
    study: str
    technique: str
    precision: str
    group: str
    params: int = 0
    macs: int = 0
    artifact_bytes: int | None = None
    gzip_bytes: int | None = None
    epk_bytes: int | None = None
    cells: dict[str, Cell] = field(default_factory=dict)
    drop: float | None = None  # worst over backends, points below the original's onnxruntime fp32 top-1

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "cells"} | {
            "backends": {b: {"top1": c.top1, "p50_ms": c.p50, "speedup": c.speedup, "error": c.error or None}
                         for b, c in self.cells.items()}}


def _target(study: Study, backend: str, precision: str, settings: dict[str, Any], iterations: int) -> Target:
    name = f"{study.name}-{backend}-{precision}".replace(" ", "-").replace("(", "").replace(")", "")
    return target(name, backend, settings["precision"], study.shape, runtime={"threads": 1, "iterations": iterations},
                  **{k: v for k, v in settings.items() if k != "precision"})


def _epk(model: torch.nn.Module, recipe: dict[str, Any] | None, spec: str, shape: tuple[int, ...],
         reference: torch.nn.Module) -> int | None:
    """The ``.epk`` archive's bytes, where ``edgepipe unpack`` can rebuild the model with the study's factory
    (the factory's architecture, or a low-rank step's recorded replacement); None otherwise."""
    steps = {s["technique"] for s in (recipe or {}).get("steps", [])}
    if steps & {"structured_prune", "student"}:
        return None  # another architecture: an archive would need its own factory
    data, _ = archive.encode(model, spec, input_shape=shape, reference=reference)
    return len(data)


def run_study(ws: Workspace, study: Study, quick: bool, iterations: int) -> list[Result]:
    # --quick calibrates on 64 samples, as the 224x224 study does: a smoke run, accuracy is not the point
    splits = ws.splits(study.shape, calibration_samples=64 if study.samples or quick else 256, samples=study.samples)
    source = load_model(study.spec)
    reference = load_model(study.spec).module
    example = torch.from_numpy(splits.test.x[:1])
    compressed: dict[str, Any] = {}
    out: list[Result] = []
    for row in study.rows:
        t0 = time.perf_counter()
        key = json.dumps(row.recipe, sort_keys=True)
        if key not in compressed:
            if row.recipe is None:
                model = ws.original(source)
            else:
                recipe = copy.deepcopy(row.recipe)
                if quick:
                    recipe["finetune"] = {**recipe.get("finetune", {}), "epochs": 1, "max_batches": 3}
                model, _ = ws.compress(source, recipe_from_dict(recipe, f"case study {row.technique!r}"), splits,
                                       cached=not row.live)
            onnx = ws.export(model, _target(study, "onnxruntime", "fp32", PRECISIONS["fp32"]["onnxruntime"], 1),
                             splits, f"{study.name}-{row.technique}")
            mod = model.module
            epk = _epk(mod, row.recipe, study.spec, study.shape, reference) if study.accuracy else None
            compressed[key] = (onnx, stored_params(mod), count_macs(mod, example), epk)
        onnx, params, macs, epk = compressed[key]
        res = Result(study.name, row.technique, row.precision, row.group, params, macs,
                     epk_bytes=epk if row.precision == "fp32" else None)  # the archive holds the torch weights
        for backend in BACKENDS:
            settings = PRECISIONS[row.precision].get(backend)
            if settings is None:
                continue
            t = _target(study, backend, row.precision, settings, iterations)
            try:
                built = ws.compile(onnx, t, splits, f"{study.name}-{row.technique}-{row.precision}-{backend}",
                                   evaluate=study.accuracy)
            except EdgepipeError as e:
                res.cells[backend] = Cell(error=str(e).splitlines()[0])
                continue
            res.cells[backend] = Cell(built, top1=built.top1)
            if res.artifact_bytes is None:  # the first backend's artifact (onnxruntime where it has the precision)
                files = [p for p in built.artifact.files if p.is_file()]
                res.artifact_bytes = built.artifact.size_bytes
                res.gzip_bytes = sum(len(gzip.compress(p.read_bytes(), 9)) for p in files)
        out.append(res)
        tops = ", ".join(f"{SHORT[b]} {c.top1:.2%}" if c.top1 is not None else f"{SHORT[b]} {c.error or '-'}"
                         for b, c in res.cells.items())
        print(f"  {study.name}: {row.technique} [{row.precision}]: {tops} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    return out


def measure_all(results: list[Result], rounds: int, iterations: int) -> Rounds:
    subjects = []
    for r in results:
        for b, c in r.cells.items():
            if c.built is not None:
                iters = max(20, iterations // 10) if c.built.target.input_shape[-1] >= 128 else iterations
                subjects.append(Subject((r.study, r.technique, r.precision, b), c.built.artifact,
                                        BenchSettings(threads=1, warmup=10, iterations=iters), group=r.study))
    rd = interleave(subjects, rounds)
    for r in results:
        base = (r.study, "original", "fp32", "onnxruntime")
        for b, c in r.cells.items():
            k = (r.study, r.technique, r.precision, b)
            if k in rd.measurements:
                c.p50, c.speedup = rd.median(k), rd.ratio(base, k).median
    ref = {r.study: r.cells["onnxruntime"].top1 for r in results if (r.technique, r.precision) == ("original", "fp32")}
    for r in results:
        tops = [c.top1 for c in r.cells.values() if c.top1 is not None]
        if tops and ref.get(r.study) is not None:
            r.drop = round((ref[r.study] - min(tops)) * 100, 2)
    return rd


# ---------------------------------------------------------------------------------------------------------
# output


def _n(v: int | None) -> str:
    return "–" if v is None else f"{v:,}"


def _macs(v: int) -> str:
    return f"{v / 1e6:.1f} M" if v >= 1e5 else f"{v:,}"


def markdown(results: list[Result], meta: dict[str, Study]) -> str:
    lines = []
    for name, study in meta.items():
        rows = [r for r in results if r.study == name]
        if not rows:
            continue
        lines += ["", f"**{name}** (`{study.spec}`, --data {study.data}, input {'x'.join(map(str, study.shape[1:]))}"
                  f"{'; ' + study.note if study.note else ''})", ""]
        head = ["technique", "precision", "params", "MACs", "artifact B", "gzip B", ".epk B"]
        if study.accuracy:
            head += ["top-1 ORT / OV / TFL", "drop pt"]
        head += [f"{SHORT[b]} p50 ms (×)" for b in BACKENDS]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r.technique, r.precision, _n(r.params), _macs(r.macs), _n(r.artifact_bytes), _n(r.gzip_bytes),
                     _n(r.epk_bytes)]
            if study.accuracy:
                cells.append(" / ".join(f"{r.cells[b].top1:.1%}" if b in r.cells and r.cells[b].top1 is not None
                                        else "–" for b in BACKENDS))
                cells.append("–" if r.drop is None else f"{r.drop:+.1f}")
            for b in BACKENDS:
                c = r.cells.get(b)
                cells.append("–" if c is None or c.p50 is None else f"{c.p50:.3f} ({c.speedup:.2f}×)")
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", *goal_lines(rows, study)]
    return "\n".join(lines)


def goal_lines(rows: list[Result], study: Study) -> list[str]:
    """Per backend: the fastest row within GOAL_DROP of the original, and whether it reaches GOAL_SPEEDUP."""
    out = []
    ref = next((r.cells["onnxruntime"].top1 for r in rows if (r.technique, r.precision) == ("original", "fp32")), None)
    for b in BACKENDS:
        ok = []
        for r in rows:
            c = r.cells.get(b)
            if c is None or c.speedup is None:
                continue
            drop = (ref - c.top1) * 100 if (study.accuracy and ref is not None and c.top1 is not None) else None
            if study.accuracy and (drop is None or drop > GOAL_DROP + 1e-9):
                continue
            ok.append((c.speedup, r, drop))
        if not ok:
            out.append(f"- {SHORT[b]}: no row within {GOAL_DROP:g} point")
            continue
        s, r, drop = max(ok, key=lambda x: x[0])
        met = "met" if s >= GOAL_SPEEDUP else "MISSED"
        acc = f", drop {drop:+.1f} pt" if drop is not None else " (random weights: latency only)"
        out.append(f"- {SHORT[b]}: **{s:.2f}×** the original's onnxruntime fp32 speed with {r.technique} "
                   f"[{r.precision}]{acc}: goal ≥ {GOAL_SPEEDUP:g}× {met}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, rounds=3, iterations=200,
                  quick="the example's goal rows with 3-batch fine-tunes, 64 calibration samples, 1 round of 30 "
                        "iterations (CI smoke)")
    ap.add_argument("--study", default="resnet56,example,resnet18",
                    help="comma-separated studies: resnet56, example, resnet18 (default: all)")
    ap.add_argument("--json", type=Path, help="also write every row as JSON")
    ap.add_argument("--markdown", type=Path, help="also write the tables as Markdown")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.iterations = 1, 30
    torch.set_num_threads(1)
    all_studies = studies(args.quick)
    wanted = [s.strip() for s in args.study.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in studies(False)]
    if unknown:
        ap.error(f"--study {','.join(unknown)}: choose from {', '.join(studies(False))}")
    chosen = {n: s for n, s in all_studies.items() if n in wanted}
    t0 = time.perf_counter()
    results: list[Result] = []
    for study in chosen.values():
        with Workspace.temporary(args.no_cache, data=study.data) as ws:
            res = run_study(ws, study, args.quick, args.iterations)
            results += res
            measure_all(res, args.rounds, args.iterations)
    text = markdown(results, chosen)
    print(f"batch 1, 1 thread on every backend, median of {args.rounds} interleaved rounds; "
          f"× = speed-up over the original's onnxruntime fp32 p50 in the same round")
    print(text)
    print(f"\n{time.perf_counter() - t0:.0f} s in all")
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in results], indent=1) + "\n")


if __name__ == "__main__":
    main()
