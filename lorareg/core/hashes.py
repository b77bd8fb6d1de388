"""The hashes the ecosystem identifies a safetensors file by, and the check of the ones a file embeds.

Definitions (public sources; see docs/provenance.md):

- ``sha256``: SHA-256 of the whole file. Civitai's ``files[].hashes.SHA256`` (developer.civitai.com,
  "Model versions" reference) and the Hub's LFS oid.
- ``autov2``: the first 10 hex digits of ``sha256`` (Civitai's ``AutoV2``; AUTOMATIC1111's
  ``shorthash`` of a checkpoint).
- ``tensor_sha256``: SHA-256 of the bytes after the header (from ``8 + header length`` to the end):
  sd-scripts' ``addnet_hash_safetensors`` (library/train_util.py), written as ``sshs_model_hash``;
  ModelSpec's ``modelspec.hash_sha256`` ("a hash of all tensor content, ie excluding the header
  section, with 0x prefix", Stability-AI/ModelSpec README). Editing metadata does not change it.
- ``autov3``: the first 12 hex digits of ``tensor_sha256`` (Civitai's ``AutoV3``, 12 digits in the
  API's examples; AUTOMATIC1111's LoRA ``shorthash`` of the addnet hash).
- ``legacy``: sd-scripts' ``addnet_hash_legacy``, written as ``sshs_legacy_hash``: the first 8 hex
  digits of the SHA-256 of the 0x10000 bytes at offset 0x100000 of the file *as serialised with only
  its ``ss_*`` metadata* (sd-scripts' ``precalculate_safetensors_hashes``; sd-webui-additional-networks
  re-serialises the same way to check it). A file under ~1 MiB reads nothing there: the hash of
  empty input, ``e3b0c442``.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Literal, Mapping, Optional

from pydantic import BaseModel

from .io import DTYPES, LazyTensor, SafetensorsHeader, build_header

LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000
AUTOV2_DIGITS = 10
AUTOV3_DIGITS = 12
LEGACY_DIGITS = 8
#: the hash fields a file may embed about itself, and which hash each one must equal
EMBEDDED_FIELDS = {
    "sshs_model_hash": "tensor_sha256",
    "sshs_legacy_hash": "legacy",
    "modelspec.hash_sha256": "tensor_sha256",
}
_CHUNK = 1 << 22
#: the safetensors library writes tensors sorted by dtype (its ``Dtype`` enum order, descending), then
#: name (safetensors/src/tensor.rs, ``prepare``); sd-scripts' legacy hash is taken on that layout
SAFETENSORS_DTYPE_RANK = {name: i for i, name in enumerate(
    ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"])}


class FileHashes(BaseModel):
    """The four hashes of one safetensors file (lowercase hex)."""

    sha256: str
    autov2: str
    tensor_sha256: str
    autov3: str
    legacy: str


class EmbeddedHash(BaseModel):
    """One hash field of the file's metadata, checked against the file.

    ``unverifiable``: only for ``sshs_legacy_hash`` when the 64 KiB window falls inside a header
    whose byte order sd-scripts did not fix (metadata over ~1 MiB)."""

    key: str
    status: Literal["ok", "wrong", "absent", "unverifiable"]
    embedded: Optional[str] = None
    expected: str


def _normalize(value: str) -> str:
    v = value.strip().lower()
    return v[2:] if v.startswith("0x") else v


def ss_header(tensors: Iterable[tuple[str, str, list[int], int, int]], metadata: Mapping[str, str]) -> bytes:
    """The header sd-scripts hashes the legacy window of: only ``ss_*`` metadata (always present, maybe
    empty, as safetensors writes a given dict), the tensors at the given offsets, padded with spaces to 8.
    Key order does not change its length; its bytes matter only when the metadata exceeds ~1 MiB."""
    doc: dict[str, object] = {"__metadata__": {k: metadata[k] for k in sorted(metadata) if k.startswith("ss_")}}
    for name, dtype, shape, begin, end in tensors:
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def legacy_window(header: bytes, data: memoryview) -> tuple[str, bool]:
    """(legacy hash of ``8-byte length + header + data``, whether the window touched the header)."""
    head = struct.pack("<Q", len(header)) + header
    h = hashlib.sha256()
    start, stop = LEGACY_OFFSET, LEGACY_OFFSET + LEGACY_LENGTH
    touched = start < len(head)
    if touched:
        h.update(head[start:stop])
    lo, hi = max(start - len(head), 0), max(stop - len(head), 0)
    h.update(data[lo:hi])
    return h.hexdigest()[:LEGACY_DIGITS], touched


class HashingStopped(Exception):
    """The hashing was asked to stop (its result was no longer wanted)."""


def file_hashes(header: SafetensorsHeader, stop: Optional[threading.Event] = None) -> tuple[FileHashes, bool]:
    """The file's hashes, and whether the legacy window fell in the re-serialised header.

    The whole-file and the data-section SHA-256 read the same mapped pages, each in its own thread
    (hashlib releases the GIL on large buffers): one read of the file, two cores' worth of hashing.
    ``stop``: once set, the hashing ends early with HashingStopped."""
    view = memoryview(header.mapping())
    with ThreadPoolExecutor(max_workers=1) as pool:
        data_hash = pool.submit(_sha256, view, header.data_offset, stop)
        try:
            whole = _sha256(view, 0, stop)
        finally:
            tsha = data_hash.result() if stop is None or not stop.is_set() else None
    if tsha is None:
        raise HashingStopped()
    legacy, touched = legacy_hash(header)
    return FileHashes(sha256=whole, autov2=whole[:AUTOV2_DIGITS], tensor_sha256=tsha, autov3=tsha[:AUTOV3_DIGITS], legacy=legacy), touched


def legacy_hash(header: SafetensorsHeader) -> tuple[str, bool]:
    """The file's legacy hash, and whether its window fell in the re-serialised header (reads 64 KiB at most)."""
    infos = {name: (t.dtype, list(t.shape), t.nbytes, lambda t=t: header.view(t)) for name, t in header.tensors.items()}
    return _legacy(infos, header.metadata)


def _sha256(view: memoryview, start: int, stop: Optional[threading.Event] = None) -> str:
    h = hashlib.sha256()
    for i in range(start, len(view), _CHUNK):
        if stop is not None and stop.is_set():
            raise HashingStopped()
        h.update(view[i : i + _CHUNK])
    return h.hexdigest()


def _legacy(infos: Mapping[str, tuple[str, list[int], int, Callable[[], memoryview]]], metadata: Mapping[str, str]) -> tuple[str, bool]:
    """sd-scripts' legacy hash: the tensors laid out as the safetensors library lays them out, with
    only the ``ss_*`` metadata, and the 64 KiB window at 1 MiB of that serialisation hashed.
    ``infos``: name -> (dtype, shape, byte size, its bytes when asked: only the window's are)."""
    order = sorted(infos, key=lambda n: (-SAFETENSORS_DTYPE_RANK[infos[n][0]], n))
    spans, offset = [], 0
    for name in order:
        dtype, shape, nbytes, _ = infos[name]
        spans.append((name, dtype, shape, offset, offset + nbytes))
        offset += nbytes
    return legacy_window(ss_header(spans, metadata), _Concat([infos[n][2:] for n in order]))  # type: ignore[arg-type]


def check_embedded(metadata: Mapping[str, str], hashes: FileHashes, legacy_in_header: bool = False) -> list[EmbeddedHash]:
    """Each known hash field: ``ok``, ``wrong`` (it names other content) or ``absent``."""
    out = []
    for key, which in EMBEDDED_FIELDS.items():
        expected = getattr(hashes, which)
        value = metadata.get(key)
        if value is None or not value.strip():
            out.append(EmbeddedHash(key=key, status="absent", expected=expected))
            continue
        ok = _normalize(value) == expected
        status = "ok" if ok else ("unverifiable" if key == "sshs_legacy_hash" and legacy_in_header else "wrong")
        out.append(EmbeddedHash(key=key, status=status, embedded=value, expected=expected))
    return out


def own_hash_fields(tensors: Mapping[str, LazyTensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """The hash fields a file about to be written with these tensors and metadata must carry for itself.

    Only tensor-data hashes can be embedded: the data section does not depend on the header, so they
    are known before writing (a whole-file SHA-256 cannot be stored in the file it hashes)."""
    _, order = build_header(tensors, metadata)  # the writer's data order
    h = hashlib.sha256()
    for name in order:
        h.update(tensors[name].buffer())
    return own_fields(h.hexdigest(), own_legacy_hash(tensors, metadata))


def own_legacy_hash(tensors: Mapping[str, LazyTensor], metadata: Mapping[str, str]) -> str:
    """The legacy hash of a file about to be written (only its ``ss_*`` metadata and its tensors count)."""
    return _legacy({n: (t.dtype, list(t.shape), t.numel * DTYPES[t.dtype][1], t.buffer) for n, t in tensors.items()}, metadata)[0]


def own_fields(tensor_sha256: str, legacy: str) -> dict[str, str]:
    """The fields a file carries about itself, from the SHA-256 of its data section and its legacy hash."""
    return {"sshs_model_hash": tensor_sha256, "sshs_legacy_hash": legacy, "modelspec.hash_sha256": "0x" + tensor_sha256}


#: stand-ins of the final lengths, for a header written before the hashes are known (and replaced after)
PLACEHOLDER_HASHES = FileHashes(sha256="0" * 64, autov2="0" * AUTOV2_DIGITS, tensor_sha256="0" * 64,
                                autov3="0" * AUTOV3_DIGITS, legacy="0" * LEGACY_DIGITS)


class _Concat:
    """Slices of the concatenation of buffers, without building it (only the legacy window is read).
    ``parts``: (byte size, its bytes when asked)."""

    def __init__(self, parts: list[tuple[int, Callable[[], memoryview]]]):
        self.parts = parts

    def __getitem__(self, s: slice) -> bytes:
        lo, hi, out, pos = s.start, s.stop, [], 0
        for size, get in self.parts:
            end = pos + size
            if end > lo and pos < hi:
                p = memoryview(get()).cast("B")
                out.append(bytes(p[max(lo - pos, 0) : min(hi, end) - pos]))
            pos = end
            if pos >= hi:
                break
        return b"".join(out)


def without_inherited_hashes(metadata: Mapping[str, str]) -> dict[str, str]:
    """Metadata minus the hash fields that describe another file's content (a derived file's source)."""
    return {k: v for k, v in metadata.items() if k not in EMBEDDED_FIELDS and not k.startswith("modelspec.hash_")}


def source_hash_fields(hashes: Optional[FileHashes]) -> dict[str, str]:
    """The source file's hashes, recorded as ``lorareg.source_*`` (never as the output's own)."""
    if hashes is None:
        return {}
    return {
        "lorareg.source_sha256": hashes.sha256,
        "lorareg.source_tensor_sha256": hashes.tensor_sha256,
        "lorareg.source_legacy_hash": hashes.legacy,
    }
