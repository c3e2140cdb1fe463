"""Docker images built and run for real: build time per image (layer cache off), image size, what each
image's run measured and where, and the arm64 LiteRT answers against this host's x86 run of the same file.

Needs a running Docker engine (DOCKER_HOST or the default socket) and, for arm64 on x86, qemu-user-static
registered with binfmt (see docs/how-to/docker.md); root or user namespaces to make the bases.

    python bench/bench_docker.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from edgepipe import api

IMAGES = [("cpu-int8", "linux/amd64"), ("intel-cpu-int8", "linux/amd64"), ("cpu-int8", "linux/arm64"),
          ("arm64-cpu-int8", "linux/arm64")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer timed iterations in each image")
    args = ap.parse_args()
    iterations = 20 if args.quick else 200
    from edgepipe.ship import base

    bases = {}
    for platform in ("linux/amd64", "linux/arm64"):
        t0 = time.perf_counter()
        b = api.docker_base(platform)
        bases[platform] = b.tag
        how = "cached root" if b.cached else f"root made in {b.seconds:.0f} s"
        print(f"base {b.tag}: {how}, loaded in {time.perf_counter() - t0:.0f} s ({base.default_mirror()})")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dist = Path(tmp) / "dist"
        api.build(None, sorted({t for t, _ in IMAGES}), out=dist, bench=False)
        for target, platform in IMAGES:
            arch = platform.split("/")[1]
            tag = f"edgepipe-bench/{target}:{arch}"
            t0 = time.perf_counter()
            built = api.docker_build(dist / target, platform, tag, context=Path(tmp) / f"ctx-{target}-{arch}",
                                     base_image=bases[platform], no_cache=True)
            total = time.perf_counter() - t0
            m = api.docker_run(tag, verify=True, iterations=iterations, warmup=5)
            c = (m.eval or {}).get("comparison") or {}
            rows.append((f"{target} ({m.backend})", platform, f"{total:.0f}", f"{built['image']['seconds']:.0f}",
                         f"{built['image']['size_bytes'] / 1e6:.0f}", f"{m.p50_ms:.3f}",
                         "qemu-user" if m.emulated else "native", f"{m.eval['top1']:.2%}",
                         f"{c.get('agreement', float('nan')):.2%}", f"{c.get('max_abs_logit_diff', float('nan')):.4g}"))
            print(f"{tag}: {built['image']['builder']} builder; {c}", file=sys.stderr)
    head = ("image (runtime)", "platform", "context+build s", "build s", "MB", "p50 ms", "ran", "top-1 there",
            "agree w/ x86", "max abs dlogit")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print("p50 under qemu-user proves function only; build s: `docker build --no-cache` (offline, from the "
          "context's wheels); context+build s includes writing the context (wheels from the cache).")


if __name__ == "__main__":
    main()
