"""What lorareg learnt about a file, remembered by its fingerprint (path, size, mtime, inode): its hashes,
which of its tensors hold NaN/Inf, and the data hash of an output made of its bytes. A file converted,
ported or scanned again is not hashed or scanned again. A changed file has a new fingerprint, so a stale
entry is never used."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

from .hashes import FileHashes, file_hashes
from .io import DTYPES, LazyTensor, SafetensorsHeader, atomic_write_text, file_nonfinite

#: bump when an entry changes meaning: old entries are then simply not found
MEMORY_VERSION = 1

T = TypeVar("T")


def fingerprint(path: Path) -> Optional[str]:
    """A cheap identity of a file's current bytes, or None when it cannot be had."""
    try:
        st = os.stat(path)
        real = os.path.realpath(path)
    except OSError:
        return None
    key = f"{MEMORY_VERSION}|{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_dev}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _entry(root: Optional[Path], kind: str, key: Optional[str]) -> Optional[Path]:
    return root / kind / key[:2] / f"{key}.json" if root is not None and key else None


def recall(root: Optional[Path], kind: str, key: Optional[str], load: Callable[[str], T]) -> Optional[T]:
    """What was remembered under ``root/kind/key``, or None (nothing, or a damaged entry)."""
    entry = _entry(root, kind, key)
    if entry is None:
        return None
    try:
        return load(entry.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def remember(root: Optional[Path], kind: str, key: Optional[str], text: str) -> None:
    entry = _entry(root, kind, key)
    if entry is not None:
        try:
            atomic_write_text(entry, text + "\n")
        except OSError:
            pass  # a read-only cache still works, it just computes again next time


def remembered(root: Optional[Path], kind: str, key: Optional[str], compute: Callable[[], T],
               dump: Callable[[T], str], load: Callable[[str], T]) -> T:
    """``compute()``, or what it gave before under ``root/kind/key`` (no root or key: always computed)."""
    value = recall(root, kind, key, load)
    if value is None:
        value = compute()
        remember(root, kind, key, dump(value))
    return value


def data_recipe(tensors: Sequence[LazyTensor], max_memory_share: float = 0.125) -> Optional[str]:
    """An identity of the bytes these tensors make laid end to end (a data section about to be written):
    tensors still in a file by that file's fingerprint and their byte range, tensors made in memory by their
    own SHA-256. None when it cannot be had, or when hashing the in-memory tensors would cost more than
    ``max_memory_share`` of hashing the whole (a LoRA computed anew, not copied from a file).

    File tensors are never changed in place (lorareg makes new tensors for new values), so a file range
    of an unchanged file is the same bytes."""
    parts = [f"{MEMORY_VERSION}|data"]
    prints: dict[int, Optional[str]] = {}
    total = sum(t.numel * DTYPES[t.dtype][1] for t in tensors)
    in_memory = 0
    for t in tensors:
        where = t.stored()
        if where is not None:
            header, info = where
            if id(header) not in prints:
                prints[id(header)] = fingerprint(header.path)
            fp = prints[id(header)]
            if fp is None:
                return None
            parts.append(f"F{fp}:{info.begin}:{info.end}")
        else:
            buf = t.buffer()
            in_memory += len(buf)
            if in_memory > max_memory_share * total:
                return None
            parts.append(f"M{len(buf)}:{hashlib.sha256(buf).hexdigest()}")
    return hashlib.sha256(";".join(parts).encode()).hexdigest()


def remembered_file_hashes(header: SafetensorsHeader, root: Optional[Path], stop: Optional[threading.Event] = None) -> FileHashes:
    """:func:`file_hashes` of the file, from ``root/file-hashes`` when its fingerprint is known there
    (``stop``: set, it ends the hashing early with HashingStopped)."""
    fp = fingerprint(header.path) if root is not None else None
    compute = (lambda: file_hashes(header)[0]) if stop is None else (lambda: file_hashes(header, stop)[0])
    return remembered(root, "file-hashes", fp, compute, lambda h: h.model_dump_json(), FileHashes.model_validate_json)


def remember_file_hashes(path: Path, hashes: FileHashes, root: Optional[Path], fp: Optional[str] = None) -> None:
    """Record hashes taken elsewhere (a batch's plan) for the file at ``path`` as it is now (``fp``: the fingerprint
    they were taken at; nothing is recorded if the file has changed since)."""
    now = fingerprint(path)
    if now is not None and (fp is None or fp == now) and recall(root, "file-hashes", now, FileHashes.model_validate_json) is None:
        remember(root, "file-hashes", now, hashes.model_dump_json())


def remembered_nonfinite(header: SafetensorsHeader, root: Optional[Path]) -> frozenset[str]:
    """The file's tensors holding NaN/Inf (:func:`lorareg.core.io.file_nonfinite`), remembered by fingerprint."""
    fp = fingerprint(header.path) if root is not None else None

    def load(text: str) -> frozenset[str]:
        names = json.loads(text)["nonfinite"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("damaged entry")
        return frozenset(names)

    return remembered(root, "file-nonfinite", fp, lambda: file_nonfinite(header),
                      lambda names: json.dumps({"nonfinite": sorted(names)}), load)
