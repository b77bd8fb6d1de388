"""The registry: model families (schemas/) and key formats (adapters/), loaded from data files."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pydantic import ValidationError

from ..core.errors import InputError, RegistryError
from .data import data_roots, iter_data_files, read_json, schema_file, validate
from .families import CANONICAL, Component, Family, FamilySpec, build_family
from .formats import Format, FormatSpec, Variant

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


def _load_family(path: Path) -> Family:
    spec = _typed(FamilySpec, _read_valid(path, "family.schema.json"), path)
    modules_path = path.parent.parent / "modules" / path.name
    if not modules_path.exists():
        raise RegistryError(f"{path}: generated module table {modules_path} is missing (run tools/gen_modules.py)")
    return build_family(spec, _read_valid(modules_path, "modules.schema.json"), path)


def _load_format(path: Path) -> Format:
    return Format(spec=_typed(FormatSpec, _read_valid(path, "adapter.schema.json"), path), path=path)


@lru_cache(maxsize=8)
def _load(roots: tuple[Path, ...]) -> Registry:
    families: dict[str, Family] = {}
    for path in iter_data_files("families"):
        fam = _load_family(path)
        if fam.id != path.stem:
            raise RegistryError(f"{path}: id {fam.id!r} must match the file name")
        families[fam.id] = fam
    formats: dict[str, Format] = {}
    for path in iter_data_files("adapters"):
        fmt = _load_format(path)
        if fmt.id != path.stem:
            raise RegistryError(f"{path}: id {fmt.id!r} must match the file name")
        formats[fmt.id] = fmt
    correspondences = []
    for path in iter_data_files("correspondences"):
        correspondences.append(_read_valid(path, "correspondence.schema.json"))
    return Registry(families=families, formats=formats, correspondences=correspondences)


def get_registry() -> Registry:
    """The registry for the current data roots (built-in plus LORAREG_DATA_PATH), cached."""
    return _load(tuple(data_roots()))
