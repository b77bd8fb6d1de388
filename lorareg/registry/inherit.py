"""Family files that build on another (``variant_of``): a fine-tune or sibling of a family.

A variant file names its parent and says only what differs (name, aliases, Hub repos, notes,
detection, and ``config_overrides`` per component); every other field is the parent's. Its module
table is its own generated file when the overrides change the modules, else the parent's: FLUX.1
Krea/Kontext [dev] ship no copy of FLUX.1 [dev]'s table.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Optional

from ..core.errors import RegistryError

#: fields of a variant file that are never copied onto the parent's document as they are
_OWN = ("config_overrides",)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RegistryError(f"{path}: cannot read JSON ({e})") from None


def parent_path(path: Path, parent: str, find: Optional[Callable[[str], Optional[Path]]] = None) -> Path:
    """The parent's family file: beside the variant, else wherever ``find`` locates it."""
    beside = path.parent / f"{parent}.json"
    if beside.exists():
        return beside
    found = find(parent) if find else None
    if found is None:
        raise RegistryError(f"{path}: variant_of {parent!r} names no family file")
    return found


def resolve_family_doc(path: Path, doc: dict, find=None, _seen: tuple = ()) -> dict:
    """The full family document of ``doc`` (read from ``path``): itself, or its parent's with its own fields over it."""
    parent = doc.get("variant_of")
    if not parent:
        return doc
    if parent in _seen or parent == doc.get("id"):
        raise RegistryError(f"{path}: variant_of forms a cycle ({' -> '.join((*_seen, parent))})")
    ppath = parent_path(path, parent, find)
    base = resolve_family_doc(ppath, _read(ppath), find, (*_seen, doc.get("id", "?")))
    merged = copy.deepcopy(base)
    merged.pop("config_overrides", None)
    for key, value in doc.items():
        if key not in _OWN:
            merged[key] = copy.deepcopy(value)
    for cid, over in (doc.get("config_overrides") or {}).items():
        comp = merged.get("components", {}).get(cid)
        if comp is None:
            raise RegistryError(f"{path}: config_overrides names component {cid!r}, which {parent} does not have")
        comp["architecture"]["config"].update(copy.deepcopy(over))
    return merged


def modules_path(path: Path, doc: dict, find=None) -> Path:
    """The module table of a family file: its own, else (a variant without one) its parent's."""
    own = path.parent.parent / "modules" / path.name
    parent = doc.get("variant_of")
    if own.exists() or not parent:
        return own
    ppath = parent_path(path, parent, find)
    return modules_path(ppath, _read(ppath), find)
