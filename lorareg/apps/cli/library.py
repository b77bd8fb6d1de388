"""`lorareg scan` and `lorareg batch`: whole libraries (lorareg.library)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ...library.manifest import read_manifest, rows_from_scan
from ...library.runner import batch, summary_table
from ...library.scan import scan, to_csv
from ...core.errors import InputError
from ...core.io import atomic_write_text
from .main import main


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"


@main.command("scan")
@click.argument("paths", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Rows and summary as JSON (input of `lorareg batch --from-scan`).")
@click.option("--csv", "as_csv", is_flag=True, help="Rows as CSV.")
@click.option("--workers", type=click.IntRange(min=1), help="Processes (default: one per core).")
@click.option("--cache", "cache_path", type=click.Path(path_type=Path), help="Fingerprint cache file (default: beside the basis cache).")
@click.option("--no-cache", is_flag=True, help="Read every file again, and keep no cache.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write the JSON/CSV here instead of stdout.")
@click.option("--civitai", is_flag=True, help="Also look each file up on Civitai by SHA-256, then by tensor-data hash (AutoV3).")
def scan_cmd(paths, as_json, as_csv, workers, cache_path, no_cache, output, civitai) -> None:
    """Inventory LoRA files: folders (recursively), files, list files (.txt) or Hub refs; one row each."""
    if as_json and as_csv:
        raise InputError("--json or --csv, not both")
    res = scan(paths, workers=workers, cache=False if no_cache else (cache_path or True), progress=True, civitai=civitai)
    s = res.summary
    if as_json:
        text = json.dumps(res.model_dump(), indent=1) + "\n"
    elif as_csv:
        text = to_csv(res.rows)
    else:
        lines = []
        for r in res.rows:
            if r.ok:
                ranks = ",".join(sorted(r.ranks, key=int))
                lines.append(f"{r.path}  {r.format}  {r.family}  {r.adapter_type}  r{ranks}  {r.modules} modules  {(r.sha256 or '')[:10]}"
                             + (f"  [{'; '.join(r.problems)}]" if r.problems else "")
                             + (f"  civitai:{r.civitai['version_id']} {r.civitai['page_url']}" if r.civitai else ""))
            else:
                lines.append(f"{r.path}  FAILED  {r.error}")
        lines.append(f"{s.files} files: {s.ok} ok, {s.failed} failed, {s.cached} from cache, {s.seconds:.2f} s")
        lines.append(f"  families  {_counts(s.by_family)}")
        lines.append(f"  formats   {_counts(s.by_format)}")
        if s.problems:
            lines.append(f"  problems  {_counts(s.problems)}")
        text = "\n".join(lines) + "\n"
    if output:
        atomic_write_text(output, text)
        click.echo(f"{s.files} files ({s.ok} ok, {s.failed} failed) -> {output}", err=True)
    else:
        click.echo(text, nl=False)


@main.command("batch")
@click.argument("manifest", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--outdir", required=True, type=click.Path(path_type=Path), help="Folder for the outputs and the ledger.")
@click.option("--from-scan", type=click.Path(path_type=Path), help="Make the rows from a `lorareg scan --json` output.")
@click.option("--family", "families", multiple=True, help="--from-scan: only files of this family (repeatable).")
@click.option("--to", "to", help="Default target family of every row.")
@click.option("--source-model", help="Default source model of every row.")
@click.option("--target-model", help="Default target model of every row.")
@click.option("--method", help="Default method of every row (as `lorareg port --method`).")
@click.option("--format", "format_", help="Default output key format of every row.")
@click.option("--device", help="Default device of every row (auto, cpu, cuda).")
@click.option("--push-prefix", metavar="ORG/", help="Push every row without a `push` field to ORG/<output name>.")
@click.option("--workers", type=click.IntRange(min=1), help="Local processes (default: one per core).")
@click.option("--ray", "use_ray", is_flag=True, help="Run the rows on Ray (pip install 'lorareg[ray]').")
@click.option("--ray-address", metavar="ADDR", help="Ray cluster to join (e.g. 10.0.0.5:6379); implies --ray.")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Basis cache (default $LORAREG_CACHE).")
@click.option("--ship-bases/--no-ship-bases", default=None,
              help="Ray: send the bases to every node through Ray's object store (default: only to nodes that do not see --cache-dir).")
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True, help="Retries of a row whose worker died.")
@click.option("--json", "as_json", is_flag=True, help="Rows and summary as JSON.")
def batch_cmd(manifest, outdir, from_scan, families, to, source_model, target_model, method, format_, device, push_prefix,
              workers, use_ray, ray_address, cache_dir, ship_bases, retries, as_json) -> None:
    """Port many LoRAs (a JSONL/CSV manifest, or --from-scan) into OUTDIR; resumable, failures isolated."""
    defaults = {k: v for k, v in {"to": to, "source_model": source_model, "target_model": target_model, "method": method,
                                  "format": format_, "device": device}.items() if v is not None}
    if manifest is None and from_scan is None:
        raise InputError("give a MANIFEST (JSONL or CSV) or --from-scan scan.json")
    rows = None
    if push_prefix:
        rows = read_manifest(manifest, defaults) if manifest is not None else rows_from_scan(from_scan, defaults, families)
        for r in rows:
            if r.push is None:
                stem = Path(r.output).name if r.output else Path(r.lora.rstrip("/")).name.removesuffix(".safetensors")
                r.push = push_prefix.rstrip("/") + "/" + (stem if r.output else f"{stem}-{r.to or 'ported'}")
    res = batch(rows if rows is not None else manifest, outdir, from_scan=None if rows is not None else from_scan,
                families=families, defaults=defaults, workers=workers, ray=use_ray, ray_address=ray_address,
                cache_dir=cache_dir, ship_bases=ship_bases, retries=retries, progress=not as_json)
    if as_json:
        click.echo(json.dumps(res.model_dump(), indent=1))
    else:
        click.echo(summary_table(res))
    if not res.ok:
        sys.exit(1)
