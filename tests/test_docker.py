"""Runtime images: the Dockerfile templates (lint-clean), the self-contained build context (release, the
platform's wheels pinned by sha256, the bench worker, the test split), and, with a real Docker engine
(marked ``docker``), images built and run for amd64 and for arm64 under QEMU, with the arm64 image's
answers compared with this host's run of the same file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "edgepipe" / "ship" / "dockerfiles"


@pytest.mark.parametrize("dockerfile", sorted(p.name for p in TEMPLATES.glob("*.Dockerfile")))
def test_dockerfile_templates_are_lint_clean_offline_and_pin_their_base(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run([hadolint, "--failure-threshold", "info", str(TEMPLATES / dockerfile)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    from dockerfile_parse import DockerfileParser

    p = DockerfileParser(str(TEMPLATES / dockerfile))
    froms = p.parent_images  # ARG defaults substituted
    assert froms and all(":" in f and "$" not in f and not f.endswith(":latest") for f in froms), froms
    runs = [i["value"] for i in p.structure if i["instruction"] == "RUN"]
    # every pip install is offline and hash-checked: nothing is fetched while building
    assert runs and all("--no-index" in r and "--require-hashes" in r for r in runs if "pip install" in r)
    assert any(i["instruction"] == "COPY" and i["value"].startswith("release/ /release") for i in p.structure)
    assert any(i["instruction"] == "ENTRYPOINT" and "edgepipe-worker.pyz" in i["value"] for i in p.structure)


def test_context_is_self_contained_and_pinned(releases, tmp_path):
    from edgepipe import api
    from edgepipe.release import MANIFEST
    from edgepipe.types import Manifest

    rel = releases["cpu-int8"]
    ctx = api.docker_context(rel, "linux/amd64", tmp_path / "ctx")
    d = ctx.directory
    assert (d / "Dockerfile").read_text().count("ARG BASE_IMAGE=python:3.11-slim-bookworm") == 1
    for f in rel.iterdir():  # the release, byte for byte
        assert (d / "release" / f.name).read_bytes() == f.read_bytes()
    lock = (d / "requirements.lock").read_text()
    tools = Manifest.read(rel / MANIFEST).tools
    assert f"onnxruntime=={tools['onnxruntime']} --hash=sha256:" in lock and f"numpy=={tools['numpy']} " in lock
    pins = re.findall(r"^(\S+)==(\S+) --hash=sha256:([0-9a-f]{64})$", lock, re.M)
    wheels = sorted((d / "wheels").glob("*.whl"))
    assert len(pins) == len(wheels) == ctx.wheels > 2
    digests = {hashlib.sha256(w.read_bytes()).hexdigest() for w in wheels}
    assert digests == {h for _, _, h in pins}
    assert all("x86_64" in w.name or "none-any" in w.name or "abi3" in w.name for w in wheels), wheels
    with np.load(d / "eval.npz") as z:
        acc = Manifest.read(rel / MANIFEST).accuracy
        assert len(z["y"]) == acc.samples and z["x"].shape[1:] == (1, 32, 32)
    import zipfile

    with zipfile.ZipFile(d / "edgepipe-worker.pyz") as z:
        names = z.namelist()
    assert "__main__.py" in names and "edgepipe/harness/worker.py" in names
    assert json.loads((d / "context.json").read_text())["platform"] == "linux/amd64"
    # the same release again: the wheels come from the cache, the context is byte-identical
    again = api.docker_context(rel, "linux/amd64", tmp_path / "ctx2")
    assert (again.directory / "requirements.lock").read_text() == lock


def test_arm64_context_takes_the_boards_wheels(releases, tmp_path):
    from edgepipe import api

    ctx = api.docker_context(releases["arm64-cpu-int8"], "linux/arm64", tmp_path / "ctx")
    names = [w.name for w in (ctx.directory / "wheels").glob("*.whl")]
    assert any(n.startswith("ai_edge_litert-") and "aarch64" in n for n in names), names
    assert not any("x86_64" in n for n in names), names


def test_tensorrt_context_is_structurally_sound(tmp_path):
    """TensorRT images need NVIDIA's base images, which cannot be pulled here: the context is written and
    checked, not built."""
    from dockerfile_parse import DockerfileParser

    from edgepipe import api

    api.build(None, ["jetson-orin-nano-int8"], out=tmp_path / "dist", bench=False)
    ctx = api.docker_context(tmp_path / "dist" / "jetson-orin-nano-int8", "linux/arm64", tmp_path / "ctx")
    d = ctx.directory
    assert ctx.base_image == "nvcr.io/nvidia/l4t-jetpack:r36.4.0" and ctx.python == "3.10"
    p = DockerfileParser(str(d / "Dockerfile"))
    assert p.parent_images == ["nvcr.io/nvidia/l4t-jetpack:r36.4.0"]
    lock = (d / "requirements.lock").read_text()
    assert "cuda-python==12.6.2.post1" in lock and "numpy==1.26.4" in lock
    assert all("cp310" in w.name or "abi3" in w.name or "none-any" in w.name for w in (d / "wheels").glob("*.whl"))
    assert (d / "src" / "edgepipe" / "cli.py").is_file() and (d / "release" / "tensorrt-bundle.json").is_file()


def test_bad_inputs_say_what_to_do(releases, tmp_path, cli_error):
    line = cli_error("docker", "build", str(tmp_path), "--platform", "linux/amd64", "--tag", "x:1",
                     "--context", str(tmp_path / "c"))
    assert "not a release directory" in line and "edgepipe build" in line
    # a base whose Python is too old for the numpy the release was verified with: named, nothing written
    line = cli_error("docker", "build", str(releases["cpu-int8"]), "--platform", "linux/arm64", "--tag", "x:1",
                     "--python", "3.9", "--context", str(tmp_path / "c"))
    assert "no wheel of numpy==" in line and "linux/arm64" in line and "3.9" in line
    assert not (tmp_path / "c").exists()
    # a package with no aarch64 wheels at all (Intel's MKL)
    from edgepipe.errors import ConfigError
    from edgepipe.ship.wheels import wheelhouse

    with pytest.raises(ConfigError, match=r"no wheel of mkl==2025\.3\.0 exists for linux/arm64"):
        wheelhouse({"mkl": "2025.3.0"}, "linux/arm64", cache=tmp_path / "w")


def test_no_engine_still_writes_the_context(releases, tmp_path, cli_error, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/nothing.sock")
    line = cli_error("docker", "build", str(releases["cpu-int8"]), "--platform", "linux/amd64", "--tag", "x:1",
                     "--context", str(tmp_path / "c"))
    assert "no Docker" in line and "docker.io" in line and str(tmp_path / "c") in line
    assert (tmp_path / "c" / "Dockerfile").is_file() and (tmp_path / "c" / "requirements.lock").is_file()


def test_bench_runs_without_torch(releases):
    """The bench worker (what the images and boards run) must not need torch."""
    block = releases["cpu-int8"].parent / "block"
    block.mkdir(exist_ok=True)
    (block / "sitecustomize.py").write_text("import sys\nfor m in ('torch', 'onnxscript', 'sklearn'):\n    sys.modules[m] = None\n")
    env = {**os.environ, "PYTHONPATH": f"{block}{os.pathsep}{ROOT}"}
    r = subprocess.run([sys.executable, "-m", "edgepipe", "bench", str(releases["cpu-int8"]), "--iterations", "5",
                        "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["p50_ms"] > 0


# ---------------------------------------------------------------------------------------------------------
# built and run for real


def _build_run(docker_engine, bases, release: Path, platform: str, tag: str, tmp: Path, verify: bool = False):
    from edgepipe import api

    built = api.docker_build(release, platform, tag, context=tmp / tag.replace("/", "_").replace(":", "_"),
                             base_image=bases[platform])
    assert built["image"]["platform"] == platform
    assert docker_engine.image_arch(tag) == platform.split("/")[1]
    return built, api.docker_run(tag, verify=verify, iterations=10, warmup=2)


@pytest.mark.docker
@pytest.mark.parametrize("target,family", [("cpu-int8", "onnxruntime"), ("intel-cpu-int8", "openvino")])
def test_amd64_image_builds_offline_and_benchmarks_its_release(docker_engine, bases, releases, tmp_path, target,
                                                                family):
    built, m = _build_run(docker_engine, bases, releases[target], "linux/amd64", f"edgepipe-test/{target}:1",
                          tmp_path, verify=True)
    assert m.backend == family and m.p50_ms > 0 and m.iterations == 10
    assert m.host["machine"] == "x86_64" and m.emulated is None
    ev = m.eval
    assert ev["samples"] == 359 and ev["top1"] == pytest.approx(ev["release_top1"])
    assert ev["comparison"]["agreement"] == 1.0  # same machine, same runtime version: same answers


@pytest.mark.docker
@pytest.mark.parametrize("target,family", [("arm64-cpu-int8", "tflite"), ("cpu-int8", "onnxruntime")])
def test_arm64_image_runs_under_emulation_and_matches_x86(docker_engine, bases, releases, tmp_path, capsys, target,
                                                          family):
    from edgepipe.cli import main

    rel = releases[target]
    tag = f"edgepipe-test/{target}:arm64"
    with pytest.raises(SystemExit) as e:
        main(["docker", "build", str(rel), "--platform", "linux/arm64", "--tag", tag,
              "--base-image", bases["linux/arm64"], "--context", str(tmp_path / "ctx"), "--json"])
    assert e.value.code == 0
    built = json.loads(capsys.readouterr().out)
    assert built["image"]["platform"] == "linux/arm64" and built["image"]["builder"] in ("buildx", "classic")
    with pytest.raises(SystemExit) as e:
        main(["docker", "run", tag, "--verify", "--iterations", "10", "--warmup", "2", "--json"])
    assert e.value.code == 0
    m = json.loads(capsys.readouterr().out)
    assert m["backend"] == family
    assert m["host"]["machine"] == "aarch64" and m["host"]["emulated"] == "qemu-user"
    c = m["eval"]["comparison"]
    # the runtime's aarch64 kernels against this host's x86-64 ones, same file, same 359 samples
    assert c["samples"] == 359 and c["there"].endswith("emulated by qemu-user)")
    assert c["agreement"] >= 0.99, c
    if family == "tflite":  # int8 logits: at most a quantization step or two apart
        meta = json.loads((rel / "manifest.json").read_text())["artifact"]["metadata"]
        assert c["max_abs_logit_diff"] <= 2 * meta["tensors"]["outputs"][0]["scale"] + 1e-6, c
    else:
        assert c["max_abs_logit_diff"] < 0.1, c
    print(f"{target} arm64 vs x86: {c}", file=sys.stderr)


@pytest.mark.docker
def test_a_base_root_leaves_out_docs_translations_and_certificates(bases):
    """The bases are slim: what nothing in an image reads is not unpacked (nor, under QEMU, processed)."""
    import tarfile

    from conftest import BASES_CACHE, BOARD_PACKAGES

    from edgepipe.ship import base

    for platform, extra in (("linux/amd64", ()), ("linux/arm64", BOARD_PACKAGES)):
        tar, _, cached = base.rootfs(platform, (*base.DEFAULT_PACKAGES, *extra), cache=BASES_CACHE)
        assert cached  # the one the bases fixture made
        with tarfile.open(tar) as t:
            names = [n.lstrip("./") for n in t.getnames()]
        assert "usr/bin/python3" in names and "usr/lib/python3.11/venv/__init__.py" in names
        for d in ("usr/share/doc/", "usr/share/man/", "usr/share/locale/", "usr/share/ca-certificates/"):
            assert not [n for n in names if n.startswith(d) and n != d], (platform, d)


@pytest.mark.docker
def test_an_absent_base_or_image_says_what_to_do(docker_engine, releases, tmp_path, cli_error):
    line = cli_error("docker", "build", str(releases["cpu-int8"]), "--platform", "linux/amd64", "--tag", "x:1",
                     "--base-image", "edgepipe-test/absent-base:1", "--context", str(tmp_path / "c"))
    assert "the base image edgepipe-test/absent-base:1 is not in this engine" in line
    assert "edgepipe docker base --platform linux/amd64" in line
    assert (tmp_path / "c" / "Dockerfile").is_file()  # the context stays for a build elsewhere
    line = cli_error("docker", "run", "edgepipe-test/never-built:1")
    assert "no image edgepipe-test/never-built:1" in line and "edgepipe docker build" in line


@pytest.fixture(scope="module")
def two_input_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image-and-vector model (two inputs) released for onnxruntime int8, with random labels (its top-1 is
    far from 100, so an image that scored other outputs or other samples would not reproduce it)."""
    from edgepipe import api
    from edgepipe.models.tasks import TASKS

    root = tmp_path_factory.mktemp("two-input")
    task = TASKS["image_vector"]
    np.savez(root / "iv.npz", **task.inputs(), y=np.random.default_rng(1).integers(0, 10, task.samples))
    (root / "iv-int8.toml").write_text('backend = "onnxruntime"\nprecision = "int8"\n[runtime]\nthreads = 1\n'
                                       '[calibration]\nsamples = 64\n')
    res = api.build("edgepipe.models.tasks:image_vector", [str(root / "iv-int8.toml")], out=root / "dist",
                    data=str(root / "iv.npz"), input_shape=task.shapes, bench=False, allow_accuracy_drop=True)
    return res.results[0].release_dir


@pytest.mark.docker
@pytest.mark.parametrize("platform", ["linux/amd64", "linux/arm64"])
def test_a_two_input_models_image_is_verified_by_its_metric_output_by_output(docker_engine, bases, two_input_release,
                                                                              tmp_path, capsys, platform):
    from edgepipe.cli import main

    rel = two_input_release
    acc = json.loads((rel / "manifest.json").read_text())["accuracy"]
    arch = platform.split("/")[1]
    tag = f"edgepipe-test/two-input:{arch}"
    with pytest.raises(SystemExit) as e:
        main(["docker", "build", str(rel), "--platform", platform, "--tag", tag, "--base-image", bases[platform],
              "--context", str(tmp_path / "ctx"), "--json"])
    assert e.value.code == 0, capsys.readouterr().err
    capsys.readouterr()
    with np.load(tmp_path / "ctx" / "eval.npz") as z:  # every input under its name, and the labels
        assert sorted(z.files) == ["feats", "image", "y"] and z["image"].shape == (48, 3, 16, 16)
    with pytest.raises(SystemExit) as e:
        main(["docker", "run", tag, "--verify", "--iterations", "5", "--warmup", "1", "--json"])
    assert e.value.code == 0, capsys.readouterr().err
    m = json.loads(capsys.readouterr().out)
    ev = m["eval"]
    assert m["host"]["machine"] == {"amd64": "x86_64", "arm64": "aarch64"}[arch] and ev["platform"] == platform
    assert ev["metric"] == "top1" and ev["samples"] == ev["of"] == acc["samples"] == 48
    assert ev["release_value"] == acc["value"] and 0 < acc["value"] < 60
    (out,) = ev["comparison"]["outputs"]
    assert out["name"] == "logits" and out["shape"] == [48, 10]
    if arch == "amd64":  # the same file, the same onnxruntime, the same machine: the same answers
        assert ev["value"] == pytest.approx(acc["value"]) and out["sqnr_db"] >= 100 and out["agreement"] == 1.0
    else:  # onnxruntime's aarch64 int8 kernels under QEMU against this host's x86-64 ones
        assert abs(ev["value"] - acc["value"]) <= 100 / 48 + 1e-9, ev
        assert out["sqnr_db"] > 30 and out["agreement"] >= 0.97, out
    print(f"two-input image {platform}: {ev['metric']} {ev['value']:.2f} (release {acc['value']:.2f}), "
          f"SQNR {out['sqnr_db']:.1f} dB, agreement {out['agreement']:.2%}", file=sys.stderr)
