"""What a model's own files say about it: tensor shapes from safetensors headers, configs, folder layout.

No tensor data is read and nothing is imported from transformers or diffusers: a local folder or file
is read header by header; a Hub repo through huggingface_hub (configs and indexes downloaded, headers
read with HTTP range requests: ``read_hub_model``).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..core.errors import InputError
from ..core.io import read_header
from ..core.names import PICKLE_SUFFIXES
from ..hub.client import hub_endpoint, is_offline, translate_errors
from ..hub.pull import _download, _list_files
from .layout import INDEX_FILES, weight_files_in as _layout_weight_files
from .refs import ModelRef

Shape = tuple[int, ...]
#: diffusers sub-folders that hold a LoRA-adaptable component, and the role each has
ROLE_OF_FOLDER = (("unet", "unet"), ("transformer", "transformer"), ("prior", "transformer"), ("text_encoder", "text_encoder"))
_COMPONENT_ID = re.compile(r"^[a-z][a-z0-9_]*$")
_PICKLES = PICKLE_SUFFIXES
#: a safetensors header larger than this is not a header (the format caps it at 100 MB)
_MAX_HEADER = 100 * 2**20


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
    """The files holding one folder's weights (sources.layout's rule): an index alone (its map names the
    shards), else the weight files; never a PEFT adapter's weights."""
    chosen = [n for n in _layout_weight_files(names) if not n.startswith("adapter_model")]
    return chosen[:1] if chosen and chosen[0] in INDEX_FILES else chosen


def _shapes_of_header(path: Path) -> dict[str, Shape]:
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
    ref = ModelRef.parse(text)
    if ref.path is not None:
        return read_local(ref.path, text)
    return read_hub_model(ref)


# --------------------------------------------------------------------------- Hub models, headers only


def _remote_header(url: str, headers: dict) -> dict[str, tuple[int, ...]]:
    from huggingface_hub import get_session

    session = get_session()

    def get(start: int, stop: int) -> bytes:
        r = session.get(url, headers={**headers, "Range": f"bytes={start}-{stop - 1}"}, follow_redirects=True)
        r.raise_for_status()
        return r.content[: stop - start]

    (n,) = struct.unpack("<Q", get(0, 8))
    if not 0 < n <= _MAX_HEADER:
        raise InputError(f"{url}: not a safetensors file (header length {n})")
    doc = json.loads(get(8, 8 + n))
    return {k: tuple(v["shape"]) for k, v in doc.items() if k != "__metadata__"}


def read_hub_model(ref: ModelRef) -> ModelFiles:
    """A Hub model read to the level of its headers: configs and indexes downloaded, safetensors headers
    read with HTTP range requests (two small reads a file), never the weights. Offline
    (``HF_HUB_OFFLINE=1``) the weight files must be in huggingface_hub's cache; their headers are read there."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    where = f"{ref.repo_id}@{ref.revision}" if ref.revision else ref.repo_id
    endpoint = hub_endpoint()
    offline = is_offline()
    sub = (ref.repo_path or "").strip("/")
    with translate_errors("reading", where, endpoint=endpoint, offline=offline):
        names, cached_only = _list_files(ref.repo_id, "model", ref.revision, endpoint=endpoint, token=None, offline=offline)
        if sub:
            if sub.endswith(_PICKLES):
                raise InputError(f"{where}: {sub} is a pickle checkpoint (lorareg never unpickles)")
            names = [n[len(sub) + 1:] for n in names if n.startswith(sub + "/")] if sub not in names else [sub]
            if not names:
                raise InputError(f"{where}: no file or folder {sub!r} in the repo")
        base = sub + "/" if sub and not sub.endswith(".safetensors") else ""
        folders_of: dict[str, list[str]] = {}
        for n in names:
            folder, _, fname = n.rpartition("/")
            folders_of.setdefault(folder, []).append(fname)
        if sub.endswith(".safetensors"):
            plan = {"": [sub]}
            kind = "single_file"
        else:
            plan = {f: weight_files_in(files) for f, files in folders_of.items() if "/" not in f and role_of_folder(f)}
            plan = {f: w for f, w in plan.items() if w}
            kind = "diffusers" if plan and ("model_index.json" in folders_of.get("", []) or not weight_files_in(folders_of.get("", []))) else "transformers"
            if kind == "transformers":
                plan = {"": weight_files_in(folders_of.get("", []))}
            if not any(plan.values()):
                pickles = any(n.endswith(_PICKLES) for n in names)
                raise InputError(f"{where}: no .safetensors weights found" + (" (only pickle files, which lorareg never reads)" if pickles else ""))
        small = [f"{f}/{name}".lstrip("/") for f in plan for name in ("config.json",) if name in folders_of.get(f, [])]
        small += [f"{f}/{w}".lstrip("/") for f, ws in plan.items() for w in ws if w.endswith(INDEX_FILES)]
        if "model_index.json" in folders_of.get("", []):
            small.append("model_index.json")
        if offline or cached_only:
            # no range requests offline: the weight files themselves must be cached
            small += [f"{f}/{w}".lstrip("/") for f, ws in plan.items() for w in ws if not w.endswith(INDEX_FILES)]
        small = [base + s for s in small]
        folder = _download(ref.repo_id, "model", ref.revision, small or [base + "config.json"], endpoint=endpoint, token=None,
                           offline=cached_only)
        root = folder / sub if sub else folder
        if offline or cached_only:
            files = read_local(root, ref.text)
            files.repo_id, files.local = ref.repo_id, root
            return files
        http_headers = build_hf_headers(token=None)
        out: dict[str, FolderTensors] = {}
        for f, ws in plan.items():
            local = root.parent if kind == "single_file" else (root / f if f else root)
            shards = ws
            if ws and ws[0].endswith(INDEX_FILES):
                doc = json.loads((local / ws[0]).read_text(encoding="utf-8"))
                shards = sorted(set(doc.get("weight_map", {}).values()))
            tensors: dict[str, tuple[int, ...]] = {}
            for shard in shards:
                path_in_repo = shard if kind == "single_file" else base + (f"{f}/{shard}" if f else shard)
                url = hf_hub_url(ref.repo_id, path_in_repo, revision=ref.revision, endpoint=endpoint)
                tensors.update(_remote_header(url, http_headers))
            cfg_path = local / "config.json"
            config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
            out[f] = FolderTensors(tensors, config, [f"{f}/{s}".lstrip("/") for s in shards])
        index_path = root / "model_index.json"
        index = json.loads(index_path.read_text(encoding="utf-8")) if kind == "diffusers" and index_path.is_file() else {}
    return ModelFiles(ref.text, kind, out, model_index=index, repo_id=ref.repo_id, local=None)
