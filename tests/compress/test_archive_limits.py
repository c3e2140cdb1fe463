"""Forged archives (valid trailing hash, hostile header): every size is checked against the file's length
before anything is allocated; malformed headers are one line, never a MemoryError or a traceback."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import subprocess
import sys
import tracemalloc
from typing import Any

import pytest

from edgepipe.errors import ModelLoadError
from edgepipe.package import _huffman as hf
from edgepipe.package import archive

SHA = "0" * 64


def forge(header: Any, payload: bytes = b"", *, raw: bytes | None = None) -> bytes:
    """An archive with a correct trailing SHA-256 around any header: what an attacker can make."""
    text = raw if raw is not None else json.dumps(header).encode()
    packed = lzma.compress(text, format=lzma.FORMAT_RAW, filters=archive._LZMA)
    body = archive.MAGIC + hf.varint(len(packed)) + packed + payload
    return body + hashlib.sha256(body).digest()


def header(tensors: list[Any], edits: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    return {"format": 1, "spec": "edgepipe.models.example:digits_resnet", "input_shape": [1, 1, 32, 32],
            "edits": edits or {}, "sha256": SHA, "tensors": tensors, **kw}


EMPTY_SPARSE = hf.encode(__import__("numpy").zeros(0, dtype="int64"))  # no stored positions

CASES = {
    "header is a list": (forge([]), "its header is a list, not a table"),
    "deeply nested header": (forge(None, raw=b"[" * 20_000 + b"]" * 20_000), "nested too deeply"),
    "header that expands to 64 MiB": (forge(None, raw=b'{"spec": "' + b" " * (64 << 20) + b'"}'), "expands past"),
    "2**40 raw values": (forge(header([["w", "float32", [2**40], 0, {"l": "raw", "f": "f4"}]])),
                         "claims 1,099,511,627,776 values"),
    "1 GiB of zeros in a few bytes": (
        forge(header([["w", "float32", [1 << 28], len(EMPTY_SPARSE), {"l": "sparse", "w": 4, "f": "f4"}]]),
              EMPTY_SPARSE), "tensor 'w' claims 268,435,456 values from a 214-byte file"),
    "many tensors of 64 MiB of zeros": (
        forge(header([[f"w{i}", "float32", [1 << 24], len(EMPTY_SPARSE), {"l": "sparse", "w": 4, "f": "f4"}]
                      for i in range(16)]), EMPTY_SPARSE * 16), "decoding it would take 1,024 MiB of memory"),
    "hashed layer of 2**26 values from 4 bytes": (
        forge(header([["w", "float32", [1 << 26], 4,
                       {"l": "hashed", "seed": 1, "n": 1, "sub": {"l": "raw", "f": "f4"}}]]), b"\0" * 4),
        "decoding it would take 2,560 MiB"),
    "raw size that disagrees with its bytes": (forge(header([["w", "float32", [1000], 4, {"l": "raw"}]]), b"\0" * 4),
                                               "1,000 raw values need 4,000 bytes, the archive holds 4"),
    "bytes past the payload": (forge(header([["w", "float32", [1], 4096, {"l": "raw"}]]), b"\0" * 4),
                               "byte count is 4096, not an integer in 0..4"),
    "edit that builds a 4 GiB layer": (forge(header([], {"fc": [["linear", 1 << 15, 1 << 15, True]]})),
                                       "edit 'fc' layer 0 needs a weight of shape [32768, 32768], and the archive "
                                       "holds none"),
    "edit naming no layer": (forge(header([], {"__import__('os')": [["linear", 1, 1, False]]})), "does not name a layer"),
    "unknown dtype": (forge(header([["w", "V1000000000", [1], 0, {"l": "raw"}]])), "has dtype 'V1000000000'"),
    "negative shape": (forge(header([["w", "float32", [-5], 0, {"l": "raw"}]])), "shape[0] is -5"),
    "byte count that is not a number": (
        forge(header([["w", "float32", [4], None, {"l": "sparse", "w": 4, "f": "f4"}]])), "byte count is None"),
    "huge input shape": (forge(header([], input_shape=[1, 3, 100000, 100000])), "is not N, C, H, W of a sane size"),
    "factory that is not a name": (forge(header([], spec=["os", "abort"])), "its factory is ['os', 'abort']"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forged_archive_is_refused_before_allocating(case):
    data, expected = CASES[case]
    tracemalloc.start()
    try:
        with pytest.raises(ModelLoadError) as e:
            archive.decode(data, "archive 'x.epk'")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert expected in msg and "\n" not in msg, msg
    assert peak < 200 << 20, f"{case}: {peak / 2**20:.0f} MiB allocated before refusing"


def test_positions_past_the_tensor_are_refused():
    import numpy as np

    stream = hf.encode(np.array([3, 9], dtype=np.int64))  # positions 3 and 13 in a 4-value tensor
    payload = stream + np.zeros(2, np.float32).tobytes()
    data = forge(header([["w", "float32", [4], len(payload), {"l": "sparse", "w": 4, "f": "f4"}]]), payload)
    with pytest.raises(ModelLoadError, match=r"a stored position \(13\) lies past the tensor's 4 values"):
        archive.decode(data)


def test_a_real_archive_still_reads(tmp_path):
    import torch

    m = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    data, _ = archive.encode(m, "x:y", input_shape=(1, 16, 1, 1))
    back = archive.decode(data)
    assert all(torch.equal(back.state[k], v) for k, v in m.state_dict().items())


def test_cli_unpack_of_a_bomb_is_one_line_and_writes_nothing(tmp_path):
    bomb = tmp_path / "bomb.epk"
    bomb.write_bytes(CASES["1 GiB of zeros in a few bytes"][0])
    r = subprocess.run([sys.executable, "-m", "edgepipe", "unpack", str(bomb), "--out", str(tmp_path / "w.safetensors")],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "MemoryError" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "claims 268,435,456 values" in errors[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.epk"]
