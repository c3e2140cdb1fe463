"""docker/: one lint-clean Dockerfile per target family, a bake file covering every shipped target's backend,
and the runtime images' promise that running and measuring a release needs no torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
FAMILY = {"onnxruntime.Dockerfile": "onnxruntime", "openvino.Dockerfile": "openvino",
          "tflite.Dockerfile": "tflite", "tensorrt.Dockerfile": "tensorrt"}


def _bake() -> dict[str, dict]:
    import hcl2

    with open(DOCKER / "docker-bake.hcl") as f:
        data = hcl2.load(f)
    strip = lambda v: v.strip('"') if isinstance(v, str) else v  # noqa: E731
    out = {}
    for block in data["target"]:
        for name, body in block.items():
            out[strip(name)] = {strip(k): ({strip(a): strip(b) for a, b in v.items()} if isinstance(v, dict)
                                             else [strip(x) for x in v] if isinstance(v, list) else strip(v))
                                for k, v in body.items()}
    return out


@pytest.mark.parametrize("dockerfile", sorted(p.name for p in DOCKER.glob("*.Dockerfile")))
def test_dockerfile_is_lint_clean_and_pins_its_base(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run([hadolint, "--failure-threshold", "info", str(DOCKER / dockerfile)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    from dockerfile_parse import DockerfileParser

    p = DockerfileParser(str(DOCKER / dockerfile))
    froms = p.parent_images  # ARG defaults substituted
    assert froms and all(":" in f and "$" not in f and not f.endswith(":latest") for f in froms), froms
    assert any(i["instruction"] == "ARG" and i["value"].startswith("RELEASE=") for i in p.structure)
    assert any(i["instruction"] == "COPY" and i["value"].startswith("${RELEASE} /release") for i in p.structure)


def test_bake_targets_point_at_real_dockerfiles_and_targets():
    from edgepipe.config import load_target, target_files

    bake = {k: v for k, v in _bake().items() if not k.startswith("_")}
    assert bake
    shipped = target_files()
    for name, t in bake.items():
        dockerfile = ROOT / t["dockerfile"]
        assert dockerfile.is_file(), name
        assert t["platforms"] and all(p in ("linux/amd64", "linux/arm64") for p in t["platforms"])
        release = t["args"]["RELEASE"]
        target_name = release.removeprefix("dist/")
        if target_name in shipped:  # each default release names a shipped target of the image's family
            assert load_target(target_name).backend == FAMILY[dockerfile.name], name


def test_every_backend_of_a_shipped_target_has_an_image():
    from edgepipe.config import load_target, target_files

    covered = {FAMILY[Path(t["dockerfile"]).name] for t in _bake().values() if "dockerfile" in t}
    needed = {load_target(p).backend for p in target_files().values()}
    assert needed <= covered, f"no image for {needed - covered}"


def test_bench_runs_without_torch(tmp_path):
    """The runtime images install edgepipe with --no-deps and no torch: `edgepipe bench` must not need it."""
    from edgepipe import api

    api.build(None, ["cpu-int8"], out=tmp_path / "dist", bench=False)
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nfor m in ('torch', 'onnxscript', 'sklearn'):\n    sys.modules[m] = None\n")
    env = {**os.environ, "PYTHONPATH": f"{block}{os.pathsep}{ROOT}"}
    r = subprocess.run([sys.executable, "-m", "edgepipe", "bench", str(tmp_path / "dist" / "cpu-int8"),
                        "--iterations", "5", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["p50_ms"] > 0
