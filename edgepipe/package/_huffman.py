"""Canonical Huffman coding of integer streams, with numpy (encode vectorised, decode by table look-up).

A coded stream is self-describing: ``varint count, varint alphabet size, the alphabet (delta varints),
one code length per symbol (bytes), varint bit count, the bits (MSB first)``. Code lengths are capped at
``MAX_LEN`` bits by halving the counts until the tree fits (the zlib-style heuristic), which keeps the
decode table at ``2**MAX_LEN`` entries.
"""

from __future__ import annotations

import heapq

import numpy as np

MAX_LEN = 20


# ---------------------------------------------------------------------------------------------------------
# varints (LEB128) and a byte reader


def varint(n: int) -> bytes:
    """Unsigned LEB128 encoding of ``n``."""
    if n < 0:
        raise ValueError(f"varint of a negative number {n}")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class Reader:
    """Sequential reads from a byte buffer; running past its end raises ``ValueError``."""

    def __init__(self, data: bytes | memoryview, pos: int = 0) -> None:
        self.data = memoryview(data)
        self.pos = pos

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"read of {n} bytes at offset {self.pos} runs past the end ({len(self.data)} bytes)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def varint(self) -> int:
        shift = n = 0
        while True:
            b = self.take(1)[0]
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7
            if shift > 63:
                raise ValueError("varint longer than 64 bits")


# ---------------------------------------------------------------------------------------------------------
# code lengths and canonical codes


def _lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code lengths for symbols with positive ``counts`` (one symbol gets length 1)."""
    n = len(counts)
    if n == 1:
        return np.ones(1, dtype=np.int64)
    parent = np.zeros(2 * n - 1, dtype=np.int64)
    heap = [(int(c), i) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    node = n
    while len(heap) > 1:
        c1, a = heapq.heappop(heap)
        c2, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (c1 + c2, node))
        node += 1
    depth = np.zeros(2 * n - 1, dtype=np.int64)
    for i in range(2 * n - 3, -1, -1):  # parents are created after their children: walk down from the root
        depth[i] = depth[parent[i]] + 1
    return depth[:n]


def code_lengths(counts: np.ndarray, max_len: int = MAX_LEN) -> np.ndarray:
    """Code lengths of at most ``max_len`` bits for positive ``counts``."""
    counts = np.asarray(counts, dtype=np.int64)
    if len(counts) > 1 << max_len:
        raise ValueError(f"{len(counts)} symbols do not fit codes of at most {max_len} bits")
    lengths = _lengths(counts)
    while lengths.max() > max_len:  # flatten the distribution until the tree is shallow enough
        counts = np.maximum(counts >> 1, 1)
        lengths = _lengths(counts)
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes for symbols (in alphabet order) with the given code lengths."""
    order = np.lexsort((np.arange(len(lengths)), lengths))
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, prev = 0, int(lengths[order[0]])
    for k, i in enumerate(order):
        ln = int(lengths[i])
        if k:
            code = (code + 1) << (ln - prev)
        codes[i] = code
        prev = ln
    return codes


def coded_bits(values: np.ndarray) -> int:
    """Bits the Huffman-coded payload of ``values`` would take (no table), for choosing between layouts."""
    values = np.asarray(values).reshape(-1)
    if values.size == 0:
        return 0
    _, counts = np.unique(values, return_counts=True)
    return int((code_lengths(counts) * counts).sum())


# ---------------------------------------------------------------------------------------------------------
# encode / decode


def encode(values: np.ndarray) -> bytes:
    """Huffman-code a stream of non-negative integers into a self-describing byte string."""
    values = np.asarray(values).reshape(-1)
    if values.size and (values.dtype.kind not in "iu" or values.min() < 0):
        raise ValueError("Huffman streams hold non-negative integers")
    out = bytearray(varint(int(values.size)))
    if values.size == 0:
        return bytes(out)
    alphabet, inverse, counts = np.unique(values.astype(np.int64), return_inverse=True, return_counts=True)
    lengths = code_lengths(counts)
    codes = canonical_codes(lengths)
    out += varint(len(alphabet))
    prev = -1
    for a in alphabet.tolist():
        out += varint(a - prev - 1)
        prev = a
    out += lengths.astype(np.uint8).tobytes()
    sym_len, sym_code = lengths[inverse], codes[inverse]
    total = int(sym_len.sum())
    starts = np.cumsum(sym_len) - sym_len
    owner = np.repeat(np.arange(values.size), sym_len)
    offset = np.arange(total) - starts[owner]
    bits = ((sym_code[owner] >> (sym_len[owner] - 1 - offset)) & 1).astype(np.uint8)
    out += varint(total)
    out += np.packbits(bits).tobytes()
    return bytes(out)


def decode(reader: Reader) -> np.ndarray:
    """Read one stream written by :func:`encode` from ``reader``; returns int64 values."""
    n = reader.varint()
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = reader.varint()
    if k < 1 or k > 1 << MAX_LEN:
        raise ValueError(f"Huffman table with {k} symbols")
    alphabet = np.zeros(k, dtype=np.int64)
    prev = -1
    for i in range(k):
        prev = prev + 1 + reader.varint()
        alphabet[i] = prev
    lengths = np.frombuffer(reader.take(k), dtype=np.uint8).astype(np.int64)
    if lengths.min() < 1 or lengths.max() > MAX_LEN or (np.ldexp(1.0, -lengths).sum() > 1.0 + 1e-12):
        raise ValueError("invalid Huffman code lengths")
    total = reader.varint()
    raw = np.frombuffer(reader.take((total + 7) // 8), dtype=np.uint8)
    bits = np.unpackbits(raw)[:total].astype(np.int64)
    width = int(lengths.max())
    # the next `width` bits at every position, as an integer: index into the decode table
    padded = np.concatenate([bits, np.zeros(width, dtype=np.int64)])
    window = np.zeros(total, dtype=np.int64)
    for j in range(width):
        window = (window << 1) | padded[j : j + total]
    codes = canonical_codes(lengths)
    table_sym = np.full(1 << width, -1, dtype=np.int64)
    table_len = np.zeros(1 << width, dtype=np.int64)
    for s in range(k):
        lo = int(codes[s]) << (width - int(lengths[s]))
        hi = lo + (1 << (width - int(lengths[s])))
        table_sym[lo:hi] = s
        table_len[lo:hi] = lengths[s]
    syms = table_sym[window].tolist()
    lens = table_len[window].tolist()
    out = []
    pos = 0
    for i in range(n):
        if pos >= total:
            raise ValueError(f"Huffman stream ends after {i} of {n} symbols")
        s = syms[pos]
        if s < 0:
            raise ValueError("invalid Huffman code in stream")
        out.append(s)
        pos += lens[pos]
    if pos != total:
        raise ValueError(f"Huffman stream has {total - pos} bits left over")
    return alphabet[np.asarray(out, dtype=np.int64)]
