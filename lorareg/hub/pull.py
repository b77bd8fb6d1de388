"""Pull LoRAs and base-model weights from the Hub, through huggingface_hub's cache.

Only the files that are needed are downloaded: the LoRA file (or the PEFT adapter's two files) and the
repo's README.md (for its license); for a base model, the ``*.safetensors`` (and index) of the
components being ported, in the folders the family's layouts name. Pickle files are never fetched.
With ``HF_HUB_OFFLINE=1`` the same files come from the cache, or a one-line error says they are not there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..core.errors import InputError
from ..core.names import CARD_NAME, PICKLE_SUFFIXES
from ..registry import Family
from ..sources.layout import weight_files_in
from ..sources.refs import HubRef, looks_like_hub_ref, parse_hub_ref
from .client import hub_endpoint, is_offline, translate_errors

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
#: text files a model needs at run time besides its weights (never pickles; tokenizer.model is protobuf)
CONFIG_SUFFIXES = ("config.json", "vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "generation_config.json")


@dataclass(frozen=True)
class PulledLora:
    """A LoRA resolved on the Hub: what was asked, the commit it resolved to, where it lies in the cache."""

    ref: HubRef
    commit: str
    files: tuple[str, ...]
    local_path: Path
    license: Optional[str] = None

    @property
    def pinned(self) -> HubRef:
        """The same reference at the exact commit."""
        return self.ref.at(self.commit)


#: LoRAs resolved in this process, by canonical hf:// form (the report keeps the user's spelling)
_PULLED: dict[str, PulledLora] = {}


# --------------------------------------------------------------------------- plumbing


def _listing(repo_id: str, repo_type: str, revision: Optional[str], *, endpoint, token, offline: bool) -> list[str]:
    """Every path in the repo at ``revision``: from the Hub, or offline from the cached tree listing."""
    if offline:
        from huggingface_hub import get_cached_repo_tree

        return [f.path for f in get_cached_repo_tree(repo_id, repo_type=repo_type, revision=revision)]
    from huggingface_hub import HfApi

    info = HfApi(endpoint=endpoint, token=token).repo_info(repo_id, repo_type=repo_type, revision=revision)
    return [s.rfilename for s in (info.siblings or [])]


def _transient(exc: BaseException) -> bool:
    """A network failure or a Hub-side error (5xx, 429): worth trying the cache instead."""
    if type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore") or isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return isinstance(status, int) and (status >= 500 or status == 429)


def _list_files(repo_id: str, repo_type: str, revision: Optional[str], *, endpoint, token,
                offline: bool) -> tuple[list[str], bool]:
    """(paths in the repo, whether they come from the cache): the Hub, or the cache when offline or when
    the Hub cannot be reached (as huggingface_hub itself does)."""
    if offline:
        return _listing(repo_id, repo_type, revision, endpoint=endpoint, token=token, offline=True), True
    try:
        return _listing(repo_id, repo_type, revision, endpoint=endpoint, token=token, offline=False), False
    except Exception as e:
        if not _transient(e):
            raise
        try:
            return _listing(repo_id, repo_type, revision, endpoint=endpoint, token=token, offline=True), True
        except Exception:
            raise e from None


def _download(repo_id: str, repo_type: str, revision: Optional[str], files: list[str], *, endpoint, token,
              offline: bool) -> Path:
    """The snapshot folder (named by its commit) holding ``files``."""
    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        repo_id,
        repo_type=repo_type,
        revision=revision,
        allow_patterns=[_glob_escape(f) for f in files],
        endpoint=endpoint,
        token=token,
        local_files_only=offline,
    )
    return Path(folder)


def _glob_escape(path: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", path)


def _card_license(readme: Path) -> Optional[str]:
    """The ``license`` of a model card's YAML front matter, if any."""
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    m = re.match(r"^\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", text, re.S)
    if not m:
        return None
    try:
        import yaml

        meta = yaml.safe_load(m.group(1))
    except Exception:
        return None
    lic = meta.get("license") if isinstance(meta, dict) else None
    if isinstance(lic, str) and lic.strip():
        if lic.strip() == "other" and isinstance(meta.get("license_name"), str):
            return f"other ({meta['license_name'].strip()})"
        return lic.strip()
    return None


# --------------------------------------------------------------------------- LoRAs


def _choose_lora(ref: HubRef, names: list[str]) -> tuple[list[str], str]:
    """(files to download, path of the LoRA file or PEFT folder in the repo; '' is the repo root)."""
    where = ref.uri
    if ref.path:
        p = ref.path.strip("/")
        if p in names:
            if p.endswith(".safetensors"):
                return [p], p
            if p.endswith(PICKLE_SUFFIXES):
                raise InputError(f"{where}: a pickle checkpoint; lorareg never unpickles files (use .safetensors)")
            raise InputError(f"{where}: not a .safetensors LoRA file")
        inside = [n for n in names if n.startswith(p + "/")]
        if not inside:
            raise InputError(f"{where}: no file or folder {p!r} in {ref.repo_id}" + (f"@{ref.revision}" if ref.revision else ""))
        return _choose_in(where, ref, p, inside)
    return _choose_in(where, ref, "", names)


def _choose_in(where: str, ref: HubRef, folder: str, names: list[str]) -> tuple[list[str], str]:
    prefix = folder + "/" if folder else ""
    names_set = set(names)
    if all(prefix + f in names_set for f in PEFT_FILES):
        return [prefix + f for f in PEFT_FILES], folder
    peft_dirs = sorted(
        n[: -len("/adapter_model.safetensors")]
        for n in names
        if n.startswith(prefix) and n.endswith("/adapter_model.safetensors")
        and n[: -len("adapter_model.safetensors")] + "adapter_config.json" in names_set
    )
    loose = sorted(n for n in names if n.startswith(prefix) and n.endswith(".safetensors")
                   and not any(n == d + "/adapter_model.safetensors" for d in peft_dirs))
    candidates = loose + [d + "/" for d in peft_dirs]
    if len(candidates) == 1:
        c = candidates[0]
        if c.endswith("/"):
            d = c[:-1]
            return [f"{d}/{f}" for f in PEFT_FILES], d
        return [c], c
    if not candidates:
        pickles = any(n.endswith(PICKLE_SUFFIXES) for n in names if n.startswith(prefix))
        raise InputError(f"{where}: no .safetensors LoRA file or PEFT adapter found"
                         + (" (only pickle files, which lorareg never reads)" if pickles else ""))
    shown = ", ".join(candidates[:4]) + (f", ... ({len(candidates)} in all)" if len(candidates) > 4 else "")
    raise InputError(f"{where}: {len(candidates)} LoRA files ({shown}); name one, e.g. "
                     f"{HubRef(ref.repo_id, candidates[0].rstrip('/'), ref.revision, ref.repo_type).uri}")


def pull_lora(text: str, *, endpoint: Optional[str] = None, token: Optional[str] = None,
              local_only: bool = False) -> PulledLora:
    """Resolve a Hub LoRA reference to files in the cache (downloading what is missing)."""
    ref = parse_hub_ref(text)
    endpoint = hub_endpoint(endpoint)
    offline = local_only or is_offline()
    # a bare org/repo may as well have been a mistyped local path: say both
    shown = ref.uri if str(text).startswith("hf:") else f"{text} (no such local file or folder; as a Hub repo)"
    with translate_errors("downloading", shown, token=token, endpoint=endpoint, offline=offline):
        try:
            names, cached_only = _list_files(ref.repo_id, ref.repo_type, ref.revision, endpoint=endpoint, token=token,
                                             offline=offline)
        except Exception:
            cached = _cached_file(ref) if offline else None
            if cached is None:
                raise
            return _remember(PulledLora(ref, _commit_of(cached), (ref.path or "",), cached))
        files, target = _choose_lora(ref, names)
        extra = [CARD_NAME] if CARD_NAME in names and CARD_NAME not in files else []
        folder = _download(ref.repo_id, ref.repo_type, ref.revision, files + extra, endpoint=endpoint, token=token,
                           offline=cached_only)
    local = folder / target if target else folder
    if not local.exists():
        raise InputError(f"{ref.uri}: {target or 'the adapter'} was not downloaded (it changed on the Hub meanwhile?)")
    card = folder / CARD_NAME
    return _remember(PulledLora(ref, folder.name, tuple(files), local, _card_license(card) if card.exists() else None))


def _commit_of(path: Path) -> str:
    """The commit of a file in huggingface_hub's cache (``.../snapshots/<commit>/...``)."""
    parts = path.parts
    return parts[len(parts) - 1 - parts[::-1].index("snapshots") + 1] if "snapshots" in parts else ""


def _cached_file(ref: HubRef) -> Optional[Path]:
    """A single named file cached by some other download (no tree listing cached)."""
    if not ref.path or not ref.path.endswith(".safetensors"):
        return None
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(ref.repo_id, ref.path, revision=ref.revision, repo_type=ref.repo_type)
    return Path(hit) if isinstance(hit, str) else None


def _remember(pulled: PulledLora) -> PulledLora:
    _PULLED[pulled.ref.uri] = pulled
    return pulled


def resolve_lora_ref(text: str, *, endpoint: Optional[str] = None, token: Optional[str] = None) -> Path:
    """A Hub LoRA reference -> the local path (file, or PEFT folder) in huggingface_hub's cache."""
    return pull_lora(text, endpoint=endpoint, token=token).local_path


def lookup_lora(text: Optional[str]) -> Optional[PulledLora]:
    """What a LoRA reference (as recorded in a report) resolved to: from this process, or from the cache only."""
    if not text or Path(text).exists() or not looks_like_hub_ref(text):
        return None
    try:
        ref = parse_hub_ref(text)
    except InputError:
        return None
    if ref.uri in _PULLED:
        return _PULLED[ref.uri]
    try:
        return pull_lora(text, local_only=True)
    except Exception:
        return None


# --------------------------------------------------------------------------- base models


def select_weight_files(family: Family, components: Optional[list[str]], names: list[str], where: str) -> list[str]:
    """The weight files (and indexes) the family's layouts need for ``components``; never pickles."""
    wanted = components or list(family.components)
    for layout in family.spec.layouts:
        if layout.type == "single_file":
            continue
        chosen: list[str] = []
        for cid, lc in layout.components.items():
            if cid in wanted and cid in family.components:
                chosen += _folder_weights(lc.path or "", names)
        if chosen:
            return chosen
    for layout in family.spec.layouts:
        if layout.type == "single_file" and layout.filename and layout.filename in names:
            return [layout.filename]
    root = [n for n in names if "/" not in n and n.endswith(".safetensors")]
    if len(root) == 1 and any(l.type == "single_file" for l in family.spec.layouts):
        return root
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        raise InputError(f"{where}: only pickle checkpoints for {family.id} (lorareg never unpickles; it needs .safetensors)")
    raise InputError(f"{where}: no {family.id} .safetensors weights found for {', '.join(wanted)} "
                     "in the folders the family's layouts name")


def _folder_weights(folder: str, names: list[str]) -> list[str]:
    """The weight files of one folder of a repo listing (paths relative to the repo)."""
    prefix = folder.strip("/") + "/" if folder.strip("/") else ""
    here = [n[len(prefix):] for n in names if n.startswith(prefix) and "/" not in n[len(prefix):]]
    return [prefix + f for f in weight_files_in(here)]


def snapshot_for_family(family: Family, repo_id: str, revision: Optional[str], components: Optional[list[str]],
                        *, path: Optional[str] = None, endpoint: Optional[str] = None,
                        token: Optional[str] = None, with_configs: bool = False) -> tuple[Path, str]:
    """Download (or find in the cache) only the weight files a port needs: (local path, commit sha).

    The local path is the snapshot folder, or with ``path`` (a single-file checkpoint, or a subfolder
    holding the model) that file or folder inside it. ``with_configs`` adds the repo's small text
    files (configs, tokenizers, scheduler settings: ``CONFIG_SUFFIXES``) that running the model needs.
    """
    where = f"{repo_id}@{revision}" if revision else repo_id
    endpoint = hub_endpoint(endpoint)
    offline = is_offline()
    sub = (path or "").strip("/")
    with translate_errors("downloading", where, token=token, endpoint=endpoint, offline=offline):
        names, cached_only = _list_files(repo_id, "model", revision, endpoint=endpoint, token=token, offline=offline)
        if sub and sub in names:
            if not sub.endswith(".safetensors"):
                raise InputError(f"{where}: {sub} is not a .safetensors file (lorareg never unpickles)")
            files = [sub]
        elif sub:
            inside = [n[len(sub) + 1:] for n in names if n.startswith(sub + "/")]
            if not inside:
                raise InputError(f"{where}: no file or folder {sub!r} in the repo")
            files = [f"{sub}/{f}" for f in select_weight_files(family, components, inside, f"{where}/{sub}")]
        else:
            files = select_weight_files(family, components, names, where)
        if with_configs:
            files += [n for n in names if n.endswith(CONFIG_SUFFIXES) and (not sub or n.startswith(sub + "/")) and n not in files]
        folder = _download(repo_id, "model", revision, files, endpoint=endpoint, token=token, offline=cached_only)
    return (folder / sub if sub else folder), folder.name
