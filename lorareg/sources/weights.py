"""Base-model weights, read lazily: only the tensors of the modules being ported, never the model.

A model reference is a local diffusers folder, a transformers folder (sharded or not), a single-file
checkpoint with LDM/original names, or a Hub id ``org/name[@revision]``. Which files hold which
component comes from the family's ``layouts``; names in a single file come from its naming scheme.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..core.errors import InputError
from ..core.io import DTYPES, LazyTensor, SafetensorsHeader, read_header
from ..core.names import PICKLE_SUFFIXES, numel
from ..engine.relatedness import ByteRange, StoredWeight
from ..hub.pull import snapshot_for_family
from ..registry import CANONICAL, Family
from ..registry.families import Component
from .layout import is_index, weight_files_in
from .refs import ModelRef



@dataclass
class _Source:
    """One component's tensors: a list of safetensors files (shards) and how names map into them."""

    component: Component
    prefix: str
    scheme: str
    files: dict[str, Path]  # tensor name -> file (shards); empty means 'look in every header'
    headers: dict[Path, SafetensorsHeader] = field(default_factory=dict)

    def header(self, path: Path) -> SafetensorsHeader:
        if path not in self.headers:
            self.headers[path] = read_header(path)
        return self.headers[path]

    def find(self, name: str) -> Optional[tuple[SafetensorsHeader, str]]:
        candidates = [self.files[name]] if name in self.files else list(dict.fromkeys(self.files.values()))
        for path in candidates:
            h = self.header(path)
            if name in h.tensors:
                return h, name
        return None


class BaseWeights:
    """Lazy access to the weights of one family's model at one reference."""

    def __init__(self, family: Family, ref: ModelRef, sources: dict[str, _Source], layout: str, revision: Optional[str]):
        self.family = family
        self.ref = ref
        self.layout = layout
        self.revision = revision
        self._sources = sources

    @property
    def components(self) -> list[str]:
        return sorted(self._sources)

    def files(self) -> list[Path]:
        """The weight files of the components opened (every shard a component's index names, and any
        file whose header was read)."""
        return sorted({p for src in self._sources.values() for p in (*src.files.values(), *src.headers)})

    def folder(self) -> Path:
        """The local folder the weights were read from (a transformers model's config.json sits there)."""
        if self.ref.path is not None and self.ref.path.is_dir():
            return self.ref.path
        for src in self._sources.values():
            if src.files:
                return next(iter(src.files.values())).parent
        return self.ref.path.parent if self.ref.path is not None else Path(str(self.ref))

    def weight(self, component: str, module: str) -> torch.Tensor:
        """The weight of a canonical module, as stored (dtype and shape as in the checkpoint)."""
        src = self._sources.get(component)
        if src is None:
            raise InputError(f"{self.ref}: no weights for component {component!r} in this {self.layout} layout")
        shape = src.component.modules.get(module)
        if shape is None:
            raise InputError(f"{self.family.id} has no module {component}:{module}")
        t = self._read(src, module)
        if tuple(t.shape) != tuple(shape):
            if t.numel() == numel(shape):
                t = t.reshape(shape)  # a 1x1 conv stored as linear, or the reverse
            else:
                raise InputError(f"{self.ref}: {component}:{module} has shape {list(t.shape)}, expected {list(shape)} for {self.family.id}")
        return t

    def stored(self, component: str, module: str) -> StoredWeight:
        """Where a canonical module's weight lies in the files (byte ranges, in row order), unread.

        For the streamed relatedness check (lorareg.engine.relatedness), which reads the bytes in
        chunks itself instead of mapping whole shards. A fused tensor's part is its rows' byte range.
        """
        src = self._sources.get(component)
        if src is None:
            raise InputError(f"{self.ref}: no weights for component {component!r} in this {self.layout} layout")
        shape = src.component.modules.get(module)
        if shape is None:
            raise InputError(f"{self.family.id} has no module {component}:{module}")
        group = src.component.fused_group_of(src.scheme).get(module) if src.scheme != CANONICAL else None
        header, key = self._found(src, (group.name if group is not None else _stored_name(src, module)) + ".weight", module)
        info = header.tensors[key]
        start = header.data_offset + info.begin
        if group is None:
            ranges = (ByteRange(header.path, start, info.nbytes),)
        else:
            row = info.nbytes // info.shape[0]
            parts = sorted((s.start, s.at, s.stop - s.start) for s in group.slices if s.module == module)
            ranges = tuple(ByteRange(header.path, start + at * row, rows * row) for _, at, rows in parts)
        if sum(r.nbytes for r in ranges) != numel(shape) * DTYPES[info.dtype][1]:
            stored = [sum(rows for _, _, rows in parts), *info.shape[1:]] if group is not None else list(info.shape)
            raise InputError(f"{self.ref}: {component}:{module} has shape {stored}, expected {list(shape)} for {self.family.id}")
        return StoredWeight(ranges, tuple(shape), DTYPES[info.dtype][0])

    def fingerprint(self, component: str, module: str) -> Optional[str]:
        """A cheap identity of a module's stored weight (file path, size, mtime, offset, name), or None.

        It lets the basis cache skip hashing weights it has seen: the content digest is remembered
        under this fingerprint. A file rewritten in place gets a new mtime and so a new fingerprint.
        """
        src = self._sources.get(component)
        if src is None or module not in src.component.modules:
            return None
        found = self._locate(src, _stored_name(src, module) + ".weight")
        if found is None:
            return None
        header, key = found
        st = header.path.stat()
        info = header.tensors[key]
        text = f"{header.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{header.data_offset + info.begin}|{key}|{component}:{module}"
        return hashlib.sha256(text.encode()).hexdigest()

    def _read(self, src: _Source, module: str) -> torch.Tensor:
        if src.scheme != CANONICAL:
            group = src.component.fused_group_of(src.scheme).get(module)
            if group is not None:
                fused = self._tensor(src, group.name + ".weight", module)
                rows = [fused[s.at : s.at + s.stop - s.start] for s in group.slices if s.module == module]
                order = sorted((s.start, i) for i, s in enumerate(x for x in group.slices if x.module == module))
                return torch.cat([rows[i] for _, i in order], dim=0)
        return self._tensor(src, _stored_name(src, module) + ".weight", module)

    def _candidates(self, src: _Source, name: str) -> list[str]:
        prefix = src.component.spec.module_prefix
        tried = [src.prefix + name]
        if prefix and name.startswith(prefix):
            tried.append(src.prefix + name[len(prefix) :])  # transformers 5 saves CLIP without text_model.
        elif prefix:
            tried.append(src.prefix + prefix + name)
        return tried

    def _locate(self, src: _Source, name: str) -> Optional[tuple[SafetensorsHeader, str]]:
        for candidate in self._candidates(src, name):
            found = src.find(candidate)
            if found:
                return found
        return None

    def _found(self, src: _Source, name: str, module: str) -> tuple[SafetensorsHeader, str]:
        found = self._locate(src, name)
        if found is None:
            tried = self._candidates(src, name)[0]
            raise InputError(f"{self.ref}: weight of {src.component.id}:{module} not found (looked for {tried!r})")
        return found

    def _tensor(self, src: _Source, name: str, module: str) -> torch.Tensor:
        header, key = self._found(src, name, module)
        info = header.tensors[key]
        return LazyTensor(info.dtype, info.shape, header=header, info=info).torch()


def _stored_name(src: _Source, module: str) -> str:
    """The module's name in the checkpoint's naming scheme (a fused group's name for fused parts)."""
    if src.scheme == CANONICAL:
        return module
    group = src.component.fused_group_of(src.scheme).get(module)
    return group.name if group is not None else src.component.name_in(src.scheme, module)


def _index_map(index_path: Path) -> dict[str, Path]:
    try:
        doc = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = doc["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{index_path}: not a valid safetensors index") from None
    return {name: index_path.parent / fname for name, fname in weight_map.items()}


def _component_files(folder: Path) -> Optional[dict[str, Path]]:
    """Tensor name -> file for an index; ``{"": file}`` for one file; placeholder keys to search every shard."""
    files = weight_files_in(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    if not files:
        return None
    if is_index(files[0]):
        return _index_map(folder / files[0])
    if len(files) == 1:
        return {"": folder / files[0]}
    return {str(i): folder / f for i, f in enumerate(files)}


def open_local(family: Family, path: Path, components: Optional[list[str]] = None, revision: Optional[str] = None) -> BaseWeights:
    """Match a local folder or file to one of the family's layouts."""
    wanted = components or list(family.components)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise InputError(f"{path}: pickle checkpoints are not read (lorareg never unpickles); use .safetensors")
        for layout in family.spec.layouts:
            if layout.type != "single_file":
                continue
            sources = {
                cid: _Source(family.components[cid], lc.prefix, lc.scheme, {"": path})
                for cid, lc in layout.components.items()
                if cid in wanted and cid in family.components
            }
            if sources and _probe(sources):
                return BaseWeights(family, ModelRef(str(path), path=path), sources, "single_file", revision)
        # a bare component file (e.g. a diffusers unet/diffusion_pytorch_model.safetensors)
        sources = {cid: _Source(family.components[cid], "", CANONICAL, {"": path}) for cid in wanted}
        sources = {cid: s for cid, s in sources.items() if _probe({cid: s})}
        if sources:
            return BaseWeights(family, ModelRef(str(path), path=path), sources, "component_file", revision)
        raise InputError(f"{path}: no {family.id} weights found in this file (checked the family's single-file layouts)")
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder")
    for layout in family.spec.layouts:
        if layout.type == "single_file":
            continue
        sources = {}
        for cid, lc in layout.components.items():
            if cid not in wanted or cid not in family.components:
                continue
            files = _component_files(path / lc.path if lc.path else path)
            if files is not None:
                sources[cid] = _Source(family.components[cid], lc.prefix, lc.scheme, files)
        if sources and _probe(sources):
            return BaseWeights(family, ModelRef(str(path), path=path), sources, layout.type, revision)
    raise InputError(f"{path}: not a {family.id} model folder (expected one of: {', '.join(_layout_names(family))})")


def _layout_names(family: Family) -> list[str]:
    out = []
    for layout in family.spec.layouts:
        if layout.type == "single_file":
            out.append(f"a single .safetensors file{f' like {layout.filename}' if layout.filename else ''}")
        else:
            parts = [lc.path or "." for lc in layout.components.values()]
            out.append(f"a {layout.type} folder ({', '.join(parts)})")
    return out


def _probe(sources: dict[str, _Source]) -> bool:
    """Does each component have at least one of its module weights in these files? (headers only)"""
    for src in sources.values():
        bw = BaseWeights.__new__(BaseWeights)
        bw._sources = sources
        found = False
        try:
            for name in src.component.modules:
                if bw._locate(src, _stored_name(src, name) + ".weight") is not None:
                    found = True
                    break
        except (InputError, OSError, ValueError):
            return False
        if not found:
            return False
    return True


def open_model(family: Family, ref: str | ModelRef, components: Optional[list[str]] = None, *, with_configs: bool = False) -> BaseWeights:
    """Open a base model reference (local, or Hub through huggingface_hub and its cache).

    ``with_configs``: from the Hub, also fetch the configs, tokenizers and scheduler settings (the
    small text files needed to run the model, not only to read its weights).
    """
    ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
    if ref.path is not None:
        return open_local(family, ref.path, components)
    local, revision = snapshot_for_family(family, ref.repo_id, ref.revision, components, path=ref.repo_path, with_configs=with_configs)
    weights = open_local(family, local, components, revision)
    weights.ref = ref
    return weights
