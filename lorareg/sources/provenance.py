"""What a port's report records about where its inputs came from: the source LoRA's hashes and Civitai
facts, and the weights of a local base model named by their SHA-256 (a local folder has no Hub id)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..core.lora import Lora
from .http import file_sha256

CIVITAI_KEY = "lorareg.source_civitai"


def civitai_facts(metadata: dict[str, str]) -> Optional[dict[str, Any]]:
    """The Civitai facts a LoRA loaded from Civitai carries (see lorareg.sources.civitai.provenance_metadata)."""
    raw = metadata.get(CIVITAI_KEY)
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def source_lora_record(lora: Lora) -> dict[str, Any]:
    """Report fields about the source LoRA beyond its path and SHA-256."""
    out: dict[str, Any] = {}
    if lora.source_hashes:
        out["hashes"] = dict(lora.source_hashes)
    facts = civitai_facts(lora.metadata)
    if facts:
        out["civitai"] = facts
    return out


def local_weights_sha256(weights) -> Optional[dict[str, str]]:
    """SHA-256 of each weight file a local base model was read from, by its path inside the model folder."""
    if weights is None or weights.revision is not None or weights.ref.path is None:
        return None
    root = weights.ref.path if weights.ref.path.is_dir() else weights.ref.path.parent
    out = {}
    for p in weights.files():
        try:
            name = str(Path(p).resolve().relative_to(root.resolve()))
        except ValueError:
            name = Path(p).name
        out[name] = file_sha256(Path(p))
    return out
