"""Which key format and which model family a LoRA file is: candidates scored with evidence.

Structure decides first (do the keys parse, do factor shapes fit the family's modules, how much of
the family's matching modules does the LoRA cover); metadata (kohya ss_base_model_version,
modelspec.architecture, PEFT base_model_name_or_path) only breaks ties and adds evidence.
"""

from __future__ import annotations

from typing import Mapping, Optional

from pydantic import BaseModel, Field

from ..core.errors import DetectionError
from ..core.io import LazyTensor
from .reader import ParseResult, SplitKey, parse_keys, split_keys
from ..registry import Family, Registry

SAMPLE_KEYS = 96
METADATA_HINT_KEYS = ("ss_base_model_version", "modelspec.architecture", "base_model_name_or_path", "ss_sd_model_name")


class Candidate(BaseModel):
    format: str
    variant: str
    family: str
    mapped: int
    total: int
    coverage: float = Field(description="share of the family's modules of the adapted kinds that the LoRA covers")
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


def metadata_hints(metadata: Mapping[str, str], registry: Registry) -> dict[str, list[str]]:
    """family id -> metadata entries that name it."""
    hints: dict[str, list[str]] = {}
    for key in METADATA_HINT_KEYS:
        value = metadata.get(key)
        if not value:
            continue
        v = value.split("/lora")[0] if key == "modelspec.architecture" else value
        for fid in registry.families_for_alias(v):
            hints.setdefault(fid, []).append(f"{key}={value}")
    return hints


def _leaf(name: str) -> str:
    return ".".join(name.split(".")[-2:])


def _coverage(result: ParseResult) -> float:
    touched: dict[str, set[str]] = {}
    modules: set[tuple[str, str]] = set()
    for pk in result.parsed.values():
        names = [s.module for s in pk.target.slices] if hasattr(pk.target, "slices") else [pk.target]
        for n in names:
            modules.add((pk.component, n))
            touched.setdefault(pk.component, set()).add(_leaf(n))
    if not modules:
        return 0.0
    total = 0
    for cid, leaves in touched.items():
        comp = result.family.components[cid]
        total += sum(1 for n in comp.modules if _leaf(n) in leaves)
    return len(modules) / total if total else 0.0


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
            live = [fam for fam in fams if parse_keys(variant, fam, sample_tensors, sample_split).parsed]
            if not live:
                continue
            split = split_keys(variant, keys)
            for fam in live:
                res = parse_keys(variant, fam, tensors, split)
                if not res.parsed:
                    continue
                results[(fmt.id, variant.id, fam.id)] = res
                candidates.append(
                    Candidate(
                        format=fmt.id,
                        variant=variant.id,
                        family=fam.id,
                        mapped=len(res.parsed),
                        total=len(keys),
                        coverage=round(_coverage(res), 6),
                        shape_mismatches=len(res.shape_mismatches),
                        metadata_agrees=fam.id in hints,
                    )
                )
    priority = {f.id: f.spec.priority for f in registry.formats.values()}
    candidates.sort(
        key=lambda c: (-c.mapped, -c.coverage, not c.metadata_agrees, -priority[c.format], c.family, c.variant)
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
    )
    return det, res


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
