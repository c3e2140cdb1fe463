"""Packed archives: the Huffman coder, bit-exact round trips, sizes per stage, damage refused, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgepipe.compress.share import cluster
from edgepipe.errors import ModelLoadError
from edgepipe.models import state_dict_sha256
from edgepipe.package import _huffman as hf
from edgepipe.package import archive

EXAMPLE = "edgepipe.models.example:digits_resnet"


def _entropy_bytes(v: np.ndarray) -> float:
    _, c = np.unique(v, return_counts=True)
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum() * len(v) / 8)


@pytest.mark.parametrize("kind", ["uniform16", "geometric", "zipf", "constant", "two", "wide"])
def test_huffman_round_trip_and_size_near_entropy(kind):
    rng = np.random.default_rng(1)
    v = {"uniform16": rng.integers(0, 16, 20_000), "geometric": rng.geometric(0.05, 20_000) - 1,
         "zipf": rng.zipf(1.5, 20_000) % 5000, "constant": np.full(1000, 7), "two": rng.integers(0, 2, 999),
         "wide": rng.integers(0, 1 << 30, 300)}[kind]
    coded = hf.encode(v)
    r = hf.Reader(coded)
    assert np.array_equal(hf.decode(r), v) and r.pos == len(coded)
    h = _entropy_bytes(v)
    payload = hf.coded_bits(v) / 8
    assert h - 1e-6 <= payload <= h + len(v) / 8 + 1  # Huffman: within one bit per symbol of the entropy
    if kind in ("uniform16", "geometric"):
        assert payload < h * 1.03  # and close to it for these
    assert len(coded) < payload + 16 + 6 * len(np.unique(v))  # the table is small


def test_huffman_edge_cases():
    assert np.array_equal(hf.decode(hf.Reader(hf.encode(np.zeros(0, dtype=np.int64)))), np.zeros(0))
    lengths = hf.code_lengths(np.array([2**40, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1] + [2**i for i in range(30)]), 12)
    assert lengths.max() <= 12 and np.ldexp(1.0, -lengths).sum() <= 1.0
    with pytest.raises(ValueError, match="runs past the end"):
        hf.decode(hf.Reader(hf.encode(np.arange(100))[:-3]))


@pytest.mark.parametrize("width", [1, 2, 3, 5])
def test_relative_offsets_with_filler_zeros(width):
    rng = np.random.default_rng(width)
    positions = np.sort(rng.choice(5000, 60, replace=False))
    gaps, filler = archive._gaps(positions, width)
    assert gaps.max() <= (1 << width) - 1  # every offset fits the width ...
    assert filler.sum() > 0  # ... thanks to filler entries at zero positions
    back = archive._positions(gaps)
    assert np.array_equal(back[~filler], positions) and not np.isin(back[filler], positions).any()


def _pruned_shared(model: nn.Module, sparsity: float = 0.9, bits: int = 4) -> nn.Module:
    """A pruned and shared model, made directly (no fine-tune): what the recipe steps leave behind."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                w = m.weight
                w.mul_(w.abs() > w.abs().flatten().kthvalue(int(w.numel() * sparsity)).values)
                c, i = cluster(w, bits)
                w.copy_(torch.where(i >= 0, c[i.clamp(min=0)], torch.zeros(())))
    return model


def _example():
    from edgepipe.models.example import digits_resnet

    return digits_resnet()


def test_pruned_shared_example_round_trips_bit_exact_and_sizes_fall_per_stage(tmp_path):
    model = _pruned_shared(_example())
    report = archive.pack(model, EXAMPLE, tmp_path / "m.epk", input_shape=(1, 1, 32, 32))
    s = report.stages
    assert s["dense"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert s["dense"] > 5 * s["pruned"] and s["pruned"] > 2 * s["shared"] > 2 * s["huffman"]
    assert report.file_bytes == (tmp_path / "m.epk").stat().st_size < s["dense"] / 20
    layouts = {r["name"]: r["layout"] for r in report.tensors}
    assert layouts["layer3.1.conv2.weight"] == "shared" and layouts["layer3.1.bn1.running_var"] == "raw"
    restored = archive.restore(archive.read(tmp_path / "m.epk"))
    assert state_dict_sha256(restored) == state_dict_sha256(model) == report.state_sha256
    for (n, a), b in zip(model.state_dict().items(), restored.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), n


def test_special_values_and_dtypes_round_trip():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            w = torch.tensor([0.0, -0.0, float("nan"), float("inf"), 1.5, 1.5, 0.0, 1e-30] * 20)
            self.w = nn.Parameter(w)
            self.register_buffer("i", torch.arange(-5, 5, dtype=torch.int64))
            self.register_buffer("h", torch.randn(7).half())
            self.register_buffer("bf", torch.randn(7).bfloat16())
            self.register_buffer("b", torch.tensor([True, False]))
            self.register_buffer("one", torch.tensor(3.25))

    m = Odd()
    data, _ = archive.encode(m, "x:y")
    back = archive.decode(data).state
    for n, t in m.state_dict().items():
        assert back[n].dtype == t.dtype and back[n].shape == t.shape
        assert torch.equal(back[n].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), n


def _small_archive(tmp_path) -> bytes:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        m[0].weight.mul_(m[0].weight.abs() > 0.1)
    data, _ = archive.encode(m, "x:y")
    return data


def test_every_flipped_byte_is_refused(tmp_path):
    data = _small_archive(tmp_path)
    archive.decode(data)  # intact: reads
    positions = range(len(data)) if len(data) <= 2000 else np.random.default_rng(0).choice(len(data), 400)
    for pos in positions:
        for flip in (0x01, 0x80):
            bad = bytearray(data)
            bad[pos] ^= flip
            with pytest.raises(ModelLoadError, match="corrupted or truncated|not an edgepipe archive"):
                archive.decode(bytes(bad))


def test_truncated_archive_is_refused(tmp_path):
    data = _small_archive(tmp_path)
    for n in (0, 3, 10, len(data) // 2, len(data) - 32, len(data) - 1):
        with pytest.raises(ModelLoadError, match="corrupted or truncated|not an edgepipe archive"):
            archive.decode(data[:n])
    with pytest.raises(ModelLoadError, match="corrupted or truncated"):
        archive.decode(data + b"\0")


def test_unpack_of_a_damaged_archive_writes_nothing(tmp_path):
    from edgepipe import api

    archive.pack(_example(), EXAMPLE, tmp_path / "m.epk", input_shape=(1, 1, 32, 32))
    data = bytearray((tmp_path / "m.epk").read_bytes())
    data[len(data) // 2] ^= 0x10
    (tmp_path / "bad.epk").write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelLoadError, match="corrupted or truncated: its SHA-256 does not match"):
        api.unpack(tmp_path / "bad.epk", out / "w.safetensors")
    assert list(out.iterdir()) == []


def test_hashed_layers_store_buckets_and_lowrank_layers_their_structure(tmp_path):
    from edgepipe.compress.hashing import HashingConfig, finalize, hash_layers
    from edgepipe.compress.lowrank import LowRankConfig, factorise

    model = _example()
    factorise(model, LowRankConfig(ranks={"layer3.1.conv1": (16, 16)}, layers=("layer3.1.conv1",)),
              torch.zeros(1, 1, 32, 32))
    hash_layers(model, HashingConfig(ratio=0.125, layers=("layer3.1.conv2", "fc")))
    finalize(model)
    report = archive.pack(model, EXAMPLE, tmp_path / "m.epk", input_shape=(1, 1, 32, 32), reference=_example())
    rows = {r["name"]: r for r in report.tensors}
    assert rows["layer3.1.conv2.weight"]["layout"] == "hashed"
    assert rows["layer3.1.conv2.weight"]["huffman"] <= 36_864 // 8 * 4 + 16  # the buckets, not the weights
    restored = archive.restore(archive.read(tmp_path / "m.epk"))
    assert isinstance(restored.layer3[1].conv1, nn.Sequential)
    assert state_dict_sha256(restored) == state_dict_sha256(model)
    assert restored.layer3[1].conv2.edgepipe_hash.buckets == 36_864 // 8  # a re-pack stays small
    again, _ = archive.encode(restored, EXAMPLE, input_shape=(1, 1, 32, 32), reference=_example())
    assert len(again) == report.file_bytes


@pytest.mark.slow
def test_cli_pack_unpack_and_compile(tmp_path, monkeypatch):
    from edgepipe.cli import main

    monkeypatch.chdir(tmp_path)
    model = _pruned_shared(_example())
    from safetensors.torch import save_file

    save_file(model.state_dict(), "w.safetensors")
    with pytest.raises(SystemExit) as e:
        main(["pack", EXAMPLE, "--weights", "w.safetensors", "--out", "m.epk", "--json"])
    assert e.value.code == 0
    for out in ("m.pt2", "back.safetensors"):
        with pytest.raises(SystemExit) as e:
            main(["unpack", "m.epk", "--out", out])
        assert e.value.code == 0
    from safetensors.torch import load_file

    back = load_file("back.safetensors")
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    with pytest.raises(SystemExit) as e:
        main(["compile", "m.pt2", "--trust-code", "--target", "cpu-int8", "--out", "dist", "--allow-accuracy-drop",
              "--json"])
    assert e.value.code == 0
    assert (tmp_path / "dist" / "cpu-int8" / "manifest.json").is_file()


def test_pack_and_unpack_arguments_are_checked(tmp_path):
    from edgepipe import api
    from edgepipe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"pack needs MODEL as package.module:factory .* pass a compressed .pt2 as --weights"):
        api.pack(str(tmp_path / "model.pt2"), out=tmp_path / "m.epk")
    with pytest.raises(ConfigError, match=r"give a .pt2 \(a model\) or a .safetensors \(weights\) path"):
        api.unpack(tmp_path / "m.epk", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
