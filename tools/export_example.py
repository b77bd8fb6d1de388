"""Export the benchmark's LM pair as lorareg's embedded example (lorareg/examples/lm), in fp16.

    python bench/fidelity/run.py --only lm --work WORK      # train the benchmark's LM pair
    python tools/export_example.py WORK/lm                     # export it into lorareg/examples/lm

Writes v1/ and v2/ (transformers folders), lora-v1/ (the task LoRA trained on v1, PEFT folder),
lora-v2-retrained/ (the reference: the same LoRA recipe trained directly on v2), heldout.txt and
example.json. The example's registry family (data/schemas/families/example-llama.json) has the same
architecture as the benchmark's fid-llama.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

import lorareg
from lorareg.core.io import LazyTensor
from lorareg.core.lora import Lora, Module

REPO = Path(__file__).resolve().parents[1]
DEST = REPO / "lorareg" / "examples" / "lm"
HELDOUT_BYTES = 16384


def _fp16_lora(src: Path, dst: Path) -> None:
    lo = lorareg.load(src, family="fid-llama")
    mods = {}
    for k, m in lo.modules.items():
        f = {r: LazyTensor.from_torch(v.float().half().contiguous()) for r, v in m.factors.items()}
        mods[k] = Module(m.component, m.name, m.kind, f, m.alpha, None, m.weight_shape)
    lorareg.save(Lora(family="fid-llama", modules=mods, format_state=None), dst, format="peft", force=True)
    # the base the adapter belongs to, relative to the example folder
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "v1" if dst.name == "lora-v1" else "v2"
    (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def export(lm_work: Path, dest: Path = DEST, log=print) -> Path:
    from transformers import AutoModelForCausalLM

    for name in ("v1", "v2"):
        out = dest / name
        if out.exists():
            shutil.rmtree(out)
        model = AutoModelForCausalLM.from_pretrained(lm_work / name, dtype=torch.float32)
        model.half().save_pretrained(out)
        (out / "generation_config.json").unlink(missing_ok=True)
    for src, dst in (("lora-v1", "lora-v1"), ("lora-v2", "lora-v2-retrained")):
        if (dest / dst).exists():
            shutil.rmtree(dest / dst)
        _fp16_lora(lm_work / src, dest / dst)
    text = (lm_work / "heldout.txt").read_bytes()[:HELDOUT_BYTES]
    (dest / "heldout.txt").write_bytes(text)
    meta = {
        "description": "A byte-level Llama (hidden 128, 4 layers, 4 heads / 2 KV heads) trained on the Python standard library's "
                       "sources (v1), then trained further on a shifted mix (v2); a rank-8 LoRA on all 7 projections of v1 that "
                       "learns English prose (the Python language reference, pydoc_data.topics); the same LoRA recipe retrained "
                       "on v2 as the reference; held-out topics of the language reference as evaluation text. Built by "
                       "bench/fidelity/run.py --write-example.",
        "family": "example-llama",
        "source_model": "v1", "target_model": "v2", "lora": "lora-v1", "reference_lora": "lora-v2-retrained",
        "heldout": "heldout.txt", "tokenizer": "bytes", "seq_len": 128,
    }
    (dest / "example.json").write_text(json.dumps(meta, indent=2) + "\n")
    for p in dest.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    log(f"example: exported to {dest} ({size / 1e6:.2f} MB)")
    return dest


if __name__ == "__main__":
    # the benchmark's own family (fid-llama) names the LoRA's modules
    os.environ["LORAREG_DATA_PATH"] = os.pathsep.join(
        [str(REPO / "bench" / "fidelity" / "data"), *[p for p in os.environ.get("LORAREG_DATA_PATH", "").split(os.pathsep) if p]])
    export(Path(sys.argv[1]))
