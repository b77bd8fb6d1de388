"""Which key format and which model family a LoRA file is: candidates scored with evidence.

Structure decides first (do the keys parse, do factor shapes fit the family's modules, how much of
the family's matching modules does the LoRA cover); metadata (kohya ss_base_model_version,
modelspec.architecture, PEFT base_model_name_or_path) only breaks ties and adds evidence.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping, Optional

from pydantic import BaseModel, Field

from ..core.errors import DetectionError
from ..core.hash_memory import fingerprint, recall, remember
from ..core.io import LazyTensor, SafetensorsHeader
from .reader import ParseResult, SplitKey, may_parse, parse_keys, split_keys
from ..registry import Family, Registry

SAMPLE_KEYS = 96
METADATA_HINT_KEYS = ("ss_base_model_version", "modelspec.architecture", "base_model_name_or_path", "ss_sd_model_name",
                      "lorareg.port.target_family")


class Candidate(BaseModel):
    format: str
    variant: str
    family: str
    mapped: int
    total: int
    coverage: float = Field(description="share of the family's modules of the adapted kinds that the LoRA covers")
    complete_groups: int = Field(0, description="repeated blocks (e.g. transformer_blocks.{i}.attn.to_q) the LoRA covers at every index the family has: block counts")
    rank_on_tie: int = Field(0, description="the family's detection.rank_on_tie (listed first when no block count decides)")
    shape_mismatches: int
    metadata_agrees: bool


class Detection(BaseModel):
    format: str
    variant: str
    family: str
    confidence: float
    fitting_families: list[str] = Field(description="every family whose modules fit all the keys")
    evidence: list[str]
    candidates: list[Candidate]
    undecided: list[str] = Field(default_factory=list, description="families the file fits equally well with no metadata to choose (the chosen one first); empty when decided")
    undecided_names_differ: bool = Field(False, description="the undecided families would name the modules differently")
    named_variant: Optional[str] = Field(None, description="a named variant of the family (Pony of sdxl...) the metadata names")


def metadata_hints(metadata: Mapping[str, str], registry: Registry) -> dict[str, list[str]]:
    """family id -> metadata entries that name it."""
    hints: dict[str, list[str]] = {}
    # a port's output names its target; the source's own entries (kept in the file) describe the old base
    keys = ("lorareg.port.target_family",) if metadata.get("lorareg.port.target_family") else METADATA_HINT_KEYS
    for key in keys:
        value = metadata.get(key)
        if not value:
            continue
        v = value.split("/lora")[0] if key == "modelspec.architecture" else value
        for fid in registry.families_for_alias(v):
            hints.setdefault(fid, []).append(f"{key}={value}")
    return hints


def _leaf(name: str) -> str:
    return ".".join(name.split(".")[-2:])


def _targets(result: ParseResult) -> set[tuple[str, str]]:
    """(component, canonical module) of every parsed key, each once (a module's factors share one)."""
    fused: set[int] = set()
    out: set[tuple[str, str]] = set()
    for pk in result.parsed.values():
        if isinstance(pk.target, str):
            out.add((pk.component, pk.target))
        elif id(pk.target) not in fused:  # a fused module: its parts (the same object for each of its keys)
            fused.add(id(pk.target))
            out.update((pk.component, s.module) for s in pk.target.slices)
    return out


def _coverage(result: ParseResult, modules: set[tuple[str, str]]) -> float:
    if not modules:
        return 0.0
    touched: dict[str, set[str]] = {}
    for cid, n in modules:
        touched.setdefault(cid, set()).add(_leaf(n))
    leaves = _family_leaves(result.family)
    total = sum(leaves[cid].get(leaf, 0) for cid, names in touched.items() for leaf in names)
    return len(modules) / total if total else 0.0


def _family_leaves(fam: Family) -> dict[str, dict[str, int]]:
    """component -> leaf (last two name segments) -> how many of its modules end so."""
    cached = _LEAVES.get(fam.id)
    if cached is None:
        cached = {}
        for cid, comp in fam.components.items():
            counts: dict[str, int] = {}
            for name in comp.modules:
                counts[_leaf(name)] = counts.get(_leaf(name), 0) + 1
            cached[cid] = counts
        _LEAVES[fam.id] = cached
    return cached


_LEAVES: dict[str, dict[str, dict[str, int]]] = {}


def _group(name: str) -> tuple[str, Optional[int]]:
    """A module name with its first block index taken out: ('transformer_blocks.{}.attn.to_q', 3)."""
    segs = name.split(".")
    for i, seg in enumerate(segs):
        if seg.isdigit():
            return ".".join(segs[:i] + ["{}"] + segs[i + 1 :]), int(seg)
    return name, None


def _family_groups(fam: Family) -> dict[tuple[str, str], set[int]]:
    cached = _GROUPS.get(fam.id)
    if cached is None:
        cached = {}
        for cid, comp in fam.components.items():
            for name in comp.modules:
                g, i = _group(name)
                if i is not None:
                    cached.setdefault((cid, g), set()).add(i)
        _GROUPS[fam.id] = cached
    return cached


_GROUPS: dict[str, dict[tuple[str, str], set[int]]] = {}


def _complete_groups(result: ParseResult, modules: set[tuple[str, str]]) -> int:
    """How many repeated blocks the LoRA covers at every index the family has (a block count that fits exactly)."""
    seen: dict[tuple[str, str], set[int]] = {}
    for cid, n in modules:
        g, i = _group(n)
        if i is not None:
            seen.setdefault((cid, g), set()).add(i)
    fam = _family_groups(result.family)
    return sum(1 for key, idx in seen.items() if len(fam.get(key, ())) > 1 and idx == fam[key])


def score_candidates(
    tensors: Mapping[str, LazyTensor],
    metadata: Mapping[str, str],
    registry: Registry,
    container: str = "safetensors",
    formats: Optional[list[str]] = None,
    families: Optional[list[str]] = None,
) -> tuple[list[Candidate], dict[tuple[str, str, str], ParseResult]]:
    keys = list(tensors)
    hints = metadata_hints(metadata, registry)
    results: dict[tuple[str, str, str], ParseResult] = {}
    candidates: list[Candidate] = []
    fams: list[Family] = [registry.family(f) for f in families] if families else list(registry.families.values())
    # A strided sample rules out most (variant, family) pairs before any full parse.
    sample = keys[:: max(1, len(keys) // SAMPLE_KEYS)]
    sample_tensors = {k: tensors[k] for k in sample}
    for fmt in registry.formats.values():
        if fmt.spec.container != container or (formats and fmt.id not in formats):
            continue
        for variant in fmt.variants:
            sample_split = split_keys(variant, sample)
            if not any(isinstance(item, SplitKey) for item in sample_split):
                continue
            live = [fam for fam in fams if variant.applies_to(fam) and may_parse(variant, fam, sample_split)
                    and parse_keys(variant, fam, sample_tensors, sample_split).parsed]
            if not live:
                continue
            split = split_keys(variant, keys)
            for fam in live:
                res = parse_keys(variant, fam, tensors, split)
                if not res.parsed:
                    continue
                results[(fmt.id, variant.id, fam.id)] = res
                modules = _targets(res)
                candidates.append(
                    Candidate(
                        format=fmt.id,
                        variant=variant.id,
                        family=fam.id,
                        mapped=len(res.parsed),
                        total=len(keys),
                        coverage=round(_coverage(res, modules), 6),
                        complete_groups=_complete_groups(res, modules),
                        rank_on_tie=fam.spec.detection.rank_on_tie,
                        shape_mismatches=len(res.shape_mismatches),
                        metadata_agrees=fam.id in hints,
                    )
                )
    priority = {f.id: f.spec.priority for f in registry.formats.values()}
    candidates.sort(
        # block counts first (a FLUX.1 LoRA on all 19 double blocks is not a HunyuanVideo LoRA missing block 19),
        # then rank_on_tie: coverage alone ranks a partial LoRA by family size, not by what it was trained on
        # a variant file (Wan 2.1 I2V of T2V, FLUX.1 Krea of [dev]) is listed after its parent on a tie
        key=lambda c: (-c.mapped, -c.complete_groups, c.rank_on_tie, -c.coverage, not c.metadata_agrees, -priority[c.format],
                       len(registry.families[c.family].lineage), c.family, c.variant)
    )
    return candidates, results


def detect_tensors(
    tensors: Mapping[str, LazyTensor],
    metadata: Mapping[str, str],
    registry: Registry,
    container: str = "safetensors",
    formats: Optional[list[str]] = None,
    families: Optional[list[str]] = None,
) -> tuple[Detection, ParseResult]:
    if not tensors:
        raise DetectionError("the file holds no tensors")
    candidates, results = score_candidates(tensors, metadata, registry, container, formats, families)
    if not candidates:
        sample = next(iter(tensors))
        raise DetectionError(f"no known LoRA key format matches these keys (e.g. {sample!r})")
    best = candidates[0]
    res = results[(best.format, best.variant, best.family)]
    total = best.total
    fitting = sorted(
        {c.family for c in candidates if c.mapped == total and c.format == best.format and c.variant == best.variant}
    )
    evidence = _evidence(best, res, metadata, registry, fitting)
    confidence = best.mapped / total
    if len(fitting) > 1:
        runner_up = next(c for c in candidates if c.family != best.family and c.family in fitting)
        # a clear structural lead (coverage) or metadata keeps confidence; a true tie halves it
        if abs(runner_up.coverage - best.coverage) < 0.05 and best.metadata_agrees == runner_up.metadata_agrees:
            confidence *= 0.5
        else:
            confidence *= 0.9
    undecided, names_differ = _undecided(best, candidates, results)
    if undecided:
        evidence.append(f"shapes cannot tell {', '.join(undecided)} apart and no metadata names one: "
                        f"{best.family} is listed first; port needs --family")
    named = _named_variant(res.family, metadata)
    if named:
        evidence.append(f"metadata names {named} (a named variant of {best.family})")
    other_formats = {c.format for c in candidates if c.mapped == total} - {best.format}
    if other_formats:
        evidence.append(f"keys also read as: {', '.join(sorted(other_formats))} (priority chose {best.format})")
    det = Detection(
        format=best.format,
        variant=best.variant,
        family=best.family,
        confidence=round(confidence, 4),
        fitting_families=fitting,
        evidence=evidence,
        candidates=candidates[:8],
        undecided=undecided,
        undecided_names_differ=names_differ,
        named_variant=named,
    )
    return det, res


#: the verdicts of detect_tensors on files, by file fingerprint, registry identity and what was asked
DETECTIONS = "detection"


def detect_file(
    header: SafetensorsHeader,
    tensors: Mapping[str, LazyTensor],
    metadata: Mapping[str, str],
    registry: Registry,
    root: Optional[Path],
    container: str = "safetensors",
    formats: Optional[list[str]] = None,
    families: Optional[list[str]] = None,
) -> tuple[Detection, ParseResult]:
    """:func:`detect_tensors` of a file's tensors, its verdict remembered under ``root``: a file met again
    (same fingerprint, same registry, same question) parses its keys only as the verdict says, not as every
    format and family could. A remembered verdict whose parse does not come out as it did is not used."""
    key = _detection_key(header, metadata, registry, container, formats, families)
    det = recall(root, DETECTIONS, key, Detection.model_validate_json)
    if det is not None and det.candidates:
        best = det.candidates[0]
        fmt = registry.formats.get(det.format)
        fam = registry.families.get(det.family)
        if fmt is not None and fam is not None and any(v.id == det.variant for v in fmt.variants):
            res = parse_keys(fmt.variant(det.variant), fam, tensors)
            if len(res.parsed) == best.mapped and len(tensors) == best.total:
                return det, res
    det, res = detect_tensors(tensors, metadata, registry, container, formats, families)
    remember(root, DETECTIONS, key, det.model_dump_json())
    return det, res


def _detection_key(header: SafetensorsHeader, metadata: Mapping[str, str], registry: Registry, container: str,
                   formats: Optional[list[str]], families: Optional[list[str]]) -> Optional[str]:
    fp = fingerprint(header.path)
    if fp is None or registry.identity is None:
        return None
    question = json.dumps([fp, registry.identity, container, formats, families, sorted(metadata.items())])
    return hashlib.sha256(question.encode("utf-8")).hexdigest()


def _undecided(best: Candidate, candidates: list[Candidate], results) -> tuple[list[str], bool]:
    """Families as good as the best on structure whom metadata does not rule out (best first)."""
    tied = [c for c in candidates if c.family != best.family and c.format == best.format and c.variant == best.variant
            and c.mapped == best.mapped and abs(c.coverage - best.coverage) < 1e-9 and c.complete_groups == best.complete_groups
            and c.shape_mismatches == best.shape_mismatches and not (best.metadata_agrees and not c.metadata_agrees)]
    if not tied:
        return [], False
    names = lambda c: {k: (pk.component, pk.target_name) for k, pk in results[(c.format, c.variant, c.family)].parsed.items()}  # noqa: E731
    ref = names(best)
    return [best.family, *sorted({c.family for c in tied})], any(names(c) != ref for c in tied)


def _named_variant(fam: Family, metadata: Mapping[str, str]) -> Optional[str]:
    for key in METADATA_HINT_KEYS:
        value = metadata.get(key)
        if value:
            v = fam.named_variant(value.split("/lora")[0] if key == "modelspec.architecture" else value)
            if v:
                return v.id
    return None


def _evidence(best: Candidate, res: ParseResult, metadata, registry: Registry, fitting: list[str]) -> list[str]:
    ev = [f"{best.mapped}/{best.total} tensors parse as {best.format} ({best.variant}) keys of {best.family}"]
    schemes = sorted({pk.scheme for pk in res.parsed.values()})
    if schemes != ["canonical"]:
        ev.append(f"module names use the {', '.join(schemes)} naming scheme")
    fam = res.family
    for note in fam.spec.detection.notes:
        ev.append(f"{fam.id}: {note}")
    for key_module in fam.spec.detection.key_modules:
        cid, _, name = key_module.partition(":")
        if any(pk.component == cid and pk.target_name == name for pk in res.parsed.values()):
            ev.append(f"has {key_module} with shape {list(fam.components[cid].modules[name])}")
    ev += res.evidence
    if len(fitting) > 1:
        ev.append(f"modules also fit: {', '.join(f for f in fitting if f != best.family)}; coverage {best.coverage:.2f} chose {best.family}")
    hints = metadata_hints(metadata, registry)
    for fid, entries in hints.items():
        ev.append(f"metadata {', '.join(entries)} names {fid}" + ("" if fid == best.family else " (structure disagrees)"))
    if res.shape_mismatches:
        ev.append(f"{len(res.shape_mismatches)} tensors have shapes that do not fit {best.family}")
    return ev
