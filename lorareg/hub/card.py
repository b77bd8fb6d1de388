"""The model card and the published report of a ported LoRA: deterministic text, no local paths.

Same port, same card: nothing here depends on the time, the machine or where files lie locally
(local paths are shown by their file name only; Hub references as ``hf://`` / ``org/repo`` text).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from ..core.version import __version__
from ..port.options import PortOptions
from ..refine.report import loss_summary, samples_summary
from ..registry import get_registry
from ..sources.refs import is_local, parse_hub_ref, public_model_ref
from .licence import Licence, licence_section

TEMPLATE = "card_template.md"


@dataclass
class CardInfo:
    """What the card says beyond the report."""

    repo_id: str
    weight_name: str
    output_format: str  # e.g. "kohya/kohya", "peft/peft"
    base_model: Optional[str] = None
    instance_prompt: Optional[str] = None
    license: Optional[str] = None
    source_commit: Optional[str] = None
    command: Optional[str] = None
    licence: Optional[Licence] = None  # default: from ``license`` (or unknown)
    output_hashes: Optional[dict[str, str]] = None  # the pushed weights file's (lorareg.core.hashes.FileHashes)

    def licence_facts(self) -> Licence:
        if self.licence is not None:
            return self.licence
        return Licence(origin="metadata" if self.license else "unknown", license=self.license)


def load_template() -> str:
    return resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")


# --------------------------------------------------------------------------- references


def model_repo_id(text: Optional[str]) -> Optional[str]:
    """The Hub repo id of a model reference, or None for a local one."""
    shown = public_model_ref(text)
    if not shown or shown != text.removeprefix("hf://"):
        return None
    try:
        ref = parse_hub_ref(shown)
    except Exception:
        return None
    return ref.repo_id


# --------------------------------------------------------------------------- trigger words


def trigger_words(metadata: dict[str, str]) -> Optional[str]:
    """Trigger words of a LoRA: ``modelspec.trigger_phrase``, else the top tags of kohya's ``ss_tag_frequency``."""
    phrase = (metadata.get("modelspec.trigger_phrase") or "").strip()
    if phrase:
        return phrase
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    counts: dict[str, int] = {}
    if isinstance(doc, dict):
        for tags in doc.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    if isinstance(n, (int, float)) and str(tag).strip():
                        t = str(tag).strip()
                        counts[t] = counts.get(t, 0) + int(n)
    if not counts:
        return None
    top = max(counts.values())
    return ", ".join([t for t, n in counts.items() if n == top][:3])


def license_of(metadata: dict[str, str]) -> Optional[str]:
    lic = (metadata.get("modelspec.license") or "").strip()
    return lic or None


# --------------------------------------------------------------------------- card


def card_metadata(report: dict[str, Any], info: CardInfo, family) -> dict[str, Any]:
    """The YAML front matter the Hub reads (model tree, widgets, gallery)."""
    spec = family.spec if family is not None else None
    tags = ["lora", "lorareg"]
    if spec is not None:
        tags += list(spec.tags)
        if spec.kind == "image":
            tags.append("template:sd-lora")
    meta: dict[str, Any] = {}
    if info.base_model:
        meta["base_model"] = info.base_model
        meta["base_model_relation"] = "adapter"
    if spec is not None and spec.library_name:
        lib = spec.library_name
        if info.output_format.split("/")[0] == "peft" and spec.kind == "text":
            lib = "peft"
        meta["library_name"] = lib
    if spec is not None and spec.pipeline_tag:
        meta["pipeline_tag"] = spec.pipeline_tag
    meta.update(info.licence_facts().front_matter())
    meta["tags"] = list(dict.fromkeys(tags))
    if info.instance_prompt:
        meta["instance_prompt"] = info.instance_prompt
    return meta


def build_card(report: dict[str, Any], info: CardInfo, registry=None) -> str:
    """The README.md text: YAML front matter + the body from ``card_template.md``."""
    import yaml

    registry = registry or get_registry()
    tgt = report.get("target_model") or {}
    src = report.get("source_model") or {}
    tgt_fam = _family(registry, tgt.get("family"))
    src_fam = _family(registry, src.get("family"))
    meta = card_metadata(report, info, tgt_fam)
    totals = report.get("totals") or {}
    src_lora = report.get("source_lora") or {}
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)
    values = {
        "front_matter": front,
        "title": f"{info.repo_id.split('/')[-1]}",
        "version": report.get("lorareg_version") or __version__,
        "target_family": tgt.get("family", "?"),
        "target_family_name": tgt_fam.spec.name if tgt_fam else tgt.get("family", "?"),
        "source_family": src.get("family", "?"),
        "source_family_name": src_fam.spec.name if src_fam else src.get("family", "?"),
        "method": report.get("method", "?"),
        "source_lora": _lora_cell(src_lora.get("path"), info.source_commit, src_lora.get("civitai")),
        "source_sha256": src_lora.get("sha256") or "unknown",
        "source_tensor_hash": _tensor_hash_cell(src_lora.get("hashes")),
        "output_sha256": (info.output_hashes or {}).get("sha256") or "unknown",
        "output_tensor_hash": _tensor_hash_cell(info.output_hashes) + (" (also its `sshs_model_hash`)" if info.output_hashes else ""),
        "licence_section": licence_section(info.licence_facts()),
        "source_format": f"`{src_lora['format']}`" if src_lora.get("format") else "unknown",
        "source_model": _model_cell(src),
        "target_model": _model_cell(tgt),
        "weight_name": info.weight_name,
        "output_format": f"`{info.output_format}`",
        "method_lines": _method_lines(report),
        "ported": totals.get("ported", "?"),
        "skipped": totals.get("skipped", "?"),
        "layers": totals.get("layers", "?"),
        "mean_similarity": _num(totals.get("mean_similarity")),
        "min_similarity": _num(totals.get("min_similarity")),
        "energy_kept": _pct(totals.get("energy_kept")),
        "skipped_lines": _skipped_lines(report),
        "weights_line": _weights_line(totals),
        "trigger_section": _trigger_section(info.instance_prompt),
        "usage": usage(info, tgt_fam) + experts_note(report, tgt_fam, info),
        "command": info.command or reconstruct_command(report, info.weight_name),
    }
    return string.Template(load_template()).substitute(values)


def _family(registry, fid: Optional[str]):
    if not fid:
        return None
    try:
        return registry.family(fid)
    except Exception:
        return None


def _tensor_hash_cell(hashes: Optional[dict]) -> str:
    if not hashes or not hashes.get("tensor_sha256"):
        return "unknown"
    return f"`{hashes['tensor_sha256']}` (AutoV3 `{hashes['tensor_sha256'][:12].upper()}`)"


def _lora_cell(path: Optional[str], commit: Optional[str], civitai: Optional[dict] = None) -> str:
    if civitai:
        name = " — ".join(x for x in (civitai.get("model_name"), civitai.get("version_name")) if x)
        by = f" by [{civitai['creator']}]({civitai.get('creator_url')})" if civitai.get("creator") else ""
        return f"[{name or 'Civitai'}]({civitai.get('page_url')}) (`civitai:{civitai.get('version_id')}`, Civitai){by}"
    if not path:
        return "an in-memory LoRA"
    if is_local(path):
        return f"`{Path(path).name}` (a local file)"
    ref = parse_hub_ref(path)
    return f"`{ref.uri}`" + (f" at commit `{commit}`" if commit and commit != ref.revision else "")


def _model_cell(m: dict[str, Any]) -> str:
    ref = m.get("ref")
    fam = m.get("family", "?")
    if not ref:
        return f"not read (family `{fam}`)"
    shown = public_model_ref(ref)
    hub = m.get("location") == "hub" if m.get("location") else bool(model_repo_id(ref))
    out = f"`{shown}` ({'Hub' if hub else 'local'}, family `{fam}`"
    if m.get("layout"):
        out += f", {m['layout']} layout"
    if m.get("revision"):
        out += f", commit `{m['revision']}`"
    out += ")"
    files = m.get("weights_sha256")
    if files:  # a local folder is named by its weights, not by a Hub id it may not be
        out += "; weights " + ", ".join(f"`{name}` sha256 `{digest}`" for name, digest in sorted(files.items()))
    return out


def _weights_line(totals: dict[str, Any]) -> str:
    """The streamed check's comparison of the two base models, when the port ran it (copy ports)."""
    if totals.get("mean_cosine") is None:
        return ""
    return (f"\nBase weights compared layer by layer (streamed check): cosine mean {_num(totals.get('mean_cosine'))}, "
            f"min {_num(totals.get('min_cosine'))}; relative distance ‖W_t − W_s‖/‖W_s‖ mean "
            f"{_num(totals.get('mean_relative_distance'))}.\n")


def _num(x) -> str:
    return "–" if x is None else f"{float(x):.4f}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * float(x):.1f}%"


def _method_lines(report: dict[str, Any]) -> str:
    rows = [
        ("method", f"`{report.get('method')}`"),
        ("subspace size k", report.get("rank_k") if report.get("rank_k") is not None else "per-layer default"),
        ("similarity threshold", report.get("threshold")),
        ("output rank", report.get("rank") if report.get("rank") is not None else "the source's"),
        ("device", report.get("device")),
    ]
    per_layer: dict[str, int] = {}
    for layer in report.get("layers") or []:
        if layer.get("method") and not layer.get("skipped"):
            per_layer[layer["method"]] = per_layer.get(layer["method"], 0) + 1
    if per_layer and (len(per_layer) > 1 or next(iter(per_layer)) != report.get("method")):
        rows.insert(1, ("per layer", ", ".join(f"`{m}` × {n}" for m, n in sorted(per_layer.items()))))
    refine = report.get("refine")
    if refine:
        name, start, end = loss_summary(refine)
        rows.append(("refinement", f"`{refine.get('method')}` from `{refine.get('start_method')}`: {refine.get('steps')} steps on "
                                   f"{samples_summary(refine)} (seed {refine.get('seed')})"))
        rows.append((f"distillation {name} (data-free quality signal)", f"**{start:.4f} → {end:.4f}**"
                     if isinstance(start, (int, float)) and isinstance(end, (int, float)) else "n/a"))
    return "\n".join(f"- {k}: {v}" for k, v in rows)


def _skipped_lines(report: dict[str, Any]) -> str:
    reasons: dict[str, int] = {}
    for layer in report.get("layers") or []:
        why = layer.get("skipped")
        if why:
            reasons[why] = reasons.get(why, 0) + 1
    warnings = "".join(f"**Warning:** {w}\n\n" for w in report.get("warnings") or [])
    if not reasons:
        return warnings
    top = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    return warnings + "Skipped layers, by reason:\n\n" + "\n".join(f"- {n} × {why}" for why, n in top) + "\n"


def _trigger_section(prompt: Optional[str]) -> str:
    if not prompt:
        return ""
    return f"\n## Trigger words\n\nUse `{prompt}` in the prompt.\n"


def usage(info: CardInfo, family) -> str:
    """Loading snippets that match the output format."""
    fmt = info.output_format.split("/")[0]
    kind = family.spec.kind if family is not None else "image"
    base = info.base_model or "<base model>"
    repo = info.repo_id
    if fmt == "peft":
        if kind == "text":
            return (
                "With transformers and PEFT:\n\n```python\n"
                "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f'model = AutoModelForCausalLM.from_pretrained("{base}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{base}")\n'
                f'model = PeftModel.from_pretrained(model, "{repo}")\n```'
            )
        return (
            "A PEFT adapter folder; with PEFT:\n\n```python\nfrom peft import PeftModel\n\n"
            f'model = PeftModel.from_pretrained(base_model, "{repo}")  # base_model: the {base} component\n```'
        )
    parts = []
    if kind in ("image", "video"):
        parts.append(
            "With diffusers:\n\n```python\nimport torch\nfrom diffusers import DiffusionPipeline\n\n"
            f'pipe = DiffusionPipeline.from_pretrained("{base}", torch_dtype=torch.float16)\n'
            f'pipe.load_lora_weights("{repo}", weight_name="{info.weight_name}")\n```'
        )
        parts.append(
            f"In ComfyUI: put `{info.weight_name}` in `ComfyUI/models/loras/` and load it with a "
            "**LoraLoader** (or **LoraLoaderModelOnly**) node on the target base model."
        )
    else:
        parts.append(f"Load `{info.weight_name}` with the tool that reads the `{info.output_format}` format on `{base}`.")
    return "\n\n".join(parts)


def experts_note(report: dict[str, Any], family, info: CardInfo) -> str:
    """Which file or key prefix holds which expert of a two-expert target (Wan 2.2 A14B)."""
    ex = family.spec.experts if family is not None else None
    if ex is None:
        return ""
    files = (report.get("output") or {}).get("files") or []
    if files:
        rows = "\n".join(f"- `{Path(str(f['path'])).name}`: the {f['expert'].replace('_', '-')} expert (`{f['component']}`)" for f in files)
        return ("\n\nThis model has two experts; each file holds one (load each on its own expert model, e.g. "
                f"ComfyUI's high-noise and low-noise model loaders):\n\n{rows}")
    return ("\n\nThis model has two experts: the keys under `transformer.` are the high-noise expert "
            f"(`{ex.high_noise}`), those under `transformer_2.` the low-noise expert (`{ex.low_noise}`):\n\n```python\n"
            f'pipe.transformer.load_lora_adapter("{info.repo_id}", weight_name="{info.weight_name}", prefix="transformer")\n'
            f'pipe.transformer_2.load_lora_adapter("{info.repo_id}", weight_name="{info.weight_name}", prefix="transformer_2")\n```')


def reconstruct_command(report: dict[str, Any], weight_name: str) -> str:
    """The ``lorareg port`` command that gives this output, from the options the report recorded."""
    recorded = dict(report.get("options") or {})
    if not report.get("options"):  # a report written before options were recorded: its top-level fields
        recorded = {k: report[k] for k in ("method", "rank_k", "threshold", "rank") if report.get(k) not in (None, 0, 0.0)}
        src, tgt = report.get("source_model") or {}, report.get("target_model") or {}
        recorded.update(source_model=src.get("ref"), target_model=tgt.get("ref"))
        if tgt.get("family") and tgt.get("family") != src.get("family"):
            recorded["to"] = tgt["family"]
    options = PortOptions.model_validate(recorded)
    lora = (report.get("source_lora") or {}).get("path") or "LORA"
    return options.command(lora, weight_name if not weight_name.startswith("adapter_model") else "adapter")
