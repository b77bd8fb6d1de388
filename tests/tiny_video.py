"""Tiny variants of the real video/Flux families, registered at test time (``variant_of`` + ``config_overrides``).

The real naming schemes, correspondences, expert layouts and diffusion data are what tests exercise; only the
transformer configs shrink, and the module tables come from tools/gen_modules.py.
"""

from __future__ import annotations

import copy
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
DIM = 16  # heads x head dim of every tiny transformer


def tiny_config(kind: str, layers: int) -> dict:
    """The tiny transformer config of a model kind (hv, wan, flux, chroma) with ``layers`` blocks of each sort."""
    two_heads = {"num_attention_heads": 2, "attention_head_dim": 8}
    return {
        "hv": {**two_heads, "num_layers": layers, "num_single_layers": layers, "num_refiner_layers": 1, "text_embed_dim": 24,
               "pooled_projection_dim": 12, "rope_axes_dim": [2, 2, 4], "mlp_ratio": 2.0},
        "wan": {**two_heads, "ffn_dim": 32, "num_layers": layers, "text_dim": 24, "freq_dim": 16},
        "flux": {**two_heads, "num_layers": layers, "num_single_layers": layers, "joint_attention_dim": 24, "pooled_projection_dim": 12,
                 "axes_dims_rope": [2, 2, 4]},
        "chroma": {**two_heads, "num_layers": layers, "num_single_layers": layers, "joint_attention_dim": 24, "axes_dims_rope": [2, 2, 4],
                   "approximator_num_channels": 8, "approximator_hidden_dim": 32, "approximator_layers": 2},
    }[kind]


@contextmanager
def tiny_registry(root: Path, variants: list[tuple[str, str, dict, Optional[dict]]]) -> Iterator[Path]:
    """A registry data folder of tiny variants (id, parent, transformer config, extra fields), on LORAREG_DATA_PATH."""
    for sub in ("families", "modules", "correspondences"):
        (root / "schemas" / sub).mkdir(parents=True)
    for fid, parent, config, extra in variants:
        tiny_variant(root, fid, parent, config, extra)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAREG_DATA_PATH", str(root))
        yield root


def _gen_modules():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gen_modules
    finally:
        sys.path.pop(0)
    return gen_modules


def tiny_variant(root: Path, fid: str, parent: str, tiny: dict, extra: dict | None = None) -> None:
    """A tiny variant family of ``parent``: its components with the tiny transformer config (and no text encoders);
    ``extra`` replaces top-level fields of the family file (e.g. its diffusion data)."""
    gm = _gen_modules()
    base = gm.load_family(ROOT / "schemas" / "families" / f"{parent}.json")
    comps = {c: copy.deepcopy(s) for c, s in base["components"].items() if s["role"] == "transformer"}
    for spec in comps.values():
        spec["architecture"]["config"].update(tiny)
        for scheme in spec.get("schemes", {}).values():
            for group in scheme.get("fuse", []):  # the final adaLN halves swap at the tiny width
                for part in group["parts"]:
                    if part.get("rows"):
                        part["rows"] = [r * DIM // 3072 for r in part["rows"]]
    doc = {"schema_version": 1, "id": fid, "variant_of": parent, "name": f"tiny {parent}", "aliases": {"names": [fid]},
           "hub": {"default_repo": f"tiny/{fid}"}, "components": comps,
           "layouts": [{"type": "diffusers", "components": {c: {"path": c, "prefix": ""} for c in comps}}],
           "detection": {"key_modules": [f"{next(iter(comps))}:proj_out"]}, **(extra or {})}
    (root / "schemas" / "families" / f"{fid}.json").write_text(json.dumps(doc))
    full = copy.deepcopy(base)
    full.update({k: v for k, v in doc.items() if k != "variant_of"})
    table = gm.compact(gm.generate(full))
    table["family"] = fid
    (root / "schemas" / "modules" / f"{fid}.json").write_text(gm.dumps(table))
