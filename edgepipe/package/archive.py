"""Packed model archives (``.epk``) for over-the-air delivery: Deep Compression's storage format, bit-exact.

Each tensor of the state dict is stored in whichever lossless layout is smallest:

* ``shared``: a codebook of the distinct non-zero values plus one Huffman-coded codebook index per
  weight, or, when the weight is sparse, per stored position, the positions being Huffman-coded relative
  offsets with the paper's filler zeros where a gap exceeds the offset width (the width is chosen per
  tensor to minimise the coded size);
* ``sparse``: positions as above plus the raw non-zero values (pruned, not shared);
* ``hashed``: a HashedNets layer's buckets (themselves in the best of these layouts) and its seed;
* ``raw``: the bytes as they are (float32 values that are exact halves are stored as float16).

File layout: ``b"EPK1"``, a varint length and an LZMA-compressed JSON header (format, the model's
factory spec, input shape, structural edits, per tensor name, dtype, shape, layout and byte count, and
the SHA-256 of the whole state dict), the tensor payloads, and a SHA-256 of everything before it. Reading
checks that trailing hash before decoding anything, and the restored state dict's hash after.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepipe.errors import CompressionError, ConfigError, ModelLoadError
from edgepipe.package import _huffman as hf

if TYPE_CHECKING:
    import torch
    from torch import nn

MAGIC = b"EPK1"
FORMAT = 1
_LZMA = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
_MAX_WIDTH = 16


# ---------------------------------------------------------------------------------------------------------
# small helpers


def _half_exact(values: np.ndarray) -> bool:
    """Whether float32 ``values`` survive a round trip through float16 bit for bit."""
    if values.dtype != np.float32:
        return False
    back = values.astype(np.float16).astype(np.float32)
    return bool(np.array_equal(back.view(np.uint32), values.view(np.uint32)))


def _floats(values: np.ndarray) -> tuple[str, bytes]:
    """Store float32 values as halves when that is exact."""
    if _half_exact(values):
        return "f2", values.astype(np.float16).tobytes()
    return "f4", values.astype(np.float32).tobytes()


def _unfloats(kind: str, reader: hf.Reader, n: int) -> np.ndarray:
    if kind == "f2":
        return np.frombuffer(reader.take(2 * n), dtype=np.float16).astype(np.float32)
    return np.frombuffer(reader.take(4 * n), dtype=np.float32).copy()


def _gaps(positions: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Relative offsets (zeros skipped) with filler entries where a gap exceeds ``2**width - 1``.

    Returns:
        (gaps, is_filler): one entry per stored position, fillers included.
    """
    bound = (1 << width) - 1
    prev = np.concatenate([[-1], positions[:-1]])
    gap = positions - prev - 1
    fillers = gap // (bound + 1)  # each filler stands on the position `bound` after the previous entry
    count = fillers + 1
    gaps = np.full(int(count.sum()), bound, dtype=np.int64)
    last = np.cumsum(count) - 1
    gaps[last] = gap - fillers * (bound + 1)
    is_filler = np.ones(len(gaps), dtype=bool)
    is_filler[last] = False
    return gaps, is_filler


def _positions(gaps: np.ndarray) -> np.ndarray:
    return np.cumsum(gaps + 1) - 1


def _best_width(positions: np.ndarray, value_cost: int) -> tuple[int, int]:
    """The offset width with the smallest coded size; ``value_cost`` bits per filler's value."""
    best = (1, 1 << 62)
    for w in range(1, _MAX_WIDTH + 1):
        gaps, filler = _gaps(positions, w)
        bits = hf.coded_bits(gaps) + int(filler.sum()) * value_cost
        if bits < best[1]:
            best = (w, bits)
    return best


# ---------------------------------------------------------------------------------------------------------
# layouts: each encoder returns (params for the header, payload) and each decoder reads them back


def _enc_raw(a: np.ndarray) -> tuple[dict[str, Any], bytes]:
    if a.dtype == np.float32:
        kind, data = _floats(a.reshape(-1))
        return {"l": "raw", "f": kind}, data
    return {"l": "raw"}, np.ascontiguousarray(a).tobytes()


def _bits(a: np.ndarray) -> np.ndarray:
    """float32 values as their bit patterns: zero means +0.0 exactly (-0.0 and NaN are ordinary values)."""
    return a.reshape(-1).view(np.uint32)


def _enc_sparse(a: np.ndarray) -> tuple[dict[str, Any], bytes]:
    u = _bits(a)
    pos = np.flatnonzero(u)
    width, _ = _best_width(pos, 32)
    gaps, _ = _gaps(pos, width)
    values = u[_positions(gaps)].view(np.float32)  # fillers read the zero at their position
    kind, data = _floats(values)
    return {"l": "sparse", "w": width, "f": kind}, hf.encode(gaps) + data


def _enc_shared(a: np.ndarray, sparse: bool) -> tuple[dict[str, Any], bytes]:
    u = _bits(a)
    book_bits = np.unique(u[u != 0])
    kind, book = _floats(book_bits.view(np.float32))
    zero = len(book_bits)  # the symbol for zero (pruned weights, fillers)
    if sparse:
        pos = np.flatnonzero(u)
        counts = np.bincount(np.searchsorted(book_bits, u[pos]), minlength=zero)
        filler_bits = max(1, int(np.ceil(-np.log2(max(1, counts.min()) / max(1, len(pos))))))
        width, _ = _best_width(pos, filler_bits)
        gaps, filler = _gaps(pos, width)
        index = np.where(filler, zero, np.searchsorted(book_bits, u[_positions(gaps)]))
        payload = book + hf.encode(gaps) + hf.encode(index)
        return {"l": "shared", "k": zero, "f": kind, "w": width}, payload
    index = np.where(u == 0, zero, np.searchsorted(book_bits, u))
    return {"l": "shared", "k": zero, "f": kind}, book + hf.encode(index)


def _encode_best(a: np.ndarray, hint: Any = None) -> tuple[dict[str, Any], bytes]:
    """The smallest lossless layout of array ``a``."""
    options = [_enc_raw(a)]
    if a.dtype == np.float32 and a.size:
        u = _bits(a)
        nz = int(np.count_nonzero(u))
        if nz < a.size:
            options.append(_enc_sparse(a))
        if nz and len(np.unique(u[u != 0])) <= min(1 << 16, max(1, a.size // 2)):
            options.append(_enc_shared(a, sparse=False))
            if nz < a.size:
                options.append(_enc_shared(a, sparse=True))
        if hint is not None:
            hashed = _enc_hashed(a, hint)
            if hashed is not None:
                options.append(hashed)
    return min(options, key=lambda o: len(o[1]))


def _enc_hashed(a: np.ndarray, spec: Any) -> tuple[dict[str, Any], bytes] | None:
    import torch

    from edgepipe.compress.hashing import expand, hash_indices

    idx, sign = hash_indices(a.size, spec.buckets, spec.seed)
    buckets = np.zeros(spec.buckets, dtype=np.float32)
    buckets[idx] = a.reshape(-1) * sign  # every member of a bucket carries the same value
    again = expand(torch.from_numpy(buckets), a.shape, spec.seed).numpy()
    if not np.array_equal(again.view(np.uint32), a.view(np.uint32)):
        return None  # not (any more) a hashed weight: store it another way
    sub, payload = _encode_best(buckets)
    return {"l": "hashed", "seed": spec.seed, "n": spec.buckets, "sub": sub}, payload


def _decode(params: dict[str, Any], reader: hf.Reader, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    layout = params["l"]
    if layout == "raw":
        if params.get("f"):
            return _unfloats(params["f"], reader, n).reshape(shape)
        return np.frombuffer(reader.take(n * dtype.itemsize), dtype=dtype).reshape(shape).copy()
    if layout == "hashed":
        import torch

        from edgepipe.compress.hashing import expand

        buckets = _decode(params["sub"], reader, np.dtype(np.float32), (params["n"],))
        return expand(torch.from_numpy(buckets), shape, params["seed"]).numpy()
    out = np.zeros(n, dtype=np.float32)
    if layout == "sparse":
        pos = _positions(hf.decode(reader))
        out[pos] = _unfloats(params["f"], reader, len(pos))
        return out.reshape(shape)
    if layout == "shared":
        codebook = np.concatenate([_unfloats(params["f"], reader, params["k"]), np.zeros(1, np.float32)])
        if "w" in params:
            pos = _positions(hf.decode(reader))
            index = hf.decode(reader)
            if len(index) != len(pos):
                raise ValueError("position and index streams differ in length")
            out[pos] = codebook[index]
        else:
            out[:] = codebook[hf.decode(reader)]
        return out.reshape(shape)
    raise ValueError(f"unknown layout {layout!r}")


# ---------------------------------------------------------------------------------------------------------
# sizes per stage, as in Deep Compression's tables


def _stage_sizes(a: np.ndarray, params: dict[str, Any], payload: int) -> dict[str, int]:
    """Bytes of ``a`` dense, pruned (fixed-width offsets + fp32 values), shared (+ fixed-width indices,
    fp32 codebook), and Huffman-coded (the layout actually stored)."""
    dense = a.nbytes
    if a.dtype != np.float32 or not a.size:
        return {"dense": dense, "pruned": dense, "shared": dense, "huffman": payload}
    flat = _bits(a)
    if params["l"] == "hashed":
        real = params["n"] * 4
        return {"dense": dense, "pruned": dense, "shared": real, "huffman": payload}
    pruned = shared = dense
    nz = np.flatnonzero(flat)
    if len(nz) < flat.size:
        width = min(range(1, _MAX_WIDTH + 1), key=lambda w: len(_gaps(nz, w)[0]) * (32 + w))
        entries = len(_gaps(nz, width)[0])
        pruned = min(dense, (entries * (32 + width) + 7) // 8)
    if params["l"] == "shared":
        k = params["k"]
        bits = max(1, int(np.ceil(np.log2(k + 1))))
        if "w" in params:
            width = params["w"]
            entries = len(_gaps(nz, width)[0])
            shared = (entries * (bits + width) + 7) // 8 + 4 * k
        else:
            shared = (flat.size * bits + 7) // 8 + 4 * k
    else:
        shared = pruned
    return {"dense": dense, "pruned": pruned, "shared": shared, "huffman": payload}


# ---------------------------------------------------------------------------------------------------------
# structure: layers a structural technique (low-rank) replaced by a Sequential of ordinary layers


def _describe_layer(m: nn.Module) -> list[Any]:
    from torch import nn

    if isinstance(m, nn.Linear):
        return ["linear", m.in_features, m.out_features, m.bias is not None]
    if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        return ["conv", m.in_channels, m.out_channels, list(m.kernel_size), list(m.stride), list(m.padding),
                list(m.dilation), m.groups, m.bias is not None]
    raise ConfigError(f"a {type(m).__name__} inside a replaced layer cannot be described in an archive")


def _build_layer(d: list[Any]) -> nn.Module:
    from torch import nn

    if d[0] == "linear":
        return nn.Linear(d[1], d[2], bias=d[3])
    return nn.Conv2d(d[1], d[2], tuple(d[3]), tuple(d[4]), tuple(d[5]), tuple(d[6]), d[7], bias=d[8])


def structure_edits(model: nn.Module, reference: nn.Module) -> dict[str, list[list[Any]]]:
    """Layers of ``reference`` (the factory's model) that ``model`` holds as a Sequential of other layers."""
    from torch import nn

    ref = dict(reference.named_modules())
    edits = {}
    for name, m in model.named_modules():
        if name in ref and isinstance(m, nn.Sequential) and isinstance(ref[name], nn.Linear | nn.Conv2d):
            edits[name] = [_describe_layer(c) for c in m]
    return edits


def apply_edits(model: nn.Module, edits: dict[str, list[list[Any]]]) -> nn.Module:
    from torch import nn

    for name, layers in edits.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, nn.Sequential(*map(_build_layer, layers)))
    return model


# ---------------------------------------------------------------------------------------------------------
# pack / read / restore


@dataclass
class PackReport:
    """What a pack wrote: bytes per stage (dense -> pruned -> shared -> Huffman) and per tensor."""

    path: Path | None
    file_bytes: int
    header_bytes: int
    stages: dict[str, int]
    tensors: list[dict[str, Any]] = field(default_factory=list)
    state_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path) if self.path else None, "file_bytes": self.file_bytes,
                "header_bytes": self.header_bytes, "stages": self.stages, "tensors": self.tensors,
                "state_sha256": self.state_sha256}


def _hints(model: nn.Module) -> dict[str, Any]:
    return {f"{n}.weight" if n else "weight": m.edgepipe_hash for n, m in model.named_modules()
            if getattr(m, "edgepipe_hash", None) is not None}


def encode(model: nn.Module, spec: str, *, input_shape: tuple[int, ...] = (), reference: nn.Module | None = None,
           hints: dict[str, Any] | None = None) -> tuple[bytes, PackReport]:
    """Encode ``model``'s state dict into archive bytes.

    Args:
        model: the (compressed) model; hashed layers carry their seed (``edgepipe_hash``) from the step.
        spec: the ``package.module:factory`` that rebuilds the architecture on unpack.
        input_shape: recorded so ``unpack`` can export a ``.pt2``.
        reference: the factory's model, to record layers a structural step replaced.
        hints: extra hash specs per tensor name (e.g. read from a safetensors file's metadata).
    """
    import torch

    from edgepipe.models import state_dict_sha256

    hints = {**_hints(model), **(hints or {})}
    edits = structure_edits(model, reference) if reference is not None else {}
    entries, payloads, rows = [], [], []
    stages = {"dense": 0, "pruned": 0, "shared": 0, "huffman": 0}
    for name, t in model.state_dict().items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ConfigError(f"tensor {name!r} has dtype {dtype}, which archives do not store")
        a = t.detach().cpu().contiguous()
        arr = a.view(torch.int16).numpy() if dtype == "bfloat16" else a.numpy()
        params, payload = _encode_best(arr, hints.get(name))
        entries.append([name, dtype, list(a.shape), len(payload), params])
        payloads.append(payload)
        sizes = _stage_sizes(arr, params, len(payload))
        for k in stages:
            stages[k] += sizes[k]
        rows.append({"name": name, "shape": list(a.shape), "layout": params["l"],
                     "nonzero": int(np.count_nonzero(arr)), "values": params.get("k"), **sizes})
    header = {"format": FORMAT, "spec": spec, "input_shape": list(input_shape), "edits": edits,
              "sha256": state_dict_sha256(model), "tensors": entries}
    hbytes = lzma.compress(json.dumps(header, separators=(",", ":")).encode(), format=lzma.FORMAT_RAW, filters=_LZMA)
    body = MAGIC + hf.varint(len(hbytes)) + hbytes + b"".join(payloads)
    data = body + hashlib.sha256(body).digest()
    back = decode(data, "the archive just encoded")
    for name, t in model.state_dict().items():  # bit-exact, or a bug: never ship it
        if not _same_bits(back.state[name], t):
            raise CompressionError(f"archive encoder bug: tensor {name!r} does not round-trip bit for bit")
    stages["archive"] = len(data)
    return data, PackReport(None, len(data), len(hbytes), stages, rows, header["sha256"])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                            b.detach().cpu().contiguous().reshape(-1).view(torch.uint8)))


@dataclass
class Unpacked:
    spec: str
    input_shape: tuple[int, ...]
    edits: dict[str, list[list[Any]]]
    state: dict[str, torch.Tensor]
    sha256: str
    hashed: dict[str, tuple[int, int]]  # tensor name -> (seed, buckets)


def decode(data: bytes, what: str = "archive") -> Unpacked:
    """Check the archive's hash, then decode every tensor. Raises ``ModelLoadError`` on any damage."""
    import torch

    if len(data) < len(MAGIC) + 33 or data[: len(MAGIC)] != MAGIC:
        raise ModelLoadError(f"{what} is not an edgepipe archive (no {MAGIC!r} header); give a file written by "
                             "`edgepipe pack`")
    body, digest = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise ModelLoadError(f"{what} is corrupted or truncated: its SHA-256 does not match the one it carries "
                             f"({len(data)} bytes read); fetch or copy it again")
    try:
        r = hf.Reader(body, len(MAGIC))
        header = json.loads(lzma.decompress(bytes(r.take(r.varint())), format=lzma.FORMAT_RAW, filters=_LZMA))
        if header.get("format") != FORMAT:
            raise ModelLoadError(f"{what} has archive format {header.get('format')}; this edgepipe reads {FORMAT}")
        state, hashed = {}, {}
        for name, dtype, shape, nbytes, params in header["tensors"]:
            sub = hf.Reader(r.take(nbytes))
            np_dtype = np.dtype(np.int16 if dtype == "bfloat16" else dtype)
            arr = _decode(params, sub, np_dtype, tuple(shape))
            if sub.pos != nbytes:
                raise ValueError(f"tensor {name!r}: {nbytes - sub.pos} bytes left over")
            t = torch.from_numpy(np.array(arr, copy=True, order="C"))
            state[name] = t.view(torch.bfloat16) if dtype == "bfloat16" else t
            if params["l"] == "hashed":
                hashed[name] = (params["seed"], params["n"])
        if r.pos != len(body):
            raise ValueError(f"{len(body) - r.pos} bytes after the last tensor")
    except ModelLoadError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, lzma.LZMAError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{what} passed its hash but could not be decoded ({e}); it was written by an "
                             "incompatible edgepipe") from e
    return Unpacked(header["spec"], tuple(header["input_shape"]), header["edits"], state, header["sha256"], hashed)


def pack(model: nn.Module, spec: str, out: Path, **kwargs: Any) -> PackReport:
    """Write ``model`` as an archive at ``out`` (atomically); see :func:`encode` for the arguments."""
    from edgepipe._fs import write_bytes_atomic

    data, report = encode(model, spec, **kwargs)
    write_bytes_atomic(Path(out), data)
    report.path = Path(out)
    return report


def read(path: Path) -> Unpacked:
    """Read and verify an archive file."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"archive {str(path)!r} not found")
    return decode(path.read_bytes(), f"archive {str(path)!r}")


def restore(unpacked: Unpacked) -> nn.Module:
    """Rebuild the model: the factory, the structural edits, the exact weights; checked by hash."""
    from edgepipe.models import load_model, state_dict_sha256

    src = load_model(unpacked.spec)
    assert src.module is not None
    module = apply_edits(src.module, unpacked.edits)
    try:
        module.load_state_dict(unpacked.state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"the archive's weights do not fit {unpacked.spec!r}: "
                             f"{str(e).strip().splitlines()[0]}") from e
    got = state_dict_sha256(module)
    if got != unpacked.sha256:
        raise ModelLoadError(f"restored weights hash {got[:12]} differs from the archive's {unpacked.sha256[:12]}")
    for name, (seed, buckets) in unpacked.hashed.items():
        from edgepipe.compress.hashing import HashSpec

        owner = module.get_submodule(name.rpartition(".")[0])
        owner.edgepipe_hash = HashSpec(seed, buckets)  # type: ignore[assignment]  # a re-pack stays small
    return module.eval()
