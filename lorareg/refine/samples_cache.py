"""On-disk cache of a teacher's samples and outputs (safetensors, never pickle), keyed by what produced them.

Porting one LoRA to several targets generates the teacher's samples once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..core.io import tensor_buffer, write_safetensors
from ..core.lora import Lora
from ..engine.cache import default_cache_root

PathLike = Union[str, Path]
_MODEL_FILES = (".safetensors", ".json", ".model", ".txt")


def lora_digest(lora: Lora) -> str:
    """The source file's SHA-256, or a digest of the factors for a LoRA built in memory."""
    if lora.source_sha256:
        return lora.source_sha256
    h = hashlib.sha256()
    for key in sorted(lora.modules):
        m = lora.modules[key]
        h.update(key.encode() + repr(m.alpha).encode())
        for role in sorted(m.factors):
            t = m.factors[role].torch().contiguous()
            h.update(role.encode() + str(tuple(t.shape)).encode())
            h.update(tensor_buffer(t if t.dtype != torch.bfloat16 else t.float()))
    return h.hexdigest()


def model_digest(folder: Path) -> str:
    """Identity of a model folder (component subfolders included): weight, config and tokenizer files' names, sizes, mtimes."""
    items = []
    for p in sorted(folder.rglob("*")):
        if p.suffix in _MODEL_FILES and p.is_file() and len(p.relative_to(folder).parts) <= 2:
            st = p.stat()
            items.append([str(p.relative_to(folder)), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps([str(folder.resolve()), items]).encode()).hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(tensor_buffer(t.detach().float())).hexdigest()


def cached(cache_dir: Optional[PathLike], kind: str, key: dict, make: Callable[[], dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], bool]:
    """(the tensors stored under ``key``, True) or (``make()``, False) after storing them atomically."""
    from safetensors.torch import load_file

    root = Path(cache_dir) if cache_dir else default_cache_root()
    path = root / kind / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest() + ".safetensors")
    if path.exists():
        try:
            return load_file(str(path)), True
        except Exception:  # noqa: BLE001 - a damaged entry is made again
            pass
    data = make()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, data)  # atomic; safetensors' save_file would need numpy
    except OSError:
        pass  # a read-only cache still works
    return data, False
