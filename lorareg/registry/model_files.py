"""What a model's own files say about it: tensor shapes from safetensors headers, configs, folder layout.

No tensor data is read and nothing is imported from transformers or diffusers: a local folder or file
is read header by header; a Hub repo through huggingface_hub (configs and indexes downloaded, headers
read with HTTP range requests, see ``lorareg.hub.headers``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..errors import InputError

Shape = tuple[int, ...]
#: diffusers sub-folders that hold a LoRA-adaptable component, and the role each has
ROLE_OF_FOLDER = (("unet", "unet"), ("transformer", "transformer"), ("prior", "transformer"), ("text_encoder", "text_encoder"))
_COMPONENT_ID = re.compile(r"^[a-z][a-z0-9_]*$")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
_PICKLES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


@dataclass
class FolderTensors:
    """One folder's (or one file's) weights: every tensor's shape, and the config.json beside them."""

    tensors: dict[str, Shape]
    config: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # weight file names, relative to the model root


@dataclass
class ModelFiles:
    """A model reference read to the level of its headers: what ``derive`` works from."""

    ref: str
    kind: Literal["transformers", "diffusers", "single_file"]
    folders: dict[str, FolderTensors]  # sub-folder ('' = the root, or the file itself) -> its tensors
    model_index: dict = field(default_factory=dict)
    repo_id: Optional[str] = None
    local: Optional[Path] = None

    @property
    def name(self) -> str:
        return self.repo_id or (self.local.stem if self.local and self.local.is_file() else self.local.name if self.local else self.ref)


def role_of_folder(name: str) -> Optional[str]:
    for prefix, role in ROLE_OF_FOLDER:
        if name == prefix or name.startswith(prefix + "_"):
            return role
    return None


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise InputError(f"{path}: cannot read JSON") from None
    return doc if isinstance(doc, dict) else {}


def weight_files_in(names: list[str]) -> list[str]:
    """The safetensors files holding one folder's weights, given the file names in it (an index wins)."""
    for index in INDEX_FILES:
        if index in names:
            return [index]
    for fname in WEIGHT_FILES:
        if fname in names:
            return [fname]
    return sorted(n for n in names if n.endswith(".safetensors") and not n.startswith("adapter_model"))


def _shapes_of_header(path: Path) -> dict[str, Shape]:
    from ..io import read_header

    return {name: tuple(info.shape) for name, info in read_header(path).tensors.items()}


def _local_folder(folder: Path, rel: str) -> Optional[FolderTensors]:
    if not folder.is_dir():
        return None
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    chosen = weight_files_in(names)
    if not chosen:
        return None
    tensors: dict[str, Shape] = {}
    files = []
    for fname in chosen:
        if fname.endswith(".index.json"):
            weight_map = _read_json(folder / fname).get("weight_map")
            if not isinstance(weight_map, dict):
                raise InputError(f"{folder / fname}: not a valid safetensors index")
            for shard in sorted(set(weight_map.values())):
                tensors.update(_shapes_of_header(folder / shard))
                files.append(f"{rel}/{shard}".lstrip("/"))
        else:
            tensors.update(_shapes_of_header(folder / fname))
            files.append(f"{rel}/{fname}".lstrip("/"))
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    return FolderTensors(tensors, config, files)


def read_local(path: Path, text: Optional[str] = None) -> ModelFiles:
    """A local model: a transformers folder, a diffusers folder, or one .safetensors file."""
    text = text or str(path)
    if path.is_file():
        if path.suffix in _PICKLES:
            raise InputError(f"{path}: pickle checkpoints are not read (lorareg never unpickles); use .safetensors")
        config = _read_json(path.parent / "config.json") if (path.parent / "config.json").is_file() else {}
        ft = FolderTensors(_shapes_of_header(path), config, [path.name])
        return ModelFiles(text, "single_file", {"": ft}, local=path)
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder")
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise InputError(f"{path}: a PEFT adapter folder, not a base model (give the model the adapter was trained on)")
    index = _read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    subs = {}
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        if _COMPONENT_ID.match(sub.name) and role_of_folder(sub.name):
            ft = _local_folder(sub, sub.name)
            if ft is not None:
                subs[sub.name] = ft
    if index or (subs and _local_folder(path, "") is None):
        if not subs:
            raise InputError(f"{path}: a diffusers folder with no unet/, transformer/ or text_encoder/ safetensors weights")
        return ModelFiles(text, "diffusers", subs, model_index=index, local=path)
    root = _local_folder(path, "")
    if root is None:
        pickles = any(p.suffix in _PICKLES for p in path.iterdir())
        raise InputError(f"{path}: no .safetensors weights found" + (" (only pickle files, which lorareg never reads)" if pickles else ""))
    return ModelFiles(text, "transformers", {"": root}, local=path)


def read_model_files(text: str) -> ModelFiles:
    """Read a model reference (local path or Hub id ``org/name[@rev]``) to the level of its headers."""
    from ..weights import ModelRef

    ref = ModelRef.parse(text)
    if ref.path is not None:
        return read_local(ref.path, text)
    from ..hub.headers import read_hub_model

    return read_hub_model(ref)
