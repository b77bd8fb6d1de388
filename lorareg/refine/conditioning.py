"""Text conditioning for denoiser distillation: prompts (from the LoRA's own metadata or a file) and their embeddings.

Prompts, in order of preference: ``--prompts FILE`` (one per line); else the LoRA's trigger phrase
(``modelspec.trigger_phrase``, or the instance prompt of a kohya ``<repeats>_<prompt>`` dataset
folder) followed by tags drawn by frequency from ``ss_tag_frequency``, the captions it was trained
on; else the empty prompt (the unconditional embedding).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Optional

import torch

from ..core.errors import InputError
from ..core.lora import Lora
from ..registry.families import Family, TextConditioning
from .hooks import merge, modules_of
from .runtime import quiet_progress_bars

MAX_TAGS = 64  # the most frequent tags only: rare ones are often noise in the captions
_KOHYA_DIR = re.compile(r"^\d+_(.+)$")


def read_prompts(path: Path) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the prompts file ({e.__class__.__name__})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise InputError(f"{path}: no prompts in the file (one per line)")
    return prompts


def _json(meta: dict, key: str):
    try:
        value = json.loads(meta.get(key) or "null")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def metadata_prompts(metadata: dict[str, str], n: int, seed: int) -> tuple[list[str], str]:
    """(``n`` prompts built from the LoRA's metadata, where they came from); ([], ...) when it has none."""
    triggers: list[str] = []
    if (metadata.get("modelspec.trigger_phrase") or "").strip():
        triggers.append(metadata["modelspec.trigger_phrase"].strip())
    freq = _json(metadata, "ss_tag_frequency") or {}
    for folder in list(freq) + list(_json(metadata, "ss_dataset_dirs") or {}):
        m = _KOHYA_DIR.match(str(folder))
        if m and m.group(1).strip() and m.group(1).strip() not in triggers:
            triggers.append(m.group(1).strip())
    counts: dict[str, float] = {}
    for tags in freq.values():
        if isinstance(tags, dict):
            for tag, c in tags.items():
                if isinstance(c, (int, float)) and c > 0 and str(tag).strip():
                    counts[str(tag).strip()] = counts.get(str(tag).strip(), 0) + float(c)
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_TAGS]
    if not triggers and not top:
        return [], "none in the LoRA's metadata"
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        parts = [triggers[i % len(triggers)]] if triggers else []
        pool = [t for t in top if t[0] not in parts]
        for _ in range(min(len(pool), rng.randint(3, 8))):
            tag = rng.choices(pool, weights=[c for _, c in pool])[0]
            pool.remove(tag)
            parts.append(tag[0])
        prompts.append(", ".join(parts))
    source = " + ".join(x for x in ("trigger phrase" if triggers else "", "ss_tag_frequency" if top else "") if x)
    return prompts, source


def component_folder(family: Family, model_folder: Path, component: str) -> Path:
    """Where a component lives in the family's diffusers layout."""
    for layout in family.spec.layouts:
        if layout.type != "single_file" and component in layout.components:
            return model_folder / layout.components[component].path
    return model_folder / component


class TextConditioner:
    """The family's text encoders (with the LoRA's text-encoder modules merged), loaded one at a time."""

    def __init__(self, family: Family, model_folder: Path, lora: Optional[Lora], device: torch.device, dtype: torch.dtype):
        self.family, self.folder, self.lora, self.device, self.dtype = family, model_folder, lora, device, dtype

    @property
    def enabled(self) -> bool:
        return bool(self.family.spec.diffusion and self.family.spec.diffusion.conditioning)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """{"encoder_hidden_states": [P, L, D], "text_embeds": [P, D'] when an encoder is pooled, "attention_mask": [P, L]
        when the denoiser takes one}, on the CPU."""
        hidden, pooled, masks = [], None, []
        for cond in self.family.spec.diffusion.conditioning:
            tokenizer = _tokenizer(self.folder / cond.tokenizer)
            encoder = _text_encoder(self.family, component_folder(self.family, self.folder, cond.component), cond, self.dtype)
            if self.lora is not None:
                merge(encoder, modules_of(self.lora, cond.component))
            encoder.to(self.device)
            tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=cond.max_length or tokenizer.model_max_length,
                               return_tensors="pt")
            ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
            # encoders whose denoiser sees the padding mask run with it; CLIP for UNets never did
            masked = cond.attention_mask or cond.zero_padding
            out = encoder(input_ids=ids, attention_mask=mask if masked else None, output_hidden_states=True)
            if cond.hidden:
                if cond.hidden_layer is not None:
                    h = out.hidden_states[cond.hidden_layer]
                else:
                    h = out.hidden_states[-2] if cond.layer == "penultimate" else out.last_hidden_state
                if cond.zero_padding:
                    h = h * mask[..., None].to(h.dtype)
                hidden.append(h.float().cpu())
                if cond.attention_mask:
                    if cond.unmasked_padding:
                        keep = mask.sum(dim=1, keepdim=True) + cond.unmasked_padding
                        mask = (torch.arange(mask.shape[1], device=mask.device) < keep).to(mask.dtype)
                    masks.append(mask.cpu())
            if cond.pooled:
                p = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
                pooled = p.float().cpu()
            del encoder
        out = {"encoder_hidden_states": torch.cat(hidden, dim=-1)} if hidden else {}
        if pooled is not None:
            out["text_embeds"] = pooled
        if masks:
            out["attention_mask"] = torch.cat(masks, dim=-1)
        return out


def _tokenizer(path: Path):
    if not path.is_dir():
        raise InputError(f"{path}: no tokenizer folder; --refine distill needs the model as a diffusers folder with its tokenizers")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a broken folder
        raise InputError(f"{path}: cannot load the tokenizer ({e.__class__.__name__}: {str(e).splitlines()[0][:160]})") from None


def _text_encoder(family: Family, path: Path, cond: TextConditioning, dtype: torch.dtype):
    import transformers

    component = family.components.get(cond.component)
    name = component.spec.architecture.class_ if component is not None else cond.class_
    cls = getattr(transformers, name or "", None)
    if cls is None:
        raise InputError(f"{family.id}: text encoder class {name} of {cond.component} is not in this transformers version")
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: no config.json; --refine distill needs the model as a diffusers folder with its text encoders")
    from transformers.utils import logging as hf_logging

    try:
        with quiet_progress_bars(hf_logging):
            model, info = cls.from_pretrained(str(path), dtype=dtype, use_safetensors=True, output_loading_info=True)  # never a pickle
        kind = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a broken folder
        raise InputError(f"{path}: cannot load the text encoder {name} ({e.__class__.__name__}: {str(e).splitlines()[0][:160]})") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # another architecture in the folder loads with these weights random, and only a log line says so
        raise InputError(f"{path}: {len(missing)} weights of {name} are not in the checkpoint (e.g. {missing[0]}; its model_type "
                         f"is {kind}): not the text encoder the family data names; give the conditioning as tensors (--prompts-embeds)")
    model.eval()
    return model
