"""The `lorareg` command: parse arguments, call the API, print text or --json."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import click

from . import __version__, api
from .errors import LoraregError
from .registry import get_registry


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Every lorareg error becomes one line on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LoraregError as e:
            _fail(str(e).splitlines()[0] if str(e) else e.__class__.__name__, e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except MemoryError:
            _fail("out of memory", 1)
        except OSError as e:
            _fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "), 1)
        except Exception as e:  # noqa: BLE001 - a bug must still not print a traceback at users
            if os.environ.get("LORAREG_DEBUG"):
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            _fail(f"unexpected {e.__class__.__name__}: {first} (set LORAREG_DEBUG=1 for a traceback; please report it)", 70)


def _emit(as_json: bool, payload, text: str) -> None:
    if as_json:
        click.echo(json.dumps(payload, indent=2, sort_keys=False, default=str))
    else:
        click.echo(text)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorareg")
def main() -> None:
    """Detect, convert and port LoRA adapters between key formats and base models."""


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
        f"  ranks       {_counts(info.ranks)}",
        f"  alphas      {_counts(info.alphas)}",
    ]
    if info.unmapped_keys:
        lines.append(f"  unmapped    {len(info.unmapped_keys)} tensors:")
        lines += [f"    {k}: {v}" for k, v in list(info.unmapped_keys.items())[:10]]
        if len(info.unmapped_keys) > 10:
            lines.append(f"    ... and {len(info.unmapped_keys) - 10} more (see --json)")
    if info.nonfinite:
        lines.append(f"  WARNING     {len(info.nonfinite)} tensors hold NaN/Inf: " + ", ".join(n["name"] for n in info.nonfinite[:5]))
    lines.append("  evidence")
    lines += [f"    - {e}" for e in info.evidence]
    if info.metadata:
        lines.append(f"  metadata    {len(info.metadata)} entries: " + ", ".join(sorted(info.metadata)[:12]))
    _emit(as_json, info.model_dump(), "\n".join(lines))


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


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
    _emit(as_json, report.model_dump(), "\n".join(lines))


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
    _emit(as_json, rows, text)


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
    _emit(as_json, rows, text)


@main.command()
@click.argument("lora", type=click.Path(path_type=Path))
@click.option("--source-model", help="Base model the LoRA was trained on: a diffusers/transformers folder, a .safetensors checkpoint, or a Hub id org/name[@rev].")
@click.option("--target-model", help="Base model to port to (same kinds of reference).")
@click.option("--to", "to", help="Target family, if it differs from the LoRA's (see `lorareg pairs`).")
@click.option("--method", default=None, help="copy, lora-x, prolora, prolora-full, align (default: see docs/methods.md).")
@click.option("--rank-k", type=click.IntRange(min=1), help="Size k of the singular subspaces (default: min(320, min(m, n) / 4) per layer).")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="Skip layers whose subspace similarity is below this.")
@click.option("--rank", type=click.IntRange(min=1), help="Output rank (default: the source's).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--dtype", help="Output dtype (default: the input's): fp16, bf16, fp32.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output file (or folder for peft).")
@click.option("--format", "format_", help="Output key format (default: the input's).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--no-align", is_flag=True, help="Do not re-pair distilled blocks by similarity; pair block i with block i.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def port(lora, source_model, target_model, to, method, rank_k, threshold, rank, device, dtype, output, format_, force, no_align, as_json) -> None:
    """Port a LoRA to another base model, training-free; writes the LoRA and a report.json."""
    from .engine import DEFAULT_METHOD
    from .port import port as run_port

    result = run_port(
        lora, source_model=source_model, target_model=target_model, to=to, method=method or DEFAULT_METHOD,
        rank_k=rank_k, threshold=threshold, rank=rank, device=device, dtype=dtype, output=output,
        format=format_, force=force, align_blocks=not no_align, progress=not as_json,
    )
    _emit(as_json, result.report.model_dump(), result.summary + f"\n  report {result.report_path}")


@main.group()
def basis() -> None:
    """Manage the cache of base-model singular bases."""


@basis.command("build")
@click.argument("model")
@click.option("--family", required=True, help="Family of the model (see `lorareg families`).")
@click.option("--component", "components", multiple=True, help="Only these components (repeatable).")
@click.option("--match", help="Only modules whose name contains this text (e.g. attn).")
@click.option("--rank-k", type=click.IntRange(min=1), help="Subspace size k (default: per-layer default).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def basis_build(model, family, components, match, rank_k, device, as_json) -> None:
    """Compute and cache the top-k bases of a model's 2-D weights ahead of any port."""
    from .bases_cli import build_bases

    stats = build_bases(model, family, list(components) or None, match, rank_k, device, progress=not as_json)
    _emit(as_json, stats, f"{stats['modules']} modules: {stats['cached']} already cached, {stats['built']} built in {stats['seconds']:.1f} s -> {stats['cache']}")


@main.command()
@click.argument("source")
@click.argument("target")
@click.option("--component", help="Only this source component.")
@click.option("--all", "show_all", is_flag=True, help="Every module, not only attention and MLP projections.")
@click.option("--json", "as_json", is_flag=True)
def pairs(source: str, target: str, component: Optional[str], show_all: bool, as_json: bool) -> None:
    """Show which target module each source module maps to, with shapes and the rule used."""
    from .resolve import resolve_pairs

    reg = get_registry()
    src = reg.family(source)
    modules = [
        (cid, name)
        for cid, comp in src.components.items()
        if component in (None, cid)
        for name, shape in comp.modules.items()
        if show_all or len(shape) == 2
    ]
    result = resolve_pairs(src, reg.family(target), modules)
    paired = [p for p in result if not p.skipped]
    lines = [f"{src.id} -> {target}: {len(paired)} of {len(result)} modules paired"]
    for p in result:
        dst = f"{p.target_component}:{p.target_module} {p.target_shape}" if not p.skipped else f"SKIP ({p.skipped})"
        lines.append(f"  {p.source_component}:{p.source_module} {p.source_shape} -> {dst}  [{p.rule}]")
    _emit(as_json, [p.model_dump() for p in result], "\n".join(lines))


@main.command()
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), help="Folder for the demo's outputs (default: a temp folder).")
@click.option("--json", "as_json", is_flag=True)
def demo(out_dir: Optional[Path], as_json: bool) -> None:
    """Offline demo on the embedded example LoRA: detect, convert kohya -> diffusers -> kohya, verify."""
    from .demo import run_demo

    res = run_demo(out_dir)
    lines = [
        f"example   {res.example}",
        f"detected  {res.detected_format}, family {res.detected_family}, {res.modules} modules",
        *[f"step      {s.action}: {s.tensors} tensors -> {s.output}" for s in res.steps],
        f"result    round trip bit-exact: {'yes' if res.round_trip_bit_exact else 'NO'}; max |ΔW difference| {res.max_delta_error:.3g}",
    ]
    _emit(as_json, res.model_dump(), "\n".join(lines))
    if not res.round_trip_bit_exact:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
