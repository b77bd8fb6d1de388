"""The registry: model families (schemas/) and key formats (adapters/), loaded from data files."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

from pydantic import ValidationError

from ..core.errors import InputError, RegistryError
from ..core.version import __version__
from .data import data_roots, iter_data_files, read_json, schema_file, validate
from .families import CANONICAL, Component, Family, FamilySpec, build_family
from .formats import Format, FormatSpec, Variant
from .inherit import modules_path as resolve_modules_path
from .inherit import resolve_family_doc

__all__ = [
    "CANONICAL",
    "Component",
    "Family",
    "Format",
    "Registry",
    "Variant",
    "get_registry",
]


@dataclass
class Registry:
    families: dict[str, Family]
    formats: dict[str, Format]
    correspondences: list[dict]
    #: what this registry was built from (its data files and lorareg's code reading them, by name, size and
    #: mtime, then the ids of families made at run time as they join). Keys what is remembered about a file's format.
    identity: Optional[str] = None

    def family(self, family_id: str) -> Family:
        fam = self.families.get(family_id)
        if fam is None:
            for f in self.families.values():
                if f.matches_alias(family_id):
                    return f
            known = ", ".join(sorted(self.families))
            raise InputError(f"unknown family {family_id!r} (known: {known})")
        return fam

    def format(self, format_id: str) -> Format:
        fmt = self.formats.get(format_id)
        if fmt is None:
            known = ", ".join(sorted(self.formats))
            raise InputError(f"unknown format {format_id!r} (known: {known})")
        return fmt

    def register(self, family: Family) -> Family:
        """Add a family made at run time (derived from a model) to this registry, in memory only."""
        known = self.families.get(family.id)
        if known is not None:
            # the same shape table met again, maybe stored another way: one family, both layouts
            for layout in family.spec.layouts:
                if layout not in known.spec.layouts:
                    known.spec.layouts.append(layout)
            return known
        self.families[family.id] = family
        if self.identity is not None:  # remembered detection verdicts stay valid per set of families (a derived id names its shapes)
            self.identity = hashlib.sha256(f"{self.identity}|{family.id}".encode()).hexdigest()
        return family

    def families_for_alias(self, value: str) -> list[str]:
        return [f.id for f in self.families.values() if f.matches_alias(value)]


def _read_valid(path: Path, schema: str) -> dict:
    doc = read_json(path)
    validate(doc, schema_file(schema), path)
    return doc


def _typed(model, doc: dict, path: Path):
    try:
        return model.model_validate(doc)
    except ValidationError as e:
        raise RegistryError(f"{path}: {e.errors()[0]['msg']} at {e.errors()[0]['loc']}") from None


def _find_family_file(family_id: str) -> Optional[Path]:
    return next((p for p in iter_data_files("families") if p.stem == family_id), None)


def _load_family(path: Path) -> Family:
    raw = _read_valid(path, "family.schema.json")
    # a variant file (variant_of) is its parent's document with its own fields over it
    doc = resolve_family_doc(path, raw, _find_family_file)
    if doc is not raw:
        validate(doc, schema_file("family.schema.json"), path)
    spec = _typed(FamilySpec, doc, path)
    modules_path = resolve_modules_path(path, raw, _find_family_file)
    if not modules_path.exists():
        raise RegistryError(f"{path}: generated module table {modules_path} is missing (run tools/gen_modules.py)")
    return build_family(spec, _read_valid(modules_path, "modules.schema.json"), path)


def _load_format(path: Path) -> Format:
    return Format(spec=_typed(FormatSpec, _read_valid(path, "adapter.schema.json"), path), path=path)


def _identity(roots: tuple[Path, ...]) -> str:
    """Every data file under the roots and every module of lorareg.formats/registry, by name, size and mtime
    (taken before the files are read, so an edit during loading only makes the identity wrong-footed, not stale)."""
    code = Path(__file__).resolve().parent.parent
    files = [p for root in roots for sub in ("schemas", "adapters") for p in sorted((root / sub).rglob("*.json"))]
    files += sorted([*(code / "registry").glob("*.py"), *(code / "formats").glob("*.py")])
    h = hashlib.sha256(__version__.encode())
    for p in files:
        try:
            st = p.stat()
        except OSError:
            continue
        h.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


@lru_cache(maxsize=8)
def _load(roots: tuple[Path, ...]) -> Registry:
    identity = _identity(roots)
    families: dict[str, Family] = {}
    for path in iter_data_files("families"):
        fam = _load_family(path)
        if fam.id != path.stem:
            raise RegistryError(f"{path}: id {fam.id!r} must match the file name")
        families[fam.id] = fam
    for fam in families.values():
        chain, cur = [fam.id], fam
        while cur.spec.variant_of and cur.spec.variant_of in families and cur.spec.variant_of not in chain:
            cur = families[cur.spec.variant_of]
            chain.append(cur.id)
        fam.lineage = tuple(chain)
    formats: dict[str, Format] = {}
    for path in iter_data_files("adapters"):
        fmt = _load_format(path)
        if fmt.id != path.stem:
            raise RegistryError(f"{path}: id {fmt.id!r} must match the file name")
        formats[fmt.id] = fmt
    correspondences = []
    for path in iter_data_files("correspondences"):
        correspondences.append(_read_valid(path, "correspondence.schema.json"))
    return Registry(families=families, formats=formats, correspondences=correspondences, identity=identity)


def get_registry() -> Registry:
    """The registry for the current data roots (built-in plus LORAREG_DATA_PATH), cached."""
    return _load(tuple(data_roots()))
