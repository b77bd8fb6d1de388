#!/usr/bin/env python
"""Generate the module tables of every model family (schemas/modules/<id>.json).

Each component of a family is built with its real class (diffusers / transformers) on the
``meta`` device from the ``architecture.config`` stored in schemas/families/<id>.json, so no
weights are allocated and nothing is downloaded. For every ``nn.Linear`` and ``nn.Conv1d/2d/3d``
(the LoRA-targetable layers) the table records name -> weight shape; it also records the
component's parameter count.

    python tools/gen_modules.py            # regenerate all tables
    python tools/gen_modules.py sdxl       # regenerate one family
    python tools/gen_modules.py --check    # exit 1 and list differences if a checked-in table is stale

``--check`` compares only ``components`` (module names, shapes and parameter counts), not the
library versions recorded in the file.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAMILIES_DIR = ROOT / "schemas" / "families"
MODULES_DIR = ROOT / "schemas" / "modules"
GENERATOR = "tools/gen_modules.py"


def _instantiate(library: str, class_name: str, config: dict):
    import torch

    mod = importlib.import_module(library)
    cls = getattr(mod, class_name)
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            if library == "diffusers":
                model = cls.from_config(cfg)
            elif library == "transformers":
                model = cls(cls.config_class.from_dict(cfg))
            else:  # pragma: no cover - schema forbids it
                raise ValueError(f"unsupported library {library!r}")
    return model


def _module_table(model, module_prefix: str) -> dict[str, list[int]]:
    import torch.nn as nn

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    names = [n for n, _ in model.named_modules() if n]
    # The prefix is added only when the built model does not already nest its modules under it
    # (transformers 5 CLIPTextModel: "encoder.layers.0..."; CLIPTextModelWithProjection:
    # "text_model.encoder.layers.0..." plus a top-level "text_projection" that stays as it is).
    add_prefix = bool(module_prefix) and not any(
        (n + ".").startswith(module_prefix) for n in names
    )
    table: dict[str, list[int]] = {}
    for name, m in model.named_modules():
        if not name or not isinstance(m, kinds):
            continue
        key = module_prefix + name if add_prefix else name
        table[key] = [int(d) for d in m.weight.shape]
    return dict(sorted(table.items()))


def _num_parameters(model) -> int:
    seen = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return int(total)


def load_family(path: Path) -> dict:
    """The full family document (a variant_of file merged over its parent's)."""
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    return _inherit().resolve_family_doc(path, doc)


def _inherit():
    # the merge rule of variant files lives in the package; import it from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    try:
        from lorareg.registry import inherit
    finally:
        sys.path.pop(0)
    return inherit


def own_table_needed(path: Path, family: dict, table: dict) -> bool:
    """A variant family whose modules equal its parent's shares the parent's table (no file of its own)."""
    parent = family.get("variant_of")
    if not parent:
        return True
    ppath = path.parent / f"{parent}.json"
    ptable_path = _inherit().modules_path(ppath, json.loads(ppath.read_text(encoding="utf-8")))
    if not ptable_path.exists():
        return True
    ptable = json.loads(ptable_path.read_text(encoding="utf-8"))
    return _expanded(ptable) != _expanded(table)


def _expanded(table: dict) -> dict:
    comps = table["components"]
    return {c: comps[v["same_as"]] if "same_as" in v else v for c, v in comps.items()}


def compact(table: dict) -> dict:
    """Store a component whose table equals an earlier one's as {"same_as": that component}."""
    out, seen = {}, {}
    for cname, comp in sorted(table["components"].items()):
        sig = json.dumps(comp, sort_keys=True)
        if sig in seen:
            out[cname] = {"same_as": seen[sig]}
        else:
            seen[sig] = cname
            out[cname] = comp
    return {**table, "components": out}


def family_paths(ids: list[str] | None = None) -> list[Path]:
    paths = sorted(FAMILIES_DIR.glob("*.json"))
    if ids:
        wanted = set(ids)
        paths = [p for p in paths if p.stem in wanted]
        missing = wanted - {p.stem for p in paths}
        if missing:
            raise SystemExit(f"unknown family id(s): {', '.join(sorted(missing))}")
    return paths


def generate(family: dict) -> dict:
    import diffusers
    import transformers

    components = {}
    for cname in sorted(family["components"]):
        comp = family["components"][cname]
        arch = comp["architecture"]
        model = _instantiate(arch["library"], arch["class"], arch["config"])
        components[cname] = {
            "num_parameters": _num_parameters(model),
            "modules": _module_table(model, comp.get("module_prefix", "")),
        }
        del model
    return {
        "family": family["id"],
        "generator": GENERATOR,
        "versions": {"diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "components": components,
    }


def dumps(table: dict) -> str:
    """Deterministic text: sorted keys, one module per line, trailing newline."""
    lines = ["{"]
    lines.append(f' "family": {json.dumps(table["family"])},')
    lines.append(f' "generator": {json.dumps(table["generator"])},')
    lines.append(f' "versions": {json.dumps(table["versions"], sort_keys=True)},')
    lines.append(' "components": {')
    comps = sorted(table["components"].items())
    for ci, (cname, comp) in enumerate(comps):
        if "same_as" in comp:
            lines.append(f'  {json.dumps(cname)}: {{"same_as": {json.dumps(comp["same_as"])}}}' + ("," if ci < len(comps) - 1 else ""))
            continue
        lines.append(f"  {json.dumps(cname)}: {{")
        lines.append(f'   "num_parameters": {comp["num_parameters"]},')
        lines.append('   "modules": {')
        mods = sorted(comp["modules"].items())
        for mi, (mname, shape) in enumerate(mods):
            sep = "," if mi < len(mods) - 1 else ""
            lines.append(f"    {json.dumps(mname)}: {json.dumps(shape)}{sep}")
        lines.append("   }")
        lines.append("  }" + ("," if ci < len(comps) - 1 else ""))
    lines.append(" }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def diff_components(fid: str, old: dict | None, new: dict, limit: int = 20) -> list[str]:
    out: list[str] = []
    if old is None:
        return [f"{fid}: schemas/modules/{fid}.json is missing"]
    oc, nc = old.get("components", {}), new["components"]
    for cname in sorted(set(oc) | set(nc)):
        if cname not in nc:
            out.append(f"{fid}/{cname}: component in checked-in file but not generated")
            continue
        if cname not in oc:
            out.append(f"{fid}/{cname}: component generated but missing from checked-in file")
            continue
        o, n = _expanded(old)[cname], _expanded(new)[cname]
        if o.get("num_parameters") != n["num_parameters"]:
            out.append(f"{fid}/{cname}: num_parameters {o.get('num_parameters')} -> {n['num_parameters']}")
        om, nm = o.get("modules", {}), n["modules"]
        entries = []
        for m in sorted(set(om) - set(nm)):
            entries.append(f"{fid}/{cname}: - {m} {om[m]}")
        for m in sorted(set(nm) - set(om)):
            entries.append(f"{fid}/{cname}: + {m} {nm[m]}")
        for m in sorted(set(om) & set(nm)):
            if list(om[m]) != list(nm[m]):
                entries.append(f"{fid}/{cname}: ~ {m} {om[m]} -> {nm[m]}")
        if len(entries) > limit:
            entries = entries[:limit] + [f"{fid}/{cname}: ... and {len(entries) - limit} more"]
        out.extend(entries)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("families", nargs="*", help="family ids (default: all)")
    ap.add_argument("--check", action="store_true", help="compare with the checked-in tables; exit 1 on drift")
    ap.add_argument("--root", type=Path, help="a data folder shaped like the repository's top level (default: the repository)")
    args = ap.parse_args(argv)
    global ROOT, FAMILIES_DIR, MODULES_DIR
    if args.root:
        ROOT = args.root.resolve()
        FAMILIES_DIR, MODULES_DIR = ROOT / "schemas" / "families", ROOT / "schemas" / "modules"

    paths = family_paths(args.families)
    problems: list[str] = []
    if args.check and not args.families:
        known = {p.stem for p in paths}  # variant files without a table of their own are checked below
        for stale in sorted(MODULES_DIR.glob("*.json")):
            if stale.stem not in known:
                problems.append(f"{stale.stem}: schemas/modules/{stale.name} has no family file")
    for path in paths:
        family = load_family(path)
        fid = family["id"]
        if fid != path.stem:
            problems.append(f"{path.name}: id {fid!r} does not match the file name")
            continue
        table = compact(generate(family))
        out = MODULES_DIR / f"{fid}.json"
        if not own_table_needed(path, family, table):
            # same modules as its parent: it reads the parent's table
            if out.exists():
                if args.check:
                    problems.append(f"{fid}: schemas/modules/{out.name} repeats its parent's table (delete it)")
                else:
                    out.unlink()
                    print(f"removed {out} (the parent's table serves)")
            elif not args.check:
                print(f"shared {fid}: the table of {family['variant_of']}")
            continue
        if args.check:
            old = json.loads(out.read_text(encoding="utf-8")) if out.exists() else None
            problems.extend(diff_components(fid, old, table))
        else:
            MODULES_DIR.mkdir(parents=True, exist_ok=True)
            text = dumps(table)
            if not out.exists() or out.read_text(encoding="utf-8") != text:
                out.write_text(text, encoding="utf-8")
                print(f"wrote {out}")
            else:
                print(f"unchanged {out}")
    if problems:
        print("module tables differ from a fresh generation (run python tools/gen_modules.py):")
        for p in problems:
            print("  " + p)
        return 1
    if args.check:
        print(f"ok: {len(paths)} module table(s) up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
