"""Safetensors I/O without trusting the input: header validation, lazy tensors, atomic writes.

Reading parses the header ourselves so that a bad file gives one clear error, and tensors stay
byte ranges of the file until something needs their values. Writing emits a deterministic header
(sorted keys, no whitespace) and copies unchanged tensors as raw bytes, so converting a file never
materialises tensors it does not change.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import struct
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Mapping, Optional, Union

import torch

from .errors import InputError

# safetensors dtype name -> (torch dtype, item size in bytes)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "I16": (torch.int16, 2),
    "I32": (torch.int32, 4),
    "I64": (torch.int64, 8),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
TORCH_TO_ST = {t: name for name, (t, _) in DTYPES.items()}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}

MAX_HEADER_BYTES = 100 * 1024 * 1024
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset relative to the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class SafetensorsHeader:
    path: Path
    data_offset: int  # absolute offset of the data section (8 + header length)
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_size: int
    _map: Optional[mmap.mmap] = field(default=None, repr=False, compare=False)
    _view: Optional[memoryview] = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def mapping(self) -> mmap.mmap:
        """The file mapped copy-on-write: tensors are views of it, writes never reach the file."""
        if self._map is None:
            with self._lock:  # hashing threads and the reader may ask at once: map the file once
                if self._map is None:
                    with open(self.path, "rb") as f:
                        if os.fstat(f.fileno()).st_size != self.file_size:
                            raise InputError(f"{self.path}: file changed while reading")
                        self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._map

    def view(self, info: TensorInfo) -> memoryview:
        if self._view is None:
            self._view = memoryview(self.mapping())
        start = self.data_offset + info.begin
        return self._view[start : start + info.end - info.begin]

    def sha256(self) -> str:
        return hashlib.sha256(memoryview(self.mapping())).hexdigest()


def is_pickle(head: bytes, size: int) -> bool:
    """Whether a file starting with ``head`` (its first 9 bytes or more) is a pickle or a torch.save zip.

    A safetensors file begins with its header's length, and a length such as 640 (bytes 80 02) reads as pickle's
    magic: such a file is safetensors when that length fits the file and the header starts with ``{``.
    """
    if not (head[:2] in PICKLE_MAGIC or head.startswith(ZIP_MAGIC)):
        return False
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n <= MAX_HEADER_BYTES and 8 + n <= size and head[8:9] == b"{":
            return False
    return True


def _refuse_non_safetensors(path: Path, head: bytes, size: int) -> None:
    if is_pickle(head, size):
        raise InputError(
            f"{path}: this is a pickle/PyTorch checkpoint, not safetensors; lorareg never unpickles "
            "files (convert it to .safetensors with a tool you trust)"
        )


def read_header(path: Union[str, Path]) -> SafetensorsHeader:
    """Parse and validate a safetensors header; raise InputError with one line on any defect."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a .safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        _refuse_non_safetensors(path, head, size)
        head = head[:8]
        f.seek(8)
        if len(head) < 8:
            raise InputError(f"{path}: file too short to be safetensors ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise InputError(
                f"{path}: not a valid safetensors file (header length {n} does not fit a file of {size} bytes)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: safetensors header is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InputError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_size)
    _check_layout(path, tensors, data_size)
    return SafetensorsHeader(path=path, data_offset=8 + n, tensors=tensors, metadata=dict(metadata), file_size=size)


def _tensor_info(path: Path, name: str, entry: object, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise InputError(f"{path}: header entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise InputError(f"{path}: tensor {name!r} has no dtype")
    if dtype not in DTYPES:
        raise InputError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    if type(shape) is not list or any(type(d) is not int or d < 0 for d in shape):
        raise InputError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int or type(offsets[1]) is not int:
        raise InputError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if begin < 0 or end < begin or end > data_size:
        raise InputError(f"{path}: tensor {name!r} lies outside the file (truncated or corrupt)")
    if end - begin != numel * DTYPES[dtype][1]:
        raise InputError(f"{path}: tensor {name!r} byte size does not match its shape and dtype")
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _check_layout(path: Path, tensors: Mapping[str, TensorInfo], data_size: int) -> None:
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise InputError(f"{path}: tensors {n0!r} and {n1!r} overlap (corrupt header)")


def tensor_buffer(t: torch.Tensor) -> memoryview:
    """A tensor's bytes in C order as a flat memoryview, without numpy (not a core dependency).

    No copy for a contiguous CPU tensor: a ctypes array over its data, which keeps the tensor alive.
    Non-contiguous, conjugated or non-CPU tensors are made contiguous CPU copies first.
    """
    t = t.detach().resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(b"")
    arr = (ctypes.c_ubyte * nbytes).from_address(t.data_ptr())
    arr._owner = t  # type: ignore[attr-defined]  # the memory belongs to t: keep it alive with the view
    return memoryview(arr).cast("B")


class LazyTensor:
    """A tensor that is still a byte range of a file, or an in-memory torch tensor."""

    __slots__ = ("dtype", "shape", "_header", "_info", "_tensor")

    def __init__(
        self,
        dtype: str,
        shape: tuple[int, ...],
        *,
        header: SafetensorsHeader | None = None,
        info: TensorInfo | None = None,
        tensor: torch.Tensor | None = None,
    ):
        self.dtype = dtype
        self.shape = tuple(shape)
        self._header = header
        self._info = info
        self._tensor = tensor

    @classmethod
    def from_torch(cls, t: torch.Tensor) -> "LazyTensor":
        if t.dtype not in TORCH_TO_ST:
            raise InputError(f"unsupported tensor dtype {t.dtype}")
        t = t.detach()
        return cls(TORCH_TO_ST[t.dtype], tuple(t.shape), tensor=t)

    @property
    def in_file(self) -> bool:
        return self._header is not None

    def stored(self) -> Optional[tuple[SafetensorsHeader, TensorInfo]]:
        """The file and byte range holding this tensor's bytes, or None for a tensor made in memory."""
        return (self._header, self._info) if self._header is not None and self._info is not None else None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def raw_bytes(self) -> bytes:
        """The tensor's bytes exactly as safetensors stores them (little endian, C order)."""
        return bytes(self.buffer())

    def buffer(self) -> memoryview:
        """The stored bytes without copying (a view of the mapped file for tensors still in a file)."""
        if self._tensor is not None:
            return tensor_buffer(self._tensor)
        assert self._header is not None and self._info is not None
        return self._header.view(self._info)

    def torch(self) -> torch.Tensor:
        """As a torch tensor. For a file tensor: a view of the copy-on-write mapping (no copy)."""
        if self._tensor is not None:
            return self._tensor
        torch_dtype, _ = DTYPES[self.dtype]
        if self.numel == 0:
            return torch.empty(self.shape, dtype=torch_dtype)
        t = torch.frombuffer(self._header.mapping(), dtype=torch_dtype, count=self.numel,
                             offset=self._header.data_offset + self._info.begin)
        self._tensor = t.reshape(self.shape)
        return self._tensor

    def float(self) -> torch.Tensor:
        return self.torch().to(torch.float32)

    def __repr__(self) -> str:
        where = "file" if self.in_file else "memory"
        return f"LazyTensor({self.dtype}, {list(self.shape)}, {where})"


TensorLike = Union[LazyTensor, torch.Tensor]


def open_tensors(path: Union[str, Path]) -> tuple[dict[str, LazyTensor], dict[str, str], SafetensorsHeader]:
    """All tensors of a safetensors file as lazy tensors, plus its metadata."""
    header = read_header(path)
    tensors = {
        name: LazyTensor(info.dtype, info.shape, header=header, info=info) for name, info in header.tensors.items()
    }
    return tensors, header.metadata, header


def _as_lazy(t: TensorLike) -> LazyTensor:
    return t if isinstance(t, LazyTensor) else LazyTensor.from_torch(t)


def build_header(tensors: Mapping[str, LazyTensor], metadata: Mapping[str, str] | None,
                 entries: Optional[str] = None) -> tuple[bytes, list[str]]:
    """A deterministic header: keys sorted, compact JSON, padded to 8 bytes. Returns (header, order).
    ``entries``: :func:`tensor_entries` of these tensors, when already made (a header written twice)."""
    order = sorted(tensors)
    parts = []
    if metadata:
        meta = {k: str(metadata[k]) for k in sorted(metadata)}
        parts.append('"__metadata__":' + json.dumps(meta, separators=(",", ":"), ensure_ascii=False))
    entries = tensor_entries(tensors, order) if entries is None else entries
    if entries:
        parts.append(entries)
    raw = ("{" + ",".join(parts) + "}").encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return raw, order


def tensor_entries(tensors: Mapping[str, LazyTensor], order: list[str]) -> str:
    """The header's tensor entries (JSON object members, no braces), data laid out in ``order``."""
    entries: dict[str, object] = {}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel * DTYPES[t.dtype][1]
        entries[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    return json.dumps(entries, separators=(",", ":"), ensure_ascii=False)[1:-1]


def write_safetensors(
    path: Union[str, Path],
    tensors: Mapping[str, TensorLike],
    metadata: Mapping[str, str] | None = None,
    *,
    digest: bool = False,
    finish: Optional[Callable[[str], Mapping[str, str]]] = None,
    data_sha256: Optional[str] = None,
) -> Optional[str]:
    """Write atomically (temp file in the same folder, then rename); with digest, return the file's SHA-256.

    ``finish(data_sha256)``: the final metadata, known only once the data section is written (hash fields
    about this very file and hashes still being computed elsewhere); ``metadata`` then holds placeholders
    of the same lengths. The data section is written first and SHA-256-hashed from the same buffers as they
    are written (in a second thread: hashlib and file writes release the GIL), then the header goes in at
    the front. ``data_sha256``: that hash when already known (it is then not computed)."""
    path = Path(path)
    lazy = {name: _as_lazy(t) for name, t in tensors.items()}
    entries = tensor_entries(lazy, sorted(lazy))
    raw_header, order = build_header(lazy, metadata, entries)
    if finish is None:
        hasher = hashlib.sha256() if digest else None

        def write(f: BinaryIO) -> None:
            for chunk in (struct.pack("<Q", len(raw_header)), raw_header, *(lazy[name].buffer() for name in order)):
                if hasher is not None:
                    hasher.update(chunk)
                f.write(chunk)

        atomic_write(path, write)
        return hasher.hexdigest() if hasher else None
    if digest:
        raise TypeError("digest and finish cannot be combined: the header is written last")

    def write_late(f: BinaryIO) -> None:
        buffers = [lazy[name].buffer() for name in order]
        f.seek(8 + len(raw_header))
        if data_sha256 is None:
            with ThreadPoolExecutor(max_workers=1) as pool:
                hashed = pool.submit(_sha256_of, buffers)
                for buf in buffers:
                    f.write(buf)
                data = hashed.result()
        else:
            for buf in buffers:
                f.write(buf)
            data = data_sha256
        header, _ = build_header(lazy, finish(data), entries)
        if len(header) != len(raw_header):  # a final value of another length: lay the file out again
            f.seek(0)
            f.truncate()
            for chunk in (struct.pack("<Q", len(header)), header, *buffers):
                f.write(chunk)
        else:
            f.seek(0)
            f.write(struct.pack("<Q", len(header)) + header)

    atomic_write(path, write_late)
    return None


def _sha256_of(buffers) -> str:
    h = hashlib.sha256()
    for buf in buffers:
        h.update(buf)
    return h.hexdigest()


def atomic_write(path: Path, writer) -> None:
    """Run writer(fileobj) on a temp file next to path and rename it into place; nothing on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


@dataclass
class NonFinite:
    name: str
    nan: int
    inf: int


def scan_nonfinite(tensors: Mapping[str, LazyTensor], known_finite: Optional[Callable[[LazyTensor], bool]] = None) -> list[NonFinite]:
    """Tensors holding NaN or Inf values (max |x| is finite iff every element is: NaN propagates).

    ``known_finite(t)``: True for a tensor known to hold only finite values (not scanned again)."""
    found: list[NonFinite] = []
    with _one_thread():
        _scan({k: t for k, t in tensors.items() if known_finite is None or not known_finite(t)}, found)
    return found


@contextmanager
def _one_thread():
    # LoRA factors are small: a thread pool costs more than it saves (and stalls on a busy machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _scan(tensors: Mapping[str, LazyTensor], found: list[NonFinite]) -> None:
    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES or t.numel == 0:
            continue
        x = t.torch()
        if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            x = x.float()
        if bool(torch.isfinite(x.abs().max())):
            continue
        x = x.float()
        nan = int(torch.isnan(x).sum())
        found.append(NonFinite(name, nan, int((~torch.isfinite(x)).sum()) - nan))


def file_nonfinite(header: SafetensorsHeader) -> frozenset[str]:
    """The names of a file's float tensors holding NaN or Inf, in about one pass over its data.

    Adjacent tensors of one dtype are checked as one run: a finite sum means every element is finite
    (NaN and Inf survive addition); a sum that is not (or overflows) falls back to the run's min and max
    (NaN propagates, nothing overflows), and only a run holding NaN/Inf is looked at tensor by tensor."""
    runs: list[list[TensorInfo]] = []
    for info in sorted(header.tensors.values(), key=lambda i: i.begin):
        if info.dtype not in FLOAT_DTYPES or info.end == info.begin:
            continue
        if runs and runs[-1][-1].dtype == info.dtype and runs[-1][-1].end == info.begin and info.dtype in _SUMMABLE:
            runs[-1].append(info)
        else:
            runs.append([info])
    bad: set[str] = set()
    with _one_thread():
        for run in runs:
            dtype, size = DTYPES[run[0].dtype]
            if run[0].dtype in _SUMMABLE:
                x = torch.frombuffer(header.mapping(), dtype=dtype, count=(run[-1].end - run[0].begin) // size,
                                     offset=header.data_offset + run[0].begin)
                if bool(torch.isfinite(x.sum())) or all(bool(torch.isfinite(v)) for v in torch.aminmax(x)):
                    continue
            found: list[NonFinite] = []
            _scan({i.name: LazyTensor(i.dtype, i.shape, header=header, info=i) for i in run}, found)
            bad.update(nf.name for nf in found)
    return frozenset(bad)


_SUMMABLE = {"F16", "BF16", "F32", "F64"}


@dataclass
class PeftDirectory:
    """A PEFT adapter folder: adapter_model.safetensors + adapter_config.json."""

    path: Path
    weights: Path
    config: dict = field(default_factory=dict)


PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def read_peft_directory(path: Union[str, Path]) -> PeftDirectory:
    path = Path(path)
    weights, config = path / PEFT_WEIGHTS, path / PEFT_CONFIG
    if not weights.exists():
        if (path / "adapter_model.bin").exists():
            raise InputError(f"{path}: only adapter_model.bin (a pickle) is present; lorareg never unpickles files")
        raise InputError(f"{path}: not a PEFT adapter folder (no {PEFT_WEIGHTS})")
    if not config.exists():
        raise InputError(f"{path}: PEFT adapter folder has no {PEFT_CONFIG}")
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{config}: invalid JSON ({e.__class__.__name__})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{config}: expected a JSON object")
    return PeftDirectory(path=path, weights=weights, config=cfg)


def same_file(a: Union[str, Path], b: Union[str, Path]) -> bool:
    a, b = Path(a), Path(b)
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False

