"""Model references where the CLI takes a family: `families --from MODEL [--write DIR]`, `pairs`, `--model`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ...core.errors import InputError
from ...registry import Family, get_registry
from ...sources.derive import family_for_model, is_derived, write_family

MODEL_HELP = ("The LoRA's base model (folder, .safetensors file or Hub id): its family is the registered one that matches it, "
              "else one derived from its own weights and config.")


def family_from_model(model: str, write_dir: Optional[Path]) -> tuple[dict, str]:
    """(JSON payload, text) describing the family of ``model``; with ``write_dir``, its registry data files."""
    fam = family_for_model(model)
    derived = is_derived(fam)
    payload = {
        "model": model,
        "id": fam.id,
        "derived": derived,
        "name": fam.spec.name,
        "kind": fam.spec.kind,
        "layouts": [layout.type for layout in fam.spec.layouts],
        "components": {cid: {"role": c.role, "class": c.spec.architecture.class_, "modules": len(c.modules),
                             "num_parameters": c.num_parameters} for cid, c in fam.components.items()},
        "diffusion": fam.spec.diffusion.model_dump() if fam.spec.diffusion else None,
        "written": None,
    }
    lines = [f"{model}", f"  family      {fam.id}" + ("  (derived from the model's weights and config)" if derived else "  (registered)"),
             f"  kind        {fam.spec.kind}; layouts {', '.join(payload['layouts'])}"]
    for cid, c in payload["components"].items():
        lines.append(f"  {cid:<11} {c['role']} {c['class']}: {c['modules']} modules, {c['num_parameters'] or '?'} parameters")
    if write_dir is not None:
        if not derived:
            raise InputError(f"{model} is the registered family {fam.id}; nothing to write")
        paths = write_family(fam, Path(write_dir))
        payload["written"] = [str(p) for p in paths]
        lines.append(f"  wrote       {paths[0]} and {paths[1]} (use with LORAREG_DATA_PATH={write_dir})")
    return payload, "\n".join(lines)


def family_or_model(text: str) -> Family:
    """A family id or alias; failing that, a model reference's family (registered match or derived)."""
    registry = get_registry()
    try:
        return registry.family(text)
    except InputError:
        if not Path(text).expanduser().exists() and "/" not in text:
            raise
    return family_for_model(text, registry=registry)
