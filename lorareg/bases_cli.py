"""`lorareg basis build`: fill the basis cache for one model ahead of any port."""

from __future__ import annotations

import time
from typing import Optional

from .engine import BasisCache
from .port import _Bases, _progress, resolve_device
from .registry import get_registry
from .weights import open_model


def build_bases(model: str, family: Optional[str], components: Optional[list[str]], match: Optional[str], rank_k: Optional[int],
                device: str, progress: bool = True, cache_dir: Optional[str] = None) -> dict:
    if family is None:  # the model's own family: the registered one that matches it, else derived from it
        from .registry.derive import family_for_model

        fam = family_for_model(model)
    else:
        fam = get_registry().family(family)
    comps = components or list(fam.components)
    weights = open_model(fam, model, comps)
    modules = [(cid, name) for cid in weights.components for name, shape in fam.components[cid].modules.items()
               if len(shape) in (2, 4) and (match is None or match in name)]
    cache = BasisCache(cache_dir) if cache_dir else BasisCache()
    bases = _Bases(cache, resolve_device(device), rank_k)
    t0 = time.perf_counter()
    bar = _progress(len(modules), "bases", progress)
    bases.get_many(weights, 0, modules, bar)
    if bar:
        bar.close()
    return {"modules": len(modules), "cached": len(modules) - bases.built, "built": bases.built,
            "seconds": round(time.perf_counter() - t0, 3), "cache": str(cache.root)}
