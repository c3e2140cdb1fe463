"""Compression bench: Deep Compression (prune + weight sharing + Huffman), low-rank, HashedNets.

Two models on the same digits data (1x32x32; evaluation split held out as everywhere in edgepipe):
the bundled example ResNet, and a LeNet-300-100 MLP on the flattened 32x32 input (1024-300-100-10),
trained here, seeded. For each: the fp32 weights file, then each technique's model packed into an
``.epk`` archive (what an over-the-air update would ship), restored from that archive, and measured:
stored bytes, ratio to the fp32 weights file, top-1 of the restored model, MACs, and onnxruntime p50
latency (fresh worker per measurement, 1 thread, all configurations interleaved over several rounds,
median of the rounds). Goals (issue 7): prune+share+Huffman >= 50x (LeNet) / >= 35x (example) with
<= 0.5 pt top-1 drop; low-rank at half the MACs <= 1 pt; hashing at 1/8 of the parameters <= 2 pt.

    PYTHONPATH=. python bench/compression.py [--rounds 3] [--json out.json]

Pruning is the ``magnitude_prune`` technique (edgepipe/compress/prune.py); the bench stops with a
message if it is not registered.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
# run as a script, bench/ would be first on sys.path and its files could shadow packages (bench/openvino.py)
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from edgepipe.compress import apply_recipe, recipe_from_dict, techniques  # noqa: E402
from edgepipe.package import archive  # noqa: E402
from edgepipe.compress._stats import count_macs, top1  # noqa: E402
from edgepipe.data import Splits, digits, split  # noqa: E402

EXAMPLE = "edgepipe.models.example:digits_resnet"
LENET = "edgepipe.models.lenet:lenet_300_100"

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
    onnx: Path | None = None
    latency_ms: list[float] = field(default_factory=list)
    stages: dict[str, int] | None = None
    seconds: float = 0.0

    @property
    def p50(self) -> float:
        return statistics.median(self.latency_ms) if self.latency_ms else float("nan")


def train_lenet(splits: Splits, epochs: int = 40) -> nn.Module:
    """LeNet-300-100 on the flattened 32x32 digits, seeded."""
    from edgepipe.compress.finetune import finetune
    from edgepipe.config.recipe import FinetuneConfig
    from edgepipe.models.lenet import lenet_300_100

    torch.manual_seed(0)
    model = lenet_300_100()
    return finetune(model, splits.train, FinetuneConfig(epochs=epochs, lr=1e-3, weight_decay=1e-4, seed=0))


def _stored_params(model: nn.Module) -> int:
    """Real parameters: a hashed layer counts its buckets, not its expanded weights."""
    n = 0
    for m in model.modules():
        spec = getattr(m, "edgepipe_hash", None)
        for name, p in m.named_parameters(recurse=False):
            n += spec.buckets if (spec is not None and name == "weight") else p.numel()
    return n


def _evaluate(name: str, technique: str, model: nn.Module, spec: str, splits: Splits, ref_top1: float,
              fp32_bytes: int, work: Path, reference: nn.Module) -> Row:
    from edgepipe.export import export

    data, report = archive.encode(model, spec, input_shape=(1, 1, 32, 32), reference=reference)
    restored = archive.restore(archive.decode(data))  # evaluate what an update would ship
    acc = top1(restored, splits.evaluation.x, splits.evaluation.y)
    example = torch.from_numpy(splits.evaluation.x[:1])
    onnx = export(restored, (1, 1, 32, 32), work / f"{name}-{len(list(work.iterdir()))}.onnx")
    return Row(name, technique, len(data), fp32_bytes / len(data), acc, round((ref_top1 - acc) * 100, 2),
               count_macs(restored, example), _stored_params(restored), onnx.path, stages=report.stages)


def _measure(rows: list[Row], rounds: int, iterations: int) -> None:
    from edgepipe.types import Artifact
    from edgepipe.harness import BenchSettings, measure

    settings = BenchSettings(threads=1, iterations=iterations, warmup=20)
    for r in range(rounds):
        for row in rows:  # interleaved: every configuration once per round
            m = measure(Artifact("onnxruntime", "fp32", row.onnx), settings)
            row.latency_ms.append(m.p50_ms)
        print(f"  latency round {r + 1}/{rounds} done", file=sys.stderr)


def run(rounds: int, iterations: int, only: str | None) -> list[Row]:
    from safetensors.torch import save_file

    from edgepipe.models import load_model

    if "magnitude_prune" not in techniques():
        raise SystemExit("bench/compression.py needs the magnitude_prune technique (edgepipe/compress/prune.py)")
    splits = split(digits((1, 32, 32)), calibration_samples=128)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="edgepipe-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        lenet = train_lenet(splits)
        print(f"trained LeNet-300-100 in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        models = {"example": (EXAMPLE, load_model(EXAMPLE).module), "lenet-300-100": (LENET, lenet)}
        for name, (spec, base) in models.items():
            if only and only != name:
                continue
            save_file(base.state_dict(), str(work / f"{name}.safetensors"))
            fp32_bytes = (work / f"{name}.safetensors").stat().st_size
            reference = load_model(spec).module
            ref_top1 = top1(base, splits.evaluation.x, splits.evaluation.y)
            rows.append(_evaluate(name, "fp32 weights file", base, spec, splits, ref_top1, fp32_bytes, work, reference))
            rows[-1].stored_bytes, rows[-1].ratio = fp32_bytes, 1.0
            for technique, recipe in RECIPES[name].items():
                t = time.perf_counter()
                import copy

                model, _ = apply_recipe(copy.deepcopy(base), recipe_from_dict(recipe), splits)
                row = _evaluate(name, technique, model, spec, splits, ref_top1, fp32_bytes, work, reference)
                row.seconds = time.perf_counter() - t
                rows.append(row)
                print(f"  {name}: {technique}: {row.stored_bytes:,} B ({row.ratio:.1f}x), top-1 {row.top1:.2%}, "
                      f"{row.seconds:.0f} s", file=sys.stderr)
        _measure(rows, rounds, iterations)
    return rows


def render(rows: list[Row]) -> str:
    lines = []
    head = (f"{'model':<14} {'technique':<24} {'stored B':>10} {'ratio':>7} {'top-1':>7} {'drop pt':>8} "
            f"{'MACs':>11} {'params':>8} {'ORT p50 ms':>10} {'vs fp32':>8}")
    lines += [head, "-" * len(head)]
    base: dict[str, Row] = {}
    for r in rows:
        base.setdefault(r.model, r)
        b = base[r.model]
        lines.append(f"{r.model:<14} {r.technique:<24} {r.stored_bytes:>10,} {r.ratio:>6.1f}x {r.top1:>7.2%} "
                     f"{r.drop_pts:>+8.2f} {r.macs:>11,} {r.params:>8,} {r.p50:>10.4f} {b.p50 / r.p50:>7.2f}x")
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
    goals = {"prune + share + Huffman": ({"lenet-300-100": 50.0, "example": 35.0}, 0.5),
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
    ap.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds (median reported)")
    ap.add_argument("--iterations", type=int, default=300, help="timed iterations per latency measurement")
    ap.add_argument("--only", choices=["example", "lenet-300-100"], help="one model only")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a shared machine: more threads than free cores makes torch crawl
    t0 = time.perf_counter()
    rows = run(args.rounds, args.iterations, args.only)
    print(render(rows))
    print(f"\n{time.perf_counter() - t0:.0f} s, torch on {torch.get_num_threads()} thread; this machine is shared with "
          "other jobs, so latency is noisy: compare the ratios, measured side by side in one run.")
    if args.json:
        args.json.write_text(json.dumps([{**r.__dict__, "onnx": None, "p50": r.p50} for r in rows], indent=1))


if __name__ == "__main__":
    main()
