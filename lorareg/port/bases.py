"""The singular bases of base-model weights a port needs: cache hits first, then batched randomized SVDs."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..core.device import resolve_device
from ..core.io import atomic_write_text
from ..core.progress import progress_bar
from ..engine import BASES_VERSION, Basis, BasisCache, BasisKey, default_k, top_k_batched, weight_digest
from ..registry import get_registry
from ..sources.derive import family_for_model
from ..sources.weights import BaseWeights, open_model

#: build SVDs in batches of at most this many weight elements (memory on the device)
BATCH_ELEMENTS = 64 * 2**20


def flat(t: torch.Tensor) -> torch.Tensor:
    """A weight as a matrix: (out, in·kh·kw) for convolutions."""
    return t.reshape(t.shape[0], -1)


def flat_shape(shape) -> tuple[int, int]:
    return (shape[0], math.prod(shape[1:]))


@dataclass
class BasesStore:
    """Top-k bases of base-model weights by (side, component, module), through the content-addressed cache."""

    cache: BasisCache
    device: torch.device
    k: Optional[int]
    built: int = 0
    seconds_read: float = 0.0
    seconds_build: float = 0.0
    memo: dict[tuple[int, str, str], Basis] = field(default_factory=dict)
    digests: dict[tuple[int, str, str], str] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)  # weight fingerprint -> digest, as used

    def k_for(self, shape) -> int:
        return self.k if self.k else default_k(shape)

    def get(self, side: int, component: str, module: str) -> Optional[Basis]:
        return self.memo.get((side, component, module))

    def same_weight(self, source: tuple[str, str], target: tuple[str, str]) -> bool:
        """Are the source and target weights of a pair the very same bytes?"""
        d = self.digests.get((0, *source))
        return d is not None and d == self.digests.get((1, *target))

    def get_many(self, model: BaseWeights, side: int, modules: list[tuple[str, str]], progress=None) -> None:
        """Fill the memo for these modules: cache hits first, then batched randomized SVDs."""
        pending: list[tuple[tuple[int, str, str], torch.Tensor, str, int]] = []
        for cid, name in modules:
            key = (side, cid, name)
            if key in self.memo:
                continue
            t0 = time.perf_counter()
            shape = model.family.components[cid].modules[name]
            k = min(self.k_for(flat_shape(shape)), min(flat_shape(shape)))
            fp = model.fingerprint(cid, name)
            digest = self.known_digest(fp)
            w = None
            if digest is None:
                w = flat(model.weight(cid, name))
                digest = weight_digest(w)
                self._remember_digest(fp, digest)
            self.digests[key] = digest
            if fp is not None:
                self.fingerprints[fp] = digest
            self.seconds_read += time.perf_counter() - t0
            hit = self.cache.get(BasisKey(digest, k, BASES_VERSION))
            if hit is not None:
                self.memo[key] = hit
                if progress:
                    progress.update(1)
                continue
            if w is None:
                w = flat(model.weight(cid, name))
            pending.append((key, w, digest, k))
            if sum(p[1].numel() for p in pending) > BATCH_ELEMENTS:
                self._build(pending, progress)
                pending = []
        self._build(pending, progress)

    def _digest_path(self, fp: str) -> Path:
        return self.cache.root / "digests" / fp[:2] / fp

    def known_digest(self, fp: Optional[str]) -> Optional[str]:
        """The content digest remembered for a weight fingerprint (skips re-hashing known files)."""
        if fp is None:
            return None
        try:
            text = self._digest_path(fp).read_text().strip()
        except OSError:
            return None
        return text if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else None

    def _remember_digest(self, fp: Optional[str], digest: str) -> None:
        if fp is None:
            return
        try:
            atomic_write_text(self._digest_path(fp), digest + "\n")
        except OSError:
            pass  # a read-only cache still works, it just hashes again next time

    def cache_files(self) -> list[str]:
        """The cache's files (relative to its root) that hold the bases and digests used so far: what another
        node needs to find every one of them in a cache of its own (lorareg batch shipping bases on Ray)."""
        files = {str(self._digest_path(fp).relative_to(self.cache.root)) for fp in self.fingerprints}
        for digest in set(self.digests.values()):
            folder = self.cache.root / digest[:2] / digest
            files.update(str(f.relative_to(self.cache.root)) for f in folder.glob("*/k*.safetensors"))
        return sorted(files)

    def _build(self, pending, progress) -> None:
        if not pending:
            return
        t0 = time.perf_counter()
        by_k: dict[int, list] = {}
        for item in pending:
            by_k.setdefault(item[3], []).append(item)
        for k, items in by_k.items():
            bases = top_k_batched([w for _, w, _, _ in items], k, self.device)
            for (key, _, digest, _), basis in zip(items, bases):
                basis = basis.to("cpu")
                self.cache.put(BasisKey(digest, k, BASES_VERSION), basis)
                self.memo[key] = basis
                self.built += 1
                if progress:
                    progress.update(1)
        self.seconds_build += time.perf_counter() - t0


def build_model_bases(model: str, family: Optional[str], components: Optional[list[str]], match: Optional[str], rank_k: Optional[int],
                      device: str, progress: bool = True, cache_dir: Optional[str] = None, list_files: bool = False) -> dict:
    """Fill the basis cache with a model's 2-D/4-D weights (``lorareg basis build``); counts and timing
    (``list_files``: and ``files``, the cache files holding them, relative to the cache's root)."""
    # no family given: the model's own (the registered one that matches it, else derived from it)
    fam = get_registry().family(family) if family else family_for_model(model)
    comps = components or list(fam.components)
    weights = open_model(fam, model, comps)
    modules = [(cid, name) for cid in weights.components for name, shape in fam.components[cid].modules.items()
               if len(shape) in (2, 4) and (match is None or match in name)]
    cache = BasisCache(cache_dir) if cache_dir else BasisCache()
    bases = BasesStore(cache, resolve_device(device), rank_k)
    t0 = time.perf_counter()
    bar = progress_bar(len(modules), "bases", progress)
    bases.get_many(weights, 0, modules, bar)
    if bar:
        bar.close()
    stats = {"modules": len(modules), "cached": len(modules) - bases.built, "built": bases.built,
             "seconds": round(time.perf_counter() - t0, 3), "cache": str(cache.root)}
    if list_files:
        stats["files"] = bases.cache_files()
    return stats
