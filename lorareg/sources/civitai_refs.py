"""Civitai references: ``civitai:<versionId>``, model/version page and download URLs, AIRs.

AIR (AI Resource Identifier, as Civitai's API returns in ``air``):
``urn:air:<ecosystem>:<type>:civitai:<modelId>@<versionId>``; the version may be left out (then the
model's latest version is meant).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional
from urllib.parse import parse_qs, urlparse

from ..core.errors import InputError

_SHORT = re.compile(r"^civitai:(\d+)$")
_AIR = re.compile(r"^urn:air:([a-z0-9_.-]+):(lora|lycoris|locon|dora):civitai:(\d+)(?:@(\d+))?$", re.IGNORECASE)
_MODEL_PATH = re.compile(r"^/models/(\d+)(?:/[^/]*)?/?$")
_DOWNLOAD_PATH = re.compile(r"^/api/download/models/(\d+)/?$")
_VERSION_PATH = re.compile(r"^/(?:api/v1/)?model-versions/(\d+)/?$")


@dataclass(frozen=True)
class CivitaiRef:
    """A Civitai LoRA: a version id, or a model id whose latest version is meant."""

    version_id: Optional[int] = None
    model_id: Optional[int] = None

    def __str__(self) -> str:
        return f"civitai:{self.version_id}" if self.version_id else f"civitai model {self.model_id}"


def looks_like_civitai_ref(text: str) -> bool:
    t = str(text).strip()
    if t.lower().startswith(("civitai:", "urn:air:")):
        return True
    host = (urlparse(t).hostname or "").lower() if "://" in t else ""
    own = (urlparse(os.environ.get("CIVITAI_ENDPOINT", "")).hostname or "").lower()  # a mirror or test server
    return host == "civitai.com" or host.endswith(".civitai.com") or host in ("civitai.green", "civitai.red") or (bool(own) and host == own)


def parse_civitai_ref(text: str) -> CivitaiRef:
    """Parse a reference; anything that is not one gives a one-line InputError."""
    t = str(text).strip()
    if m := _SHORT.match(t):
        return CivitaiRef(version_id=int(m.group(1)))
    if t.lower().startswith("urn:air:"):
        m = _AIR.match(t)
        if not m or m.group(2) is None:
            raise InputError(f"{t}: not a Civitai LoRA AIR (expected urn:air:<ecosystem>:lora:civitai:<modelId>@<versionId>)")
        return CivitaiRef(version_id=int(m.group(4)) if m.group(4) else None, model_id=int(m.group(3)))
    if "://" in t:
        url = urlparse(t)
        qs = parse_qs(url.query)
        version = (qs.get("modelVersionId") or [None])[0]
        if m := _MODEL_PATH.match(url.path):
            return CivitaiRef(version_id=int(version) if version and version.isdigit() else None, model_id=int(m.group(1)))
        for pattern in (_DOWNLOAD_PATH, _VERSION_PATH):
            if m := pattern.match(url.path):
                return CivitaiRef(version_id=int(m.group(1)))
    raise InputError(f"{t}: not a Civitai reference (civitai:<versionId>, a civitai.com/models/... URL, or an AIR)")
