"""The `lorareg` command: parse arguments, call the API, print text or --json."""

from __future__ import annotations

import json
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
