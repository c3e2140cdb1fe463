"""What edgepipe writes and reads on disk cannot be turned against it: a target's name cannot point outside
the output directory, a shared cache cannot run code or forge a figure, a planted lock file cannot make
edgepipe overwrite another file, bombs and deep nesting are refused before they are unpacked, and a release
is byte-reproducible whether its stages ran or came from the cache.

Every crafted input is made here; every refusal is one line and leaves the victim as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from test_trust import _hostile_pt2

from edgepipe.errors import ConfigError, DataError


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgepipe", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"}, timeout=300)


# ---------------------------------------------------------------------------------------------------------
# 1. a target's name is one safe path component


def test_a_target_named_like_a_path_is_refused_and_the_victim_is_untouched(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    evil = tmp_path / "evil.toml"
    evil.write_text('name = "../victim"\nbackend = "onnxruntime"\nprecision = "fp32"\n')
    r = _cli("build", "--target", str(evil), "--out", "dist2", "--no-bench", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "name = '../victim'" in errors[0] and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"] and (victim / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "dist2").exists()


@pytest.mark.parametrize("name", ["../victim", "/tmp/victim", ".", "..", "", "a/b", "a\\b", " x", "x\n", "-rf",
                                  "a" * 101])
def test_target_names_that_are_not_one_path_component_are_refused(name, tmp_path):
    from edgepipe.config import Target, load_target

    with pytest.raises(ConfigError, match=r"name = .*must be 1-100 letters"):
        Target(name=name, backend="onnxruntime", precision="fp32")
    f = tmp_path / "t.toml"
    f.write_text(f'name = {json.dumps(name)}\nbackend = "onnxruntime"\nprecision = "fp32"\n')
    with pytest.raises(ConfigError, match=r"t\.toml.*must be 1-100 letters"):
        load_target(f)


def test_ordinary_target_names_still_load():
    from edgepipe.config import Target, load_target

    for name in ("cpu-int8", "jetson-orin-nano-int8", "rpi5_v2.1", "x+y"):
        assert Target(name=name, backend="onnxruntime", precision="fp32").name == name
    assert load_target("cpu-int8").name == "cpu-int8"


# ---------------------------------------------------------------------------------------------------------
# 3. the shared cache never runs code, 4. nor forges a figure: records are signed by a key outside the cache


def _magnitude_recipe(tmp_path: Path):  # type: ignore[no-untyped-def]
    from edgepipe.config.recipe import load_recipe

    f = tmp_path / "r.toml"
    f.write_text('[[steps]]\ntechnique = "magnitude_prune"\nsparsity = 0.3\n')
    return load_recipe(f)


def _resign_files(entry_dir: Path) -> None:
    """What an attacker who can write the cache does after swapping a file: update the record's digests."""
    from edgepipe._hashing import sha256_file

    rec = json.loads((entry_dir / "record.json").read_text())
    rec["_files"] = {name: sha256_file(entry_dir / name) for name in rec["_files"]}
    (entry_dir / "record.json").write_text(json.dumps(rec))


def test_a_hostile_pt2_swapped_into_the_cache_is_never_loaded(tmp_path):
    from edgepipe.models import load_model
    from edgepipe.pipeline import stages
    from edgepipe.pipeline.cache import Cache

    src, recipe, cache = load_model(None), _magnitude_recipe(tmp_path), Cache(tmp_path / "cache")
    splits = stages.data_splits("digits", (1, 1, 32, 32))
    _, first = stages.compress(src, recipe, splits, cache)
    (entry,) = (tmp_path / "cache" / "stages" / "compress").iterdir()
    marker = tmp_path / "ran"
    hostile = _hostile_pt2(tmp_path, marker)
    (entry / "model.pt2").write_bytes(hostile.read_bytes())
    _resign_files(entry)
    compressed, again = stages.compress(src, recipe, splits, cache)
    assert compressed.module is not None  # the model of this run: recomputed, not the swapped file
    assert not marker.exists()
    assert not again.cached and again.output_sha256 == first.output_sha256


def test_a_forged_evaluation_or_compiled_model_in_the_cache_is_recomputed(tmp_path, example_onnx):
    from edgepipe._hashing import sha256_file
    from edgepipe.config import load_target
    from edgepipe.pipeline import stages
    from edgepipe.pipeline.cache import Cache

    cache = Cache(tmp_path / "cache")
    t = load_target("cpu-fp32")
    splits = stages.load_splits("digits", t)
    calib = stages.calibration_set(splits)
    art, _ = stages.compile(example_onnx, t, calib, tmp_path / "w1", cache)
    real, _ = stages.evaluate(art, t, splits, cache)
    # the cached outputs the figures are computed from, rewritten to answer "7" for every sample
    (ev_dir,) = (tmp_path / "cache" / "stages" / "predict").iterdir()
    with np.load(ev_dir / "outputs.npz") as f:
        forged = {k: np.where(np.arange(f[k].shape[1]) == 7, 1000.0, 0.0).astype(np.float32)[None].repeat(len(f[k]), 0)
                  for k in f.files}
    np.savez(ev_dir / "outputs.npz", **forged)
    _resign_files(ev_dir)
    ev, record = stages.evaluate(art, t, splits, cache)
    assert not record.cached and ev.test == real.test > 50  # recomputed from the artifact, not the forged 7s
    # the compiled model swapped (as a +1000 bias would be) and the record's digest updated to match
    (comp_dir,) = (tmp_path / "cache" / "stages" / "compile-onnxruntime").iterdir()
    (model,) = [p for p in comp_dir.iterdir() if p.suffix == ".onnx"]
    model.write_bytes(model.read_bytes() + b"\0")
    _resign_files(comp_dir)
    art2, crec = stages.compile(example_onnx, t, calib, tmp_path / "w2", cache)
    assert not crec.cached and sha256_file(art2.path) == sha256_file(art.path)


def test_cache_root_is_made_private_and_the_key_lives_outside_it(tmp_path):
    from edgepipe.pipeline.cache import Cache, key_file, signing_key

    cache = Cache(tmp_path / "fresh")
    cache.put("evaluate", "k", [], {"test": 0.5})
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o700
    assert len(signing_key()) >= 32 and key_file().stat().st_mode & 0o777 == 0o600
    assert tmp_path / "fresh" not in key_file().parents
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    Cache(shared).put("evaluate", "k", [], {"test": 0.5})  # shared on purpose: left as its owner made it
    assert shared.stat().st_mode & 0o777 == 0o755


def test_an_entry_signed_with_another_key_is_a_miss(tmp_path, monkeypatch):
    from edgepipe.pipeline import cache as cache_mod

    c = cache_mod.Cache(tmp_path / "cache")
    c.put("evaluate", "k", [], {"test": 0.5})
    assert c.get("evaluate", "k") is not None
    monkeypatch.setenv("EDGEPIPE_CACHE_KEY_FILE", str(tmp_path / "other.key"))
    assert c.get("evaluate", "k") is None  # someone else's key: not trusted, recomputed


def test_a_key_file_others_can_write_or_a_link_is_refused(tmp_path, monkeypatch):
    from edgepipe.pipeline import cache as cache_mod

    key = tmp_path / "k"
    key.write_text("a" * 64)
    os.chmod(key, 0o666)
    monkeypatch.setenv("EDGEPIPE_CACHE_KEY_FILE", str(key))
    with pytest.raises(ConfigError, match="no one else can write"):
        cache_mod.signing_key()
    link = tmp_path / "link"
    link.symlink_to(key)
    monkeypatch.setenv("EDGEPIPE_CACHE_KEY_FILE", str(link))
    with pytest.raises(ConfigError, match="not a link"):
        cache_mod.signing_key()


def test_a_writer_that_lost_the_race_uses_the_stored_output(tmp_path):
    """Two runs compress the same key at once (two pool workers): both miss, both compute, the first stores.
    The second must release what was stored, or a cold release and its cached rerun differ."""
    from edgepipe.models import load_model
    from edgepipe.pipeline import stages
    from edgepipe.pipeline.cache import Cache

    class MissedOnce(Cache):
        """The loser's view: its lookup ran before the winner stored the entry."""

        def __init__(self, root: Path) -> None:
            super().__init__(root)
            self.missed: set[str] = set()

        def get(self, kind, key):  # type: ignore[no-untyped-def]
            if kind not in self.missed:
                self.missed.add(kind)
                return None
            return super().get(kind, key)

    src, recipe = load_model(None), _magnitude_recipe(tmp_path)
    splits = stages.data_splits("digits", (1, 1, 32, 32))
    winner, _ = stages.compress(src, recipe, splits, Cache(tmp_path / "cache"))
    stored = json.loads(next((tmp_path / "cache" / "stages" / "compress").iterdir()).joinpath("record.json")
                        .read_text())
    loser, _ = stages.compress(src, recipe, splits, MissedOnce(tmp_path / "cache"))
    assert loser.records == stored["steps"] == winner.records
    assert not any("seconds" in step for step in loser.records)  # how long it took is not part of a release


# ---------------------------------------------------------------------------------------------------------
# 9. lock files never follow links


def test_a_planted_lock_link_is_refused_and_its_target_untouched(tmp_path):
    from edgepipe._fs import dir_lock, lock_path

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "dist" / "cpu-fp32"
    out.parent.mkdir()
    lock_path(out).symlink_to(victim)
    with pytest.raises(ConfigError, match="is a symbolic link"), dir_lock(out):
        pass
    assert victim.read_text() == "precious"
    lock_path(out).unlink()
    os.link(victim, lock_path(out))  # a hard link: the same file under the lock's name
    with pytest.raises(ConfigError, match="not a plain file of its own"), dir_lock(out):
        pass
    assert victim.read_text() == "precious"


def test_cli_build_with_a_planted_lock_link_is_one_line(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / ".cpu-fp32.lock").symlink_to(victim)
    r = _cli("build", "--target", "cpu-fp32", "--out", "dist", "--no-bench", cwd=tmp_path)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1 and "symbolic link" in errors[0], r.stderr
    assert victim.read_text() == "precious"


# ---------------------------------------------------------------------------------------------------------
# 10. bombs and parsers


def _zip_bomb(path: Path, nbytes: int) -> None:
    """An .npz whose array 'x' is ``nbytes`` of zeros shaped as 8x8 images, deflated (about 1000x)."""
    header = np.lib.format.header_data_from_array_1_0(np.zeros(0, np.uint8))
    header["shape"] = (nbytes // 64, 1, 8, 8)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            chunk = bytes(1 << 20)
            for _ in range(nbytes >> 20):
                f.write(chunk)
        with z.open("y.npy", "w") as g:
            np.lib.format.write_array(g, np.zeros(10, np.int64))


def test_an_npz_bomb_is_refused_from_its_headers(tmp_path):
    from edgepipe.data import load_dataset

    bomb = tmp_path / "bomb.npz"
    _zip_bomb(bomb, 256 << 20)
    assert bomb.stat().st_size < 2 << 20
    with pytest.raises(DataError, match=r"array 'x' declares 256 MiB from .* decompression bomb"):
        load_dataset(str(bomb), (1, 8, 8))


def test_an_npz_larger_than_the_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from edgepipe.data import load_dataset

    f = tmp_path / "big.npz"
    np.savez(f, x=np.ones((64, 1, 64, 64), np.float32), y=np.zeros(64, np.int64))  # 1 MiB, uncompressed
    monkeypatch.setenv("EDGEPIPE_MAX_DATA_MB", "0.5")
    with pytest.raises(DataError, match=r"unpack to more than 0 MiB.*EDGEPIPE_MAX_DATA_MB"):
        load_dataset(str(f), (1, 8, 8))
    monkeypatch.setenv("EDGEPIPE_MAX_DATA_MB", "8")
    assert len(load_dataset(str(f), (1, 8, 8)).x) == 64


def test_an_npz_holding_objects_or_other_files_is_refused(tmp_path):
    from edgepipe.data import load_dataset

    f = tmp_path / "obj.npz"
    np.savez(f, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, np.int64))
    with pytest.raises(DataError, match="Python objects.*data never runs code"):
        load_dataset(str(f), (1, 8, 8))
    g = tmp_path / "odd.npz"
    with zipfile.ZipFile(g, "w") as z:
        z.writestr("run.py", "print('hi')")
    with pytest.raises(DataError, match="'run.py' is not an array"):
        load_dataset(str(g), (1, 8, 8))


def test_a_deeply_nested_or_huge_target_file_is_one_line(tmp_path):
    from edgepipe.config import load_target

    deep = tmp_path / "deep.toml"
    deep.write_text("backend = \"onnxruntime\"\nprecision = \"fp32\"\nx = " + "[" * 200_000 + "]" * 200_000 + "\n")
    with pytest.raises(ConfigError, match="nests its tables or arrays too deeply"):
        load_target(deep)
    huge = tmp_path / "huge.toml"
    huge.write_text("backend = \"onnxruntime\"\nprecision = \"fp32\"\n" + "# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="larger than 1,048,576 bytes"):
        load_target(huge)


def test_a_deeply_nested_manifest_is_one_line(tmp_path):
    from edgepipe.types import Manifest

    (tmp_path / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ConfigError, match="is not a manifest edgepipe wrote"):
        Manifest.read(tmp_path)
