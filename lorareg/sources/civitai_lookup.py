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
    if offline():
        raise InputError("looking a file up on Civitai needs the network, but offline mode is on")
    for by, digest in (("sha256", hashes.sha256), ("autov3", hashes.autov3)):
        hit = by_hash(digest)
        if hit is not None:
            return Lookup(path=str(path), hashes=hashes, found=True, matched_by=by, civitai=hit)
    return Lookup(path=str(path), hashes=hashes, found=False)
