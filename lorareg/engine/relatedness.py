"""Streamed relatedness check of two base models, layer by layer, from their safetensors files.

For each (source weight, target weight) pair of a copy port: relative distance ‖W_t − W_s‖ / ‖W_s‖ and
cosine ⟨W_s, W_t⟩ / (‖W_s‖ ‖W_t‖), over the flattened weights, in float32 chunks of whole rows.

Why streamed: a copy port only needs to know whether the target is a fine-tune of the source (the
LoRA's ΔW is used unchanged). Top-k SVD bases of every layer of two 12–28 GB video transformers cost
both models' weights in memory and hundreds of SVDs; this check reads each weight's bytes once, with
``os.preadv`` into a chunk buffer (never an mmap of the whole shard, whose touched pages would stay in
the process's resident set until the map closes), so peak memory is a few chunks per side whatever
the model size, and the time is bounded by reading the two models once.

Accuracy: chunk sums are float32 (torch's reductions), accumulated across chunks in float64; the
distance is summed from (W_t − W_s)² directly, not from ‖W_s‖² + ‖W_t‖² − 2⟨W_s, W_t⟩, which would
cancel catastrophically for fine-tunes whose weights differ by 0.1 %.

Nothing here imports the rest of lorareg: callers describe where weights are stored with
:class:`StoredWeight` (lorareg.weights.BaseWeights.stored does for base models).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

__all__ = [
    "ByteRange",
    "StoredWeight",
    "WeightPair",
    "LayerRelatedness",
    "Relatedness",
    "RangeReader",
    "RELATED_MIN_COSINE",
    "DEFAULT_CHUNK_ELEMS",
    "check_pairs",
    "compare",
    "stored_in_file",
]

#: below this mean weight cosine the two base models look unrelated. Measured (bench/RESULTS.md,
#: "Streamed relatedness check"): fine-tuned checkpoints and distillations of one model stay far
#: above it, independently trained models of the same architecture sit near 0 (independent random
#: initialisations are orthogonal in high dimension, and training does not align them).
RELATED_MIN_COSINE = 0.5
#: elements per chunk and side (whole rows): 256 Ki elements = 512 KiB of bf16 read, 1 MiB as float32.
#: Small enough for the float32 work buffers to stay in the CPU's L2 cache: measured on this project's
#: CPU machine (2 cores, 3072×12288 bf16 pairs, page cache warm, prefetch on), 128–256 Ki elements ran at
#: ~2 GB/s, 1 Mi at ~1 GB/s, 4 Mi at 0.6–0.85 GB/s.
DEFAULT_CHUNK_ELEMS = 2**18


@dataclass(frozen=True)
class ByteRange:
    """A run of a weight's elements in a file: ``nbytes`` bytes at absolute ``offset``, C order."""

    path: Path
    offset: int
    nbytes: int


@dataclass(frozen=True)
class StoredWeight:
    """Where a weight's elements lie on disk: byte ranges (in element order) of one dtype."""

    ranges: tuple[ByteRange, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if sum(r.nbytes for r in self.ranges) != self.numel * self.itemsize:
            raise ValueError(f"byte ranges hold {sum(r.nbytes for r in self.ranges)} bytes, "
                             f"shape {list(self.shape)} of {self.dtype} needs {self.numel * self.itemsize}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def row_elems(self) -> int:
        """Elements per row of the weight flattened to [out, in·kh·kw]."""
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1


@dataclass(frozen=True)
class WeightPair:
    """One layer to compare: a label (the source module) and where both weights are stored."""

    name: str
    source: StoredWeight
    target: StoredWeight
    target_name: Optional[str] = None


@dataclass(frozen=True)
class LayerRelatedness:
    """The streamed comparison of one layer's weights (float32 math, float64 accumulation)."""

    name: str
    target_name: Optional[str]
    numel: int
    relative_distance: Optional[float]  # ‖W_t − W_s‖ / ‖W_s‖ (None when W_s is all zeros)
    cosine: Optional[float]  # ⟨W_s, W_t⟩ / (‖W_s‖ ‖W_t‖) (None when either is all zeros)
    source_norm: float
    target_norm: float
    identical: bool  # every element equal as float32 (bit-identical for f32/f16/bf16 weights of one dtype)
    chunks: int


@dataclass
class Relatedness:
    """Per-layer results and totals of a streamed check."""

    layers: list[LayerRelatedness]
    bytes_read: int = 0
    seconds: float = 0.0
    max_chunk_elems: int = 0  # the largest chunk one side held (peak working set ≈ a few of these)
    threshold: float = RELATED_MIN_COSINE

    @property
    def cosines(self) -> list[float]:
        return [l.cosine for l in self.layers if l.cosine is not None]

    @property
    def mean_cosine(self) -> Optional[float]:
        c = self.cosines
        return sum(c) / len(c) if c else None

    @property
    def min_cosine(self) -> Optional[float]:
        c = self.cosines
        return min(c) if c else None

    @property
    def mean_relative_distance(self) -> Optional[float]:
        d = [l.relative_distance for l in self.layers if l.relative_distance is not None]
        return sum(d) / len(d) if d else None

    @property
    def related(self) -> Optional[bool]:
        """Mean cosine ≥ ``threshold``; None when no layer could be compared."""
        m = self.mean_cosine
        return None if m is None else m >= self.threshold

    @property
    def gb_per_s(self) -> Optional[float]:
        return self.bytes_read / 1e9 / self.seconds if self.seconds > 0 else None


class RangeReader:
    """Reads element runs of stored weights with ``os.preadv`` (thread-safe: no shared file position).

    Counts what it reads (``bytes_read``, ``calls``) so callers and tests can check that every byte
    of a weight is read exactly once.
    """

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.calls = 0

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            return fd

    def read(self, weight: StoredWeight, start: int, count: int, out: Optional[bytearray] = None) -> torch.Tensor:
        """Elements [start, start + count) of ``weight`` (flat, as stored: its own dtype), into ``out``
        (reused between chunks: fresh buffers would cost a page fault per 4 KiB) or a new buffer."""
        size = weight.itemsize
        if count == 0:
            return torch.empty(0, dtype=weight.dtype)
        buf = out if out is not None and len(out) >= count * size else bytearray(count * size)
        view = memoryview(buf)[: count * size]
        want_lo, want_hi = start * size, (start + count) * size
        pos = 0  # byte position of the current range inside the weight
        filled = 0
        for r in weight.ranges:
            lo, hi = max(want_lo, pos), min(want_hi, pos + r.nbytes)
            if lo < hi:
                self._pread(r.path, view[filled : filled + hi - lo], r.offset + lo - pos)
                filled += hi - lo
            pos += r.nbytes
            if pos >= want_hi:
                break
        if filled != len(view):
            raise ValueError(f"read {filled} of {len(view)} bytes (elements {start}..{start + count} of a {weight.numel}-element weight)")
        with self._lock:
            self.bytes_read += filled
            self.calls += 1
        return torch.frombuffer(buf, dtype=weight.dtype, count=count)

    def _pread(self, path: Path, into: memoryview, offset: int) -> None:
        fd = self._fd(path)
        done = 0
        while done < len(into):  # preadv may return less than asked (e.g. above 2 GiB)
            n = os.preadv(fd, [into[done:]], offset + done)
            if n <= 0:
                raise OSError(f"{path}: file ends before byte {offset + done} (truncated?)")
            done += n

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "RangeReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Work:
    """float32 work buffers of one chunk, reused (no allocation, hence no page faults, per chunk)."""

    def __init__(self, n: int) -> None:
        self.s = torch.empty(n, dtype=torch.float32)
        self.d = torch.empty(n, dtype=torch.float32)


@dataclass
class _Acc:
    ss: float = 0.0
    sd: float = 0.0
    dd: float = 0.0
    chunks: int = 0
    identical: bool = True

    def add(self, s: torch.Tensor, t: torch.Tensor, work: _Work) -> None:
        n = s.numel()
        s32, d32 = work.s[:n], work.d[:n]
        s32.copy_(s)
        d32.copy_(t)
        d32.sub_(s32)  # d = t − s
        # three dots instead of four: ⟨s,t⟩ = ‖s‖² + ⟨s,d⟩ and ‖t‖² = ‖s‖² + 2⟨s,d⟩ + ‖d‖² (no cancellation: ‖d‖² is summed itself)
        self.ss += float(torch.dot(s32, s32))
        self.sd += float(torch.dot(s32, d32))
        dd = float(torch.dot(d32, d32))
        self.dd += dd
        if self.identical and dd != 0.0:
            self.identical = False
        self.chunks += 1

    @property
    def st(self) -> float:
        return self.ss + self.sd

    @property
    def tt(self) -> float:
        return max(0.0, self.ss + 2 * self.sd + self.dd)

    def result(self, pair: WeightPair) -> LayerRelatedness:
        ns, nt = math.sqrt(self.ss), math.sqrt(self.tt)
        rel = math.sqrt(self.dd) / ns if ns > 0 else None
        cos = max(-1.0, min(1.0, self.st / (ns * nt))) if ns > 0 and nt > 0 else None
        return LayerRelatedness(pair.name, pair.target_name, pair.source.numel, rel, cos, ns, nt,
                                self.identical and pair.source.dtype == pair.target.dtype, self.chunks)


def _chunk_plan(pairs: Sequence[WeightPair], chunk_elems: int) -> Iterator[tuple[int, int, int]]:
    """(pair index, first element, element count): whole rows of the flattened weight per chunk."""
    for i, p in enumerate(pairs):
        rows = max(1, chunk_elems // max(1, p.source.row_elems))
        step = rows * p.source.row_elems
        for start in range(0, p.source.numel, step):
            yield i, start, min(step, p.source.numel - start)


def check_pairs(
    pairs: Sequence[WeightPair],
    *,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    prefetch: bool = True,
    reader: Optional[RangeReader] = None,
    threshold: float = RELATED_MIN_COSINE,
    on_layer: Optional[Callable[[LayerRelatedness], None]] = None,
) -> Relatedness:
    """Compare each pair's weights, reading every byte of each once, one chunk of rows at a time.

    ``prefetch``: read the next chunk (of this layer or the next) in a background thread while this
    one is computed (reads and torch ops both release the GIL); peak memory is then two chunks per
    side instead of one. ``on_layer`` is called after each layer (progress bars).
    """
    for p in pairs:
        if p.source.numel != p.target.numel:
            raise ValueError(f"{p.name}: source has {p.source.numel} elements, target {p.target.numel} (a copy port needs equal shapes)")
    own = reader is None
    rd = reader or RangeReader()
    t0 = time.perf_counter()
    bytes0 = rd.bytes_read
    out = Relatedness([], threshold=threshold)
    accs = [_Acc() for _ in pairs]
    remaining = [sum(1 for _ in _chunk_plan([p], chunk_elems)) for p in pairs]

    biggest = max((count for _, _, count in _chunk_plan(pairs, chunk_elems)), default=0)
    size = max((max(p.source.itemsize, p.target.itemsize) for p in pairs), default=1)
    # two read slots per side (one being filled by the prefetch thread while the other is computed)
    slots = [(bytearray(biggest * size), bytearray(biggest * size)) for _ in range(2 if prefetch else 1)]
    work = _Work(biggest)

    def load(task, slot):
        i, start, count = task
        src_buf, tgt_buf = slots[slot]
        return task, rd.read(pairs[i].source, start, count, src_buf), rd.read(pairs[i].target, start, count, tgt_buf)

    results: list[Optional[LayerRelatedness]] = [None] * len(pairs)

    def finish(i: int) -> None:
        layer = results[i] = accs[i].result(pairs[i])
        if on_layer is not None:
            on_layer(layer)

    def add(loaded) -> None:
        """Fold one chunk of a layer into its accumulator; finish the layer at its last chunk."""
        (i, _, count), s, t = loaded
        out.max_chunk_elems = max(out.max_chunk_elems, count)
        accs[i].add(s, t, work)
        remaining[i] -= 1
        if remaining[i] == 0:
            finish(i)

    for i, n in enumerate(remaining):
        if n == 0:  # an empty weight: nothing to read
            finish(i)
    plan = _chunk_plan(pairs, chunk_elems)
    try:
        if prefetch:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorareg-read") as pool:
                slot = 0
                nxt = next(plan, None)
                pending = pool.submit(load, nxt, slot) if nxt is not None else None
                while pending is not None:
                    loaded = pending.result()
                    slot ^= 1  # the next read fills the other slot while this one is computed
                    nxt = next(plan, None)
                    pending = pool.submit(load, nxt, slot) if nxt is not None else None
                    add(loaded)
                    del loaded
        else:
            for task in plan:
                add(load(task, 0))
    finally:
        if own:
            rd.close()
    out.layers = [l for l in results if l is not None]
    out.bytes_read = rd.bytes_read - bytes0
    out.seconds = time.perf_counter() - t0
    return out


def compare(source: StoredWeight, target: StoredWeight, **kwargs) -> LayerRelatedness:
    """One pair (see :func:`check_pairs`)."""
    return check_pairs([WeightPair("weight", source, target)], **kwargs).layers[0]


def stored_in_file(path: Path | str, header_offset: int, begin: int, end: int, shape, dtype: torch.dtype) -> StoredWeight:
    """A whole tensor of a safetensors file (``header_offset``: start of the data section)."""
    return StoredWeight((ByteRange(Path(path), header_offset + begin, end - begin),), tuple(shape), dtype)
