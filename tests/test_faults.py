"""Bad inputs and a hostile machine give one line, never a traceback, and leave nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgepipe.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------------------
# --out


def test_out_that_is_a_file_is_one_line(tmp_path, cli_error):
    (tmp_path / "dist").write_text("not a directory")
    line = cli_error("build", "-t", "cpu-int8", "--out", str(tmp_path / "dist"), "--no-bench")
    assert "is a file, not a directory" in line
    line = cli_error("build", "-t", "cpu-int8", "--out", str(tmp_path / "dist" / "sub"), "--no-bench")
    assert "cannot be created" in line and "is a file" in line
    line = cli_error("export", "--out", str(tmp_path))
    assert "is a directory; give the path of the file" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist"]


def test_out_that_cannot_be_written_is_one_line(tmp_path, cli_error):
    if os.geteuid() == 0:  # root writes anywhere a permission bit allows: use a place no one can write
        if not Path("/proc/self").exists():
            pytest.skip("needs /proc when run as root")
        out = Path("/proc/edgepipe-out")
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        out = tmp_path / "ro" / "dist"
    line = cli_error("build", "-t", "cpu-int8", "--out", str(out), "--no-bench")
    assert "is not writable" in line or "cannot be created" in line


# ---------------------------------------------------------------------------------------------------------
# data


def test_unreadable_image_in_an_image_folder_is_a_data_error(tmp_path):
    from edgepipe.data import load_dataset

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / label / "0.png")
    (tmp_path / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"dog/1.png: not a readable image .*remove it from the image folder"):
        load_dataset(str(tmp_path), (1, 8, 8))


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_samples_are_a_data_error(bad, tmp_path):
    from edgepipe.data import load_dataset

    x = np.zeros((10, 8, 8), np.float32)
    x[7, 1, 2] = float(bad)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10) % 2)
    with pytest.raises(DataError, match="1 of 10 samples hold NaN or Inf values .*sample 7"):
        load_dataset(str(tmp_path / "d.npz"), (1, 8, 8))


def test_labels_that_are_not_class_indices_are_a_data_error(tmp_path):
    from edgepipe.data import load_dataset

    x = np.zeros((10, 8, 8), np.float32)
    np.savez(tmp_path / "neg.npz", x=x, y=np.arange(10) - 1)
    with pytest.raises(DataError, match="negative label -1"):
        load_dataset(str(tmp_path / "neg.npz"), (1, 8, 8))
    np.savez(tmp_path / "frac.npz", x=x, y=np.arange(10) / 2)
    with pytest.raises(DataError, match="non-integer labels"):
        load_dataset(str(tmp_path / "frac.npz"), (1, 8, 8))


def test_labels_outside_the_models_classes_fail_the_build_and_release_nothing(tmp_path):
    from edgepipe import api
    from edgepipe.data import digits

    d = digits((1, 8, 8))
    np.savez(tmp_path / "d.npz", x=d.x[:200, 0], y=d.y[:200] + 5)  # labels 5..14; the model has 10 classes
    out = tmp_path / "dist"
    with pytest.raises(DataError, match=r"label 1\d is outside the model's 10 classes \(0..9\)"):
        api.build(None, ["cpu-int8"], out=out, data=str(tmp_path / "d.npz"), bench=False)
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------------------------------------
# configuration and command-line values


@pytest.mark.parametrize("value", ["nan", "inf", "-1.0"])
def test_budget_that_is_not_a_finite_non_negative_number(value, tmp_path):
    from edgepipe.config import load_target

    f = tmp_path / "t.toml"
    f.write_text(f'backend = "onnxruntime"\nprecision = "int8"\n[budgets]\nmax_accuracy_drop = {value}\n')
    with pytest.raises(ConfigError, match=r"t.toml.*budgets.max_accuracy_drop = .*(finite number|>= 0)"):
        load_target(f)


def test_input_shape_too_large_to_fit_is_refused(tmp_path):
    from edgepipe.config import load_target

    f = tmp_path / "t.toml"
    f.write_text('backend = "onnxruntime"\nprecision = "fp32"\ninput_shape = [1, 3, 100000, 100000]\n')
    with pytest.raises(ConfigError, match="at most 67,108,864 values"):
        load_target(f)


@pytest.mark.parametrize("args, expected", [
    (["--threads", "-1"], "bench threads = -1: must be an integer >= 1"),
    (["--threads", "0"], "bench threads = 0: must be an integer >= 1"),
    (["--duration", "-1"], "bench duration = -1.0: must be a number of seconds > 0"),
    (["--duration", "nan"], "bench duration = nan"),
    (["--iterations", "0"], "bench iterations = 0: must be an integer >= 1"),
    (["--warmup", "-2"], "bench warmup = -2: must be an integer >= 0"),
])
def test_bench_settings_out_of_range_are_one_line(args, expected, example_onnx, cli_error):
    assert expected in cli_error("bench", str(example_onnx.path), *args)


def test_build_iterations_out_of_range_is_one_line(tmp_path, cli_error):
    line = cli_error("build", "-t", "cpu-int8", "--iterations", "-1", "--out", str(tmp_path / "d"))
    assert "--iterations -1: must be >= 1" in line
    assert not (tmp_path / "d").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB filesystem (tmpfs, mounted for the test; needs root, as CI has)."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(d)], check=True)
    yield d
    subprocess.run(["umount", "-l", str(d)], check=True)


def test_a_full_disk_is_one_line_and_leaves_nothing_that_looks_finished(small_disk, monkeypatch, cli_error):
    # the cache and the release both on a disk too small for the example's compiled model
    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(small_disk / "cache"))
    out = small_disk / "dist"
    line = cli_error("build", "-t", "cpu-fp32", "--out", str(out), "--no-bench")
    assert line.startswith("error: No space left on device") and str(small_disk) in line, line  # the full disk
    assert not (out / "manifest.json").exists()
    left = [p for p in small_disk.rglob("*") if p.is_file() and p.suffix in {".onnx", ".json"}
            and not p.name.startswith(".") and "tmp" not in p.name]
    assert not [p for p in left if "cache" not in p.parts], left  # no finished-looking file in the release


def test_onnx_with_a_custom_op_is_one_line_and_releases_nothing(tmp_path, cli_error):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 32, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])
    graph = helper.make_graph([helper.make_node("Flatten", ["x"], ["f"]),
                               helper.make_node("MyOp", ["f"], ["y"], domain="com.example")], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.example", 1)]), tmp_path / "m.onnx")
    out = tmp_path / "dist"
    line = cli_error("build", str(tmp_path / "m.onnx"), "-t", "cpu-fp32", "--out", str(out), "--no-bench")
    assert "onnxruntime cannot load" in line and "com.example:MyOp" in line
    assert not out.exists() or not any(out.iterdir())
