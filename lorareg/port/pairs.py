"""Which target module each source module corresponds to: identity within a family, data across.

Cross-family rules live in schemas/correspondences/<source>__<target>.json: rename rules (the
naming-scheme rule language, anchored at the start), skips with reasons, and groups of blocks whose
source index is chosen by subspace similarity when weights are at hand (see ``align_groups``).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

from pydantic import BaseModel

from ..core.errors import InputError
from ..registry import Family, Registry, get_registry
from ..registry.naming import Pattern, render


class Pair(BaseModel):
    source_component: str
    source_module: str
    source_shape: list[int]
    target_component: Optional[str] = None
    target_module: Optional[str] = None
    target_shape: Optional[list[int]] = None
    rule: str
    skipped: Optional[str] = None  # reason, when there is no usable target

    @property
    def key(self) -> str:
        return f"{self.source_component}:{self.source_module}"

    @property
    def same_shape(self) -> bool:
        return self.target_shape is not None and _flat(self.source_shape) == _flat(self.target_shape)


def _flat(shape) -> tuple[int, int]:
    return (shape[0], math.prod(shape[1:]))


def correspondence(registry: Registry, source: str, target: str) -> Optional[dict]:
    for doc in registry.correspondences:
        if doc["source"] == source and doc["target"] == target:
            return doc
    return None


def resolve_pairs(
    source: Family | str,
    target: Family | str,
    modules: Optional[Iterable[tuple[str, str]]] = None,
    *,
    allow_shape_mismatch: bool = False,
) -> list[Pair]:
    """Pairs for the given source modules (default: every module of the source family)."""
    registry = get_registry()
    src = registry.family(source) if isinstance(source, str) else source
    tgt = registry.family(target) if isinstance(target, str) else target
    if modules is None:
        modules = [(cid, name) for cid, comp in src.components.items() for name in comp.modules]
    if src.id == tgt.id:
        doc = {"components": {c: c for c in src.components}, "rules": [], "shape_mismatch": "skip"}
        rule_name = "identity (same family)"
    else:
        doc = correspondence(registry, src.id, tgt.id)
        if doc is None:
            known = sorted(f"{d['source']}->{d['target']}" for d in registry.correspondences)
            raise InputError(f"no correspondence from {src.id} to {tgt.id} (known: {', '.join(known)})")
        rule_name = f"same name ({src.id}->{tgt.id})"
    rules = [(r, Pattern.parse("^" + r["from"].lstrip("^"))) for r in doc["rules"]]
    mismatch_ok = allow_shape_mismatch or doc.get("shape_mismatch") == "align"
    pairs = []
    for cid, name in modules:
        shape = list(src.components[cid].modules[name])
        tcid = doc["components"].get(cid)
        if tcid is None or tcid not in tgt.components:
            pairs.append(Pair(source_component=cid, source_module=name, source_shape=shape, rule="components",
                              skipped=f"{tgt.id} has no counterpart of component {cid}"))
            continue
        tname, why, used = _apply_rules(cid, name, rules, rule_name)
        if why is not None:
            pairs.append(Pair(source_component=cid, source_module=name, source_shape=shape, rule=used, skipped=why))
            continue
        tshape = tgt.components[tcid].modules.get(tname)
        if tshape is None:
            pairs.append(Pair(source_component=cid, source_module=name, source_shape=shape, target_component=tcid,
                              target_module=tname, rule=used, skipped=f"{tgt.id} has no module {tcid}:{tname}"))
            continue
        pair = Pair(source_component=cid, source_module=name, source_shape=shape, target_component=tcid,
                    target_module=tname, target_shape=list(tshape), rule=used)
        if not pair.same_shape and not mismatch_ok:
            pair.skipped = f"shapes differ ({shape} -> {list(tshape)}): needs --method align"
        pairs.append(pair)
    return pairs


def _apply_rules(cid: str, name: str, rules, default_rule: str) -> tuple[str, Optional[str], str]:
    segs = name.split(".")
    for rule, pattern in rules:
        if rule["component"] != cid:
            continue
        found = pattern.search(segs)
        if found is None:
            continue
        start, env = found
        label = f"{rule['from']} -> {rule.get('to', 'skip')}"
        if "skip" in rule:
            return name, rule["skip"], label
        new = render(rule["to"], env).split(".") + segs[start + len(pattern.segments) :]
        return ".".join(new), None, label
    return name, None, default_rule


def align_groups(
    pairs: list[Pair],
    source: Family,
    target: Family,
    similarity: Callable[[Pair, str], Optional[float]],
) -> list[Pair]:
    """Re-pair the blocks of each searched group by subspace similarity, keeping their order.

    ``similarity(pair, candidate_target_module)`` scores a source module against a target module.
    For a group like ``down_blocks.2.attentions.{a}.transformer_blocks.{b}`` (vary b) the source
    blocks present in the LoRA are aligned monotonically to the target's blocks, maximising the summed
    similarity (dynamic programming); every module of a block follows its block.
    """
    doc = correspondence(get_registry(), source.id, target.id)
    if not doc or not doc.get("search"):
        return pairs
    by_key = {p.key: p for p in pairs}
    for search in doc["search"]:
        cid, var = search["component"], search["vary"]
        pattern = Pattern.parse("^" + search["group"])
        groups: dict[tuple, dict[int, list[Pair]]] = {}
        for p in pairs:
            if p.source_component != cid:
                continue
            found = pattern.search(p.source_module.split("."))
            if found is None:
                continue
            env = found[1]
            fixed = tuple(sorted((k, v) for k, v in env.items() if k != var))
            groups.setdefault(fixed, {}).setdefault(env[var], []).append(p)
        tcomp = target.components.get(doc["components"].get(cid) or "")
        if tcomp is None:
            continue
        for fixed, blocks in groups.items():
            env = dict(fixed)
            tblocks = []
            i = 0
            while True:
                prefix = render(search["group"], {**env, var: i})
                if not any(n.startswith(prefix + ".") for n in tcomp.modules):
                    break
                tblocks.append(prefix)
                i += 1
            sblocks = sorted(blocks)
            if not tblocks or not sblocks:
                continue
            score = [[_block_score(blocks[s], render(search["group"], {**env, var: s}), t, similarity) for t in tblocks] for s in sblocks]
            assignment = _monotone(score, len(sblocks), len(tblocks))
            for si, ti in assignment.items():
                s = sblocks[si]
                src_prefix = render(search["group"], {**env, var: s})
                for p in blocks[s]:
                    new_name = tblocks[ti] + p.source_module[len(src_prefix):]
                    tshape = tcomp.modules.get(new_name)
                    if tshape is None:
                        continue
                    by_key[p.key] = p.model_copy(update={
                        "target_module": new_name, "target_shape": list(tshape), "skipped": None,
                        "rule": f"{search['group']} aligned by similarity ({var} {s} -> {ti})",
                    })
            for si, s in enumerate(sblocks):
                if si not in assignment:
                    for p in blocks[s]:
                        by_key[p.key] = p.model_copy(update={
                            "target_module": None, "target_shape": None, "target_component": None,
                            "skipped": f"block {var}={s} has no counterpart left in {target.id} after alignment",
                            "rule": f"{search['group']} aligned by similarity"})
    return [by_key[p.key] for p in pairs]


def _block_score(block_pairs: list[Pair], src_prefix: str, tgt_prefix: str, similarity) -> float:
    vals = []
    for p in block_pairs:
        s = similarity(p, tgt_prefix + p.source_module[len(src_prefix):])
        if s is not None:
            vals.append(s)
    return sum(vals) / len(vals) if vals else 0.0


def _monotone(score: list[list[float]], n_s: int, n_t: int) -> dict[int, int]:
    """Order-preserving matching of source to target blocks maximising the summed score."""
    # best[i][j]: best total using the first i sources and first j targets
    best = [[0.0] * (n_t + 1) for _ in range(n_s + 1)]
    choice = [[0] * (n_t + 1) for _ in range(n_s + 1)]
    for i in range(1, n_s + 1):
        for j in range(1, n_t + 1):
            options = [(best[i - 1][j], 1), (best[i][j - 1], 2), (best[i - 1][j - 1] + score[i - 1][j - 1], 3)]
            best[i][j], choice[i][j] = max(options)
    out: dict[int, int] = {}
    i, j = n_s, n_t
    while i > 0 and j > 0:
        c = choice[i][j]
        if c == 3:
            out[i - 1] = j - 1
            i, j = i - 1, j - 1
        elif c == 1:
            i -= 1
        else:
            j -= 1
    return out
