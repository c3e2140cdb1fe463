"""Untrusted files never run code: .pt2 and TorchScript need --trust-code, an archive never picks the code
that rebuilds it, the current directory never shadows installed packages, a board cannot smuggle ssh options.

Every crafted file is made here, and every refusal is one line, writes nothing and runs nothing.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from edgepipe.errors import ConfigError, ModelLoadError
from edgepipe.models import EXAMPLE, load_model


def _cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgepipe", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200", **(env or {})}, timeout=300)


def _one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1, r.stdout + r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    return errors[0]


class _Touch:
    """Unpickling this creates ``path``: what a hostile file would do, harmlessly."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.path, "w"))


def _hostile_pt2(tmp_path: Path, marker: Path) -> Path:
    """A real torch.export program whose first weight is a pickle that creates ``marker`` when loaded."""
    ep = torch.export.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),))
    torch.export.save(ep, str(tmp_path / "real.pt2"))
    out = tmp_path / "hostile.pt2"
    with zipfile.ZipFile(tmp_path / "real.pt2") as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("model_weights_config.json"):
                cfg = json.loads(data)
                cfg["config"]["weight"]["use_pickle"] = True
                data = json.dumps(cfg).encode()
            elif info.filename.endswith("weights/weight_0"):
                data = pickle.dumps(_Touch(marker))
            dst.writestr(info.filename, data)
    (tmp_path / "real.pt2").unlink()
    return out


# ---------------------------------------------------------------------------------------------------------
# .pt2 and TorchScript: code, loaded only with --trust-code


def test_hostile_pt2_is_refused_as_model_and_as_weights_and_runs_only_when_trusted(tmp_path):
    marker = tmp_path / "ran"
    pt2 = _hostile_pt2(tmp_path, marker)
    with pytest.raises(ModelLoadError, match=r"weights_only=False.*it was not loaded: pass --trust-code"):
        load_model(str(pt2))
    with pytest.raises(ModelLoadError, match=r"weights file .* is a torch.export program.*--trust-code"):
        load_model(EXAMPLE, pt2)
    assert not marker.exists()
    # the file is a real exploit: trusted, torch.export.load runs its pickle (and then fails on the garbage)
    with pytest.raises(ModelLoadError):
        load_model(str(pt2), trust_code=True)
    assert marker.exists()


def test_torchscript_model_needs_trust(tmp_path):
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), str(path))
    with pytest.raises(ModelLoadError, match=r"is a TorchScript archive, which is code.*--trust-code"):
        load_model(str(path))
    assert load_model(str(path), trust_code=True).module is not None


@pytest.mark.parametrize("how", ["model", "weights"])
def test_cli_refuses_a_hostile_pt2_in_one_line_and_writes_nothing(how, tmp_path):
    marker = tmp_path / "ran"
    pt2 = _hostile_pt2(tmp_path, marker)
    out = tmp_path / "dist"
    args = [str(pt2)] if how == "model" else [EXAMPLE, "--weights", str(pt2)]
    line = _one_error_line(_cli("build", *args, "-t", "cpu-int8", "--out", str(out), "--no-bench"))
    assert "it was not loaded: pass --trust-code" in line
    assert not marker.exists() and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.pt2"]


def test_pipeline_trust_reaches_the_model_load_and_the_compress_cache_trusts_its_own_files(tmp_path):
    """api.build(trust_code=True) loads a .pt2 model; the compress stage's cached .pt2 (edgepipe's own,
    verified by hash) loads without the user's flag."""
    from edgepipe import api
    from edgepipe.config.recipe import load_recipe
    from edgepipe.models import save_program
    from edgepipe.pipeline import stages
    from edgepipe.pipeline.cache import Cache

    pt2 = save_program(load_model(None).module, (1, 1, 32, 32), tmp_path / "m.pt2")
    with pytest.raises(ModelLoadError, match="--trust-code"):
        api.compile(str(pt2), "cpu-fp32", out=tmp_path / "dist")
    assert not (tmp_path / "dist").exists()
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[steps]]\ntechnique = "magnitude_prune"\nsparsity = 0.3\n')
    src, rec, cache = load_model(None), load_recipe(recipe), Cache(tmp_path / "cache")
    splits = stages.data_splits("digits", (1, 1, 32, 32))
    stages.compress(src, rec, splits, cache)
    hit, record = stages.compress(src, rec, splits, cache)  # from the cache: loads the cached .pt2
    assert record.cached and hit.module is not None


# ---------------------------------------------------------------------------------------------------------
# unpack: the user names the factory; the archive's is only compared


def _archive_naming(tmp_path: Path, spec: str) -> Path:
    from edgepipe.package import archive

    path = tmp_path / "m.epk"
    data, _ = archive.encode(torch.nn.Linear(3, 2), spec)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("spec", ["os:abort", "evilmod:make", "model.pt2"])
def test_unpack_never_imports_the_factory_an_archive_names(spec, tmp_path, monkeypatch):
    from edgepipe import api

    monkeypatch.chdir(tmp_path)
    (tmp_path / "evilmod.py").write_text("open('ran', 'w').close()\ndef make():\n    return None\n")
    epk = _archive_naming(tmp_path, spec)
    with pytest.raises(ModelLoadError, match=rf"packed for the factory '{spec}', not '{EXAMPLE}'"):
        api.unpack(epk, tmp_path / "w.safetensors")
    assert "evilmod" not in sys.modules and not (tmp_path / "ran").exists()
    assert not (tmp_path / "w.safetensors").exists()


def test_unpack_cli_compares_factories_and_library_restore_needs_one(tmp_path):
    from edgepipe.package import archive

    (tmp_path / "evilmod.py").write_text("open('ran', 'w').close()\ndef make():\n    return None\n")
    epk = _archive_naming(tmp_path, "evilmod:make")
    line = _one_error_line(_cli("unpack", str(epk), "--out", "w.safetensors", cwd=tmp_path))
    assert "'evilmod:make'" in line and f"'{EXAMPLE}'" in line and "--factory" in line
    line = _one_error_line(_cli("unpack", str(epk), "--out", "w.safetensors", "--factory", "other.mod:fn",
                                cwd=tmp_path))
    assert "'evilmod:make', not 'other.mod:fn'" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evilmod.py", "m.epk"]
    with pytest.raises(ModelLoadError, match="not bundled with edgepipe; name the factory"):
        archive.restore(archive.read(epk))
    assert "evilmod" not in sys.modules


# ---------------------------------------------------------------------------------------------------------
# the current directory never shadows an installed package


def test_current_directory_never_shadows_installed_packages(tmp_path):
    (tmp_path / "sklearn").mkdir()
    (tmp_path / "sklearn" / "__init__.py").write_text("open('shadowed', 'w').close()\nraise ImportError('fake')\n")
    (tmp_path / "mymodel.py").write_text(
        "import sklearn\nfrom edgepipe.models.example import DigitsResNet\n"
        "def net():\n    return DigitsResNet()\n")
    code = ("import sys, os, sklearn.datasets as d; from edgepipe.models import load_model; load_model(None); "
            "src = load_model('mymodel:net'); import sklearn; "
            "print(sklearn.__file__.startswith(os.getcwd()), sys.path[-1] == os.getcwd(), src.spec)")
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True", "mymodel:net"]  # the user's module found, last on sys.path
    # `python -m edgepipe` itself would put the directory first; the CLI takes it off
    r = _cli("export", "--out", "m.onnx", cwd=tmp_path)  # loads the example and the digits (sklearn)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "shadowed").exists()


def test_factory_that_does_not_compile_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "broken_model.py").write_text("def net(:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"module 'broken_model' does not compile: .*line 1"):
        load_model("broken_model:net")


# ---------------------------------------------------------------------------------------------------------
# ssh: no option injection


@pytest.mark.parametrize("kwargs", [{"host": "-oProxyCommand=touch x"}, {"host": "h", "user": "-lroot"},
                                    {"host": "h", "workdir": "-rf"}, {"host": "h b"},
                                    {"host": "h", "ssh_options": ("ProxyCommand=touch x",)},
                                    {"host": "h", "ssh_options": ("LocalCommand touch x",)}])
def test_board_refuses_option_injection(kwargs):
    from edgepipe.config import Board

    with pytest.raises(ConfigError, match="board"):
        Board(**kwargs)


def test_board_in_a_target_file_is_checked(tmp_path):
    from edgepipe.config import load_target

    f = tmp_path / "t.toml"
    f.write_text('backend = "onnxruntime"\nprecision = "fp32"\n[board]\nhost = "-oProxyCommand=sh"\n')
    with pytest.raises(ConfigError, match=r"t.toml.*board.host = '-oProxyCommand=sh': must not .* start with '-'"):
        load_target(f)


def test_ssh_and_scp_put_double_dash_before_the_destination(monkeypatch, tmp_path):
    from edgepipe.config import Board
    from edgepipe.harness import remote

    calls: list[list[str]] = []

    monkeypatch.setattr(remote, "_bounded_run", lambda cmd, *a: calls.append(cmd) or (0, "", "", None))
    ssh = remote.SSH(Board(host="pi.local", user="pi", ssh_options=("ConnectTimeout=5",)))
    ssh.run("true", "x")
    ssh.copy([tmp_path / "a"], "/tmp/w")
    assert [c[0] for c in calls] == ["ssh", "scp"]
    for cmd in calls:
        dd = cmd.index("--")  # everything after it is an operand, never an option
        dest = next(i for i, a in enumerate(cmd) if a.startswith("pi@pi.local"))
        assert dd < dest and not any(a.startswith("-") for a in cmd[dd + 1:]), cmd


def test_cli_device_option_injection_is_one_line(example_onnx, tmp_path, cli_error):
    line = cli_error("bench", str(example_onnx.path), "--device", f"-oProxyCommand=touch {tmp_path}/x")
    assert "must not be empty or start with '-'" in line
    assert not (tmp_path / "x").exists()
