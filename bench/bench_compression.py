"""Compression bench: Deep Compression (prune + weight sharing + Huffman), low-rank, HashedNets.

Two models on the same digits data (1x32x32; test split held out as everywhere in edgepipe): the bundled
example ResNet, and a LeNet-300-100 MLP on the flattened 32x32 input (1024-300-100-10), trained here,
seeded. For each: the fp32 weights file, then each technique's model (``stages.compress``) packed into an
``.epk`` archive (what an over-the-air update would ship), restored from that archive, exported, compiled
for onnxruntime fp32 and evaluated by edgepipe's stages (``_measure.Workspace``), and measured: stored
bytes, ratio to the fp32 weights file, top-1 of the restored model on the test split, MACs, and
onnxruntime p50 latency (fresh worker per measurement, 1 thread, all configurations interleaved over
several rounds, median of the rounds; "vs fp32" is the median over rounds of the fp32 row's p50 over this
row's, measured side by side). Goals (issue 7): prune+share+Huffman >= 50x (LeNet) / >= 35x (example)
with <= 0.5 pt top-1 drop; low-rank at half the MACs <= 1 pt; hashing at 1/8 of the parameters <= 2 pt.

    python bench/bench_compression.py [--rounds 3] [--json out.json] [--quick]

Pruning is the ``magnitude_prune`` technique (edgepipe/compress/prune.py); the bench stops with a
message if it is not registered.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _measure import (
    Rounds,
    Subject,
    Workspace,
    add_arguments,
    interleave,
    stored_params,
    target,
    torch_source,
)
from torch import nn

from edgepipe.compress import recipe_from_dict, techniques
from edgepipe.compress._stats import count_macs
from edgepipe.data import Splits
from edgepipe.harness import BenchSettings
from edgepipe.package import archive
from edgepipe.types import Artifact

EXAMPLE = "edgepipe.models.example:digits_resnet"
LENET = "edgepipe.models.lenet:lenet_300_100"
INPUT_SHAPE = (1, 1, 32, 32)
QUICK_FINETUNE = {"epochs": 1, "max_batches": 3}

# Recipes per model. Iterative pruning (Han et al. 2015): prune, retrain, prune harder, retrain.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "example": {
        "prune + share + Huffman": {
            "finetune": {"epochs": 3, "lr": 1e-3},
            "steps": [
                {"technique": "magnitude_prune", "sparsity": 0.8, "finetune": True},
                {"technique": "magnitude_prune", "sparsity": 0.9, "finetune": True},
                {"technique": "magnitude_prune", "sparsity": 0.95, "finetune": True},
                {"technique": "weight_share", "bits": {"conv": 4, "linear": 4}, "codebook": "float16",
                 "others": "float16", "finetune": True},
            ],
        },
        "low-rank (1/2 MACs)": {
            "finetune": {"epochs": 4, "lr": 1e-3},
            "steps": [{"technique": "lowrank", "macs": 0.5, "finetune": True}],
        },
        "hashing (1/8 params)": {
            "finetune": {"epochs": 12, "lr": 3e-3},
            "steps": [{"technique": "hashing", "ratio": 0.125, "finetune": True}],
        },
    },
    "lenet-300-100": {
        "prune + share + Huffman": {  # per-layer ratios, as the paper's LeNet-300-100 (8% / 9% / 26% kept)
            "finetune": {"epochs": 20, "lr": 1e-3},
            "steps": [
                {"technique": "magnitude_prune", "layers": {"1": 0.8, "3": 0.6, "5": 0.3}, "finetune": True},
                {"technique": "magnitude_prune", "layers": {"1": 0.9, "3": 0.8, "5": 0.5}, "finetune": True},
                {"technique": "magnitude_prune", "layers": {"1": 0.95, "3": 0.85, "5": 0.6}, "finetune": True},
                {"technique": "magnitude_prune", "layers": {"1": 0.96, "3": 0.88, "5": 0.65}, "finetune": True},
                {"technique": "weight_share", "bits": {"linear": 4}, "codebook": "float16", "others": "float16",
                 "finetune": True},
            ],
        },
        "low-rank (1/2 MACs)": {
            "finetune": {"epochs": 6, "lr": 1e-3},
            "steps": [{"technique": "lowrank", "macs": 0.5, "finetune": True}],
        },
        "hashing (1/8 params)": {
            "finetune": {"epochs": 20, "lr": 3e-3},
            "steps": [{"technique": "hashing", "ratio": 0.125, "finetune": True}],
        },
    },
}


@dataclass
class Row:
    model: str
    technique: str
    stored_bytes: int
    ratio: float
    top1: float
    drop_pts: float
    macs: int
    params: int
    artifact: Artifact | None = None
    latency_ms: list[float] = field(default_factory=list)
    p50: float = float("nan")
    vs_fp32: float = float("nan")
    stages: dict[str, int] | None = None
    seconds: float = 0.0


def train_lenet(splits: Splits, epochs: int = 40) -> nn.Module:
    """LeNet-300-100 on the flattened 32x32 digits, seeded."""
    from edgepipe.compress.finetune import finetune
    from edgepipe.config.recipe import FinetuneConfig
    from edgepipe.models.lenet import lenet_300_100

    torch.manual_seed(0)
    model = lenet_300_100()
    return finetune(model, splits.train, FinetuneConfig(epochs=epochs, lr=1e-3, weight_decay=1e-4, seed=0)).eval()


def _evaluate(ws: Workspace, name: str, technique: str, model: nn.Module, spec: str, splits: Splits,
              ref_top1: float | None, fp32_bytes: int, reference: nn.Module) -> Row:
    """Pack, restore what an update would ship, then export, compile (onnxruntime fp32) and evaluate it."""
    data, report = archive.encode(model, spec, input_shape=INPUT_SHAPE, reference=reference)
    restored = archive.restore(archive.decode(data))
    t = target(f"{name}-fp32", "onnxruntime", "fp32", INPUT_SHAPE, runtime={"threads": 1})
    built = ws.build(torch_source(restored, f"{spec} ({technique}, restored)"), t, splits, f"{name}-{technique}")
    acc = built.top1
    assert acc is not None
    ref = acc if ref_top1 is None else ref_top1
    example = torch.from_numpy(splits.test.x[:1])
    return Row(name, technique, len(data), fp32_bytes / len(data), acc, round((ref - acc) * 100, 2),
               count_macs(restored, example), stored_params(restored), built.artifact, stages=report.stages)


def run(ws: Workspace, rounds: int, iterations: int, only: str | None, quick: bool) -> list[Row]:
    from safetensors.torch import save_file

    from edgepipe.models import load_model

    if "magnitude_prune" not in techniques():
        raise SystemExit("bench/bench_compression.py needs the magnitude_prune technique (edgepipe/compress/prune.py)")
    splits = ws.splits(INPUT_SHAPE, calibration_samples=128)
    rows: list[Row] = []
    t0 = time.perf_counter()
    lenet = train_lenet(splits, epochs=2 if quick else 40)
    print(f"trained LeNet-300-100 in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    models = {"example": (EXAMPLE, load_model(EXAMPLE).module), "lenet-300-100": (LENET, lenet)}
    for name, (spec, base) in models.items():
        if only and only != name:
            continue
        weights = ws.root / f"{name}.safetensors"
        save_file(base.state_dict(), str(weights))
        fp32_bytes = weights.stat().st_size
        reference = load_model(spec).module
        fp32 = _evaluate(ws, name, "fp32 weights file", base, spec, splits, None, fp32_bytes, reference)
        fp32.stored_bytes, fp32.ratio = fp32_bytes, 1.0
        rows.append(fp32)
        source = torch_source(base, spec)
        for technique, recipe in RECIPES[name].items():
            if quick:
                recipe = {**copy.deepcopy(recipe), "finetune": QUICK_FINETUNE}
            t = time.perf_counter()
            # not from the stage cache: packing needs the live module (a hashed layer's seed)
            compressed, _ = ws.compress(source, recipe_from_dict(recipe), splits, cached=False)
            row = _evaluate(ws, name, technique, compressed.module, spec, splits, fp32.top1, fp32_bytes, reference)
            row.seconds = time.perf_counter() - t
            rows.append(row)
            print(f"  {name}: {technique}: {row.stored_bytes:,} B ({row.ratio:.1f}x), top-1 {row.top1:.2%}, "
                  f"{row.seconds:.0f} s", file=sys.stderr)
    settings = BenchSettings(threads=1, iterations=iterations, warmup=20)
    r = interleave([Subject((row.model, row.technique), row.artifact, settings, group=row.model)
                    for row in rows if row.artifact is not None], rounds)
    _latency(rows, r)
    return rows


def _latency(rows: list[Row], r: Rounds) -> None:
    for row in rows:
        key, base = (row.model, row.technique), (row.model, "fp32 weights file")
        row.latency_ms, row.p50, row.vs_fp32 = r.series(key), r.median(key), r.ratio(base, key).median


def render(rows: list[Row]) -> str:
    lines = []
    head = (f"{'model':<14} {'technique':<24} {'stored B':>10} {'ratio':>7} {'top-1':>7} {'drop pt':>8} "
            f"{'MACs':>11} {'params':>8} {'ORT p50 ms':>10} {'vs fp32':>8}")
    lines += [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.model:<14} {r.technique:<24} {r.stored_bytes:>10,} {r.ratio:>6.1f}x {r.top1:>7.2%} "
                     f"{r.drop_pts:>+8.2f} {r.macs:>11,} {r.params:>8,} {r.p50:>10.4f} {r.vs_fp32:>7.2f}x")
    lines.append("")
    lines.append("Deep Compression stages (bytes of the state dict; archive = the .epk file with header and hash):")
    for r in rows:
        if r.technique.startswith("prune") and r.stages:
            s = r.stages
            lines.append(f"  {r.model:<14} dense {s['dense']:>9,} -> pruned {s['pruned']:>8,} "
                         f"({s['dense'] / s['pruned']:.1f}x) -> shared {s['shared']:>7,} ({s['dense'] / s['shared']:.1f}x)"
                         f" -> Huffman {s['huffman']:>7,} ({s['dense'] / s['huffman']:.1f}x) -> archive "
                         f"{s['archive']:>7,} ({s['dense'] / s['archive']:.1f}x)")
    lines.append("")
    goals: dict[str, tuple[dict[str, float] | None, float]] = {
        "prune + share + Huffman": ({"lenet-300-100": 50.0, "example": 35.0}, 0.5),
        "low-rank (1/2 MACs)": (None, 1.0), "hashing (1/8 params)": (None, 2.0)}
    for r in rows:
        if r.technique not in goals:
            continue
        ratios, max_drop = goals[r.technique]
        want = ratios.get(r.model) if ratios else None
        ok = r.drop_pts <= max_drop and (want is None or r.ratio >= want)
        extra = f", ratio {r.ratio:.1f}x >= {want:.0f}x" if want else ""
        if r.technique.startswith("low-rank"):
            extra = f", MACs {r.macs / rows[[x.model for x in rows].index(r.model)].macs:.2f} of fp32"
        lines.append(f"  {'met ' if ok else 'MISS'} {r.model}: {r.technique}: drop {r.drop_pts:+.2f} <= {max_drop} pt{extra}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap, rounds=3, iterations=300,
                  quick="tiny fine-tunes, LeNet trained 2 epochs, 2 rounds of 50 iterations: a smoke run (the "
                        "goals are not expected to be met)")
    ap.add_argument("--only", choices=["example", "lenet-300-100"], help="one model only")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.iterations = 2, 50
    torch.set_num_threads(1)  # a shared machine: more threads than free cores makes torch crawl
    t0 = time.perf_counter()
    with Workspace.temporary(args.no_cache) as ws:
        rows = run(ws, args.rounds, args.iterations, args.only, args.quick)
    print(render(rows))
    print(f"\n{time.perf_counter() - t0:.0f} s, torch on {torch.get_num_threads()} thread; this machine is shared with "
          "other jobs, so latency is noisy: compare the ratios, measured side by side in one run.")
    if args.json:
        out: list[dict[str, Any]] = [{**r.__dict__, "artifact": None} for r in rows]
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
