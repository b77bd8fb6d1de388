"""`lorareg port`: move a LoRA onto another base model, layer by layer, training-free.

load the LoRA -> resolve source/target module pairs -> open both base models (lazily) -> bases from
the cache (randomized SVD on a miss) and distilled blocks re-paired -> project each layer -> report
-> optionally refine -> write the LoRA, report.json and a summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..core.device import resolve_device
from ..core.errors import InputError
from ..core.io import atomic_write
from ..core.lora import Lora
from ..core.names import REPORT_NAME
from ..core.progress import progress_bar
from ..engine import BasisCache
from ..formats.api import check_output, load, save
from .. import refine as refinement
from ..registry import Family, get_registry
from ..sources.weights import BaseWeights, open_model
from .bases import BasesStore
from .check import check_info, check_kind, streamed_check
from .layers import project_layers
from .options import PortOptions
from .pairs import resolve_pairs
from .plan import plan_with_weights
from .report import PortReport, PortResult, model_info, published_report, provenance_metadata, source_lora_info, summarize, totals, unrelated_score, unrelated_warning

_DTYPE_ALIASES = {"fp16": "F16", "float16": "F16", "bf16": "BF16", "bfloat16": "BF16", "fp32": "F32", "float32": "F32"}


@dataclass
class _Models:
    source: Optional[BaseWeights]
    target: Optional[BaseWeights]
    seconds: float = 0.0


def port(lora: Union[str, Path, Lora], options: Optional[PortOptions] = None, **kwargs: Any) -> PortResult:
    """Port a LoRA from its base model to a target model; write it (and report.json) if ``output``.

    Settings are a :class:`PortOptions` or its fields as keyword arguments (``refine_<x>`` for the
    refinement's; see :class:`lorareg.refine.RefineOptions`). ``refine="distill"``: after the
    projection, train the ported LoRA on the target to match the source model + LoRA on samples the
    source generates itself (data-free). Refused on unrelated base models unless ``force_unrelated``.
    """
    opts = options.model_copy(update=kwargs) if options is not None else PortOptions.from_kwargs(**kwargs)
    t_start = time.perf_counter()
    opts.check_preconditions()
    src_lora = _load_source(lora, opts)
    src_fam, tgt_fam = _families(src_lora, opts)
    device = resolve_device(opts.device)
    out_dtype = _dtype_name(opts.dtype) if opts.dtype else None
    refine_kind = refinement.check_pair(opts.refine, src_fam, tgt_fam) if opts.refine is not None else None

    pairs = resolve_pairs(src_fam, tgt_fam, [(m.component, m.name) for m in src_lora.modules.values()],
                          allow_shape_mismatch=(opts.method == "align" or (opts.method == "auto" and opts.with_models)))
    models = _open_models(src_lora, src_fam, tgt_fam, sorted({p.target_component for p in pairs if p.target_component}), opts)
    if refine_kind is not None:
        refinement.check_models(refine_kind, models.source.folder(), models.target.folder())
    cache = BasisCache(opts.cache_dir) if opts.cache_dir else BasisCache()
    bases = BasesStore(cache, device, opts.rank_k) if models.source is not None else None
    kind = check_kind(opts, pairs, src_fam, tgt_fam) if bases is not None else None
    streamed = streamed_check(pairs, models.source, models.target, bases, opts.progress) if kind == "streamed" else None
    if kind == "bases":
        pairs = plan_with_weights(pairs, src_fam, tgt_fam, models.source, models.target, bases, opts.align_blocks, opts.progress)

    bar = progress_bar(len(pairs), "projecting", opts.progress)
    projected = project_layers(src_lora, pairs, bases, opts, out_dtype, device, bar, streamed)
    if bar:
        bar.close()
    report = _report(src_lora, src_fam, tgt_fam, models, projected, bases, cache, opts, device)
    report.check = check_info(kind, streamed)
    if streamed is not None:
        report.timings["streamed_check_s"] = round(streamed.seconds, 3)
    ported = Lora(family=tgt_fam.id, modules=projected.modules, metadata=dict(src_lora.metadata), format_state=src_lora.format_state,
                  source_path=src_lora.source_path, source_sha256=src_lora.source_sha256, source_hashes=src_lora.source_hashes)
    if refine_kind is not None:
        ported = _refine(refine_kind, ported, src_lora, src_fam, tgt_fam, models, report, opts, device)
    result = PortResult(lora=ported, report=report)
    if opts.output is not None:
        _write(result, src_lora, opts)
    report.timings["total_s"] = round(time.perf_counter() - t_start, 3)
    if result.report_path is not None:  # the report as published: no local paths, no wall times, the bytes a push uploads
        atomic_write(result.report_path, lambda f: f.write(published_report(report, result.output)))
    result.summary = summarize(report)
    return result


def _load_source(lora: Union[str, Path, Lora], opts: PortOptions) -> Lora:
    if opts.output is not None:
        if isinstance(lora, (str, Path)):
            check_output(Path(lora), Path(opts.output), opts.force)
        else:
            check_output(None, Path(opts.output), opts.force)
    return lora if isinstance(lora, Lora) else load(lora)


def _families(lora: Lora, opts: PortOptions) -> tuple[Family, Family]:
    if lora.family is None:
        raise InputError("the LoRA's family is unknown; load it with family=...")
    registry = get_registry()
    src = registry.family(lora.family)
    return src, (registry.family(opts.to) if opts.to else src)


def _open_models(lora: Lora, src_fam: Family, tgt_fam: Family, tgt_components: list[str], opts: PortOptions) -> _Models:
    if not opts.with_models:
        return _Models(None, None)
    t0 = time.perf_counter()
    configs = opts.refine is not None  # a refinement runs the models: it needs their configs and tokenizers too
    src = open_model(src_fam, opts.source_model, lora.components, with_configs=configs)
    tgt = open_model(tgt_fam, opts.target_model, tgt_components, with_configs=configs)
    return _Models(src, tgt, time.perf_counter() - t0)


def _report(lora: Lora, src_fam: Family, tgt_fam: Family, models: _Models, projected, bases: Optional[BasesStore],
            cache: BasisCache, opts: PortOptions, device: torch.device) -> PortReport:
    t = totals(projected.layers, lora)
    return PortReport(
        method=opts.method, rank_k=opts.rank_k, threshold=opts.threshold, rank=opts.rank, options=opts.recorded(), device=str(device),
        source_lora=source_lora_info(lora, src_fam),
        source_model=model_info(models.source, src_fam, opts.source_model),
        target_model=model_info(models.target, tgt_fam, opts.target_model),
        layers=projected.layers, totals=t,
        timings={"open_s": round(models.seconds, 3), "read_weights_s": round(bases.seconds_read if bases else 0.0, 3),
                 "build_bases_s": round(bases.seconds_build if bases else 0.0, 3), "project_s": round(projected.seconds, 3)},
        cache={"hits": cache.hits, "misses": cache.misses, "built": bases.built if bases else 0},
        warnings=unrelated_warning(t),
    )


def _refine(kind, ported: Lora, src_lora: Lora, src_fam: Family, tgt_fam: Family, models: _Models, report: PortReport,
            opts: PortOptions, device: torch.device) -> Lora:
    if report.totals.related is False and not opts.force_unrelated:
        raise InputError(
            f"the base models look unrelated ({unrelated_score(report.totals)}); distillation would retrain "
            "the LoRA, not port it; pass --force-unrelated to refine anyway")
    if not ported.modules:
        raise InputError("no layer could be ported (see the report: every layer was skipped); nothing to refine")
    job = refinement.RefineJob(source_lora=src_lora, source_family=src_fam, target_family=tgt_fam, source_model=models.source.folder(),
                               target_model=models.target.folder(), device=device, progress=opts.progress, start_method=opts.method,
                               cache_dir=Path(opts.cache_dir) if opts.cache_dir else None)
    t0 = time.perf_counter()
    refined, report.refine = refinement.run(kind, ported, job, opts.refine_options)
    report.timings["refine_s"] = round(time.perf_counter() - t0, 3)
    return refined


def _write(result: PortResult, src_lora: Lora, opts: PortOptions) -> None:
    if not result.lora.modules:
        raise InputError("no layer could be ported (see the report: every layer was skipped); nothing written")
    out_path = Path(opts.output)
    report = result.report
    t0 = time.perf_counter()
    default_format = src_lora.format_state.format if src_lora.format_state else "diffusers"
    conv = save(result.lora, out_path, format=opts.format or default_format, force=True, extra_metadata=provenance_metadata(report))
    report.output = {"path": str(out_path), "format": conv.target_format, "dropped": [d.model_dump() for d in conv.dropped]}
    report.timings["write_s"] = round(time.perf_counter() - t0, 3)
    result.output, result.report_path = out_path, report_path(out_path)


def report_path(output: Path) -> Path:
    """Where the report of an output lies: ``report.json`` in a PEFT folder, ``<stem>.report.json`` beside a file."""
    return output / REPORT_NAME if output.is_dir() else output.parent / f"{output.stem}.{REPORT_NAME}"


def _dtype_name(name: str) -> str:
    st = _DTYPE_ALIASES.get(name.lower(), name.upper())
    if st not in ("F16", "BF16", "F32"):
        raise InputError(f"unsupported --dtype {name!r} (fp16, bf16, fp32)")
    return st
