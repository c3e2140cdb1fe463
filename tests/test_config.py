from __future__ import annotations

import pytest

from edgepipe import backends
from edgepipe.config import load_target, target_files
from edgepipe.errors import ConfigError


@pytest.mark.parametrize("name", sorted(target_files()))
def test_every_shipped_target_loads_and_fits_its_backend(name):
    t = load_target(name)
    assert t.name == name
    backends.get(t.backend).validate(t)


def test_typo_key_names_file_field_and_allowed(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('backend = "onnxruntime"\nprecision = "int8"\n[calibration]\nmethdo = "minmax"\n')
    with pytest.raises(ConfigError) as e:
        load_target(f)
    msg = str(e.value)
    assert "bad.toml" in msg and "calibration.methdo" in msg and "method" in msg and "samples" in msg


def test_wrong_value_lists_allowed_values(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('backend = "onnxruntime"\nprecision = "int4"\n')
    with pytest.raises(ConfigError, match=r"precision = 'int4' is not allowed; choose one of 'fp32', 'fp16'"):
        load_target(f)


def test_wrong_type_is_named(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('backend = "onnxruntime"\nprecision = "fp32"\n[runtime]\nthreads = "four"\n')
    with pytest.raises(ConfigError, match=r"runtime.threads = 'four': expected"):
        load_target(f)


def test_unknown_target_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown target 'cpu-int9'; known targets: .*cpu-int8"):
        load_target("cpu-int9")


def test_backend_rejects_unsupported_precision_and_options(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('backend = "onnxruntime"\nprecision = "fp16"\n')
    with pytest.raises(ConfigError, match="does not support precision 'fp16'"):
        backends.get("onnxruntime").validate(load_target(f))
    f.write_text('backend = "onnxruntime"\nprecision = "int8"\n[options]\nactivation = "uint8"\n')
    with pytest.raises(ConfigError, match="unknown key 'options.activation'.*activation_type"):
        backends.get("onnxruntime").validate(load_target(f))


def test_unknown_backend_lists_known(tmp_path):
    with pytest.raises(ConfigError, match="unknown backend 'tensorflow'; known backends: .*onnxruntime"):
        backends.get("tensorflow")


def test_target_round_trips_through_toml(tmp_path):
    import tomli_w

    t = load_target("cpu-int8")
    f = tmp_path / "copy.toml"
    f.write_text(tomli_w.dumps(t.to_dict()))
    assert load_target(f) == t
