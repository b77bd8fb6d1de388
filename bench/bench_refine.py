"""Timing of `lorareg port --refine distill` at real model sizes (random weights of the real shapes).

Two refinements, each next to a baseline in the same run on the same device:
  * LM: a TinyLlama-sized model (the `tinyllama` family's config) v1 -> v2 (= v1 + noise);
  * UNet: an SDXL-sized pipeline -> an SSD-1B-sized one (the `sdxl` / `ssd-1b` family configs, random
    weights: unrelated, so --force-unrelated; the similarity is irrelevant to the timing).
The baseline is the same number of steps of ordinary LoRA training on the target (same batch and
sequence / latent size, random data), i.e. what retraining costs per step; the ratio is
refinement (sampling included) / baseline.

    python bench/bench_refine.py --device cuda              # the real sizes (needs a GPU with ~40 GB)
    python bench/bench_refine.py --device cpu --scale tiny  # the pipeline on the test families' sizes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))


def _cfg(family: str, component: str) -> dict:
    from lorareg.registry import get_registry

    return dict(get_registry().family(family).components[component].spec.architecture.config)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _baseline(model, modules, loss_fn, steps, device) -> float:
    """Seconds for ``steps`` steps of ordinary LoRA training (hooks, AdamW) on ``model``."""
    from lorareg.refine.hooks import TrainableLora
    from lorareg.refine.train import train_factors

    hooks = TrainableLora(model, modules, device)
    _sync(device)
    t = time.perf_counter()
    train_factors(hooks.parameters(), loss_fn, steps=steps, lr=1e-4, started=t, budget_seconds=None, progress=False, desc="", loss_name="")
    _sync(device)
    hooks.remove()
    return time.perf_counter() - t


def bench_lm(work: Path, family: str, steps: int, device, dtype) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorareg
    from lora_factory import make_lora

    cfg = LlamaConfig(**_cfg(family, "model"))
    torch.manual_seed(0)
    v1 = LlamaForCausalLM(cfg).to(dtype)
    v1.save_pretrained(work / "lm-v1")
    with torch.no_grad():
        for p in v1.parameters():
            p.add_(0.01 * p.float().std() * torch.randn_like(p))
    v1.save_pretrained(work / "lm-v2")
    lora = make_lora(family, r"(q|k|v|o|gate|up|down)_proj$", rank=16, alpha=16.0, dtype=torch.bfloat16, seed=1)
    for m in lora.modules.values():
        m.factors["up"] = type(m.factors["up"]).from_torch((m.factors["up"].torch().float() * 1e-3).to(torch.bfloat16))
    _sync(device)
    t = time.perf_counter()
    res = lorareg.port(lora, source_model=str(work / "lm-v1"), target_model=str(work / "lm-v2"), refine="distill", refine_steps=steps,
                       device=str(device), progress=False, cache_dir=work / "cache", force_unrelated=True)
    _sync(device)
    port_s = time.perf_counter() - t
    r = res.report.refine
    model = v1.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)

    def loss(step):
        x = torch.randint(0, cfg.vocab_size, (r["batch"], r["sample_length"]), generator=g).to(device)
        return model(input_ids=x, labels=x).loss

    base_s = _baseline(model, res.lora.modules, loss, steps, device)
    return {"model": f"{family} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params)", "refine": r, "port_s": port_s,
            "baseline_s": base_s, "ratio": r["wall_s"] / base_s}


def bench_unet(work: Path, src: str, tgt: str, steps: int, latent: int, device, dtype) -> dict:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    import lorareg
    from lora_factory import clip_tokenizer_folder, make_lora

    torch.manual_seed(0)
    for fam, name in ((src, "src"), (tgt, "tgt")):
        UNet2DConditionModel.from_config(_cfg(fam, "unet")).to(dtype).save_pretrained(work / name / "unet")
        te1 = _cfg(fam, "text_encoder")
        te2 = _cfg(fam, "text_encoder_2")
        CLIPTextModel(CLIPTextConfig(**te1)).to(dtype).save_pretrained(work / name / "text_encoder")
        CLIPTextModelWithProjection(CLIPTextConfig(**te2)).to(dtype).save_pretrained(work / name / "text_encoder_2")
        clip_tokenizer_folder(work / name / "tokenizer")
        clip_tokenizer_folder(work / name / "tokenizer_2")
    lora = make_lora(src, r"unet:.*attn[12]\.to_(q|k|v|out\.0)$", rank=16, alpha=16.0, dtype=torch.bfloat16, seed=2)
    for m in lora.modules.values():
        m.factors["up"] = type(m.factors["up"]).from_torch((m.factors["up"].torch().float() * 1e-3).to(torch.bfloat16))
    _sync(device)
    t = time.perf_counter()
    res = lorareg.port(lora, source_model=str(work / "src"), target_model=str(work / "tgt"), to=tgt, refine="distill", refine_steps=steps,
                       refine_latent_size=latent, device=str(device), progress=False, cache_dir=work / "cache", force_unrelated=True)
    _sync(device)
    port_s = time.perf_counter() - t
    r = res.report.refine
    from lorareg.refine.unet import load_unet
    from lorareg.registry import get_registry

    unet = load_unet(get_registry().family(tgt), work / "tgt", dtype).to(device)
    cfg = unet.config
    pooled = int(cfg["projection_class_embeddings_input_dim"]) - 6 * int(cfg["addition_time_embed_dim"])
    g = torch.Generator().manual_seed(0)
    b = r["batch"]

    def loss(step):
        x = torch.randn(b, 4, latent, latent, generator=g).to(device, dtype)
        ctx = torch.randn(b, 77, int(cfg["cross_attention_dim"]), generator=g).to(device, dtype)
        added = {"text_embeds": torch.randn(b, pooled, generator=g).to(device, dtype),
                 "time_ids": torch.full((b, 6), float(latent * 8), device=device, dtype=dtype)}
        t = torch.randint(0, 1000, (b,), generator=g).to(device)
        return torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample.float(), x.float())

    unet_modules = {k: m for k, m in res.lora.modules.items() if m.component == "unet"}
    base_s = _baseline(unet, unet_modules, loss, steps, device)
    return {"model": f"{src} -> {tgt} UNet ({sum(p.numel() for p in unet.parameters()) / 1e9:.2f} B params)", "refine": r,
            "port_s": port_s, "baseline_s": base_s, "ratio": r["wall_s"] / base_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", choices=["real", "tiny"], default="real")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--latent-size", type=int, default=None, help="UNet latents (default: 128 real, 8 tiny)")
    ap.add_argument("--only", choices=["lm", "unet"])
    ap.add_argument("--json", type=Path, help="also write the measurements here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # small ops on a shared CPU stall with more threads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.scale == "tiny":
        os.environ["LORAREG_DATA_PATH"] = str(ROOT / "tests" / "data")
    lm_family, src, tgt = ("tinyllama", "sdxl", "ssd-1b") if args.scale == "real" else ("tiny-llama", "tiny-xl-te", "tiny-xl-te")
    latent = args.latent_size or (128 if args.scale == "real" else 8)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "steps": args.steps}
    with tempfile.TemporaryDirectory(prefix="lorareg-bench-refine-") as tmp:
        os.environ.setdefault("LORAREG_CACHE", str(Path(tmp) / "bases"))
        if args.only in (None, "lm"):
            out["lm"] = bench_lm(Path(tmp), lm_family, args.steps, device, dtype)
        if args.only in (None, "unet"):
            out["unet"] = bench_unet(Path(tmp), src, tgt, args.steps, latent, device, dtype)
    for part in ("lm", "unet"):
        if part in out:
            o, r = out[part], out[part]["refine"]
            print(f"{part}: {o['model']} on {out['device']}: refine {r['wall_s']:.1f} s ({r['steps']} steps, sampling {r['sample_s']:.1f} s, "
                  f"{r.get('dtype', 'model dtype')}) vs {args.steps} steps of plain LoRA training {o['baseline_s']:.1f} s: {o['ratio']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
