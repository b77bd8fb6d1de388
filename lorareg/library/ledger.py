"""The ledger of a batch: one JSON line per finished row, in OUTDIR beside the outputs.

A row is identified by the SHA-256 of (source LoRA SHA-256, target, every option, lorareg version).
Each record is appended with one ``write`` on an ``O_APPEND`` descriptor and ``fsync``'d before the
driver moves on, after the row's output was written atomically: a batch killed at any point leaves
every recorded row complete on disk, and a re-run skips exactly the rows recorded as done. A torn
last line (killed mid-write) is ignored and terminated before the next append. One batch at a time
holds OUTDIR (an ``flock`` on ``ledger.lock``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from ..core.errors import InputError
from ..core.version import __version__

LEDGER = "ledger.jsonl"
LOCK = "ledger.lock"


def row_key(source_sha256: Optional[str], lora: str, options: dict[str, Any], version: str = __version__) -> str:
    """What identifies a row's result (the path only when the source could not be hashed)."""
    ident = {"source": source_sha256 or f"path:{lora}", "options": options, "lorareg": version}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


class Ledger:
    """Append-only JSONL of row records; the last record of a key is its state."""

    def __init__(self, outdir: Path):
        self.path = Path(outdir) / LEDGER
        self.lock_path = Path(outdir) / LOCK
        self._lock_fd: Optional[int] = None

    # -- one batch at a time -------------------------------------------------------------------
    def __enter__(self) -> "Ledger":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise InputError(f"{self.path.parent}: another batch is running in this folder") from None
        self._lock_fd = fd
        self._repair()
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _repair(self) -> None:
        """Terminate a torn last line so that the next record starts on a line of its own."""
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() == 0:
                    return
                f.seek(-1, os.SEEK_END)
                last = f.read(1)
        except FileNotFoundError:
            return
        if last != b"\n":
            self._write(b"\n")

    # -- records -------------------------------------------------------------------------------
    def records(self) -> list[dict]:
        """Every complete record, in order (torn or foreign lines are skipped)."""
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("key"), str):
                out.append(rec)
        return out

    def state(self) -> dict[str, dict]:
        """key -> its last record."""
        return {rec["key"]: rec for rec in self.records()}

    def append(self, record: dict) -> None:
        record = {**record, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._write((json.dumps(record, sort_keys=True, separators=(",", ":"), default=str) + "\n").encode("utf-8"))

    def _write(self, data: bytes) -> None:
        new = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:  # the file's name must survive a crash too
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
