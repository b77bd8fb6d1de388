"""References to LoRAs and models: local paths, ``hf://[datasets/|spaces/]org/repo[/path][@rev]`` and ``org/repo[@rev]``.

``hf://org/repo/path/file.safetensors@rev`` names one file at a revision; ``hf://org/repo@rev/path`` is
accepted too (the form huggingface_hub's file system uses). ``pathlib`` turns ``hf://`` into ``hf:/``, so
both spellings parse. A revision may be percent-encoded (``refs%2Fpr%2F1``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import quote, unquote

from ..core.errors import InputError

_NAME = r"[A-Za-z0-9][\w.\-]*"
_REPO_ID = re.compile(rf"^{_NAME}/{_NAME}$")
_BARE = re.compile(rf"^({_NAME}/{_NAME})(?:@([^\s@]+))?$")
_TYPES = {"datasets": "dataset", "spaces": "space", "models": "model"}
_PREFIX = {"dataset": "datasets/", "space": "spaces/", "model": ""}
#: a missing local path ending like this is a missing file, not a Hub repo
_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".json", ".gguf", ".sft")


@dataclass(frozen=True)
class HubRef:
    """A repo on the Hub, optionally a file or folder in it, optionally at a revision."""

    repo_id: str
    path: Optional[str] = None
    revision: Optional[str] = None
    repo_type: str = "model"

    @property
    def uri(self) -> str:
        """The canonical ``hf://`` form."""
        out = f"hf://{_PREFIX[self.repo_type]}{self.repo_id}"
        if self.path:
            out += f"/{self.path}"
        if self.revision:
            out += f"@{quote(self.revision, safe='')}"
        return out

    def __str__(self) -> str:
        return self.uri

    def at(self, revision: Optional[str]) -> "HubRef":
        return HubRef(self.repo_id, self.path, revision, self.repo_type)


def is_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and ".." not in text and not text.endswith((".", "-"))


def looks_like_hub_ref(text: str) -> bool:
    """Could this (missing) local path be meant as a Hub reference?"""
    text = str(text)
    if text.startswith(("hf://", "hf:/")):
        return True
    if text.startswith((".", "/", "~", "\\")) or "\\" in text:
        return False
    m = _BARE.match(text)
    if not m:
        return False
    return not m.group(1).lower().endswith(_FILE_SUFFIXES)


def parse_hub_ref(text: str) -> HubRef:
    """Parse ``hf://...`` or ``org/repo[@rev]``; raise InputError with one line if it is neither."""
    raw = str(text).strip()
    if raw.startswith("hf://"):
        body = raw[5:]
    elif raw.startswith("hf:/"):
        body = raw[4:]
    else:
        m = _BARE.match(raw)
        if not m or not is_repo_id(m.group(1)):
            raise InputError(f"{raw}: not a Hub reference (org/repo[@revision] or hf://org/repo/path[@revision])")
        return HubRef(m.group(1), None, _rev(m.group(2)))
    body = body.strip("/")
    repo_type = "model"
    first, _, rest = body.partition("/")
    if first in _TYPES and "/" in rest:
        repo_type, body = _TYPES[first], rest
    parts = body.split("/")
    if len(parts) < 2:
        raise InputError(f"{raw}: a Hub path needs org/repo (hf://org/repo[/path][@revision])")
    org, name = parts[0], parts[1]
    revision = None
    if "@" in name:  # hf://org/repo@rev/path
        name, revision = name.split("@", 1)
        path_parts = parts[2:]
    else:
        path_parts = parts[2:]
        if path_parts and "@" in path_parts[-1]:  # hf://org/repo/path/file@rev
            last, revision = path_parts[-1].rsplit("@", 1)
            path_parts = path_parts[:-1] + ([last] if last else [])
    repo_id = f"{org}/{name}"
    if not is_repo_id(repo_id):
        raise InputError(f"{raw}: {repo_id!r} is not a valid Hub repo id")
    path = "/".join(p for p in path_parts if p) or None
    if path is not None and any(p in (".", "..") for p in path.split("/")):
        raise InputError(f"{raw}: '.' and '..' are not allowed in a Hub path")
    if revision is not None and not revision:
        raise InputError(f"{raw}: empty revision after '@'")
    return HubRef(repo_id, path, _rev(revision), repo_type)


def parse_repo_id(text: str) -> tuple[str, Optional[str]]:
    """``org/repo[@rev]`` (a push target); raise InputError otherwise."""
    m = _BARE.match(str(text).strip())
    if not m or not is_repo_id(m.group(1)):
        raise InputError(f"{text}: not a Hub repo id (expected user/repo)")
    return m.group(1), _rev(m.group(2))


def _rev(rev: Optional[str]) -> Optional[str]:
    return unquote(rev) if rev else None


@dataclass(frozen=True)
class ModelRef:
    """Where a base model lives: a local path, or a Hub repo (optionally a file in it) at a revision."""

    text: str
    path: Optional[Path] = None
    repo_id: Optional[str] = None
    revision: Optional[str] = None
    repo_path: Optional[str] = None  # a single-file checkpoint or a subfolder inside the repo

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        p = Path(text).expanduser()
        if p.exists():
            return cls(text, path=p)
        if looks_like_hub_ref(text):
            ref = parse_hub_ref(text)
            return cls(text, repo_id=ref.repo_id, revision=ref.revision, repo_path=ref.path)
        raise InputError(f"{text}: no such file or folder, and not a Hub id (org/name[@revision] or hf://org/name/file@rev)")

    def __str__(self) -> str:
        return self.text


# ------------------------------------------------------------------ as published (cards, recorded commands)


def is_local(text: str) -> bool:
    return Path(text).expanduser().exists() or not looks_like_hub_ref(text)


def public_lora_ref(text: Optional[str]) -> Optional[str]:
    """A LoRA reference as published: the canonical hf:// form, or a local file's name."""
    if not text:
        return None
    if is_local(text):
        return Path(text).name
    return parse_hub_ref(text).uri


def public_model_ref(text: Optional[str]) -> Optional[str]:
    """A model reference as published: ``org/name[@rev]``, or a local folder/file's name."""
    if not text:
        return None
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")):
        return Path(text).name
    return text[5:] if text.startswith("hf://") else text
