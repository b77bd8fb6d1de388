"""`lorareg inspect`, `convert`, `families`, `formats`: LoRA files and the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from ...formats import api
from ...registry import get_registry
from ...sources.civitai_lookup import lookup_file
from .main import counts, emit, main


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--format", "format_", help="Read as this format instead of detecting it.")
@click.option("--family", help="Read against this family instead of detecting it.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: Path, format_: Optional[str], family: Optional[str], as_json: bool) -> None:
    """Show a LoRA's format, family, adapter type, ranks and alphas."""
    info = api.inspect(path, format=format_, family=family)
    lines = [
        f"{info.path}",
        f"  format      {info.format} ({info.variant})",
        f"  family      {info.family}  confidence {info.confidence:.2f}"
        + (f"  (also fits: {', '.join(f for f in info.fitting_families if f != info.family)})" if len(info.fitting_families) > 1 else ""),
        f"  type        {info.adapter_type}",
        f"  components  {', '.join(info.components)}",
        f"  modules     {info.num_modules} ({info.num_tensors} tensors, {', '.join(info.dtypes)})",
        f"  ranks       {counts(info.ranks)}",
        f"  alphas      {counts(info.alphas)}",
    ]
    if info.unmapped_keys:
        lines.append(f"  unmapped    {len(info.unmapped_keys)} tensors:")
        lines += [f"    {k}: {v}" for k, v in list(info.unmapped_keys.items())[:10]]
        if len(info.unmapped_keys) > 10:
            lines.append(f"    ... and {len(info.unmapped_keys) - 10} more (see --json)")
    if info.nonfinite:
        lines.append(f"  WARNING     {len(info.nonfinite)} tensors hold NaN/Inf: " + ", ".join(n["name"] for n in info.nonfinite[:5]))
    h = info.hashes
    lines += [
        f"  sha256      {h.sha256}  (AutoV2 {h.autov2.upper()})",
        f"  tensor hash {h.tensor_sha256}  (AutoV3 {h.autov3.upper()}, legacy {h.legacy})",
        "  embedded    " + ", ".join(f"{c.key} {c.status}" for c in info.embedded_hashes),
    ]
    lines += [f"  WARNING     {c.key} is {c.embedded!r} but this file's is {c.expected}: it names other content"
              for c in info.wrong_hashes]
    lines.append("  evidence")
    lines += [f"    - {e}" for e in info.evidence]
    if info.metadata:
        lines.append(f"  metadata    {len(info.metadata)} entries: " + ", ".join(sorted(info.metadata)[:12]))
    emit(as_json, info.model_dump(), "\n".join(lines))


@main.command()
@click.argument("path", type=click.Path(path_type=Path, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def lookup(path: Path, as_json: bool) -> None:
    """Which Civitai model/version a local LoRA file is (by SHA-256, then by its tensor-data hash)."""
    res = lookup_file(path)
    if not res.found:
        text = f"{path}: not on Civitai (SHA-256 {res.hashes.sha256}, AutoV3 {res.hashes.autov3.upper()})"
    else:
        c = res.civitai
        how = "same file" if res.matched_by == "sha256" else "same tensors, other metadata (AutoV3)"
        text = "\n".join([
            f"{path}: civitai:{c.version_id} ({how})",
            f"  model     {c.model_name} / {c.version_name} by {c.creator or 'unknown'}",
            f"  base      {c.base_model} (family {', '.join(c.families) or '?'})",
            f"  page      {c.page_url}",
        ])
    emit(as_json, res.model_dump(), text)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--to", "to", required=True, help="Target format id (see `lorareg formats`).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output file (or folder for peft).")
@click.option("--variant", help="Variant of the target format (default: the format's first writable one).")
@click.option("--family", help="Family of the input, if detection is ambiguous.")
@click.option("--rank", type=click.IntRange(min=1), help="Refactor LoHa/LoKr/full modules to plain LoRA of this rank.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--allow-unmapped", is_flag=True, help="Convert even if some tensors map to no module (they are listed as dropped).")
@click.option("--allow-nonfinite", is_flag=True, help="Convert even if factors hold NaN/Inf.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def convert(path, to, output, variant, family, rank, force, allow_unmapped, allow_nonfinite, as_json) -> None:
    """Convert a LoRA to another key format (exact for plain LoRA)."""
    report = api.convert(
        path, output, to=to, variant=variant, family=family, rank=rank, force=force,
        allow_unmapped=allow_unmapped, allow_nonfinite=allow_nonfinite,
    )
    lines = [
        f"{path} ({report.source_format}) -> {output} ({report.target_format}), family {report.family}",
        f"  modules {report.modules_in} -> {report.modules_out}, tensors {report.tensors_in} -> {report.tensors_out}",
    ]
    for r in report.refactored:
        lines.append(f"  refactored {r.module}: {r.from_type} -> {r.to_type} rank {r.rank}, relative error {r.relative_error:.3g}")
    for d in report.dropped:
        lines.append(f"  dropped {d.item}: {d.reason}")
    emit(as_json, report.model_dump(), "\n".join(lines))


@main.command()
@click.option("--json", "as_json", is_flag=True)
def families(as_json: bool) -> None:
    """List the model families the registry knows."""
    reg = get_registry()
    rows = []
    for fam in sorted(reg.families.values(), key=lambda f: f.id):
        rows.append(
            {
                "id": fam.id,
                "name": fam.spec.name,
                "kind": fam.spec.kind,
                "components": {cid: len(c.modules) for cid, c in fam.components.items()},
                "default_repo": fam.spec.hub.default_repo,
                "aliases": fam.spec.aliases.model_dump(),
            }
        )
    text = "\n".join(
        f"{r['id']:<14} {r['name']:<36} " + ", ".join(f"{c}:{n}" for c, n in r["components"].items()) for r in rows
    )
    emit(as_json, rows, text)


@main.command()
@click.option("--json", "as_json", is_flag=True)
def formats(as_json: bool) -> None:
    """List the LoRA key formats the registry reads and writes."""
    reg = get_registry()
    rows = []
    for fmt in sorted(reg.formats.values(), key=lambda f: f.id):
        rows.append(
            {
                "id": fmt.id,
                "title": fmt.spec.title,
                "container": fmt.spec.container,
                "writable": fmt.spec.writable,
                "variants": [v.id + (" (read only)" if v.spec.read_only else "") for v in fmt.variants],
            }
        )
    text = "\n".join(
        f"{r['id']:<14} {'read/write' if r['writable'] else 'read only':<10} {r['title']}  [{', '.join(r['variants'])}]"
        for r in rows
    )
    emit(as_json, rows, text)
