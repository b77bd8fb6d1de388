"""What a port reports: per layer, totals, the whole report (report.json), the summary and the provenance metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, Field

from ..core.version import __version__
from ..core.lora import Lora, Module
from ..engine import energy
from ..engine.relatedness import RELATED_MIN_COSINE
from ..refine.report import loss_summary, samples_summary
from ..registry import Family
from ..hub.pull import lookup_lora
from ..sources.provenance import local_weights_sha256, source_lora_record
from ..sources.refs import public_lora_ref, public_model_ref
from ..sources.weights import BaseWeights
from .bases import flat

#: below this mean subspace similarity the two base models look unrelated (bench/fidelity: unrelated
#: models < 0.3, related checkpoints and distillations >= 0.79): the port is flagged
RELATED_MIN_SIMILARITY = 0.5
#: volatile report fields emptied in the published copy (they change on every run)
VOLATILE = ("timings", "cache")
REFINE_VOLATILE = ("sample_s", "train_s", "wall_s", "samples_cached", "stopped_by_budget")


class LayerReport(BaseModel):
    source: str
    method: Optional[str] = None
    target: Optional[str] = None
    source_shape: list[int]
    target_shape: Optional[list[int]] = None
    rule: str
    similarity: Optional[float] = None
    similarity_in: Optional[float] = None
    similarity_out: Optional[float] = None
    kept_energy: Optional[float] = None
    rank_in: Optional[int] = None
    rank_out: Optional[int] = None
    skipped: Optional[str] = None
    relative_distance: Optional[float] = Field(None, description="‖W_t − W_s‖ / ‖W_s‖ of the base weights (streamed check)")
    cosine: Optional[float] = Field(None, description="⟨W_s, W_t⟩ / (‖W_s‖ ‖W_t‖) of the base weights (streamed check)")


class ModelInfo(BaseModel):
    ref: Optional[str] = None
    family: str
    revision: Optional[str] = None
    layout: Optional[str] = None
    location: Optional[str] = Field(None, description="hub or local")
    weights_sha256: Optional[dict[str, str]] = Field(None, description="a local model's weight files by SHA-256 (it has no Hub id)")


class PortTotals(BaseModel):
    layers: int
    ported: int
    skipped: int
    mean_similarity: Optional[float] = None
    min_similarity: Optional[float] = None
    energy_kept: Optional[float] = Field(None, description="‖ΔW_out‖² / ‖ΔW_in‖² summed over ported layers")
    related: Optional[bool] = Field(None, description=f"mean weight cosine >= {RELATED_MIN_COSINE} (streamed check), "
                                                     f"else mean subspace similarity >= {RELATED_MIN_SIMILARITY}")
    related_similarity: Optional[float] = Field(None, description="mean similarity over every compared layer, ported or not")
    related_by: Optional[str] = Field(None, description="what the verdict used: 'cosine' (streamed check) or 'subspace'")
    mean_cosine: Optional[float] = Field(None, description="mean weight cosine over every compared layer (streamed check)")
    min_cosine: Optional[float] = None
    mean_relative_distance: Optional[float] = Field(None, description="mean ‖W_t − W_s‖ / ‖W_s‖ over every compared layer")


class PortReport(BaseModel):
    lorareg_version: str = __version__
    method: str
    rank_k: Optional[int] = Field(None, description="subspace size k (None: per-layer default)")
    threshold: float
    rank: Optional[int] = None
    options: dict[str, Any] = Field(default_factory=dict, description="the options that change the output (PortOptions.recorded)")
    device: str
    source_lora: dict[str, Any]
    source_model: ModelInfo
    target_model: ModelInfo
    output: Optional[dict[str, Any]] = None
    layers: list[LayerReport]
    totals: PortTotals
    timings: dict[str, float]
    cache: dict[str, int]
    refine: Optional[dict[str, Any]] = None
    check: Optional[dict[str, Any]] = Field(None, description="how the base models were compared: streamed or bases, bytes read")
    warnings: list[str] = Field(default_factory=list)


@dataclass
class PortResult:
    lora: Lora
    report: PortReport
    output: Optional[Path] = None
    report_path: Optional[Path] = None
    summary: str = ""


def rounded(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(float(x), 6)


def totals(layers: list[LayerReport], lora: Lora) -> PortTotals:
    ported = [l for l in layers if not l.skipped]
    sims = [l.similarity for l in ported if l.similarity is not None]
    energy_in = {l.source: module_energy(lora.modules[l.source]) for l in layers}
    energy_out = sum(energy_in[l.source] * l.kept_energy for l in ported if l.kept_energy is not None)
    all_in = sum(energy_in.values())
    compared = [l.similarity for l in layers if l.similarity is not None]
    related_sim = sum(compared) / len(compared) if compared else None
    cosines = [l.cosine for l in layers if l.cosine is not None]
    mean_cos = sum(cosines) / len(cosines) if cosines else None
    dists = [l.relative_distance for l in layers if l.relative_distance is not None]
    # the streamed check's cosine decides where it ran (every compared layer has one); else the subspaces
    if mean_cos is not None:
        related, related_by = mean_cos >= RELATED_MIN_COSINE, "cosine"
    else:
        related = None if related_sim is None else related_sim >= RELATED_MIN_SIMILARITY
        related_by = None if related is None else "subspace"
    return PortTotals(
        related=related,
        related_by=related_by,
        related_similarity=rounded(related_sim),
        mean_cosine=rounded(mean_cos),
        min_cosine=rounded(min(cosines)) if cosines else None,
        mean_relative_distance=rounded(sum(dists) / len(dists)) if dists else None,
        layers=len(layers),
        ported=len(ported),
        skipped=len(layers) - len(ported),
        mean_similarity=rounded(sum(sims) / len(sims)) if sims else None,
        min_similarity=rounded(min(sims)) if sims else None,
        energy_kept=rounded(energy_out / all_in) if all_in > 0 else None,
    )


def unrelated_score(t: PortTotals) -> str:
    """What made the verdict, e.g. ``mean weight cosine 0.01``."""
    return f"mean weight cosine {t.mean_cosine:.2f}" if t.related_by == "cosine" else f"mean subspace similarity {t.related_similarity:.2f}"


def unrelated_warning(t: PortTotals) -> list[str]:
    if t.related is not False:
        return []
    bound = RELATED_MIN_COSINE if t.related_by == "cosine" else RELATED_MIN_SIMILARITY
    return [f"the base models look unrelated: {unrelated_score(t)} < {bound}; "
            "a training-free port is unlikely to carry the LoRA's effect (use --threshold to skip such layers)"]


def module_energy(m: Module) -> float:
    if m.kind != "lora":
        return 0.0
    return energy(flat(m.factors["up"].float()), flat(m.factors["down"].float())) * m.scale**2


def model_info(w: Optional[BaseWeights], fam: Family, ref: Optional[str]) -> ModelInfo:
    location = None if w is None else ("hub" if w.revision is not None else "local")
    return ModelInfo(ref=str(ref) if ref else None, family=fam.id, revision=w.revision if w else None, layout=w.layout if w else None,
                     location=location, weights_sha256=local_weights_sha256(w))


def source_lora_info(lora: Lora, family: Family) -> dict[str, Any]:
    fmt = f"{lora.format_state.format}/{lora.format_state.variant}" if lora.format_state else None
    return {"path": lora.source_path, "sha256": lora.source_sha256, "family": family.id, "format": fmt, "modules": len(lora.modules),
            **source_lora_record(lora)}


def provenance_metadata(report: PortReport) -> dict[str, str]:
    """The ``lorareg.port.*`` entries of the written file's metadata."""
    t = report.totals
    return {
        "lorareg.port.method": report.method,
        "lorareg.port.source_model": report.source_model.ref or "",
        "lorareg.port.source_revision": report.source_model.revision or "",
        "lorareg.port.target_model": report.target_model.ref or "",
        "lorareg.port.target_revision": report.target_model.revision or "",
        "lorareg.port.target_family": report.target_model.family,
        "lorareg.port.layers": json.dumps({"ported": t.ported, "skipped": t.skipped, "mean_similarity": t.mean_similarity, "energy_kept": t.energy_kept}),
        "lorareg.port.params": json.dumps({"rank_k": report.rank_k, "threshold": report.threshold, "rank": report.rank}),
    }


def summarize(report: PortReport) -> str:
    t = report.totals
    lines = [
        f"ported {report.source_lora.get('path')} ({report.source_model.family}) -> {report.target_model.family} with {report.method}",
        f"  layers: {t.ported} ported, {t.skipped} skipped of {t.layers}",
    ]
    if t.mean_similarity is not None:
        lines.append(f"  subspace similarity: mean {t.mean_similarity:.3f}, min {t.min_similarity:.3f}")
    if t.mean_cosine is not None:
        lines.append(f"  base weights: cosine mean {t.mean_cosine:.4f}, min {t.min_cosine:.4f}; "
                     f"relative distance mean {t.mean_relative_distance:.4f}")
    if t.energy_kept is not None:
        lines.append(f"  energy of the LoRA kept: {100 * t.energy_kept:.1f}%")
    reasons: dict[str, int] = {}
    for l in report.layers:
        if l.skipped:
            reasons[l.skipped] = reasons.get(l.skipped, 0) + 1
    for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:5]:
        lines.append(f"  skipped {n}: {why}")
    for w in report.warnings:
        lines.append(f"  WARNING: {w}")
    if report.check and report.check.get("kind") == "streamed":
        c = report.check
        lines.append(f"  streamed check: {c['bytes_read'] / 1e9:.2f} GB read in {c['seconds']:.2f} s, no basis built")
    lines.append(f"  bases: {report.cache.get('hits', 0)} from cache, {report.cache.get('built', 0)} built; time {report.timings.get('total_s', 0):.2f} s")
    if report.refine:
        r = report.refine
        name, start, end = loss_summary(r)
        lines.append(f"  refined ({r['method']}, {r['steps']} steps, {samples_summary(r)}, {r['wall_s']:.1f} s): "
                     f"{name} {start:.4f} -> {end:.4f} (data-free quality signal: lower is closer to source + LoRA)")
    if report.output:
        lines.append(f"  wrote {report.output['path']} ({report.output['format']})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the published form


def public_report(report: dict[str, Any], weight_name: str, source_commit: Optional[str] = None) -> dict[str, Any]:
    """The report as published: volatile fields emptied, local paths reduced to names."""
    r = json.loads(json.dumps(report, default=str))
    for key in VOLATILE:
        if key in r:
            r[key] = {}
    if isinstance(r.get("refine"), dict):
        # wall-clock fields change on every run; the losses are deterministic for a seed
        r["refine"] = {k: v for k, v in r["refine"].items() if k not in REFINE_VOLATILE}
    src = r.get("source_lora")
    if isinstance(src, dict):
        src["path"] = public_lora_ref(src.get("path"))
        if source_commit:
            src["commit"] = source_commit
    for key in ("source_model", "target_model"):
        m = r.get(key)
        if isinstance(m, dict) and m.get("ref"):
            m["ref"] = public_model_ref(m["ref"])
    if isinstance(r.get("output"), dict):
        r["output"]["path"] = weight_name
    return r


def report_bytes(public: dict[str, Any]) -> bytes:
    return (json.dumps(public, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def published_report(report: PortReport, out_path: Path) -> bytes:
    """report.json's bytes: the public form of the report, the same bytes a push uploads."""
    pulled = lookup_lora(report.source_lora.get("path"))
    weight_name = "adapter_model.safetensors" if out_path.is_dir() else out_path.name
    return report_bytes(public_report(report.model_dump(mode="json"), weight_name, pulled.commit if pulled else None))
