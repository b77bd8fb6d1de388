"""The GitHub Action's logic (``action.yml`` runs ``python -m lorareg.apps.action``).

Inputs come from environment variables that ``action.yml`` sets from its inputs (``env:`` only, so
no input is ever interpolated into a shell script):

=======================  ====================================================================
``INPUT_LORA``           path, glob (``**`` allowed) or ``hf://`` path; several, one a line
``INPUT_SOURCE_MODEL``   the LoRA's base model (folder, checkpoint, Hub id); may be empty
``INPUT_TARGET_MODELS``  one target a line: ``ref``, ``family:ref`` or ``family:`` (no weights)
``INPUT_METHOD``         ``auto`` (default), ``copy``, ``lora-x``, ``prolora``, ...
``INPUT_THRESHOLD``      skip layers whose subspace similarity is below this (default 0)
``INPUT_PUSH_TO``        repo id template; empty: port only. ``{owner}`` ``{repo}`` ``{name}``
                         ``{target}`` ``{family}`` ``{ref}``
``INPUT_CREATE_PR``      ``'true'``: open a pull request on each repo instead of committing
``INPUT_HF_TOKEN``       token for the Hub (else ``HF_TOKEN``, else OIDC trusted publishing)
``INPUT_DEVICE``         ``auto``, ``cpu``, ``cuda``
``INPUT_OUTPUT_DIR``     where the ported files and the combined report go (default ``lorareg-ported``)
=======================  ====================================================================

Every (LoRA, target) pair is tried; one failing does not stop the others. At the end the combined
report is written, a markdown table per target is appended to ``$GITHUB_STEP_SUMMARY``, the outputs
(``repo-urls``, ``commit-urls``, ``report``, ``failed``) go to ``$GITHUB_OUTPUT``, and the exit status
is 1 if any target failed. The token is never printed.
"""

from __future__ import annotations

import glob
import html
import json
import os
import re
import sys
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from ..core.version import __version__
from ..core.errors import InputError, LoraregError
from ..core.io import atomic_write_text
from ..hub.client import scrub
from ..hub.push import push
from ..port import PortOptions, port
from ..registry import get_registry
from ..sources.refs import looks_like_hub_ref, parse_repo_id

ACTION_REPORT_NAME = "lorareg-action-report.json"
DEFAULT_OUTPUT_DIR = "lorareg-ported"
_GLOB_CHARS = re.compile(r"[*?\[]")
_FAMILY_PREFIX = re.compile(r"^([A-Za-z0-9][\w.\-]*):(?!//)(.*)$")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_PLACEHOLDERS = ("owner", "repo", "name", "target", "family", "ref")
_REASON_DETAIL = re.compile(r"\b\w+:[\w.]+|\b[A-Za-z_]\w*(?:\.\w+){2,}|\d+\.\d+")
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")


class ActionInputError(Exception):
    """An input the whole run cannot go on with (no LoRA found, a bad number...)."""


@dataclass
class Target:
    line: str
    family: Optional[str]
    ref: Optional[str]

    @property
    def label(self) -> str:
        """``{target}``: the family when given, else the reference's last path part."""
        if self.family:
            return self.family
        return ref_basename(self.ref or "")


@dataclass
class Inputs:
    loras: list[str]
    source_model: Optional[str]
    targets: list[Target]
    method: str = "auto"
    threshold: float = 0.0
    push_to: Optional[str] = None
    create_pr: bool = False
    token: Optional[str] = None
    device: str = "auto"
    output_dir: Path = Path(DEFAULT_OUTPUT_DIR)


@dataclass
class Outcome:
    lora: str
    name: str
    target: str
    family: Optional[str]
    ref: Optional[str]
    repo_id: Optional[str] = None
    ok: bool = False
    error: Optional[str] = None
    output: Optional[str] = None
    report_path: Optional[str] = None
    totals: Optional[dict[str, Any]] = None
    target_family: Optional[str] = None
    method: Optional[str] = None
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    push: Optional[dict[str, Any]] = None

    @property
    def link(self) -> Optional[str]:
        if not self.push:
            return None
        return self.push.get("pr_url") or self.push.get("commit_url") or self.push.get("repo_url")


# ----------------------------------------------------------------------------------------- inputs


def _get(env: Mapping[str, str], name: str) -> str:
    return (env.get(f"INPUT_{name}") or "").strip()


def _bool(text: str, what: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ActionInputError(f"{what}: expected 'true' or 'false', got {text!r}")


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def ref_basename(ref: str) -> str:
    """The last path part of a model reference, without a revision or a file suffix."""
    text = ref.strip()
    if text.startswith("hf://"):
        text = text[5:]
    elif text.startswith("hf:/"):
        text = text[4:]
    text = text.rstrip("/\\")
    text = re.split(r"[/\\]", text)[-1] if text else text
    text = text.split("@", 1)[0]
    for suffix in (".safetensors", ".sft", ".ckpt"):
        if text.lower().endswith(suffix):
            text = text[: -len(suffix)]
    return text


def parse_targets(text: str, known_families: Optional[set[str]] = None) -> list[Target]:
    """``ref``, ``family:ref`` or ``family:`` per line (``hf://`` refs are not split at their colon)."""
    targets = []
    for line in _lines(text):
        m = _FAMILY_PREFIX.match(line)
        if m and not Path(line).exists():
            family, ref = m.group(1), m.group(2).strip() or None
        elif known_families is not None and line in known_families and not Path(line).exists():
            family, ref = line, None
        else:
            family, ref = None, line
        targets.append(Target(line, family, ref))
    return targets


def expand_loras(text: str, cwd: Optional[Path] = None) -> list[str]:
    """Each line: an ``hf://`` path or Hub id (kept), an existing path, or a glob (sorted matches)."""
    cwd = Path(cwd or Path.cwd())
    found: list[str] = []
    for line in _lines(text):
        path = Path(line).expanduser()
        full = path if path.is_absolute() else cwd / path
        if full.exists():
            found.append(str(full))
            continue
        if line.startswith(("hf://", "hf:/")) or (looks_like_hub_ref(line) and not _GLOB_CHARS.search(line)):
            found.append(line)
            continue
        if not _GLOB_CHARS.search(line):
            raise ActionInputError(f"lora: {line}: no such file")
        matches = sorted(glob.glob(line, root_dir=str(cwd), recursive=True))
        matches = [m for m in matches if m.lower().endswith(".safetensors") or (cwd / m / "adapter_config.json").exists()]
        if not matches:
            raise ActionInputError(f"lora: {line}: no .safetensors file (or PEFT folder) matched")
        found.extend(str(cwd / m) for m in matches if str(cwd / m) not in found)
    if not found:
        raise ActionInputError("lora: no LoRA given")
    return found


def lora_name(lora: str) -> str:
    """``{name}``: the LoRA file's stem, or the PEFT folder's / Hub repo's name."""
    return ref_basename(lora) or "lora"


def sanitize(part: str) -> str:
    """Make ``part`` usable inside a Hub repo name: [A-Za-z0-9._-], no '--'/'..', no leading or trailing '.-_'."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", part)
    text = re.sub(r"-{2,}", "-", text)
    text = re.sub(r"\.{2,}", ".", text)
    return text.strip("-._")[:80]


def render_repo_id(template: str, values: Mapping[str, str]) -> str:
    """Fill ``{owner}``-style placeholders (each value sanitized; the template itself is taken literally)."""
    def fill(m: re.Match) -> str:
        key = m.group(1)
        if key not in _PLACEHOLDERS:
            raise InputError(f"push-to: unknown placeholder {{{key}}} (known: {', '.join('{%s}' % p for p in _PLACEHOLDERS)})")
        value = sanitize(values.get(key) or "")
        if not value:
            raise InputError(f"push-to: {{{key}}} is empty here")
        return value

    rendered = _PLACEHOLDER.sub(fill, template.strip())
    repo_id, revision = parse_repo_id(rendered)  # InputError for anything that is not org/name[@rev]
    return repo_id + (f"@{revision}" if revision else "")


def read_inputs(env: Mapping[str, str], cwd: Optional[Path] = None) -> Inputs:
    lora_text = _get(env, "LORA")
    if not lora_text:
        raise ActionInputError("lora: required")
    targets_text = _get(env, "TARGET_MODELS")
    try:
        known = set(get_registry().families)
    except Exception:  # noqa: BLE001 - the registry's own error shows up again in each port
        known = None
    targets = parse_targets(targets_text, known)
    if not targets:
        raise ActionInputError("target-models: give at least one target, one a line (ref, family:ref or family:)")
    threshold_text = _get(env, "THRESHOLD") or "0"
    try:
        threshold = float(threshold_text)
    except ValueError:
        raise ActionInputError(f"threshold: not a number: {threshold_text!r}") from None
    if not 0.0 <= threshold <= 1.0:
        raise ActionInputError(f"threshold: must be between 0 and 1, got {threshold_text}")
    out_dir = Path(_get(env, "OUTPUT_DIR") or DEFAULT_OUTPUT_DIR)
    if not out_dir.is_absolute():
        out_dir = Path(cwd or Path.cwd()) / out_dir
    return Inputs(
        loras=expand_loras(lora_text, cwd),
        source_model=_get(env, "SOURCE_MODEL") or None,
        targets=targets,
        method=_get(env, "METHOD") or "auto",
        threshold=threshold,
        push_to=_get(env, "PUSH_TO") or None,
        create_pr=_bool(_get(env, "CREATE_PR"), "create-pr"),
        token=_get(env, "HF_TOKEN") or None,
        device=_get(env, "DEVICE") or "auto",
        output_dir=out_dir,
    )


# ------------------------------------------------------------------------------------------- run


def _one_line(exc: BaseException, token: Optional[str]) -> str:
    text = str(exc).strip()
    if not isinstance(exc, LoraregError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return scrub(text, token) or type(exc).__name__


def _out_path(inputs: Inputs, lora: str, name: str, target: Target, used: set[str]) -> Path:
    base = sanitize(f"{name}-{target.label}") or "target"
    folder_name, n = base, 1
    while folder_name in used:
        n += 1
        folder_name = f"{base}-{n}"
    used.add(folder_name)
    folder = inputs.output_dir / folder_name
    local = Path(lora)
    if local.is_dir():
        return folder / "adapter"
    stem = local.name if local.suffix == ".safetensors" else f"{name}.safetensors"
    return folder / stem


class _OidcScope:
    """With no token given but the job allowed to mint an OIDC id token (``permissions: id-token:
    write``), scope huggingface_hub's trusted-publishing exchange (``HF_OIDC_RESOURCE``) to each repo
    while pushing to it."""

    def __init__(self, token: Optional[str]):
        self.enabled = (
            not token
            and not os.environ.get("HF_TOKEN")
            and not os.environ.get("HF_OIDC_RESOURCE")
            and bool(os.environ.get("ACTIONS_ID_TOKEN_REQUEST_URL") or os.environ.get("HF_OIDC_ID_TOKEN"))
        )

    def __call__(self, repo_id: str):
        import contextlib

        @contextlib.contextmanager
        def scope():
            if not self.enabled:
                yield
                return
            os.environ["HF_OIDC_RESOURCE"] = repo_id.split("@", 1)[0]
            try:
                yield
            finally:
                os.environ.pop("HF_OIDC_RESOURCE", None)

        return scope()


def _shown(lora: str, cwd: Path) -> str:
    """A local LoRA relative to the workspace when it is inside it (logs, summary, report)."""
    try:
        return Path(lora).relative_to(cwd).as_posix()
    except ValueError:
        return lora


def run_targets(inputs: Inputs, env: Mapping[str, str], log=print, cwd: Optional[Path] = None) -> list[Outcome]:
    """Port (and push) every LoRA to every target; never raises for a target's failure."""
    owner = env.get("GITHUB_REPOSITORY_OWNER") or (env.get("GITHUB_REPOSITORY") or "").partition("/")[0]
    repo = (env.get("GITHUB_REPOSITORY") or "").partition("/")[2]
    oidc = _OidcScope(inputs.token)
    outcomes: list[Outcome] = []
    seen_repos: dict[str, str] = {}
    used: set[str] = set()
    for lora in inputs.loras:
        name = lora_name(lora)
        for target in inputs.targets:
            shown = _shown(lora, Path(cwd or Path.cwd()))
            o = Outcome(lora=shown, name=name, target=target.line, family=target.family, ref=target.ref)
            outcomes.append(o)
            where = _flat(f"{shown} -> {target.line}")  # a file name with a newline cannot start a workflow command
            try:
                if inputs.push_to:
                    o.repo_id = render_repo_id(inputs.push_to, {
                        "owner": owner, "repo": repo, "name": name, "target": target.label,
                        "family": target.family or "", "ref": ref_basename(target.ref or ""),
                    })
                    if o.repo_id in seen_repos:
                        raise InputError(f"push-to renders to {o.repo_id} for {seen_repos[o.repo_id]} too; "
                                                 "add {target} or {name} to it")
                    seen_repos[o.repo_id] = where
                if target.ref and not inputs.source_model:
                    raise InputError(f"target {target.ref} names a model, so source-model is needed too "
                                             f"(or write '{target.family or 'family'}:' to port by module names)")
                out = _out_path(inputs, lora, name, target, used)
                options = PortOptions(source_model=inputs.source_model if target.ref else None, target_model=target.ref,
                                      to=target.family, method=inputs.method, threshold=inputs.threshold, device=inputs.device,
                                      output=out, force=True, progress=False)
                result = port(lora, options)
                rep = result.report
                o.output, o.report_path = str(result.output), str(result.report_path)
                o.totals = rep.totals.model_dump()
                o.target_family, o.method = rep.target_model.family, rep.method
                for layer in rep.layers:
                    if layer.skipped:
                        reason = _REASON_DETAIL.sub("…", layer.skipped)
                        o.skipped_reasons[reason] = o.skipped_reasons.get(reason, 0) + 1
                log(f"ported {where}: {rep.totals.ported} of {rep.totals.layers} layers -> {result.output}")
                if o.repo_id:
                    with oidc(o.repo_id):
                        pushed = push(
                            result, o.repo_id, create_pr=inputs.create_pr, token=inputs.token,
                            command=options.command(lora, Path(result.output).name),
                        )
                    o.push = pushed.model_dump()
                    what = pushed.pr_url or pushed.commit_url if pushed.changed else f"unchanged ({pushed.commit_oid})"
                    log(f"pushed {where} to {pushed.repo_id}: {what}")
                o.ok = True
            except Exception as exc:  # noqa: BLE001 - one target's failure must not hide the others
                o.error = _one_line(exc, inputs.token)
                log(f"::error title=lorareg port failed::{_escape_command(f'{where}: {o.error}')}")
                if not isinstance(exc, LoraregError):
                    for line in traceback.format_exc().splitlines():
                        log(_scrub_all(line, inputs.token))
    return outcomes


def _flat(text: str) -> str:
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", text)


def _scrub_all(text: str, token: Optional[str]) -> str:
    return scrub(text, token) if text.strip() else text


def _escape_command(text: str) -> str:
    """Data of a workflow command (``::error::...``) must not end it early or start another."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


# --------------------------------------------------------------------------------------- outputs


def _md(value: Any) -> str:
    """A markdown table cell: HTML-escaped, no pipes or newlines, backticks neutralised."""
    text = html.escape(str(value), quote=False).replace("|", "\\|").replace("`", "&#96;")
    return " ".join(text.split())


def _num(value: Optional[float], pct: bool = False) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if pct else f"{value:.3f}"


def summary_markdown(outcomes: list[Outcome], fatal: Optional[str] = None) -> str:
    lines = ["## lorareg port", ""]
    if fatal:
        lines += [f"❌ {_md(fatal)}", ""]
        return "\n".join(lines) + "\n"
    failed = sum(not o.ok for o in outcomes)
    lines += [f"{len(outcomes) - failed} of {len(outcomes)} targets succeeded.", ""]
    for o in outcomes:
        status = ("✅ pushed" if o.push and o.push.get("changed") else "✅ unchanged on the Hub" if o.push else "✅ ported") if o.ok else "❌ failed"
        lines += [f"### {_md(o.name)} → {_md(o.target)}", "", "| | |", "|---|---|", f"| status | {status} |"]
        if o.error:
            lines.append(f"| error | {_md(o.error)} |")
        if o.totals:
            t = o.totals
            lines += [
                f"| target family | {_md(o.target_family)} |",
                f"| method | {_md(o.method)} |",
                f"| layers ported | {t['ported']} of {t['layers']} |",
                f"| layers skipped | {t['skipped']} |",
                f"| mean similarity | {_num(t.get('mean_similarity'))} |",
                f"| min similarity | {_num(t.get('min_similarity'))} |",
                f"| energy kept | {_num(t.get('energy_kept'), pct=True)} |",
            ]
            for reason, n in sorted(o.skipped_reasons.items(), key=lambda kv: -kv[1])[:5]:
                lines.append(f"| skipped: {_md(reason)} | {n} |")
        if o.repo_id:
            link = o.link
            lines.append(f"| link | [{_md(o.repo_id)}]({_md(link)}) |" if link else f"| repo | {_md(o.repo_id)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def combined_report(outcomes: list[Outcome], fatal: Optional[str] = None) -> dict[str, Any]:
    return {
        "lorareg_version": __version__,
        "error": fatal,
        "targets": len(outcomes),
        "succeeded": sum(o.ok for o in outcomes),
        "failed": sum(not o.ok for o in outcomes),
        "results": [
            {
                "lora": o.lora, "name": o.name, "target": o.target, "family": o.family, "ref": o.ref,
                "ok": o.ok, "error": o.error, "repo_id": o.repo_id, "output": o.output, "report": o.report_path,
                "target_family": o.target_family, "method": o.method, "totals": o.totals,
                "skipped_reasons": o.skipped_reasons, "push": o.push, "link": o.link,
            }
            for o in outcomes
        ],
    }


def write_outputs(path: str, values: Mapping[str, str]) -> None:
    """Append ``name=value`` pairs to ``$GITHUB_OUTPUT``, multi-line ones with a random heredoc delimiter."""
    with open(path, "a", encoding="utf-8") as f:
        for key, value in values.items():
            if "\n" in value or "\r" in value:
                delim = f"ghadelimiter_{uuid.uuid4().hex}"
                f.write(f"{key}<<{delim}\n{value}\n{delim}\n")
            else:
                f.write(f"{key}={value}\n")


def _append(path: Optional[str], text: str) -> None:
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)


def main(env: Optional[Mapping[str, str]] = None, cwd: Optional[Path] = None) -> int:
    env = os.environ if env is None else env
    cwd = Path(cwd or env.get("GITHUB_WORKSPACE") or Path.cwd())
    token = _get(env, "HF_TOKEN") or None
    if token and env is os.environ:
        os.environ["HF_TOKEN"] = token  # Hub reads during the port (hf:// LoRAs, Hub base models)
    outcomes: list[Outcome] = []
    fatal = None
    try:
        inputs = read_inputs(env, cwd)
    except Exception as exc:  # noqa: BLE001
        fatal = str(exc) if isinstance(exc, ActionInputError) else _one_line(exc, token)
        fatal = scrub(fatal, token)
        print(f"::error title=lorareg action::{_escape_command(fatal)}")
        out_dir = cwd / (_get(env, "OUTPUT_DIR") or DEFAULT_OUTPUT_DIR)
    else:
        out_dir = inputs.output_dir
        outcomes = run_targets(inputs, env, cwd=cwd)
    report = combined_report(outcomes, fatal)
    report_path = out_dir / ACTION_REPORT_NAME
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")
    except OSError as exc:
        print(f"::error title=lorareg action::cannot write {report_path}: {_escape_command(str(exc))}")
    _append(env.get("GITHUB_STEP_SUMMARY"), summary_markdown(outcomes, fatal))
    pushed = [o for o in outcomes if o.ok and o.push]
    outputs = {
        "repo-urls": "\n".join(dict.fromkeys(str(o.push["repo_url"]) for o in pushed)),
        "commit-urls": "\n".join(o.link or "" for o in pushed),
        "report": str(report_path),
        "failed": str(report["failed"]),
    }
    if env.get("GITHUB_OUTPUT"):
        write_outputs(env["GITHUB_OUTPUT"], outputs)
    n_failed = report["failed"]
    print(f"lorareg: {report['succeeded']} of {report['targets']} targets succeeded; report {report_path}")
    return 1 if (fatal or n_failed) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
