"""Time one `--refine distill` step on a real flow-matching transformer's shapes (random weights).

For each family the transformer is built from the family's real config (diffusers class, random init, bf16 on
CUDA / fp32 on CPU), a rank-16 LoRA is put on every attention projection through lorareg's own hooks
(lorareg.refine.hooks.TrainableLora), and three things are timed with lorareg's own call path
(lorareg.refine.dit.Denoiser, from the family's `diffusion.denoiser` data):
  * a teacher sampling step (one forward, no grad; classifier-free guidance doubles it where the family uses it),
  * a student distillation step (forward + backward + AdamW, gradient checkpointing on CUDA),
  * the same step of plain LoRA training on random data: what retraining costs per step (the ratio should be ~1).
Peak accelerator memory is reported. `--layers N` keeps N double and N single blocks (the widths stay real),
for a CPU check of the script.

    python bench/bench_refine_dit.py --device cuda                                   # HunyuanVideo and Wan 2.1 14B, 3 x 16 x 16 latents
    python bench/bench_refine_dit.py --device cuda --frames 9 --latent 60x104        # 33 frames at 480x832
    python bench/bench_refine_dit.py --device cpu --layers 1 --families hunyuan-video # the script on a CPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

LAYER_KEYS = ("num_layers", "num_single_layers")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _build(family, layers, device, dtype):
    import diffusers

    comp = family.components[family.spec.diffusion.denoiser.component]
    cfg = dict(comp.spec.architecture.config)
    if layers:
        cfg.update({k: min(layers, cfg[k]) for k in LAYER_KEYS if k in cfg})
    cls = getattr(diffusers, comp.spec.architecture.class_)
    with torch.device("meta"):
        model = cls.from_config(cfg)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    model = model.to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, cfg


def _lora(model, family_id, rank):
    from lorareg.core.io import LazyTensor
    from lorareg.core.lora import Module

    mods = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            out_f, in_f = m.weight.shape
            factors = {"down": LazyTensor.from_torch(torch.randn(rank, in_f) * 0.01), "up": LazyTensor.from_torch(torch.zeros(out_f, rank))}
            mods[f"transformer:{name}"] = Module(name=name, component="transformer", kind="lora", factors=factors, alpha=float(rank))
    return mods


def bench_family(family_id: str, args, device, dtype) -> dict:
    from lorareg.refine.dit import Denoiser
    from lorareg.refine.hooks import TrainableLora
    from lorareg.registry import get_registry

    fam = get_registry().family(family_id)
    spec = fam.spec.diffusion.denoiser
    model, cfg = _build(fam, args.layers, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    den = Denoiser(model, spec)
    h, w = args.latent
    frames = args.frames if spec.latents == "video" else 1
    x = torch.randn(1, spec.latent_channels, frames, h, w, device=device, dtype=dtype)
    sigma = torch.tensor([0.7], device=device)
    text_dim = int(cfg.get("text_embed_dim") or cfg.get("text_dim") or cfg.get("joint_attention_dim"))
    cond = {"text": torch.randn(1, args.text_len, text_dim, device=device, dtype=dtype),
            "text_mask": torch.ones(1, args.text_len, device=device, dtype=dtype)}
    if cfg.get("pooled_projection_dim"):
        cond["pooled"] = torch.randn(1, int(cfg["pooled_projection_dim"]), device=device, dtype=dtype)
    first = x[:, :, :1] if spec.image_condition is not None else None
    cfg_scale = spec.classifier_free_guidance
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def teacher_step():
        with torch.no_grad():
            for _ in range(2 if cfg_scale != 1.0 else 1):
                den(x, sigma, cond, first)

    hooks = TrainableLora(model, _lora(model, family_id, args.rank), device)
    if device.type == "cuda":
        model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(hooks.parameters(), lr=1e-4)
    target = torch.randn_like(x).float()

    def student_step():
        loss = F.mse_loss(den(x, sigma, cond, first).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def plain_step():  # retraining: the same LoRA on a noisy latent of random data, flow-matching loss
        x0 = torch.randn_like(x)
        noise = torch.randn_like(x)
        xt = (1 - 0.7) * x0 + 0.7 * noise
        loss = F.mse_loss(den(xt, sigma, cond, first).float(), (noise - x0).float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = {"family": family_id, "params_b": round(params / 1e9, 3), "latent": [frames, h, w], "text_len": args.text_len,
           "layers": {k: cfg[k] for k in LAYER_KEYS if k in cfg}, "dtype": str(dtype).replace("torch.", ""),
           "lora_modules": len(hooks.params), "cfg_forwards": 2 if cfg_scale != 1.0 else 1}
    for name, fn in (("teacher_step_s", teacher_step), ("distill_step_s", student_step), ("retrain_step_s", plain_step)):
        fn()  # warm-up
        _sync(device)
        t = time.perf_counter()
        for _ in range(args.repeat):
            fn()
        _sync(device)
        out[name] = round((time.perf_counter() - t) / args.repeat, 4)
    out["distill_vs_retrain"] = round(out["distill_step_s"] / out["retrain_step_s"], 3)
    if device.type == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    hooks.remove()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="hunyuan-video,wan2.1-t2v-14b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, help="keep this many double and single blocks (CPU check); default all")
    ap.add_argument("--frames", type=int, default=3, help="latent frames (video)")
    ap.add_argument("--latent", default="16x16", help="latent H x W")
    ap.add_argument("--text-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.latent = tuple(int(v) for v in args.latent.lower().split("x"))
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = [bench_family(f, args, device, dtype) for f in args.families.split(",")]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"device {device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    print("| family | params (B) | latent F×H×W | teacher step | distill step | retrain step | distill / retrain | peak GiB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['family']} | {r['params_b']} | {'×'.join(map(str, r['latent']))} | {r['teacher_step_s']:.3f} s | "
              f"{r['distill_step_s']:.3f} s | {r['retrain_step_s']:.3f} s | {r['distill_vs_retrain']:.2f} | {r.get('peak_gib', '-')} |")


if __name__ == "__main__":
    main()
