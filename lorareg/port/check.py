"""How a port compares the two base models: a streamed read of each weight (distance, cosine) for copy
ports, or the top-k bases of every layer (subspace similarity) for projections, alignment and thresholds."""

from __future__ import annotations

from typing import Any, Optional

from ..core.errors import InputError
from ..core.progress import progress_bar
from ..engine import BASES_VERSION, BasisKey
from ..engine.relatedness import Relatedness, WeightPair, check_pairs
from ..registry import Family, get_registry
from ..sources.weights import BaseWeights
from .bases import BasesStore, flat_shape
from .options import AUTO, PortOptions
from .pairs import Pair, correspondence


def check_kind(options: PortOptions, pairs: list[Pair], src_fam: Family, tgt_fam: Family) -> str:
    """Which comparison of the base models a port with both models runs (see ``PortOptions.check``)."""
    live = [p for p in pairs if not p.skipped]
    method = options.method
    copy_only = method == "copy" or (method == AUTO and all(p.same_shape for p in live)
                                     and not _aligns_blocks(src_fam, tgt_fam, options.align_blocks))
    if options.check == "streamed" and not copy_only:
        raise InputError(f"--check streamed is for copy ports; --method {method} on these layers needs the bases (--check bases)")
    if options.check is not None:
        return options.check
    # a --threshold is on subspace similarity: every layer then needs its bases
    return "streamed" if copy_only and options.threshold == 0 else "bases"


def _aligns_blocks(src_fam: Family, tgt_fam: Family, align: bool) -> bool:
    if not align or src_fam.id == tgt_fam.id:
        return False
    doc = correspondence(get_registry(), src_fam.id, tgt_fam.id)
    return bool(doc and doc.get("search"))


def streamed_check(pairs: list[Pair], src_w: BaseWeights, tgt_w: BaseWeights, bases: BasesStore, progress: bool) -> Relatedness:
    """Distance and cosine of every ported layer's base weights, one streamed read of each; the
    subspace similarity comes from bases already in the cache (put in the store's memo), never built."""
    live = [p for p in pairs if not p.skipped and p.same_shape]
    todo = [WeightPair(p.key, src_w.stored(p.source_component, p.source_module), tgt_w.stored(p.target_component, p.target_module),
                       f"{p.target_component}:{p.target_module}") for p in live]
    bar = progress_bar(len(todo), "comparing base weights", progress)
    result = check_pairs(todo, on_layer=(lambda _l: bar.update(1)) if bar else None)
    if bar:
        bar.close()
    for p in live:
        _cached_basis(bases, src_w, 0, p.source_component, p.source_module)
        _cached_basis(bases, tgt_w, 1, p.target_component, p.target_module)
    return result


def _cached_basis(bases: BasesStore, model: BaseWeights, side: int, cid: str, name: str) -> None:
    """Put a weight's basis in the memo if the cache holds it under a remembered digest (no hashing)."""
    digest = bases.known_digest(model.fingerprint(cid, name))
    if digest is None:
        return
    key = (side, cid, name)
    bases.digests[key] = digest
    shape = model.family.components[cid].modules[name]
    k = min(bases.k_for(flat_shape(shape)), min(flat_shape(shape)))
    hit = bases.cache.get(BasisKey(digest, k, BASES_VERSION))
    if hit is not None:
        bases.memo[key] = hit


def check_info(kind: Optional[str], streamed: Optional[Relatedness]) -> Optional[dict[str, Any]]:
    """The report's ``check`` entry."""
    if kind is None:
        return None
    if streamed is None:
        return {"kind": kind}
    return {"kind": kind, "layers": len(streamed.layers), "bytes_read": streamed.bytes_read, "seconds": round(streamed.seconds, 3),
            "max_chunk_elems": streamed.max_chunk_elems, "related_min_cosine": streamed.threshold}
