"""Civitai as a LoRA source, through its public REST API v1 (developer.civitai.com, "Model versions",
"Models"): ``GET /api/v1/model-versions/{id}``, ``/model-versions/by-hash/{hash}``, ``/models/{id}``.

The primary safetensors file of a version is downloaded (resumably) into a cache and kept only if its
SHA-256 is the API's ``files[].hashes.SHA256``; pickles are never fetched. The API also gives the base
model (mapped to a family through the registry's Civitai aliases), trigger words, names, creator and the
model's licence facts (``allowDerivatives``...). ``CIVITAI_API_TOKEN`` is sent as ``Authorization:
Bearer``, never shown. ``CIVITAI_ENDPOINT`` replaces https://civitai.com; with ``HF_HUB_OFFLINE=1`` (or
``CIVITAI_OFFLINE=1``) only the cache is used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel

from ..core.errors import InputError
from ..hub.client import is_offline
from ..core.io import atomic_write_text
from ..registry import get_registry
from .civitai_refs import CivitaiRef, looks_like_civitai_ref, parse_civitai_ref
from .http import SourceError, download_verified, get_json

DEFAULT_ENDPOINT = "https://civitai.com"
TOKEN_ENV = "CIVITAI_API_TOKEN"
SAFETENSORS_FORMAT = "SafeTensor"
MODEL_FILE_TYPES = ("Model", "Pruned Model")


class CivitaiLora(BaseModel):
    """What Civitai says about one LoRA version, as recorded in reports and cards (no local paths)."""

    version_id: int
    model_id: int
    model_name: Optional[str] = None
    version_name: Optional[str] = None
    base_model: Optional[str] = None
    families: list[str] = []
    creator: Optional[str] = None
    trained_words: list[str] = []
    file_name: str
    sha256: str
    air: Optional[str] = None
    page_url: str
    creator_url: Optional[str] = None
    #: the model's licence facts; None where the API did not say
    allow_derivatives: Optional[bool] = None
    allow_commercial_use: Optional[list[str]] = None
    allow_no_credit: Optional[bool] = None
    allow_different_license: Optional[bool] = None


# --------------------------------------------------------------------------- settings


def endpoint() -> str:
    return (os.environ.get("CIVITAI_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def token() -> Optional[str]:
    return os.environ.get(TOKEN_ENV) or None


def offline() -> bool:
    return is_offline() or os.environ.get("CIVITAI_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_root() -> Path:
    """``$LORAREG_CIVITAI_CACHE``, else ``$HF_HOME/lorareg/civitai``."""
    env = os.environ.get("LORAREG_CIVITAI_CACHE")
    if env:
        return Path(env).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME).expanduser() / "lorareg" / "civitai"


def _describe(code: int, what: str) -> str:
    if code in (401, 403):
        if token():
            return f"{what}: Civitai refused the token in {TOKEN_ENV} (HTTP {code})"
        return f"{what}: Civitai requires a login for this (HTTP {code}); set {TOKEN_ENV} to an API key"
    if code == 404:
        return f"{what}: not found on Civitai (HTTP 404)"
    if code == 429:
        return f"{what}: Civitai's rate limit was hit (HTTP 429)"
    return f"{what}: Civitai answered HTTP {code}"


def _api(path: str, what: str) -> Any:
    return get_json(f"{endpoint()}/api/v1/{path}", token=token(), what=what, describe=_describe)


# --------------------------------------------------------------------------- API documents -> facts


def pick_file(version: dict) -> dict:
    """The version's primary safetensors model file; a version with only pickles is refused."""
    files = [f for f in version.get("files") or [] if isinstance(f, dict)]
    models = [f for f in files if f.get("type", "Model") in MODEL_FILE_TYPES]
    safe = [f for f in models if (f.get("metadata") or {}).get("format") == SAFETENSORS_FORMAT
            or str(f.get("name", "")).endswith(".safetensors")]
    if not safe:
        others = ", ".join(f"{f.get('name')} ({(f.get('metadata') or {}).get('format', '?')})" for f in models) or "no model file"
        raise InputError(f"civitai:{version.get('id')}: no safetensors file ({others}); lorareg never unpickles files")
    primary = [f for f in safe if f.get("primary")]
    chosen = (primary or safe)[0]
    if not (chosen.get("hashes") or {}).get("SHA256"):
        raise InputError(f"civitai:{version.get('id')}: the API gives no SHA-256 for {chosen.get('name')}; cannot verify it")
    return chosen


def _commercial(value) -> Optional[list[str]]:
    """``allowCommercialUse``: a list of permissions today, a single string in older responses."""
    if value is None:
        return None
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def facts_of(version: dict, model: Optional[dict], registry=None) -> CivitaiLora:
    f = pick_file(version)
    vid, mid = int(version["id"]), int(version.get("modelId") or (model or {}).get("id"))
    creator = ((model or {}).get("creator") or {}).get("username")
    base = version.get("baseModel")
    return CivitaiLora(
        version_id=vid,
        model_id=mid,
        model_name=(model or {}).get("name") or (version.get("model") or {}).get("name"),
        version_name=version.get("name"),
        base_model=base,
        families=families_for(base, registry) if base else [],
        creator=creator,
        trained_words=[str(w).strip() for w in version.get("trainedWords") or [] if str(w).strip()],
        file_name=str(f.get("name")),
        sha256=str(f["hashes"]["SHA256"]).lower(),
        air=version.get("air"),
        page_url=page_url(mid, vid),
        creator_url=f"{endpoint()}/user/{creator}" if creator else None,
        allow_derivatives=(model or {}).get("allowDerivatives"),
        allow_commercial_use=_commercial((model or {}).get("allowCommercialUse")),
        allow_no_credit=(model or {}).get("allowNoCredit"),
        allow_different_license=(model or {}).get("allowDifferentLicense"),
    )


def page_url(model_id: int, version_id: int) -> str:
    return f"{endpoint()}/models/{model_id}?modelVersionId={version_id}"


def families_for(base_model: str, registry=None) -> list[str]:
    """Families whose ``aliases.civitai`` name this base model; an unknown name is refused with the list."""
    registry = registry or get_registry()
    fams = list(registry.families.values())
    hits = [f.id for f in fams if base_model.strip().lower() in {a.lower() for a in f.spec.aliases.civitai}]
    if not hits:
        known = sorted({a for f in fams for a in f.spec.aliases.civitai})
        raise InputError(f"Civitai base model {base_model!r} is no known family's (known: {', '.join(known)})")
    return sorted(hits)


# --------------------------------------------------------------------------- resolve + download


def _version_doc(ref: CivitaiRef) -> dict:
    if ref.version_id is None:
        model = _api(f"models/{ref.model_id}", f"civitai model {ref.model_id}")
        versions = [v for v in model.get("modelVersions") or [] if isinstance(v, dict) and v.get("id")]
        if not versions:
            raise InputError(f"civitai model {ref.model_id}: has no published version")
        ref = CivitaiRef(version_id=int(versions[0]["id"]), model_id=ref.model_id)
    return _api(f"model-versions/{ref.version_id}", str(ref))


def _facts_path(version_id: int) -> Path:
    return cache_root() / "versions" / f"{version_id}.json"


def _file_path(sha256: str) -> Path:
    return cache_root() / "files" / f"{sha256.lower()}.safetensors"


def resolve(text: Union[str, CivitaiRef], *, progress: bool = False) -> tuple[Path, CivitaiLora]:
    """A Civitai reference -> (the verified file in the cache, what Civitai says about it)."""
    ref = text if isinstance(text, CivitaiRef) else parse_civitai_ref(str(text))
    if offline():
        return _from_cache(ref)
    version = _version_doc(ref)
    mid = version.get("modelId") or ref.model_id
    model = _api(f"models/{mid}", f"civitai model {mid}") if mid else None
    facts = facts_of(version, model)
    f = pick_file(version)
    dest = _file_path(facts.sha256)
    if not dest.exists():
        url = f.get("downloadUrl") or version.get("downloadUrl")
        if not url:
            raise InputError(f"{ref}: the API gives no download URL")
        download_verified(url, dest, facts.sha256, token=token(), what=f"{ref} ({facts.file_name})",
                          describe=_describe, progress=progress)
    atomic_write_text(_facts_path(facts.version_id), facts.model_dump_json(indent=2) + "\n")
    _RESOLVED[facts.version_id] = facts
    return dest, facts


def _from_cache(ref: CivitaiRef) -> tuple[Path, CivitaiLora]:
    if ref.version_id is None:
        raise InputError(f"{ref}: offline, a model's latest version cannot be looked up; give its version id")
    facts = cached_facts(ref.version_id)
    if facts is None or not _file_path(facts.sha256).exists():
        raise InputError(f"{ref}: not in the Civitai cache ({cache_root()}) and offline mode is on")
    return _file_path(facts.sha256), facts


#: versions resolved in this process
_RESOLVED: dict[int, CivitaiLora] = {}


def cached_facts(version_id: int) -> Optional[CivitaiLora]:
    """What was recorded about a version when it was downloaded (no network)."""
    if version_id in _RESOLVED:
        return _RESOLVED[version_id]
    path = _facts_path(version_id)
    if not path.exists():
        return None
    try:
        return CivitaiLora.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def lookup_ref(text: Optional[str]) -> Optional[CivitaiLora]:
    """The recorded facts of a reference as written in a report (``civitai:<id>``...), or None."""
    if not text or not looks_like_civitai_ref(text):
        return None
    try:
        ref = parse_civitai_ref(text)
    except InputError:
        return None
    return cached_facts(ref.version_id) if ref.version_id else None


def by_hash(digest: str) -> Optional[CivitaiLora]:
    """The version holding a file with this hash (SHA-256, AutoV2, AutoV3...), or None if Civitai has none."""
    try:
        version = _api(f"model-versions/by-hash/{digest}", f"civitai hash {digest[:12]}")
    except SourceError as e:
        if e.status == 404:
            return None
        raise
    mid = version.get("modelId")
    model = _api(f"models/{mid}", f"civitai model {mid}") if mid else None
    return facts_of(version, model)


def provenance_metadata(facts: CivitaiLora) -> dict[str, str]:
    """The source's Civitai facts, for the metadata of files derived from it."""
    return {"lorareg.source_civitai": json.dumps(facts.model_dump(exclude_none=True), sort_keys=True)}
