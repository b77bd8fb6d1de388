"""The pairs a port works on, refined with the base weights: their bases, and distilled blocks re-paired by similarity."""

from __future__ import annotations

from typing import Optional

from ..core.progress import progress_bar
from ..engine import subspace_similarity
from ..registry import Family, get_registry
from ..registry.naming import Pattern
from ..sources.weights import BaseWeights
from .bases import BasesStore
from .pairs import Pair, align_groups, correspondence


def plan_with_weights(pairs: list[Pair], src_fam: Family, tgt_fam: Family, src_w: BaseWeights, tgt_w: BaseWeights,
                      bases: BasesStore, align: bool, progress: bool) -> list[Pair]:
    """Fill ``bases`` for every live pair (and the candidates of searched block groups); re-pair those groups."""
    live = [p for p in pairs if not p.skipped or p.target_module]
    src_mods = [(p.source_component, p.source_module) for p in live]
    tgt_mods = {(p.target_component, p.target_module) for p in live if p.target_shape}
    align = align and src_fam.id != tgt_fam.id
    doc = correspondence(get_registry(), src_fam.id, tgt_fam.id) if align else None
    if doc and doc.get("search"):
        tgt_mods |= _group_candidates(doc, pairs, tgt_fam)
    bar = progress_bar(len(src_mods) + len(tgt_mods), "bases", progress)
    bases.get_many(src_w, 0, src_mods, bar)
    bases.get_many(tgt_w, 1, sorted(tgt_mods), bar)
    if bar:
        bar.close()
    if not align:
        return pairs

    def sim(pair: Pair, candidate: str) -> Optional[float]:
        sb = bases.get(0, pair.source_component, pair.source_module)
        tb = bases.get(1, pair.target_component or pair.source_component, candidate)
        if sb is None or tb is None or sb.U.shape != tb.U.shape:
            return None
        return subspace_similarity(sb.U, tb.U)

    return align_groups(pairs, src_fam, tgt_fam, sim)


def _group_candidates(doc, pairs: list[Pair], tgt_fam: Family) -> set[tuple[str, str]]:
    """Target modules of searched block groups whose leaf names the LoRA adapts: each may be the best match."""
    out = set()
    for search in doc["search"]:
        tcid = doc["components"].get(search["component"])
        comp = tgt_fam.components.get(tcid or "")
        if comp is None:
            continue
        pattern = Pattern.parse("^" + search["group"])
        leaves = set()
        for p in pairs:
            found = pattern.search(p.source_module.split(".")) if p.source_component == search["component"] else None
            if found:
                leaves.add(".".join(p.source_module.split(".")[found[0] + len(pattern.segments):]))
        for name in comp.modules:
            found = pattern.search(name.split("."))
            if found and ".".join(name.split(".")[found[0] + len(pattern.segments):]) in leaves:
                out.add((tcid, name))
    return out
