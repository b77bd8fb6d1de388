"""Which Civitai model version a local file is: by its SHA-256, then by its tensor-data hash (AutoV3),
which still matches after the file's metadata was edited."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel

from ..core.hashes import FileHashes, file_hashes
from ..core.io import read_header, read_peft_directory
from .civitai import CivitaiLora, by_hash, offline
from ..core.errors import InputError


class Lookup(BaseModel):
    path: str
    hashes: FileHashes
    found: bool
    matched_by: Optional[Literal["sha256", "autov3"]] = None
    civitai: Optional[CivitaiLora] = None


def lookup_file(path: Union[str, Path]) -> Lookup:
    path = Path(path)
    weights = read_peft_directory(path).weights if path.is_dir() else path
    hashes, _ = file_hashes(read_header(weights))
    matched_by, hit = lookup_hashes(hashes.sha256, hashes.autov3)
    return Lookup(path=str(path), hashes=hashes, found=hit is not None, matched_by=matched_by, civitai=hit)


def lookup_hashes(sha256: Optional[str], autov3: Optional[str]) -> tuple[Optional[str], Optional[CivitaiLora]]:
    """The Civitai version of a file by its SHA-256, then by its tensor-data hash: (matched by, version) or (None, None)."""
    if offline():
        raise InputError("looking a file up on Civitai needs the network, but offline mode is on")
    for by, digest in (("sha256", sha256), ("autov3", autov3)):
        hit = by_hash(digest) if digest else None
        if hit is not None:
            return by, hit
    return None, None
