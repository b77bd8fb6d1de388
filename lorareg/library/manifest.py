"""The rows of a batch: one port each, with the fields of `lorareg port`'s options, spelled the same.

A manifest is JSONL (one object per line) or CSV (a header row, one row per port); ``source-model``
and ``source_model`` are the same field. Fields a row leaves out come from the batch's defaults (the
command line), then from `lorareg port`'s defaults. ``output`` is relative to the batch's OUTDIR and
defaults to ``<lora name>-<target>.safetensors`` (a folder for PEFT).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from ..core.errors import InputError


class BatchRow(BaseModel):
    """One port: `lorareg port LORA [options]` (output relative to OUTDIR)."""

    model_config = ConfigDict(extra="forbid")

    lora: str
    source_model: Optional[str] = None
    target_model: Optional[str] = None
    to: Optional[str] = None
    method: str = "auto"
    rank_k: Optional[int] = None
    threshold: float = 0.0
    rank: Optional[int] = None
    dtype: Optional[str] = None
    format: Optional[str] = None
    no_align: bool = False
    check: Optional[str] = None
    device: str = "auto"
    output: Optional[str] = None
    # --refine distill and its options (`lorareg port --steps ...`)
    refine: Optional[str] = None
    steps: int = 100
    samples: Optional[int] = None
    sample_length: int = 128
    prompts: Optional[str] = None
    latent_size: Optional[int] = None
    sampler_steps: int = 8
    noisings: int = 4
    guidance: Optional[float] = None
    frames: Optional[int] = None
    prompts_embeds: Optional[str] = None
    refine_target: Optional[str] = None
    batch: Optional[int] = None
    lr: Optional[float] = None
    seed: int = 0
    budget_seconds: Optional[float] = None
    force_unrelated: bool = False
    # --push and its options
    push: Optional[str] = None
    private: bool = False
    create_pr: bool = False
    revision: Optional[str] = None
    commit_message: Optional[str] = None
    instance_prompt: Optional[str] = None

    def options(self) -> dict[str, Any]:
        """Everything but the LoRA's path: what, with the LoRA's SHA-256, identifies the result."""
        return self.model_dump(exclude={"lora"})


FIELDS = tuple(BatchRow.model_fields)
# the port options a basis build depends on (rows sharing them share the warm bases)
_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _normalise(raw: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key is None:
            raise InputError(f"{where}: more cells than header columns")
        name = key.strip().lstrip("-").replace("-", "_")
        if name == "lora_path":
            name = "lora"
        if isinstance(value, str):
            value = value.strip()
            if value == "":
                continue
            if name in BatchRow.model_fields and BatchRow.model_fields[name].annotation is bool:
                if value.lower() not in _BOOL_WORDS:
                    raise InputError(f"{where}: {name} must be true or false, got {value!r}")
                value = _BOOL_WORDS[value.lower()]
        if value is None:
            continue
        out[name] = value
    return out


def make_row(raw: dict[str, Any], defaults: Optional[dict[str, Any]], where: str) -> BatchRow:
    fields = {**_normalise(defaults or {}, "defaults"), **_normalise(raw, where)}
    try:
        return BatchRow.model_validate(fields)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "row"
        hint = f" (known fields: {', '.join(FIELDS)})" if err["type"] == "extra_forbidden" else ""
        raise InputError(f"{where}: {loc}: {err['msg']}{hint}") from None


def read_manifest(path: Union[str, Path], defaults: Optional[dict[str, Any]] = None) -> list[BatchRow]:
    """Rows of a JSONL or CSV manifest (by suffix; .json may hold a list of objects)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such manifest file")
    text = path.read_text(encoding="utf-8-sig")
    rows: list[BatchRow] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise InputError(f"{path}: empty CSV manifest")
        for n, raw in enumerate(reader, start=2):
            rows.append(make_row(raw, defaults, f"{path.name}:{n}"))
    elif path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        for n, raw in enumerate(_json(text, path.name), start=1):
            rows.append(make_row(_object(raw, f"{path.name}[{n}]"), defaults, f"{path.name}[{n}]"))
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"{path.name}:{n}"
            rows.append(make_row(_object(_json(line, where), where), defaults, where))
    if not rows:
        raise InputError(f"{path}: the manifest has no rows")
    return rows


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg})") from None


def _object(raw: Any, where: str) -> dict:
    if isinstance(raw, str):
        return {"lora": raw}
    if not isinstance(raw, dict):
        raise InputError(f"{where}: a row must be an object with at least 'lora'")
    return raw


def rows_from_scan(scan_json: Union[str, Path], defaults: Optional[dict[str, Any]] = None,
                   families: Iterable[str] = ()) -> list[BatchRow]:
    """One row per file of a `lorareg scan --json` output (only ``families`` if given)."""
    path = Path(scan_json)
    if not path.is_file():
        raise InputError(f"{path}: no such scan file")
    doc = _json(path.read_text(encoding="utf-8"), path.name)
    scanned = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(scanned, list):
        raise InputError(f"{path}: not a `lorareg scan --json` output (no 'rows')")
    wanted = set(families)
    rows = [make_row({"lora": r["path"]}, defaults, f"{path.name}[{n}]") for n, r in enumerate(scanned)
            if isinstance(r, dict) and "path" in r and (not wanted or r.get("family") in wanted)]
    if not rows:
        raise InputError(f"{path}: no scanned file to port" + (f" of family {', '.join(sorted(wanted))}" if wanted else ""))
    return rows


def default_output(row: BatchRow, family: Optional[str]) -> str:
    """``<lora name>-<target>[.safetensors]`` (no suffix for a PEFT folder output)."""
    lora = row.lora.rstrip("/")
    name = Path(lora.split("@")[0]).name if "://" not in lora else lora.split("://", 1)[1].split("@")[0].rsplit("/", 1)[-1]
    is_dir = Path(lora).is_dir()
    stem = name if is_dir else (name[: -len(".safetensors")] if name.endswith(".safetensors") else name)
    target = row.to or family or "ported"
    peft_out = row.format == "peft" or (row.format is None and is_dir)
    return f"{stem}-{target}" + ("" if peft_out else ".safetensors")
