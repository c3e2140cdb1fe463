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

The trailing hash detects damage, not forgery, so the header is treated as hostile: every type, count,
shape and byte size in it is checked against the file's own length (and fixed caps) before anything is
allocated, and its factory spec is only ever compared with the one the user names (:func:`restore`),
never imported.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
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


def _read_positions(params: dict[str, Any], reader: hf.Reader, n: int) -> np.ndarray:
    """Stored positions of a sparse stream, checked to lie inside the tensor before anything is indexed."""
    gaps = hf.decode(reader)
    if len(gaps) and int(gaps.max()) > (1 << params["w"]) - 1:
        raise ValueError(f"a relative offset is wider than the layout's {params['w']} bits")
    pos = _positions(gaps)
    if len(pos) and int(pos[-1]) >= n:
        raise ValueError(f"a stored position ({int(pos[-1])}) lies past the tensor's {n} values")
    return pos


def _decode(params: dict[str, Any], reader: hf.Reader, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    n = math.prod(shape)
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
        pos = _read_positions(params, reader, n)
        out[pos] = _unfloats(params["f"], reader, len(pos))
        return out.reshape(shape)
    if layout == "shared":
        codebook = np.concatenate([_unfloats(params["f"], reader, params["k"]), np.zeros(1, np.float32)])
        if "w" in params:
            pos = _read_positions(params, reader, n)
            index = hf.decode(reader)
            if len(index) != len(pos):
                raise ValueError("position and index streams differ in length")
            out[pos] = codebook[index]
        else:
            out[:] = codebook[hf.decode(reader)]
        return out.reshape(shape)
    raise ValueError(f"unknown layout {layout!r}")


# ---------------------------------------------------------------------------------------------------------
# limits: every size an archive states is checked against the file's own length before anything is allocated

_MAX_HEADER = 16 << 20  # decompressed header bytes, at most ...
_HEADER_RATIO = 128  # ... and at most this many times its compressed size (plus 64 KiB)
_MAX_DIMS = 8
_MAX_NAME = 1024
# bytes a decode may allocate: a floor plus this many times the file's length (pruned + shared + Huffman
# coding reaches ~50x, a hashed layer of shared buckets a few hundred; its expansion costs ~40 bytes a value)
_ALLOC_FLOOR = 256 << 20
_ALLOC_RATIO = 1024
_HASH_COST = 40
_MAX_BOOK = 1 << 16


class _Malformed(ValueError):
    """The archive's header states something impossible or too large; the message says what."""


def _int(v: Any, what: str, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        bound = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
        raise _Malformed(f"{what} is {v!r:.60}, not {bound}")
    return v


def _check_params(p: Any, dtype: str, n: int, nbytes: int, where: str, nested: bool = False) -> int:
    """Check one tensor's layout parameters; returns the bytes its decode allocates."""
    if not isinstance(p, dict) or p.get("l") not in ("raw", "sparse", "shared", "hashed"):
        raise _Malformed(f"{where}: unknown layout {p!r:.80}")
    layout, f = p["l"], p.get("f")
    if f is not None and f not in ("f2", "f4"):
        raise _Malformed(f"{where}: unknown value format {f!r:.20}")
    if layout != "raw" and dtype != "float32":
        raise _Malformed(f"{where}: layout {layout!r} holds float32 values, not {dtype}")
    if layout == "raw":
        if f is not None and dtype != "float32":
            raise _Malformed(f"{where}: value format {f!r} on a {dtype} tensor")
        item = {"f2": 2, "f4": 4}.get(f or "", np.dtype(np.int16 if dtype == "bfloat16" else dtype).itemsize)
        if nbytes != n * item:
            raise _Malformed(f"{where}: {n:,} raw values need {n * item:,} bytes, the archive holds {nbytes:,}")
        return n * max(item, 4) * 2
    if f is None and layout != "hashed":
        raise _Malformed(f"{where}: layout {layout!r} without a value format")
    if layout == "sparse":
        _int(p.get("w"), f"{where}: offset width", 1, _MAX_WIDTH)
        return n * 4 + nbytes * 8 * 16  # the tensor, plus the Huffman decoder's arrays per payload bit
    if layout == "shared":
        _int(p.get("k"), f"{where}: codebook size", 0, _MAX_BOOK)
        if "w" in p:
            _int(p["w"], f"{where}: offset width", 1, _MAX_WIDTH)
        return n * 4 + nbytes * 8 * 16
    if nested:
        raise _Malformed(f"{where}: a hashed layer's buckets cannot themselves be hashed")
    _int(p.get("seed"), f"{where}: seed", -(1 << 63), (1 << 64) - 1)
    buckets = _int(p.get("n"), f"{where}: bucket count", 1, max(1, n))
    return n * _HASH_COST + _check_params(p.get("sub"), "float32", buckets, nbytes, f"{where} (buckets)", True)


def _check_shape(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > _MAX_DIMS:
        raise _Malformed(f"{what} is {v!r:.60}, not a list of at most {_MAX_DIMS} sizes")
    return tuple(_int(d, f"{what}[{i}]", 0, 1 << 40) for i, d in enumerate(v))


def _layer_params(d: Any, where: str) -> dict[str, tuple[int, ...]]:
    """The parameter shapes of a layer an ``edits`` entry describes (checked before the layer is built)."""
    if isinstance(d, list) and len(d) == 4 and d[0] == "linear" and isinstance(d[3], bool):
        i, o = _int(d[1], f"{where} in_features", 1), _int(d[2], f"{where} out_features", 1)
        return {"weight": (o, i), **({"bias": (o,)} if d[3] else {})}
    if isinstance(d, list) and len(d) == 9 and d[0] == "conv" and isinstance(d[8], bool):
        i, o = _int(d[1], f"{where} in_channels", 1), _int(d[2], f"{where} out_channels", 1)
        pairs = []
        for k, name, lo in ((3, "kernel_size", 1), (4, "stride", 1), (5, "padding", 0), (6, "dilation", 1)):
            if not isinstance(d[k], list) or len(d[k]) != 2:
                raise _Malformed(f"{where} {name} is {d[k]!r:.40}, not two sizes")
            pairs.append(tuple(_int(x, f"{where} {name}", lo, 1 << 16) for x in d[k]))
        g = _int(d[7], f"{where} groups", 1)
        if i % g or o % g:
            raise _Malformed(f"{where}: {g} groups do not divide {i} in and {o} out channels")
        return {"weight": (o, i // g, *pairs[0]), **({"bias": (o,)} if d[8] else {})}
    raise _Malformed(f"{where} is {d!r:.80}, not a linear or conv layer")


def _check_header(h: Any, what: str, payload: int, file_bytes: int) -> None:
    """Everything the header states, checked for type and size before any tensor is decoded."""
    if not isinstance(h, dict):
        raise _Malformed(f"its header is a {type(h).__name__}, not a table")
    if h.get("format") != FORMAT:
        raise ModelLoadError(f"{what} has archive format {h.get('format')!r:.20}; this edgepipe reads {FORMAT}")
    spec = h.get("spec")
    if not isinstance(spec, str) or not 0 < len(spec) <= _MAX_NAME:
        raise _Malformed(f"its factory is {spec!r:.60}, not a name")
    if not isinstance(h.get("sha256"), str) or len(h["sha256"]) != 64:
        raise _Malformed("its state hash is not a SHA-256")
    shape = _check_shape(h.get("input_shape"), "its input_shape")
    if shape and (len(shape) != 4 or min(shape) < 1 or math.prod(shape[1:]) > 1 << 26 or shape[0] > 4096):
        raise _Malformed(f"its input_shape {list(shape)} is not N, C, H, W of a sane size")
    tensors = h.get("tensors")
    if not isinstance(tensors, list):
        raise _Malformed("its tensor list is missing")
    shapes: dict[str, tuple[int, ...]] = {}
    total = alloc = 0
    for i, entry in enumerate(tensors):
        if not isinstance(entry, list) or len(entry) != 5:
            raise _Malformed(f"tensor entry {i} is {entry!r:.80}, not [name, dtype, shape, bytes, layout]")
        name, dtype, tshape, nbytes, params = entry
        if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME:
            raise _Malformed(f"tensor entry {i} has the name {name!r:.60}")
        if dtype not in _DTYPES:
            raise _Malformed(f"tensor {name!r} has dtype {dtype!r:.30}; archives store {', '.join(_DTYPES)}")
        dims = _check_shape(tshape, f"tensor {name!r}'s shape")
        nbytes = _int(nbytes, f"tensor {name!r}'s byte count", 0, payload)
        n = math.prod(dims)
        total += nbytes
        if total > payload:
            raise _Malformed(f"its tensors claim more bytes than the file's {payload:,}-byte payload")
        if n > (_ALLOC_FLOOR + _ALLOC_RATIO * file_bytes) // 4:
            raise _Malformed(f"tensor {name!r} claims {n:,} values from a {file_bytes:,}-byte file")
        alloc += _check_params(params, dtype, n, nbytes, f"tensor {name!r}")
        shapes[name] = dims
    if total != payload:
        raise _Malformed(f"its tensors account for {total:,} of the {payload:,} payload bytes")
    limit = _ALLOC_FLOOR + _ALLOC_RATIO * file_bytes
    if alloc > limit:
        raise _Malformed(f"decoding it would take {alloc / 2**20:,.0f} MiB of memory for a {file_bytes:,}-byte file "
                         f"(at most {limit / 2**20:,.0f} MiB)")
    edits = h.get("edits")
    if not isinstance(edits, dict):
        raise _Malformed("its structural edits are not a table")
    for layer, descs in edits.items():
        if not layer or len(layer) > _MAX_NAME or not all(part.isidentifier() or part.isdigit()
                                                          for part in layer.split(".")):
            raise _Malformed(f"edit {layer!r:.60} does not name a layer")
        if not isinstance(descs, list) or not 0 < len(descs) <= 64:
            raise _Malformed(f"edit {layer!r} is {descs!r:.60}, not a list of layers")
        for j, d in enumerate(descs):
            for pname, pshape in _layer_params(d, f"edit {layer!r} layer {j}").items():
                key = f"{layer}.{j}.{pname}"
                if shapes.get(key) != pshape:
                    raise _Malformed(f"edit {layer!r} layer {j} needs a {pname} of shape {list(pshape)}, and the "
                                     f"archive holds {list(shapes[key]) if key in shapes else 'none'}")


def _read_header(data: bytes, what: str) -> tuple[dict[str, Any], hf.Reader, memoryview]:
    """Check the magic and the trailing hash, then read and check the header; returns it, a reader at the
    first tensor's payload, and the body."""
    if len(data) < len(MAGIC) + 33 or data[: len(MAGIC)] != MAGIC:
        raise ModelLoadError(f"{what} is not an edgepipe archive (no {MAGIC!r} header); give a file written by "
                             "`edgepipe pack`")
    body, digest = memoryview(data)[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise ModelLoadError(f"{what} is corrupted or truncated: its SHA-256 does not match the one it carries "
                             f"({len(data)} bytes read); fetch or copy it again")
    try:
        r = hf.Reader(body, len(MAGIC))
        packed = bytes(r.take(r.varint()))
        cap = min(_MAX_HEADER, (64 << 10) + _HEADER_RATIO * len(packed))
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA)
        text = dec.decompress(packed, max_length=cap + 1)
        if len(text) > cap:
            raise _Malformed(f"its {len(packed):,}-byte header expands past {cap:,} bytes")
        if not dec.eof:
            raise _Malformed("its header is truncated")
        header = json.loads(text)
        _check_header(header, what, len(body) - r.pos, len(data))
    except ModelLoadError:
        raise
    except RecursionError as e:
        raise ModelLoadError(f"{what} passed its hash but its header is nested too deeply to be an edgepipe "
                             "archive; it was not read") from e
    except (ValueError, KeyError, TypeError, IndexError, OverflowError, lzma.LZMAError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{what} passed its hash but is malformed: {e}; nothing was decoded (it was not "
                             "written by `edgepipe pack`, or by an incompatible version)") from e
    return header, r, body


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


def decode(data: bytes, what: str = "archive", factory: str | None = None) -> Unpacked:
    """Check the archive's hash and header, then decode every tensor. Raises ``ModelLoadError`` on any
    damage, on sizes the file cannot hold, and (``factory`` given) when the archive names another factory.
    Nothing is imported: the factory is only compared."""
    import torch

    header, r, body = _read_header(data, what)
    if factory is not None:
        check_factory(header["spec"], factory, what)
    try:
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
    except (ValueError, KeyError, TypeError, IndexError, OverflowError, MemoryError) as e:
        raise ModelLoadError(f"{what} passed its hash but could not be decoded ({e}); it was written by an "
                             "incompatible edgepipe") from e
    return Unpacked(header["spec"], tuple(header["input_shape"]), header["edits"], state, header["sha256"], hashed)


# the factories that ship with edgepipe: restore() may rebuild these without being told the factory
BUNDLED_FACTORIES = ("edgepipe.models.example:digits_resnet", "edgepipe.models.lenet:lenet_300_100")


def check_factory(archived: str, factory: str, what: str = "archive") -> None:
    """The archive must have been packed for ``factory`` (the one the user named): only compared, never
    imported from the archive."""
    if archived != factory:
        raise ModelLoadError(f"{what} was packed for the factory {archived!r}, not {factory!r}; pass the factory "
                             "it was packed for (--factory), if that is code you trust")


def pack(model: nn.Module, spec: str, out: Path, **kwargs: Any) -> PackReport:
    """Write ``model`` as an archive at ``out`` (atomically); see :func:`encode` for the arguments."""
    from edgepipe._fs import write_bytes_atomic

    data, report = encode(model, spec, **kwargs)
    write_bytes_atomic(Path(out), data)
    report.path = Path(out)
    return report


def read(path: Path, factory: str | None = None) -> Unpacked:
    """Read and verify an archive file (``factory``: the one it must name; checked before decoding)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"archive {str(path)!r} not found")
    return decode(path.read_bytes(), f"archive {str(path)!r}", factory)


def restore(unpacked: Unpacked, factory: str | None = None) -> nn.Module:
    """Rebuild the model: the factory, the structural edits, the exact weights; checked by hash.

    Args:
        unpacked: a decoded archive.
        factory: the ``package.module:factory`` the user names (code runs only because they named it); it
            must equal the archive's. ``None``: only a factory bundled with edgepipe is accepted. The
            archive's own spec is never imported.
    """
    from edgepipe.models import load_model, state_dict_sha256

    if factory is None:
        if unpacked.spec not in BUNDLED_FACTORIES:
            raise ModelLoadError(f"the archive was packed for the factory {unpacked.spec!r}, which is not bundled "
                                 "with edgepipe; name the factory to rebuild it with (--factory), if you trust it")
        factory = unpacked.spec
    check_factory(unpacked.spec, factory)
    src = load_model(factory, trust_code=False)
    if src.module is None:
        raise ModelLoadError(f"factory {factory!r} gave an ONNX model; unpack needs package.module:factory")
    try:
        module = apply_edits(src.module, unpacked.edits)
    except (AttributeError, ValueError, TypeError) as e:
        raise ModelLoadError(f"the archive's structural edits do not fit {factory!r}'s model: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
    try:
        module.load_state_dict(unpacked.state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"the archive's weights do not fit {factory!r}: "
                             f"{str(e).strip().splitlines()[0]}") from e
    got = state_dict_sha256(module)
    if got != unpacked.sha256:
        raise ModelLoadError(f"restored weights hash {got[:12]} differs from the archive's {unpacked.sha256[:12]}")
    for name, (seed, buckets) in unpacked.hashed.items():
        from edgepipe.compress.hashing import HashSpec

        owner = module.get_submodule(name.rpartition(".")[0])
        owner.edgepipe_hash = HashSpec(seed, buckets)  # type: ignore[assignment]  # a re-pack stays small
    return module.eval()
