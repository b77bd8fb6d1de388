"""How long finding a model's family takes (headers only): registered matches and derived families, real sizes.

    python bench/bench_derive.py

Writes safetensors files whose headers have real model shapes and whose data sections are holes (sparse
files: nothing but the headers touches the disk), then times ``family_for_model`` on each: a TinyLlama
folder and an SDXL single-file checkpoint (registered families: matched), a Llama-3-8B-shaped folder
(4 shards + index) and a Mistral-7B-shaped one (derived, then paired with each other and with itself).
"""

from __future__ import annotations

import json
import math
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorareg.registry import CANONICAL, get_registry  # noqa: E402
from lorareg.sources.derive import family_for_model, structural_correspondence  # noqa: E402


def sparse(path: Path, shapes: dict) -> None:
    header, off = {}, 0
    for key, shape in shapes.items():
        n = 2 * math.prod(shape)
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)


def llama_like(root: Path, hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, shards: int, mtype: str) -> Path:
    hd = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv * hd, hidden),
                       p + "self_attn.v_proj.weight": (kv * hd, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    keys = list(shapes)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s::shards]
        sparse(root / name, {k: shapes[k] for k in part})
        weight_map.update({k: name for k in part})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": mtype, "architectures": [f"{mtype.title()}ForCausalLM"]}))
    return root


def timed(label: str, fn):
    t = time.perf_counter()
    out = fn()
    shown = out.id if hasattr(out, "id") else out
    print(f"{label:<58} {1000 * (time.perf_counter() - t):8.1f} ms  -> {shown}")
    return out


def main() -> None:
    reg = get_registry()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tl = reg.family("tinyllama").components["model"]
        sparse(root / "tinyllama" / "model.safetensors", {**{f"{n}.weight": s for n, s in tl.modules.items()},
                                                          "model.embed_tokens.weight": (32000, 2048)})
        sdxl = reg.family("sdxl")
        layout = next(lay for lay in sdxl.spec.layouts if lay.type == "single_file")
        shapes = {}
        for cid, lc in layout.components.items():
            comp = sdxl.components[cid]
            fused = comp.fused_group_of(lc.scheme) if lc.scheme != CANONICAL else {}
            for n, s in comp.modules.items():
                g = fused.get(n)
                shapes[lc.prefix + (g.name if g else comp.name_in(lc.scheme, n)) + ".weight"] = (g.out_features, *s[1:]) if g else s
        sparse(root / "sdxl.safetensors", shapes)
        llama3 = llama_like(root / "llama3-8b", 4096, 14336, 32, 32, 8, 128256, 4, "llama")
        mistral = llama_like(root / "mistral-7b", 4096, 14336, 32, 32, 8, 32768, 3, "mistral")
        timed("TinyLlama folder (registered)", lambda: family_for_model(str(root / "tinyllama")).id)
        timed("SDXL single file, LDM names, 2 components (registered)", lambda: family_for_model(str(root / "sdxl.safetensors")).id)
        a = timed("Llama-3-8B-shaped, 4 shards + index (derived)", lambda: family_for_model(str(llama3)))
        b = timed("Mistral-7B-shaped, 3 shards + index (derived)", lambda: family_for_model(str(mistral)))
        timed("pairs Llama-3-8B -> Mistral-7B (same depth and width)",
              lambda: len(structural_correspondence(a, b)["components"]))
        print(f"derived ids: {a.id} ({sum(len(c.modules) for c in a.components.values())} modules), {b.id}")


if __name__ == "__main__":
    main()
