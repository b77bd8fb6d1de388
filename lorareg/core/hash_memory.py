"""A file's hashes remembered by its fingerprint (path, size, mtime, inode): a file converted, ported or
scanned again is not hashed again. A changed file has a new fingerprint, so a stale entry is never used."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

from .hashes import FileHashes, file_hashes
from .io import SafetensorsHeader, atomic_write_text

#: bump when FileHashes changes meaning: old entries are then simply not found
MEMORY_VERSION = 1


def fingerprint(path: Path) -> Optional[str]:
    """A cheap identity of a file's current bytes, or None when it cannot be had."""
    try:
        st = os.stat(path)
        real = os.path.realpath(path)
    except OSError:
        return None
    key = f"{MEMORY_VERSION}|{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_dev}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def remembered_file_hashes(header: SafetensorsHeader, root: Optional[Path]) -> FileHashes:
    """:func:`file_hashes` of the file, from ``root/file-hashes`` when its fingerprint is known there."""
    fp = fingerprint(header.path) if root is not None else None
    entry = root / "file-hashes" / fp[:2] / f"{fp}.json" if fp else None
    if entry is not None:
        try:
            return FileHashes.model_validate_json(entry.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # not remembered (or a damaged entry): hash the file
    hashes = file_hashes(header)[0]
    if entry is not None:
        try:
            atomic_write_text(entry, hashes.model_dump_json() + "\n")
        except OSError:
            pass  # a read-only cache still works, it just hashes again next time
    return hashes
