"""Families derived from a model's own weights and config, for models the registry does not know.

A model reference (local folder or file, or a Hub id) is read to the level of its safetensors headers
(``model_files``). If a registered family *matches* it, that family is used; otherwise a family is
derived from it and registered in memory under ``derived:<model_type>:<hash of the shape table>``, so
the rest of lorareg (detection, pairs, port, refine, card) uses it as any other family.

A registered family F matches a model M when, under one of F's layouts, every component of F that M
holds has all of F's modules with the same shapes (a 1x1 conv stored flat counts as the same) and M
holds no further weight of a kind F has (same name up to its block indices: a deeper model is not F),
and M holds at least one of F's components. Of several matching families the one covering the most
modules wins. The LoRA's own registered family is kept more readily (see ``family_for_model``), so
that what worked before derived families existed works the same.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..core.errors import InputError
from ..core.io import atomic_write_text
from ..hub.pull import snapshot_for_family
from ..registry import get_registry
from ..registry.data import schema_file, validate
from ..registry.families import (
    CANONICAL,
    Aliases,
    Architecture,
    Component,
    ComponentSpec,
    Detection,
    DiffusionSpec,
    Family,
    FamilySpec,
    Hub,
    Layout,
    LayoutComponent,
)
from .model_files import FolderTensors, ModelFiles, Shape, read_local, read_model_files, role_of_folder
from .refs import ModelRef

DERIVED = "derived:"
HASH_CHARS = 8
#: more than this share of the shared modules changing shape means another width: unrelated models
MAX_RESHAPED_SHARE = 0.5
#: the LoRA's own registered family still names a model in which at most this share of its modules change shape
PREFER_MAX_RESHAPED = 0.05


def is_derived(family: Family) -> bool:
    return family.id.startswith(DERIVED)


def _pattern(name: str) -> str:
    """A module name with its block indices abstracted: what 'the same kind of module' means."""
    return ".".join("#" if s.isdigit() else s for s in name.split("."))


def _same_shape(a: Shape, b: Shape) -> bool:
    return tuple(a) == tuple(b) or (a[0] == b[0] and math.prod(a) == math.prod(b))


def module_table(tensors: dict[str, Shape], prefix: str = "") -> dict[str, Shape]:
    """Every 2-D to 5-D ``<module>.weight`` (linear, conv, embedding) under ``prefix``, by module name."""
    out = {}
    for key, shape in sorted(tensors.items()):
        if key.startswith(prefix) and key.endswith(".weight") and 2 <= len(shape) <= 5:
            out[key[len(prefix) : -len(".weight")]] = tuple(shape)
    return out


# --------------------------------------------------------------------------- matching registered families


@dataclass(frozen=True)
class Match:
    family: Family
    layout: str
    modules: int  # modules of the family found with their shapes
    exact: bool  # the model holds no further module of a kind the family has


def _expected(comp: Component, scheme: str) -> dict[str, tuple[str, Shape]]:
    """canonical module -> (its stored name in ``scheme``, the shape stored there)."""
    out = {}
    fused = comp.fused_group_of(scheme) if scheme != CANONICAL else {}
    for name, shape in comp.modules.items():
        group = fused.get(name)
        if group is not None:
            out[name] = (group.name, (group.out_features, *shape[1:]))
        else:
            out[name] = (comp.name_in(scheme, name), shape)
    return out


def _match_component(comp: Component, ft: FolderTensors, prefix: str, scheme: str,
                     max_reshaped: float) -> Optional[tuple[int, bool]]:
    """(modules found with their shapes, exact) when the folder holds this component; None if not;
    (0, True) when the folder holds none of its modules (the component is absent). Up to ``max_reshaped``
    of the modules may have another shape (such a match is never exact)."""
    mp = comp.spec.module_prefix
    used: set[str] = set()
    found = missing = reshaped = 0
    for name, (stored, shape) in _expected(comp, scheme).items():
        tried = [prefix + stored]
        if mp and stored.startswith(mp):
            tried.append(prefix + stored[len(mp) :])
        elif mp:
            tried.append(prefix + mp + stored)
        key = next((k + ".weight" for k in tried if k + ".weight" in ft.tensors), None)
        if key is None:
            missing += 1
            continue
        used.add(key)
        if _same_shape(ft.tensors[key], shape):
            found += 1
        else:
            reshaped += 1
    if found + reshaped == 0:
        return 0, True
    if missing or reshaped > max_reshaped * (found + reshaped):
        return None
    kinds = {_pattern(k) for k in used}
    extra = [k for k in ft.tensors if k not in used and k.startswith(prefix) and k.endswith(".weight")
             and 2 <= len(ft.tensors[k]) <= 5 and _pattern(k) in kinds]
    return found, not extra and not reshaped


def match_family(family: Family, files: ModelFiles, max_reshaped: float = 0.0) -> Optional[Match]:
    """How well a registered family fits a model (see the module docstring), or None; ``max_reshaped``:
    the share of each component's modules that may have another shape (a non-exact match)."""
    options: list[tuple[str, list[tuple[Component, FolderTensors, str, str]]]] = []
    for layout in family.spec.layouts:
        comps = []
        for cid, lc in layout.components.items():
            comp = family.components.get(cid)
            if comp is None:
                continue
            if files.kind == "single_file" and layout.type == "single_file":
                comps.append((comp, files.folders[""], lc.prefix, lc.scheme))
            elif files.kind != "single_file" and layout.type != "single_file" and (lc.path or "") in files.folders:
                comps.append((comp, files.folders[lc.path or ""], lc.prefix, lc.scheme))
        if comps:
            options.append((layout.type, comps))
    if files.kind == "single_file":  # a bare component file (e.g. a diffusers unet/diffusion_pytorch_model.safetensors)
        for comp in family.components.values():
            options.append(("component_file", [(comp, files.folders[""], "", CANONICAL)]))
    best: Optional[Match] = None
    for layout, comps in options:
        total, exact, ok = 0, True, True
        for comp, ft, prefix, scheme in comps:
            res = _match_component(comp, ft, prefix, scheme, max_reshaped)
            if res is None:
                ok = False
                break
            total += res[0]
            exact = exact and res[1]
        if ok and total > 0 and (best is None or (exact, total) > (best.exact, best.modules)):
            best = Match(family, layout, total, exact)
    return best


def registered_match(files: ModelFiles, registry) -> Optional[Match]:
    """The registered family that matches the model exactly and covers the most of it."""
    matches = [m for fam in registry.families.values() if not is_derived(fam) for m in [match_family(fam, files)] if m and m.exact]
    if not matches:
        return None
    return max(matches, key=lambda m: (m.modules, -sum(len(c.modules) for c in m.family.components.values()), m.family.id))


# --------------------------------------------------------------------------- deriving


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "model"


def _component_layout(files: ModelFiles) -> dict[str, tuple[str, str, FolderTensors]]:
    """component id -> (folder, role, its tensors), from the folder layout alone."""
    if files.kind == "diffusers":
        return {sub: (sub, role_of_folder(sub) or "transformer", ft) for sub, ft in files.folders.items()}
    ft = files.folders[""]
    if files.kind == "single_file" and files.local is not None:
        parent = files.local.parent.name
        role = role_of_folder(parent)
        if role and re.match(r"^[a-z][a-z0-9_]*$", parent):
            return {parent: ("", role, ft)}
    role = "llm" if files.kind == "transformers" or ft.config.get("architectures") else "transformer"
    return {"model": ("", role, ft)}


def _architecture(role: str, config: dict) -> Architecture:
    archs = config.get("architectures") if isinstance(config.get("architectures"), list) else []
    cls = (archs[0] if archs else None) or config.get("_class_name") or "Unknown"
    if not re.match(r"^[A-Z][A-Za-z0-9_]*$", str(cls)):
        cls = "Unknown"
    library = "diffusers" if "_class_name" in config or role in ("unet", "transformer") and not archs else "transformers"
    return Architecture.model_validate({"library": library, "class": cls, "config": config})


def _model_type(files: ModelFiles, comps) -> str:
    root = files.folders.get("")
    if root is not None and isinstance(root.config.get("model_type"), str):
        return _slug(root.config["model_type"])
    if isinstance(files.model_index.get("_class_name"), str):
        return _slug(files.model_index["_class_name"])
    for _, _, ft in comps.values():
        for key in ("model_type", "_class_name"):
            if isinstance(ft.config.get(key), str):
                return _slug(ft.config[key])
    return "model"


def shape_hash(components: dict[str, dict[str, Shape]]) -> str:
    text = json.dumps({c: sorted((n, list(s)) for n, s in mods.items()) for c, mods in sorted(components.items())})
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def _diffusion(files: ModelFiles, comps) -> Optional[DiffusionSpec]:
    """What a UNet distillation needs, from the pipeline folder's scheduler, VAE and text encoder configs."""
    if files.kind != "diffusers" or "unet" not in comps or files.local is None:
        return None
    root = files.local

    def cfg(path: Path) -> dict:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    sched = cfg(root / "scheduler" / "scheduler_config.json")
    if not sched:
        return None
    vae = cfg(root / "vae" / "config.json")
    unet = comps["unet"][2].config
    text_time = unet.get("addition_embed_type") == "text_time"
    conditioning = []
    for cid in sorted(c for c in comps if c.startswith("text_encoder")):
        tok = "tokenizer" + cid[len("text_encoder"):]
        if (root / tok).is_dir():
            # an SDXL-style UNet (text_time embedding) reads the penultimate layer and the last encoder's pooled output
            conditioning.append({"component": cid, "tokenizer": tok, "layer": "penultimate" if text_time else "last", "pooled": False})
    if text_time and conditioning:
        conditioning[-1]["pooled"] = True
    schedule = {k: sched[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end") if k in sched}
    if schedule.get("beta_schedule") not in (None, "linear", "scaled_linear", "squaredcos_cap_v2") or \
            sched.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        return None  # a schedule or target the distillation does not implement: no diffusion data, refine refuses
    # the latent space is named by the VAE's shape of latents; pipelines that share it can distill into each other
    latent = f"vae-{vae.get('latent_channels', 4)}ch-scale{vae.get('scaling_factor', 0.18215)}"
    blocks = vae.get("block_out_channels")
    return DiffusionSpec.model_validate({
        "latent_space": latent, "prediction_type": sched.get("prediction_type", "epsilon"), "noise_schedule": schedule,
        "vae_scale_factor": 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else 8, "conditioning": conditioning})


def derive_family(files: ModelFiles) -> Family:
    """A family made from a model's own tensors, folder layout and configs."""
    comps = _component_layout(files)
    tables = {cid: module_table(ft.tensors) for cid, (_, _, ft) in comps.items()}
    tables = {cid: t for cid, t in tables.items() if t}
    if not tables:
        raise InputError(f"{files.ref}: no 2-D or 4-D weights found; nothing a LoRA could adapt")
    model_type = _model_type(files, comps)
    fid = f"{DERIVED}{model_type}:{shape_hash(tables)}"
    roles = {comps[c][1] for c in tables}
    kind = "text" if roles == {"llm"} or (roles <= {"llm", "text_encoder"} and files.kind == "transformers") else "image"
    if kind == "image" and "video" in str(files.model_index.get("_class_name", "")).lower():
        kind = "video"
    components: dict[str, Component] = {}
    specs = {}
    for cid, modules in tables.items():
        _, role, ft = comps[cid]
        specs[cid] = ComponentSpec(role=role, architecture=_architecture(role, ft.config))
        n_params = sum(math.prod(s) for s in ft.tensors.values())
        components[cid] = Component(fid, cid, specs[cid], modules, n_params)
    layout = Layout(type=files.kind, components={cid: LayoutComponent(path=comps[cid][0], prefix="") for cid in tables})
    first = next(iter(tables))
    names = sorted(tables[first])
    n = sum(len(t) for t in tables.values())
    spec = FamilySpec(
        schema_version=1, id=fid, name=f"{files.name} ({model_type}, derived)", kind=kind,
        pipeline_tag={"text": "text-generation", "image": "text-to-image", "video": "text-to-video"}[kind],
        library_name="peft" if kind == "text" else "diffusers", tags=[model_type],
        aliases=Aliases(names=[fid]), hub=Hub(default_repo=files.repo_id, repos=[files.repo_id] if files.repo_id else []),
        layouts=[layout], components=specs,
        detection=Detection(notes=[f"derived from the model's own weights and config ({files.ref}): {n} modules in "
                                   f"{', '.join(f'{c} ({len(t)})' for c, t in tables.items())}; no registered family matches it"],
                            key_modules=[f"{first}:{names[0]}", f"{first}:{names[-1]}"]),
        diffusion=_diffusion(files, comps),
    )
    return Family(spec=spec, components=components, path=Path(files.ref))


def _files_for(ref: str, prefer: Optional[Family], components: Optional[list[str]]) -> ModelFiles:
    """The model's files; for a Hub model and a registered ``prefer``, the snapshot a port of that family
    downloads anyway (its weight files), read locally, instead of reading the headers remotely."""
    parsed = ModelRef.parse(str(ref))
    if parsed.repo_id is not None and prefer is not None and not is_derived(prefer):
        try:
            local, _ = snapshot_for_family(prefer, parsed.repo_id, parsed.revision, components, path=parsed.repo_path)
        except InputError:
            pass  # not stored the way that family is: read it as any model (which says why if it cannot)
        else:
            files = read_local(local, str(ref))
            files.repo_id = parsed.repo_id
            return files
    return read_model_files(str(ref))


def family_for_model(ref: str, *, prefer: Optional[Family] = None, registry=None,
                     components: Optional[list[str]] = None) -> Family:
    """The family of a model reference, in this order: ``prefer`` (a registered family, e.g. the one the LoRA
    was detected as) if the model holds all its modules with their shapes; the registered family that
    matches the model exactly; ``prefer`` if at most ``PREFER_MAX_RESHAPED`` of its modules change shape;
    else a family derived from the model (registered in memory: the same type and shape table give the
    same family)."""
    registry = registry or get_registry()
    files = _files_for(str(ref), prefer, components)
    preferred = prefer is not None and not is_derived(prefer)
    if preferred and match_family(prefer, files) is not None:
        return prefer  # every module of the LoRA's family, same shapes (more blocks allowed: as before derivation)
    found = registered_match(files, registry)
    if found is not None:
        return found.family
    if preferred and match_family(prefer, files, PREFER_MAX_RESHAPED) is not None:
        return prefer  # a variant of it (an inpainting conv_in, a resized vocabulary): read as that family, as before
    return registry.register(derive_family(files))


# --------------------------------------------------------------------------- pairs between derived families


def _block_counts(modules) -> dict[str, set[str]]:
    """Numbered containers (``model.layers``, ``down_blocks.#.attentions``) -> the indices found in them."""
    out: dict[str, set[str]] = {}
    for name in modules:
        segs = name.split(".")
        for i, seg in enumerate(segs):
            if seg.isdigit():
                out.setdefault(_pattern(".".join(segs[:i])), set()).add(seg)
    return out


def structural_correspondence(src: Family, tgt: Family) -> dict:
    """Module pairs by name between two families of which one at least is derived; refuses unrelated models.

    Related: they share a component, in each shared component every numbered container present in both
    (``model.layers``, ``down_blocks.{i}.attentions``) holds as many blocks (same depth), and at most half
    of the modules both have change shape (same width). Pairs are then by name; a reshaped or missing module is
    reported by ``resolve_pairs``.
    """
    shared = [c for c in src.components if c in tgt.components]
    archs = " / ".join(dict.fromkeys(f.components[c].spec.architecture.class_ for f in (src, tgt) for c in f.components))
    if not shared:
        raise InputError(f"{src.id} and {tgt.id} have no component in common ({', '.join(src.components)} vs "
                         f"{', '.join(tgt.components)}): unrelated models")
    for cid in shared:
        a, b = src.components[cid].modules, tgt.components[cid].modules
        ca, cb = _block_counts(a), _block_counts(b)
        depth = sorted(p for p in ca if p in cb and len(ca[p]) != len(cb[p]))
        if depth:
            p = depth[0]
            raise InputError(f"{src.id} -> {tgt.id}: unrelated models ({archs}) of different depth: {cid} has {len(ca[p])} vs "
                             f"{len(cb[p])} blocks {p.replace('#', '{i}')}.{{i}}")
        common = [n for n in a if n in b]
        if not common:
            raise InputError(f"{src.id} -> {tgt.id}: unrelated models ({archs}): no module name of {cid} in common")
        reshaped = [n for n in common if not _same_shape(a[n], b[n])]
        if len(reshaped) > MAX_RESHAPED_SHARE * len(common):
            n = reshaped[0]
            raise InputError(f"{src.id} -> {tgt.id}: unrelated models ({archs}) of different width: {len(reshaped)} of {len(common)} "
                             f"shared modules of {cid} change shape (e.g. {n}: {list(a[n])} -> {list(b[n])})")
    return {"source": src.id, "target": tgt.id, "components": {c: c for c in shared}, "rules": [], "shape_mismatch": "skip"}


# --------------------------------------------------------------------------- writing registry data files


def file_id(family: Family) -> str:
    return _slug(family.id.replace(":", "-"))


def family_documents(family: Family) -> tuple[dict, dict]:
    """The family file and the module table file of a (derived) family, as registry data documents."""
    fid = file_id(family)
    spec = family.spec
    doc = {
        "schema_version": 1, "id": fid, "name": spec.name, "kind": spec.kind, "pipeline_tag": spec.pipeline_tag,
        "library_name": spec.library_name, "tags": list(spec.tags),
        "notes": [f"written by `lorareg families --from {family.path}`; derived as {family.id}"]
        + ([] if spec.hub.default_repo else ["no hub.default_repo: add the model's Hub repo to name it as base_model on cards"]),
        "aliases": {"names": list(dict.fromkeys([fid, family.id, *spec.aliases.names]))},
        "hub": ({"default_repo": spec.hub.default_repo} if spec.hub.default_repo else {}) | {"repos": list(spec.hub.repos)},
        "layouts": [layout.model_dump(exclude_none=True) for layout in spec.layouts],
        "components": {cid: {"role": c.spec.role, "architecture": c.spec.architecture.model_dump(by_alias=True),
                             "module_prefix": c.spec.module_prefix} for cid, c in family.components.items()},
        "detection": {"notes": list(spec.detection.notes), "key_modules": list(spec.detection.key_modules)},
    }
    if spec.diffusion is not None:
        doc["diffusion"] = spec.diffusion.model_dump()
    modules = {
        "family": fid, "generator": "lorareg families --from", "versions": {},
        "components": {cid: {"num_parameters": c.num_parameters or 1, "modules": {n: list(s) for n, s in sorted(c.modules.items())}}
                       for cid, c in family.components.items()},
    }
    return doc, modules


def write_family(family: Family, root: Path) -> tuple[Path, Path]:
    """Write ``root/schemas/{families,modules}/<id>.json`` (validated), ready for ``LORAREG_DATA_PATH``."""
    doc, modules = family_documents(family)
    fam_path = root / "schemas" / "families" / f"{doc['id']}.json"
    mod_path = root / "schemas" / "modules" / f"{doc['id']}.json"
    validate(doc, schema_file("family.schema.json"), fam_path)
    validate(modules, schema_file("modules.schema.json"), mod_path)
    atomic_write_text(fam_path, json.dumps(doc, indent=1) + "\n")
    atomic_write_text(mod_path, json.dumps(modules, indent=1) + "\n")
    return fam_path, mod_path
