"""Checks of the family data: schema validity, generated tables up to date, architecture facts,
and the naming schemes (a private reference implementation of the rule semantics lives here so
that these tests do not depend on lorareg's own engine)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "schemas"
FAMILY_IDS = ["sd15", "sd21", "sdxl", "ssd-1b", "segmind-vega", "hunyuan-video", "tinyllama",
              "hunyuan-video-i2v", "hunyuan-video-i2v-33ch", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b",
              "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b", "flux.1-dev", "flux.1-schnell", "flux.1-krea-dev",
              "flux.1-kontext-dev", "chroma"]


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _resolved(fid: str) -> tuple[dict, dict, dict]:
    """(file as written, full document with its parent's fields, module table with same_as expanded)."""
    from lorareg.registry.inherit import modules_path, resolve_family_doc

    path = SCHEMAS / "families" / f"{fid}.json"
    raw = _load(path)
    table = _load(modules_path(path, raw))
    comps = table["components"]
    table = {**table, "components": {c: comps[v["same_as"]] if "same_as" in v else v for c, v in comps.items()}}
    return raw, resolve_family_doc(path, raw), table


RAW = {fid: _resolved(fid)[0] for fid in FAMILY_IDS}
FAMILIES = {fid: _resolved(fid)[1] for fid in FAMILY_IDS}
TABLES = {fid: _resolved(fid)[2] for fid in FAMILY_IDS}
#: families whose module table is their parent's (variant files whose overrides change no module)
SHARED_TABLE = {fid for fid in FAMILY_IDS if not (SCHEMAS / "modules" / f"{fid}.json").exists()}


def mods(fid: str, comp: str) -> dict[str, list[int]]:
    return TABLES[fid]["components"][comp]["modules"]


# --------------------------------------------------------------------------- reference engine
_VAR = re.compile(r"^\{([a-z]\w*)\}$")
_EXPR = re.compile(r"^\{(.+)\}$")


def _eval(expr: str, env: dict[str, int]) -> int:
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return env[node.id]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) else a * b
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError(f"bad expression {expr!r}")

    return ev(ast.parse(expr, mode="eval"))


def _match_at(pat: list[str], segs: list[str], start: int, env: dict[str, int]) -> dict[str, int] | None:
    if start + len(pat) > len(segs):
        return None
    env = dict(env)
    for p, s in zip(pat, segs[start:start + len(pat)]):
        m = _VAR.match(p)
        if m:
            if not s.isdigit() or env.setdefault(m.group(1), int(s)) != int(s):
                return None
        elif p != s:
            return None
    return env


def _render(template: str, env: dict[str, int]) -> list[str]:
    out = []
    for seg in template.split("."):
        m = _EXPR.match(seg)
        out.append(str(_eval(m.group(1), env)) if m else seg)
    return out


def apply_rules(rules: list[dict], name: str) -> str:
    segs = name.split(".")
    for rule in rules:
        pat = rule["from"]
        anchored = pat.startswith("^")
        pat_segs = pat.lstrip("^").split(".")
        for start in [0] if anchored else range(len(segs)):
            env = _match_at(pat_segs, segs, start, {})
            if env is not None:
                segs = segs[:start] + _render(rule["to"], env) + segs[start + len(pat_segs):]
                break
    return ".".join(segs)


def fuse_target(fuse: list[dict], name: str) -> tuple[str, int] | None:
    segs = name.split(".")
    for group in fuse:
        for idx, part in enumerate(group["parts"]):
            pat = part["from"].split(".")
            if len(pat) != len(segs):
                continue
            env = _match_at(pat, segs, 0, {})
            if env is not None:
                return ".".join(_render(group["to"], env)), idx
    return None


def scheme_table(fid: str, comp: str, scheme: str) -> dict[str, list[str]]:
    """scheme name -> canonical module names (several only for a fuse group)."""
    spec = FAMILIES[fid]["components"][comp]["schemes"][scheme]
    out: dict[str, list[str]] = defaultdict(list)
    for name in mods(fid, comp):
        ft = fuse_target(spec.get("fuse", []), name)
        out[ft[0] if ft else apply_rules(spec.get("rules", []), name)].append(name)
    return dict(out)


def to_scheme(fid: str, comp: str, scheme: str, name: str) -> str:
    spec = FAMILIES[fid]["components"][comp]["schemes"][scheme]
    ft = fuse_target(spec.get("fuse", []), name)
    return ft[0] if ft else apply_rules(spec.get("rules", []), name)


def fused_shape(fid: str, comp: str, scheme: str, target: str) -> list[int]:
    spec = FAMILIES[fid]["components"][comp]["schemes"][scheme]
    table = mods(fid, comp)
    for group in spec.get("fuse", []):
        gpat = group["to"].split(".")
        segs = target.split(".")
        if len(gpat) != len(segs):
            continue
        env = _match_at(gpat, segs, 0, {})
        if env is None:
            continue
        rows, rest = 0, None
        for part in group["parts"]:
            shape = table[".".join(_render(part["from"], env))]
            lo, hi = part.get("rows", [0, shape[0]])
            assert 0 <= lo < hi <= shape[0]
            rows += hi - lo
            assert rest in (None, shape[1:])
            rest = shape[1:]
        return [rows] + rest
    raise KeyError(target)


# --------------------------------------------------------------------------- schemas
def test_family_files_validate():
    schema = _load(SCHEMAS / "family.schema.json")
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    files = sorted((SCHEMAS / "families").glob("*.json"))
    assert {p.stem for p in files} == set(FAMILY_IDS)
    for path in files:
        data = _load(path)
        validator.validate(data)
        validator.validate(FAMILIES[path.stem])
        assert data["id"] == path.stem


def test_module_files_validate():
    schema = _load(SCHEMAS / "modules.schema.json")
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    files = sorted((SCHEMAS / "modules").glob("*.json"))
    assert {p.stem for p in files} == set(FAMILY_IDS) - SHARED_TABLE
    assert SHARED_TABLE <= {fid for fid in FAMILY_IDS if RAW[fid].get("variant_of")}
    for path in files:
        data = _load(path)
        validator.validate(data)
        assert data["family"] == path.stem
        assert set(data["components"]) == set(FAMILIES[path.stem]["components"])
        for comp in TABLES[path.stem]["components"].values():
            assert list(comp["modules"]) == sorted(comp["modules"])


def test_module_files_are_deterministic_text():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gen_modules
    finally:
        sys.path.pop(0)
    for fid in sorted(set(FAMILY_IDS) - SHARED_TABLE):
        path = SCHEMAS / "modules" / f"{fid}.json"
        text = path.read_text(encoding="utf-8")
        assert text.endswith("\n")
        assert gen_modules.dumps(json.loads(text)) == text


def test_generator_check_no_drift():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_modules.py"), "--check"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_generator_check_reports_drift(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gen_modules
    finally:
        sys.path.pop(0)
    fresh = gen_modules.generate(FAMILIES["tinyllama"])
    stale = json.loads(json.dumps(fresh))
    comp = stale["components"]["model"]
    comp["modules"].pop("lm_head")
    comp["modules"]["model.layers.0.self_attn.k_proj"] = [2048, 2048]
    comp["num_parameters"] += 1
    problems = gen_modules.diff_components("tinyllama", stale, fresh)
    text = "\n".join(problems)
    assert "+ lm_head" in text and "~ model.layers.0.self_attn.k_proj" in text and "num_parameters" in text
    assert gen_modules.diff_components("tinyllama", fresh, fresh) == []


def test_detection_key_modules_exist():
    for fid, fam in FAMILIES.items():
        for ref in fam["detection"]["key_modules"]:
            comp, name = ref.split(":", 1)
            assert name in mods(fid, comp), (fid, ref)
        for layout in fam["layouts"]:
            for comp, spec in layout["components"].items():
                assert comp in fam["components"], (fid, comp)
                scheme = spec.get("scheme", "canonical")
                assert scheme == "canonical" or scheme in fam["components"][comp].get("schemes", {}), (fid, scheme)


# --------------------------------------------------------------------------- architecture facts
def _tblocks(names) -> set[str]:
    out = set()
    for n in names:
        m = re.match(r"^(.*transformer_blocks\.\d+)\.", n)
        if m:
            out.add(m.group(1))
    return out


def test_cross_attention_dims():
    assert mods("sdxl", "unet")["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] == [640, 2048]
    assert mods("sd15", "unet")["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == [320, 768]
    assert mods("sd15", "unet")["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] == [640, 768]
    assert mods("sd21", "unet")["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == [320, 1024]
    for fid in ("ssd-1b", "segmind-vega"):
        assert mods(fid, "unet")["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] == [640, 2048]


def test_proj_in_kind():
    assert mods("sd15", "unet")["down_blocks.0.attentions.0.proj_in"] == [320, 320, 1, 1]
    assert mods("sd15", "unet")["mid_block.attentions.0.proj_out"] == [1280, 1280, 1, 1]
    assert mods("sd21", "unet")["down_blocks.0.attentions.0.proj_in"] == [320, 320]
    assert mods("sdxl", "unet")["down_blocks.1.attentions.0.proj_in"] == [640, 640]


@pytest.mark.parametrize("fid,total,down1,down2,up0,up1,mid", [
    ("sdxl", 70, [2, 2], [10, 10], [10, 10, 10], [2, 2, 2], 10),
    ("ssd-1b", 34, [2, 2], [4, 4], [4, 4, 10], [2, 1, 1], 0),
    ("segmind-vega", 15, [1, 1], [2, 2], [2, 2, 2], [1, 1, 1], 0),
])
def test_xl_transformer_block_counts(fid, total, down1, down2, up0, up1, mid):
    names = mods(fid, "unet")
    blocks = _tblocks(names)
    assert len(blocks) == total

    def depth(prefix):
        return len({b for b in blocks if b.startswith(prefix + ".")})

    assert [depth(f"down_blocks.1.attentions.{j}") for j in range(2)] == down1
    assert [depth(f"down_blocks.2.attentions.{j}") for j in range(2)] == down2
    assert [depth(f"up_blocks.0.attentions.{j}") for j in range(3)] == up0
    assert [depth(f"up_blocks.1.attentions.{j}") for j in range(3)] == up1
    assert depth("mid_block.attentions.0") == mid
    if mid == 0:
        assert "mid_block.resnets.0.conv1" in names and "mid_block.resnets.1.conv1" not in names
    assert not any(n.startswith("down_blocks.0.attentions") for n in names)


def test_sd_transformer_block_counts():
    for fid in ("sd15", "sd21"):
        assert len(_tblocks(mods(fid, "unet"))) == 16


def test_sdxl_other_facts():
    u = mods("sdxl", "unet")
    assert u["add_embedding.linear_1"] == [1280, 2816]
    assert sum(1 for s in u.values() if len(s) == 2) == 743


def test_parameter_totals():
    def n(fid, comp):
        return TABLES[fid]["components"][comp]["num_parameters"]

    assert n("sdxl", "unet") == 2_567_463_684
    assert abs(n("ssd-1b", "unet") / 1e9 - 1.33) < 0.01
    assert abs(n("segmind-vega", "unet") / 1e9 - 0.745) < 0.005
    assert abs(n("sd15", "unet") / 1e6 - 859.5) < 1
    assert abs(n("hunyuan-video", "transformer") / 1e9 - 12.8) < 0.1
    assert abs(n("tinyllama", "model") / 1e9 - 1.1) < 0.01


def _layers(names, prefix="text_model.encoder.layers."):
    return {int(n[len(prefix):].split(".")[0]) for n in names if n.startswith(prefix)}


def test_text_encoders():
    for fid in ("sdxl", "ssd-1b", "segmind-vega"):
        te2 = mods(fid, "text_encoder_2")
        assert _layers(te2) == set(range(32))
        assert te2["text_model.encoder.layers.0.self_attn.q_proj"] == [1280, 1280]
        assert te2["text_model.encoder.layers.0.mlp.fc1"] == [5120, 1280]
        assert te2["text_projection"] == [1280, 1280]
        te1 = mods(fid, "text_encoder")
        assert _layers(te1) == set(range(12))
        assert te1["text_model.encoder.layers.0.self_attn.q_proj"] == [768, 768]
    te = mods("sd21", "text_encoder")
    assert _layers(te) == set(range(23))
    assert te["text_model.encoder.layers.0.mlp.fc1"] == [4096, 1024]
    assert _layers(mods("sd15", "text_encoder")) == set(range(12))
    for fid in FAMILY_IDS:
        for comp, spec in FAMILIES[fid]["components"].items():
            if spec["role"] == "text_encoder" and spec["architecture"]["class"].startswith("CLIP"):
                assert all(n.startswith("text_model.") or n == "text_projection" for n in mods(fid, comp))


def test_hunyuan_facts():
    t = mods("hunyuan-video", "transformer")
    assert len({n.split(".")[1] for n in t if n.startswith("transformer_blocks.")}) == 20
    assert len({n.split(".")[1] for n in t if n.startswith("single_transformer_blocks.")}) == 40
    assert len({n.split(".")[3] for n in t if n.startswith("context_embedder.token_refiner.refiner_blocks.")}) == 2
    for q in ("to_q", "to_k", "to_v"):
        assert t[f"single_transformer_blocks.0.attn.{q}"] == [3072, 3072]
    assert t["single_transformer_blocks.0.proj_mlp"] == [12288, 3072]
    assert t["single_transformer_blocks.0.proj_out"] == [3072, 15360]
    assert t["transformer_blocks.0.ff.net.0.proj"] == [12288, 3072]
    assert t["context_embedder.proj_in"] == [3072, 4096]
    assert t["time_text_embed.text_embedder.linear_1"] == [3072, 768]
    assert t["norm_out.linear"] == [6144, 3072]


def test_tinyllama_facts():
    m = mods("tinyllama", "model")
    assert m["model.layers.0.self_attn.k_proj"] == [256, 2048]
    assert m["model.layers.0.self_attn.q_proj"] == [2048, 2048]
    assert m["model.layers.0.mlp.up_proj"] == [5632, 2048]
    assert m["lm_head"] == [32000, 2048]
    assert len({n.split(".")[2] for n in m if n.startswith("model.layers.")}) == 22


# --------------------------------------------------------------------------- naming schemes
def _root(fid: str) -> str:
    return _root(RAW[fid]["variant_of"]) if RAW[fid].get("variant_of") else fid


def _all_schemes():
    for fid, fam in FAMILIES.items():
        if RAW[fid].get("variant_of") and "components" not in RAW[fid]:
            continue  # the parent's scheme, checked with the parent (and its variants' modules)
        for comp, spec in fam["components"].items():
            for scheme in spec.get("schemes", {}):
                yield fid, comp, scheme


@pytest.mark.parametrize("fid,comp,scheme", list(_all_schemes()))
def test_scheme_is_bijection(fid, comp, scheme):
    spec = FAMILIES[fid]["components"][comp]["schemes"][scheme]
    table = scheme_table(fid, comp, scheme)
    fused_names = set()
    for group in spec.get("fuse", []):
        for name in mods(fid, comp):
            ft = fuse_target([group], name)
            if ft:
                fused_names.add(ft[0])
    for target, sources in table.items():
        if target in fused_names:
            # a complete fuse group: each part resolves to an existing canonical module
            assert fused_shape(fid, comp, scheme, target)
        else:
            assert len(sources) == 1, (target, sources)
    # flattened (kohya) names are unique too, for the scheme and for canonical names
    for names in (list(table), list(mods(fid, comp))):
        flat = [n.replace(".", "_") for n in names]
        assert len(set(flat)) == len(flat)
    # every rule does something on this family (no dead rules)
    used = set()
    # a scheme a variant inherits may hold rules for modules only the variant has (Wan I2V's k_img)
    sharing = [f for f in FAMILY_IDS if _root(f) == fid and comp in FAMILIES[f]["components"]]
    for name in {n for f in sharing for n in mods(f, comp)}:
        if fuse_target(spec.get("fuse", []), name):
            continue
        segs_before = name
        for i, rule in enumerate(spec.get("rules", [])):
            after = apply_rules([rule], segs_before)
            if after != segs_before:
                used.add(i)
            segs_before = after
    # rules for parameter-only norm layers (not in the module table) are there for reading base weights
    norm_only = re.compile(r"(^|\.)(norm\d*|norm_[a-z_]+|conv_norm_out)$")
    dead = [r["from"] for i, r in enumerate(spec.get("rules", []))
            if i not in used and not norm_only.search(r["from"].lstrip("^"))]
    assert not dead, dead


@pytest.mark.parametrize("fid", ["sd15", "sd21", "sdxl", "ssd-1b", "segmind-vega"])
def test_canonical_flat_names_unique_all_components(fid):
    for comp in FAMILIES[fid]["components"]:
        names = list(mods(fid, comp))
        assert len({n.replace(".", "_") for n in names}) == len(names)


LDM_FACTS_XL = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
    "down_blocks.0.resnets.0.time_emb_proj": "input_blocks.1.0.emb_layers.1",
    "down_blocks.0.resnets.0.conv2": "input_blocks.1.0.out_layers.3",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
    "down_blocks.2.attentions.1.proj_out": "input_blocks.8.1.proj_out",
    "up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2": "output_blocks.2.1.transformer_blocks.9.ff.net.2",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
    "up_blocks.0.resnets.0.conv1": "output_blocks.0.0.in_layers.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
}


def test_ldm_names_sdxl():
    facts = dict(LDM_FACTS_XL)
    facts.update({
        "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
        "mid_block.attentions.0.transformer_blocks.9.attn2.to_k": "middle_block.1.transformer_blocks.9.attn2.to_k",
        "mid_block.resnets.0.conv1": "middle_block.0.in_layers.2",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
    })
    for src, dst in facts.items():
        assert src in mods("sdxl", "unet"), src
        assert to_scheme("sdxl", "unet", "ldm", src) == dst, src


@pytest.mark.parametrize("fid", ["ssd-1b", "segmind-vega"])
def test_ldm_names_distilled(fid):
    names = mods(fid, "unet")
    for src, dst in LDM_FACTS_XL.items():
        if src in names:
            assert to_scheme(fid, "unet", "ldm", src) == dst, src
    assert to_scheme(fid, "unet", "ldm", "mid_block.resnets.0.conv1") == "middle_block.0.in_layers.2"
    assert to_scheme(fid, "unet", "ldm", "mid_block.resnets.0.time_emb_proj") == "middle_block.0.emb_layers.1"
    table = scheme_table(fid, "unet", "ldm")
    assert not any(t.startswith("middle_block.1") for t in table)
    if fid == "ssd-1b":
        # output_blocks 0..5 depths 4, 4, 10, 2, 1, 1 (ComfyUI's transformer_depth_output, popped from the end)
        for ob, depth in enumerate([4, 4, 10, 2, 1, 1]):
            assert len(_tblocks(t for t in table if t.startswith(f"output_blocks.{ob}.1."))) == depth


def test_ldm_names_sd15():
    facts = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.attentions.0.proj_in": "input_blocks.1.1.proj_in",
        "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
        "down_blocks.3.resnets.1.conv2": "input_blocks.11.0.out_layers.3",
        "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.2.upsamplers.0.conv": "output_blocks.8.2.conv",
        "up_blocks.3.attentions.2.proj_out": "output_blocks.11.1.proj_out",
        "up_blocks.0.resnets.2.conv_shortcut": "output_blocks.2.0.skip_connection",
        "time_embedding.linear_1": "time_embed.0",
        "conv_in": "input_blocks.0.0",
        "conv_out": "out.2",
    }
    for fid in ("sd15", "sd21"):
        for src, dst in facts.items():
            assert src in mods(fid, "unet"), src
            assert to_scheme(fid, "unet", "ldm", src) == dst, (fid, src)
    flat = {t.replace(".", "_") for t in scheme_table("sd15", "unet", "ldm")}
    assert "input_blocks_4_1_transformer_blocks_0_attn1_to_q" in flat


def test_hunyuan_original_names():
    f = ("hunyuan-video", "transformer", "original")
    facts = {
        "transformer_blocks.0.attn.to_q": "double_blocks.0.img_attn_qkv",
        "transformer_blocks.7.attn.to_v": "double_blocks.7.img_attn_qkv",
        "transformer_blocks.0.attn.add_k_proj": "double_blocks.0.txt_attn_qkv",
        "transformer_blocks.0.attn.to_out.0": "double_blocks.0.img_attn_proj",
        "transformer_blocks.0.attn.to_add_out": "double_blocks.0.txt_attn_proj",
        "transformer_blocks.0.ff.net.0.proj": "double_blocks.0.img_mlp.fc1",
        "transformer_blocks.0.ff.net.2": "double_blocks.0.img_mlp.fc2",
        "transformer_blocks.0.ff_context.net.0.proj": "double_blocks.0.txt_mlp.fc1",
        "transformer_blocks.19.ff_context.net.2": "double_blocks.19.txt_mlp.fc2",
        "transformer_blocks.0.norm1.linear": "double_blocks.0.img_mod.linear",
        "transformer_blocks.0.norm1_context.linear": "double_blocks.0.txt_mod.linear",
        "single_transformer_blocks.0.attn.to_q": "single_blocks.0.linear1",
        "single_transformer_blocks.39.proj_mlp": "single_blocks.39.linear1",
        "single_transformer_blocks.0.proj_out": "single_blocks.0.linear2",
        "single_transformer_blocks.0.norm.linear": "single_blocks.0.modulation.linear",
        "x_embedder.proj": "img_in.proj",
        "context_embedder.proj_in": "txt_in.input_embedder",
        "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.mlp.0",
        "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.linear_2",
        "context_embedder.token_refiner.refiner_blocks.1.attn.to_k": "txt_in.individual_token_refiner.blocks.1.self_attn_qkv",
        "context_embedder.token_refiner.refiner_blocks.0.attn.to_out.0": "txt_in.individual_token_refiner.blocks.0.self_attn_proj",
        "context_embedder.token_refiner.refiner_blocks.0.ff.net.0.proj": "txt_in.individual_token_refiner.blocks.0.mlp.fc1",
        "context_embedder.token_refiner.refiner_blocks.0.norm_out.linear": "txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1",
        "time_text_embed.timestep_embedder.linear_1": "time_in.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "time_in.mlp.2",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.mlp.0",
        "norm_out.linear": "final_layer.adaLN_modulation.1",
        "proj_out": "final_layer.linear",
    }
    for src, dst in facts.items():
        assert src in mods("hunyuan-video", "transformer"), src
        assert to_scheme(*f, src) == dst, src
    assert fused_shape(*f, "double_blocks.0.img_attn_qkv") == [9216, 3072]
    assert fused_shape(*f, "double_blocks.0.txt_attn_qkv") == [9216, 3072]
    assert fused_shape(*f, "single_blocks.0.linear1") == [21504, 3072]
    assert fused_shape(*f, "txt_in.individual_token_refiner.blocks.0.self_attn_qkv") == [9216, 3072]
    assert fused_shape(*f, "final_layer.adaLN_modulation.1") == [6144, 3072]
    # original [shift; scale] vs diffusers [scale; shift]: the first original half is diffusers' second half
    spec = FAMILIES["hunyuan-video"]["components"]["transformer"]["schemes"]["original"]
    (final,) = [g for g in spec["fuse"] if g["to"] == "final_layer.adaLN_modulation.1"]
    assert [p.get("rows") for p in final["parts"]] == [[3072, 6144], [0, 3072]]
    table = scheme_table(*f)
    assert len([t for t in table if t.startswith("double_blocks.0.")]) == 10
    assert len([t for t in table if t.startswith("single_blocks.0.")]) == 3
    flat = {t.replace(".", "_") for t in table}
    assert "double_blocks_0_img_mlp_fc1" in flat and "single_blocks_39_linear1" in flat
    # every original name is outside the diffusers namespace (nothing left unrenamed)
    for t in table:
        assert not t.startswith(("transformer_blocks.", "single_transformer_blocks.", "context_embedder.",
                                 "time_text_embed.", "x_embedder.", "norm_out.")), t
        assert t != "proj_out"


def test_reference_engine_semantics():
    rules = [{"from": "b.{i}", "to": "c.{2*(i+1)-1}"}, {"from": "^a.{k}", "to": "z.{k}"}]
    assert apply_rules(rules, "a.3.b.4.x") == "z.3.c.9.x"
    assert apply_rules(rules, "q.a.3") == "q.a.3"  # anchored rule does not match mid-name
    assert apply_rules([{"from": "b", "to": "y"}], "b.b") == "y.b"  # at most once, leftmost


# --------------------------------------------------------------------------- cross-checks against diffusers
# diffusers' own converters serve as an independent oracle for the scheme data (nothing is copied
# from them; they are only called).
def _marker(i: int, shape) -> "torch.Tensor":
    import torch

    t = torch.tensor([float(i)], dtype=torch.float64)
    return t.reshape([1] * max(len(shape), 1)).expand(*shape) if len(shape) else t.reshape(())


@pytest.mark.parametrize("fid", ["sd15", "sd21", "sdxl", "ssd-1b", "segmind-vega"])
def test_ldm_scheme_roundtrips_through_diffusers_converter(fid):
    torch = pytest.importorskip("torch")
    try:
        from diffusers import UNet2DConditionModel
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    except ImportError:  # pragma: no cover
        pytest.skip("diffusers single-file converter not available")
    unet = FAMILIES[fid]["components"]["unet"]
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(unet["architecture"]["config"])
    rules = unet["schemes"]["ldm"]["rules"]
    ldm, ids = {}, {}
    # every parameter (norms included), renamed by our rules, each tagged with its own index
    for i, (key, value) in enumerate(model.state_dict().items()):
        module, _, param = key.rpartition(".")
        ldm["model.diffusion_model." + apply_rules(rules, module) + "." + param] = _marker(i, tuple(value.shape))
        ids[key] = i
    converted = convert_ldm_unet_checkpoint(ldm, dict(model.config))
    assert set(converted) == set(ids)
    assert all(int(converted[k].flatten()[0]) == i for k, i in ids.items())


def test_hunyuan_scheme_roundtrips_through_diffusers_converter():
    torch = pytest.importorskip("torch")
    try:
        from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers
    except ImportError:  # pragma: no cover
        pytest.skip("diffusers HunyuanVideo LoRA converter not available")
    f = ("hunyuan-video", "transformer", "original")
    spec = FAMILIES["hunyuan-video"]["components"]["transformer"]["schemes"]["original"]
    table, canon = scheme_table(*f), mods("hunyuan-video", "transformer")
    expected: dict[str, list] = {}
    lora = {}
    for orig, sources in table.items():
        group_env = None
        for group in spec["fuse"]:
            gsegs = group["to"].split(".")
            if len(gsegs) == len(orig.split(".")):
                env = _match_at(gsegs, orig.split("."), 0, {})
                if env is not None and fuse_target([group], sources[0]):
                    group_env = (group, env)
                    break
        if group_env is None:
            shape = canon[sources[0]]
            expected[sources[0]] = list(range(shape[0]))
        else:
            group, env = group_env
            shape, offset = fused_shape(*f, orig), 0
            for part in group["parts"]:
                name = ".".join(_render(part["from"], env))
                lo, hi = part.get("rows", [0, canon[name][0]])
                rows = expected.setdefault(name, [None] * canon[name][0])
                rows[lo:hi] = range(offset, offset + hi - lo)
                offset += hi - lo
        fan_in = shape[1] if len(shape) == 2 else 1
        # rank 3: diffusers chunks the refiner's fused A factor into three as well
        lora[orig + ".lora_A.weight"] = torch.zeros(3, fan_in)
        lora[orig + ".lora_B.weight"] = torch.arange(shape[0], dtype=torch.float64)[:, None].repeat(1, 3)
    converted = _convert_hunyuan_video_lora_to_diffusers(lora)
    got = {k[len("transformer."):-len(".lora_B.weight")]: v for k, v in converted.items() if k.endswith(".lora_B.weight")}
    assert set(got) == set(expected)
    for name, rows in expected.items():
        assert got[name][:, 0].long().tolist() == rows, name
