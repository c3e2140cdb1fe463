"""Isolated converter toolchains: what counts as installed, and that a failed install never does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgepipe import toolchains
from edgepipe.errors import BackendUnavailable


@pytest.fixture
def empty_root(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPIPE_TOOLCHAINS_DIR", str(tmp_path / "tc"))
    return tmp_path / "tc"


def test_absent_and_half_installed_toolchains_are_not_used(empty_root):
    st = toolchains.status("tflite")
    assert not st.installed and "edgepipe toolchain install tflite" in st.reason
    (empty_root / "tflite" / "venv" / "bin").mkdir(parents=True)
    (empty_root / "tflite" / "venv" / "bin" / "python").symlink_to(sys.executable)
    st = toolchains.status("tflite")
    assert not st.installed and "half-installed" in st.reason  # a venv without the marker
    with pytest.raises(BackendUnavailable, match="edgepipe toolchain install tflite"):
        toolchains.python("tflite")


def test_a_marker_from_other_pins_is_not_used(empty_root):
    (empty_root / "tflite" / "venv" / "bin").mkdir(parents=True)
    (empty_root / "tflite" / "venv" / "bin" / "python").symlink_to(sys.executable)
    marker = empty_root / "tflite" / toolchains.MARKER
    marker.write_text(json.dumps({"spec_sha256": "0" * 64}))
    st = toolchains.status("tflite")
    assert not st.installed and "--force" in st.reason
    marker.write_text(json.dumps({"spec_sha256": toolchains.spec("tflite").sha256, "versions": {"onnx2tf": "x"}}))
    assert toolchains.status("tflite").installed


def test_unknown_toolchain_names_the_known_ones(empty_root):
    with pytest.raises(Exception, match="known toolchains: tflite"):
        toolchains.status("tensorrt-llm")


@pytest.mark.slow
def test_a_failed_install_leaves_nothing_that_looks_installed(empty_root, monkeypatch):
    """A real venv and pip run (nothing downloaded: pip is already there); the verify step fails."""
    broken = toolchains.ToolchainSpec(
        name="broken", description="test", requirements=("pip",), constraints="tflite-constraints.txt",
        imports=("edgepipe_no_such_module",), versions_of=("pip",), python=((3, 10), (3, 13)),
    )
    monkeypatch.setitem(toolchains.SPECS, "broken", broken)
    lines: list[str] = []
    with pytest.raises(BackendUnavailable, match="edgepipe_no_such_module"):
        toolchains.install("broken", progress=lines.append)
    assert any("creating a venv" in ln for ln in lines) and any("verifying" in ln for ln in lines)
    assert not (empty_root / "broken").exists()
    assert not toolchains.status("broken").installed
    assert "No module named" in (empty_root / "broken-install.log").read_text()


def test_install_is_idempotent_when_complete():
    st = toolchains.status("tflite")
    if not st.installed:
        pytest.skip(f"needs the installed tflite toolchain ({st.reason})")
    marker = st.path / toolchains.MARKER
    before = marker.stat().st_mtime_ns
    lines: list[str] = []
    again = toolchains.install("tflite", progress=lines.append)
    assert again.installed and lines and all("already installed" in ln for ln in lines), lines  # no step ran
    assert marker.stat().st_mtime_ns == before
    assert again.versions["onnx2tf"].startswith("1.29.")


def test_cli_status_json(empty_root):
    proc = subprocess.run([sys.executable, "-m", "edgepipe", "toolchain", "status", "--json"], capture_output=True,
                          text=True, env={**os.environ}, check=True)
    (row,) = [r for r in json.loads(proc.stdout) if r["name"] == "tflite"]
    assert row["installed"] is False and row["path"] == str(empty_root / "tflite")
