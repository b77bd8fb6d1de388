"""`lorareg basis build`: fill the basis cache for one model ahead of any port."""

from __future__ import annotations

import click

from ...port.bases import build_model_bases
from .main import emit, main


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
    stats = build_model_bases(model, family, list(components) or None, match, rank_k, device, progress=not as_json)
    emit(as_json, stats, f"{stats['modules']} modules: {stats['cached']} already cached, {stats['built']} built in {stats['seconds']:.1f} s -> {stats['cache']}")
