"""Push a ported LoRA to the Hub: weights, README.md (model card) and report.json in one atomic commit.

An unchanged re-push makes no commit (huggingface_hub skips files whose content the Hub already has,
and lorareg's outputs are byte-deterministic). The token comes from ``token=``, ``HF_TOKEN`` or the
huggingface_hub login, and is never printed, logged or written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel

from ..core.errors import InputError, LoraregError
from ..core.hashes import file_hashes
from ..core.io import PEFT_CONFIG, PEFT_WEIGHTS, read_header
from ..core.names import CARD_NAME, REPORT_NAME
from ..port.report import PortReport, PortResult
from ..registry import get_registry
from ..sources.refs import parse_repo_id
from .card import CardInfo, build_card, license_of, model_repo_id, trigger_words
from .client import hub_endpoint, is_offline, translate_errors
from .licence import check_publishable, licence_of
from .pull import lookup_lora



class PushResult(BaseModel):
    """What a push did."""

    repo_id: str
    repo_url: str
    revision: str
    changed: bool
    commit_oid: Optional[str] = None
    commit_url: Optional[str] = None
    pr_url: Optional[str] = None
    files: list[str]


@dataclass
class _Bundle:
    report: dict[str, Any]
    report_bytes: bytes  # report.json as the port wrote it: pushed as is
    weights: Path
    files: dict[str, Path] = field(default_factory=dict)  # path in repo -> local file
    weight_name: str = ""


def _locate(path: Path) -> tuple[Path, Path]:
    """(output file or PEFT folder, its report.json) for a path given to ``push``."""
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / PEFT_CONFIG).exists():
            return path, path / REPORT_NAME
        pairs = sorted(
            (r.with_name(r.name[: -len("." + REPORT_NAME)] + ".safetensors"), r)
            for r in path.glob("*." + REPORT_NAME)
            if r.with_name(r.name[: -len("." + REPORT_NAME)] + ".safetensors").exists()
        )
        if len(pairs) == 1:
            return pairs[0]
        if not pairs:
            raise InputError(f"{path}: no lorareg port output here (a PEFT folder, or X.safetensors with X.report.json)")
        raise InputError(f"{path}: {len(pairs)} port outputs here; name the .safetensors file to push")
    if path.suffix != ".safetensors":
        raise InputError(f"{path}: expected a .safetensors file or a PEFT folder written by `lorareg port`")
    return path, path.with_name(path.stem + "." + REPORT_NAME)


def _bundle(obj: Any) -> _Bundle:
    if isinstance(obj, PortResult):
        if obj.output is None or obj.report_path is None:
            raise InputError("this port result was not written to disk (port with output=...); nothing to push")
        out, report_path = Path(obj.output), Path(obj.report_path)
    else:
        out, report_path = _locate(Path(obj))
    if not report_path.exists():
        raise InputError(f"{out}: no {report_path.name} next to it; push pushes `lorareg port` outputs")
    raw = report_path.read_bytes()
    try:
        report = json.loads(raw.decode("utf-8"))
        PortReport.model_validate(report)
    except ValueError:
        raise InputError(f"{report_path}: not a lorareg port report") from None
    if out.is_dir():
        weights, config = out / PEFT_WEIGHTS, out / PEFT_CONFIG
        for f in (weights, config):
            if not f.exists():
                raise InputError(f"{f}: missing from the PEFT folder")
        return _Bundle(report, raw, weights, {PEFT_WEIGHTS: weights, PEFT_CONFIG: config}, PEFT_WEIGHTS)
    if not out.exists():
        raise InputError(f"{out}: no such file (the port output was moved or deleted)")
    return _Bundle(report, raw, out, {out.name: out}, out.name)


@contextlib.contextmanager
def _quiet_client():
    """huggingface_hub's chatter ("No files have been modified...") and httpx's deprecation warning
    on LFS uploads stay out of lorareg's one-line output."""
    hf_logger = logging.getLogger("huggingface_hub")
    old = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"httpx.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*content=.*")
            yield
    finally:
        hf_logger.setLevel(old)


def prepare(
    result_or_dir: Any,
    repo_id: str,
    *,
    instance_prompt: Optional[str] = None,
    license: Optional[str] = None,
    base_model: Optional[str] = None,
    command: Optional[str] = None,
    owner_permission: Optional[str] = None,
) -> tuple[dict[str, Union[Path, bytes]], CardInfo]:
    """The files a push uploads (path in repo -> local file or bytes) and the card's inputs; no network.

    Refused when the source's creator forbids derivatives, unless ``owner_permission`` says how the
    owner allowed it (it is then written in the card)."""
    bundle = _bundle(result_or_dir)
    header = read_header(bundle.weights)
    metadata = header.metadata
    report = bundle.report
    src = report.get("source_lora") or {}
    pulled = lookup_lora(src.get("path"))
    lic = licence_of(given=license, civitai=src.get("civitai"), hub_license=pulled.license if pulled else None,
                     file_license=license_of(metadata), owner_permission=owner_permission)
    check_publishable(lic, src.get("path") or "the source LoRA")
    info = CardInfo(
        repo_id=repo_id,
        weight_name=bundle.weight_name,
        output_format=str((report.get("output") or {}).get("format") or "unknown"),
        base_model=base_model or _claimed_base_model(report.get("target_model") or {}),
        instance_prompt=instance_prompt or trigger_words(metadata),
        license=lic.license,
        source_commit=pulled.commit if pulled else None,
        command=command,
        licence=lic,
        output_hashes=file_hashes(header)[0].model_dump(),
    )
    card = build_card(report, info)
    files: dict[str, Union[Path, bytes]] = dict(sorted(bundle.files.items()))
    files[CARD_NAME] = card.encode("utf-8")
    files[REPORT_NAME] = bundle.report_bytes  # the same bytes as the report left next to the output
    return files, info


def _claimed_base_model(tgt: dict[str, Any]) -> Optional[str]:
    """The Hub id the card may claim as ``base_model``: the target's when it was read from the Hub; the
    family's reference repo when no target weights were read (the port is for the family); none for a
    local folder, which may be any checkpoint (the card names its weights by SHA-256 instead)."""
    if tgt.get("ref"):
        return None if tgt.get("location") == "local" else model_repo_id(tgt["ref"])
    try:
        return get_registry().family(tgt.get("family")).spec.hub.default_repo
    except LoraregError:
        return None


def push(
    result_or_dir: Any,
    repo_id: str,
    *,
    private: bool = False,
    create_pr: bool = False,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    instance_prompt: Optional[str] = None,
    license: Optional[str] = None,
    base_model: Optional[str] = None,
    command: Optional[str] = None,
    owner_permission: Optional[str] = None,
    token: Optional[str] = None,
    endpoint: Optional[str] = None,
) -> PushResult:
    """Upload a port's output (a ``PortResult``, its output file/folder) to ``repo_id`` in one commit.

    ``revision``: the branch to commit to (created from main if missing); ``create_pr``: open a pull
    request against it instead. ``token``/``endpoint`` default to huggingface_hub's (``HF_TOKEN`` or
    the login; ``HF_ENDPOINT``). Nothing is committed when the repo already holds these exact files.
    """
    repo_id, rev_in_id = parse_repo_id(repo_id)
    revision = revision or rev_in_id or "main"
    if is_offline():
        raise InputError("pushing needs the network, but HF_HUB_OFFLINE=1 is set")
    files, info = prepare(result_or_dir, repo_id, instance_prompt=instance_prompt, license=license,
                          base_model=base_model, command=command, owner_permission=owner_permission)
    from huggingface_hub import CommitOperationAdd, HfApi

    endpoint = hub_endpoint(endpoint)
    api = HfApi(endpoint=endpoint, token=token)
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(src) if isinstance(src, Path) else src)
           for name, src in files.items()]
    message = commit_message or _default_message(info, files)
    with translate_errors("pushing to", repo_id, token=token, endpoint=endpoint), _quiet_client():
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        head = api.repo_info(repo_id, revision=revision).sha
        commit = api.create_commit(
            repo_id,
            ops,
            commit_message=message,
            commit_description=f"Ported with lorareg; see {CARD_NAME} and {REPORT_NAME}.",
            revision=revision,
            create_pr=create_pr,
            parent_commit=head,
        )
    changed = bool(commit.pr_url) or commit.oid != head
    return PushResult(
        repo_id=repo_id,
        repo_url=str(repo_url),
        revision=revision,
        changed=changed,
        commit_oid=commit.oid,
        commit_url=commit.commit_url,
        pr_url=commit.pr_url,
        files=list(files),
    )


def _default_message(info: CardInfo, files) -> str:  # noqa: ARG001
    return f"Upload ported LoRA {info.weight_name} (lorareg)"
