"""The verified stage cache: entries are whole or absent, and a damaged entry is recomputed, never used."""

from __future__ import annotations

import json

from edgepipe.pipeline.cache import Cache


def test_put_get_roundtrip_and_tampered_file_is_a_miss(tmp_path):
    cache = Cache(tmp_path)
    f = tmp_path / "model.onnx"
    f.write_bytes(b"weights" * 100)
    cache.put("export", "k1", [f], {"parity": {"max_abs_error": 1e-6}, "order": [3, 1, 2]})
    hit = cache.get("export", "k1")
    assert hit is not None and hit.record == {"parity": {"max_abs_error": 1e-6}, "order": [3, 1, 2]}
    assert hit.file("model.onnx").read_bytes() == f.read_bytes()
    hit.file("model.onnx").write_bytes(b"truncated")  # a damaged or half-written file
    assert cache.get("export", "k1") is None
    assert not (tmp_path / "stages" / "export" / "k1").exists()  # removed, so the stage reruns


def test_entry_without_record_or_with_bad_json_is_a_miss(tmp_path):
    cache = Cache(tmp_path)
    d = tmp_path / "stages" / "compile-onnxruntime" / "k2"
    d.mkdir(parents=True)
    (d / "model.int8.onnx").write_bytes(b"x")  # a killed run's leftovers: no record.json
    assert cache.get("compile-onnxruntime", "k2") is None
    (d / "record.json").write_text("{not json")
    assert cache.get("compile-onnxruntime", "k2") is None


def test_disabled_cache_stores_nothing(tmp_path):
    cache = Cache(tmp_path, enabled=False)
    assert cache.put("bench", "k", [], {"m": 1}) is None and cache.get("bench", "k") is None
    assert not (tmp_path / "stages").exists()


def test_record_keeps_key_order(tmp_path):
    cache = Cache(tmp_path)
    cache.put("evaluate", "k", [], {"z": 1, "a": 2})
    assert list(json.loads((tmp_path / "stages" / "evaluate" / "k" / "record.json").read_text())) [:2] == ["z", "a"]
