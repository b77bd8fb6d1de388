"""Content-addressed on-disk store of top-k bases (safetensors, atomic writes, checked reads).

Layout: ``<root>/<digest[:2]>/<digest>/<version>/k<k>.safetensors`` holding tensors ``U``, ``S``,
``V`` (fp32) and metadata (format, digest, version, k, m, n, per-tensor checksums). ``digest`` is
the sha256 of the weight's raw bytes plus its dtype and shape (:func:`weight_digest`).

The per-tensor checksum is the sum of the tensor's bytes read as little-endian 64-bit words,
modulo 2⁶⁴ (order independent, so deterministic on any machine, and ~9 GB/s on 2 CPU cores versus
~1.3 GB/s for sha256): any changed word changes it. It guards against corruption, not tampering;
the cache key itself is a sha256.

A truncated, unparsable, wrongly shaped or checksum-failing entry is deleted and reported as a
miss (``corrupt`` counts them), so the caller rebuilds it. A stored basis with a larger k serves a
request for a smaller k (the top part of it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..core.io import tensor_buffer, write_safetensors
from .bases import BASES_VERSION, Basis, top_k

__all__ = ["BasisCache", "BasisKey", "weight_digest", "default_cache_root", "tensor_checksum"]

log = logging.getLogger(__name__)

FORMAT = "lorareg-basis-1"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_KFILE = re.compile(r"^k(\d+)\.safetensors$")


def default_cache_root() -> Path:
    """``$LORAREG_CACHE`` if set, else ``$HF_HOME/lorareg/bases``."""
    env = os.environ.get("LORAREG_CACHE")
    if env:
        return Path(env).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME).expanduser() / "lorareg" / "bases"


def weight_digest(weight: Tensor) -> str:
    """sha256 (hex) of a tensor's dtype, shape and raw bytes (no copy for contiguous CPU tensors)."""
    h = hashlib.sha256()
    h.update(f"{str(weight.dtype).removeprefix('torch.')}|{tuple(weight.shape)}|".encode())
    h.update(tensor_buffer(weight))
    return h.hexdigest()


def tensor_checksum(t: Tensor) -> str:
    """Sum of the tensor's bytes as 64-bit words mod 2⁶⁴ (hex); the tail is zero-padded."""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    nbytes = flat.numel()
    whole = nbytes - nbytes % 8
    total = int(flat[:whole].view(torch.int64).sum()) if whole else 0
    if whole != nbytes:
        tail = bytes(flat[whole:].tolist()) + b"\0" * (8 - (nbytes - whole))
        total += int.from_bytes(tail, "little", signed=True)
    return f"{total % 2**64:016x}|{nbytes}"


@dataclass(frozen=True)
class BasisKey:
    """Cache key: weight digest + k + engine/method version string."""

    digest: str
    k: int
    version: str = BASES_VERSION

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{16,128}", self.digest):
            raise ValueError(f"digest must be lowercase hex, got {self.digest!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    @property
    def version_slug(self) -> str:
        return _SAFE.sub("_", self.version) or "_"

    def __str__(self) -> str:
        return f"{self.digest}/{self.version_slug}/k{self.k}"


class BasisCache:
    """Content-addressed store of :class:`Basis` objects under ``root``."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_root()
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.writes = 0

    # -- paths ---------------------------------------------------------------------------------
    def _dir(self, key: BasisKey) -> Path:
        return self.root / key.digest[:2] / key.digest / key.version_slug

    def path(self, key: BasisKey) -> Path:
        return self._dir(key) / f"k{key.k}.safetensors"

    # -- read ----------------------------------------------------------------------------------
    def _load(self, path: Path, key: BasisKey, k_file: int) -> Basis | None:
        """Load and validate one entry; delete it and return None when it is bad."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in ("U", "S", "V")}
            problem = self._validate(meta, tensors, key, k_file)
        except FileNotFoundError:
            return None
        except Exception as exc:  # truncated / unparsable / missing tensor
            problem = f"unreadable ({type(exc).__name__}: {exc})"
        if problem is None:
            return Basis(tensors["U"], tensors["S"], tensors["V"])
        self.corrupt += 1
        log.warning("lorareg basis cache: dropping corrupt entry %s: %s", path, problem)
        try:
            path.unlink()
        except OSError:
            pass
        return None

    @staticmethod
    def _validate(meta: dict, tensors: dict[str, Tensor], key: BasisKey, k_file: int) -> str | None:
        if meta.get("format") != FORMAT:
            return f"unknown format {meta.get('format')!r}"
        if meta.get("digest") != key.digest or meta.get("version") != key.version:
            return "metadata does not match the key"
        try:
            k, m, n = int(meta["k"]), int(meta["m"]), int(meta["n"])
        except (KeyError, ValueError):
            return "missing k/m/n in metadata"
        U, S, V = tensors["U"], tensors["S"], tensors["V"]
        if k != k_file or tuple(U.shape) != (m, k) or tuple(S.shape) != (k,) or tuple(V.shape) != (n, k):
            return f"wrong shapes U{tuple(U.shape)} S{tuple(S.shape)} V{tuple(V.shape)} for m={m} n={n} k={k}"
        if any(t.dtype != torch.float32 for t in (U, S, V)):
            return "not fp32"
        for name, t in tensors.items():
            if meta.get(f"checksum.{name}") != tensor_checksum(t):
                return f"checksum mismatch on {name}"
        return None

    def _candidates(self, key: BasisKey) -> list[int]:
        d = self._dir(key)
        try:
            names = os.listdir(d)
        except OSError:
            return []
        ks = []
        for name in names:
            mt = _KFILE.match(name)
            if mt and int(mt.group(1)) >= key.k:
                ks.append(int(mt.group(1)))
        return sorted(ks)

    def get(self, key: BasisKey, *, allow_larger: bool = True) -> Basis | None:
        """The stored basis for ``key`` (or the top part of a larger-k one), None on a miss."""
        ks = [key.k] if not allow_larger else self._candidates(key)
        if key.k in ks:  # exact first, then the smallest larger k
            ks.remove(key.k)
            ks.insert(0, key.k)
        for k_file in ks:
            path = self._dir(key) / f"k{k_file}.safetensors"
            basis = self._load(path, key, k_file)
            if basis is not None:
                self.hits += 1
                return basis.truncate(key.k)
        self.misses += 1
        return None

    # -- write ---------------------------------------------------------------------------------
    def put(self, key: BasisKey, basis: Basis) -> Path:
        """Store ``basis`` under ``key`` atomically (temp file + ``os.replace``)."""
        if basis.k != key.k:
            raise ValueError(f"basis has k={basis.k} but key says k={key.k}")
        tensors = {
            "U": basis.U.detach().to("cpu", torch.float32).contiguous(),
            "S": basis.S.detach().to("cpu", torch.float32).contiguous(),
            "V": basis.V.detach().to("cpu", torch.float32).contiguous(),
        }
        m, n = basis.shape
        meta = {
            "format": FORMAT,
            "digest": key.digest,
            "version": key.version,
            "k": str(key.k),
            "m": str(m),
            "n": str(n),
        }
        meta.update({f"checksum.{name}": tensor_checksum(t) for name, t in tensors.items()})
        path = self.path(key)
        # lorareg's own writer (atomic: temp file + rename); safetensors' save_file needs numpy
        write_safetensors(path, tensors, metadata=meta)
        self.writes += 1
        return path

    def get_or_build(
        self,
        weight: Tensor,
        k: int,
        builder: Callable[[Tensor, int], Basis] | None = None,
        *,
        version: str = BASES_VERSION,
        digest: str | None = None,
    ) -> Basis:
        """Cached basis of ``weight`` for ``k``; on a miss ``builder(weight, k)`` (default
        :func:`~lorareg.engine.bases.top_k`) is called and its result stored."""
        key = BasisKey(digest or weight_digest(weight), int(k), version)
        basis = self.get(key)
        if basis is None:
            basis = (builder or top_k)(weight, int(k))
            self.put(key, basis)
        return basis
