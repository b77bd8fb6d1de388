"""`lorareg demo`: the offline first-contact job on the embedded examples."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click

from ..demo import port_summary, run_demo
from .main import emit, main


@main.command()
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), help="Folder for the demo's outputs (default: a temp folder).")
@click.option("--no-port", is_flag=True, help="Only the convert round trip (skip porting the embedded LM example).")
@click.option("--json", "as_json", is_flag=True)
def demo(out_dir: Optional[Path], no_port: bool, as_json: bool) -> None:
    """Offline demo on the embedded examples: port an LM LoRA v1 -> v2 and measure it; convert kohya -> diffusers -> kohya."""
    res = run_demo(out_dir, port=not no_port)
    lines = port_summary(res.port) if res.port else ([f"port      skipped: {res.port_skipped}"] if res.port_skipped else [])
    lines += [
        f"example   {res.example}",
        f"detected  {res.detected_format}, family {res.detected_family}, {res.modules} modules",
        *[f"step      {s.action}: {s.tensors} tensors -> {s.output}" for s in res.steps],
        f"result    round trip bit-exact: {'yes' if res.round_trip_bit_exact else 'NO'}; max |ΔW difference| {res.max_delta_error:.3g}",
    ]
    emit(as_json, res.model_dump(), "\n".join(lines))
    if not res.round_trip_bit_exact:
        sys.exit(1)
