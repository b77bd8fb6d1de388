"""Find, validate and load the data files: schemas/ (families) and adapters/ (key formats).

The files live at the repository's top level in a checkout and under ``lorareg/_data`` in a wheel.
``LORAREG_DATA_PATH`` (os.pathsep-separated folders, each shaped like the top level) adds more, so a
new family or format is a data file, not code.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import jsonschema

from ..core.errors import RegistryError

_PACKAGE = Path(__file__).resolve().parent.parent


def builtin_root() -> Path:
    """The folder holding ``schemas/`` and ``adapters/`` that ship with lorareg."""
    wheel = _PACKAGE / "_data"
    if (wheel / "schemas").is_dir():
        return wheel
    checkout = _PACKAGE.parent
    if (checkout / "schemas").is_dir():
        return checkout
    raise RegistryError("lorareg data folders (schemas/, adapters/) are missing from this installation")


def data_roots() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("LORAREG_DATA_PATH", "").split(os.pathsep) if p]
    return [builtin_root(), *extra]


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RegistryError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: expected a JSON object")
    return data


@lru_cache(maxsize=None)
def _validator(schema_path: Path) -> jsonschema.protocols.Validator:
    schema = read_json(schema_path)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate(doc: dict, schema_path: Path, source: Path) -> None:
    errors = sorted(_validator(schema_path).iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.absolute_path) or "(top)"
        raise RegistryError(f"{source}: invalid at {where}: {e.message}")


def schema_file(name: str) -> Path:
    """A JSON Schema that ships with lorareg (family, modules, correspondence, adapter)."""
    root = builtin_root()
    for candidate in (root / "schemas" / name, root / "adapters" / name):
        if candidate.exists():
            return candidate
    raise RegistryError(f"JSON Schema {name} is missing from this installation")


def iter_data_files(kind: str) -> Iterator[Path]:
    """Data files of one kind ('families', 'correspondences', 'adapters') across all roots."""
    for root in data_roots():
        folder = root / "adapters" if kind == "adapters" else root / "schemas" / kind
        if folder.is_dir():
            yield from sorted(p for p in folder.glob("*.json") if not p.name.endswith(".schema.json"))
