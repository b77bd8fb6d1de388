"""Diffusion pairs: a class-conditioned UNet2DConditionModel denoiser on scikit-learn's 8×8 digits.

v1: trained on the digits; v2: v1 trained further on a shifted mix (translated digits, classes 5-9
three times as often); distilled: v2 with half of the transformer blocks of down_blocks.1 and
up_blocks.0.attentions.0 and the mid-block attention removed (like SDXL -> SSD-1B), then trained by
knowledge distillation from v2. The condition is a one-hot class vector projected by the UNet's own
``encoder_hid_proj`` and attended to by cross-attention. The task LoRA learns a style: inverted digits
(white background, dark strokes).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import lorareg

from common import LoraHooks, deltas_of, digits, fit, gain, layer_similarities, port, weight_change, with_deltas

SRC_FAMILY, DIST_FAMILY = "fid-unet", "fid-unet-distilled"
_FAM = Path(__file__).parent / "data/schemas/families"
CONFIG = json.loads((_FAM / f"{SRC_FAMILY}.json").read_text())["components"]["unet"]["architecture"]["config"]
DIST_CONFIG = json.loads((_FAM / f"{DIST_FAMILY}.json").read_text())["components"]["unet"]["architecture"]["config"]
#: which of v2's 4 transformer blocks the distilled model keeps in the shortened groups
KEPT = [1, 3]
SHORTENED = (r"down_blocks\.1\.attentions\.\d+\.transformer_blocks\.", r"up_blocks\.0\.attentions\.0\.transformer_blocks\.")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
T_TRAIN = 1000


@dataclass
class Budget:
    v1_steps: int = 800
    v2_steps: int = 250
    distill_steps: int = 300
    lora_steps: int = 200
    batch: int = 32
    lr: float = 2e-3
    lora_lr: float = 3e-3
    rank: int = 4
    alpha: float = 4.0
    eval_repeats: int = 8
    sample_steps: int = 25


TINY = Budget(v1_steps=8, v2_steps=4, distill_steps=4, lora_steps=4, batch=16, eval_repeats=1, sample_steps=4)


def invert(x: torch.Tensor) -> torch.Tensor:
    return -x


def translate(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shift each digit by up to one pixel in each direction, filling with background."""
    out = torch.full_like(x, -1.0)
    dy, dx = torch.randint(-1, 2, (2, x.shape[0]), generator=g).tolist()
    for i in range(x.shape[0]):
        src = x[i, :, max(0, -dy[i]) : 8 - max(0, dy[i]), max(0, -dx[i]) : 8 - max(0, dx[i])]
        out[i, :, max(0, dy[i]) : max(0, dy[i]) + src.shape[1], max(0, dx[i]) : max(0, dx[i]) + src.shape[2]] = src
    return out


def alphas_cumprod() -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=T_TRAIN, beta_schedule="squaredcos_cap_v2").alphas_cumprod


def noisy(x0, t, noise, ac):
    a = ac[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def cond(y: torch.Tensor) -> torch.Tensor:
    return F.one_hot(y, 10).float()[:, None, :]


class Batches:
    def __init__(self, x, y, batch, seed, weights=None, shift=False):
        self.x, self.y, self.batch, self.shift = x, y, batch, shift
        self.g = torch.Generator().manual_seed(seed)
        self.w = torch.ones(len(y)) if weights is None else weights

    def __call__(self):
        i = torch.multinomial(self.w, self.batch, replacement=True, generator=self.g)
        x = self.x[i]
        if self.shift:
            x = translate(x, self.g)
        t = torch.randint(0, T_TRAIN, (self.batch,), generator=self.g)
        noise = torch.randn(x.shape, generator=self.g)
        return x, self.y[i], t, noise


def new_unet(config=CONFIG, seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(config)


def train(model, params, batches: Batches, steps: int, lr: float, teacher=None, warmup: int = 20) -> float:
    ac = alphas_cumprod()

    def loss_at() -> torch.Tensor:
        x0, y, t, noise = batches()
        xt = noisy(x0, t, noise, ac)
        pred = model(xt, t, encoder_hidden_states=cond(y)).sample
        loss = F.mse_loss(pred, noise)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(xt, t, encoder_hidden_states=cond(y)).sample
            loss = 0.5 * loss + 0.5 * F.mse_loss(pred, target)
        return loss

    return fit(model, params, loss_at, steps, lr, warmup)


def lora_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "attentions" in n and n.endswith(LORA_TARGETS)]


def train_lora(model, batches: Batches, b: Budget, seed: int) -> LoraHooks:
    for p in model.parameters():
        p.requires_grad_(False)
    hooks = LoraHooks(model, lora_names(model), b.rank, b.alpha, seed)
    train(model, hooks.parameters(), batches, b.lora_steps, b.lora_lr, warmup=10)
    hooks.remove()
    for p in model.parameters():
        p.requires_grad_(True)
    return hooks


def distilled_from(teacher) -> torch.nn.Module:
    """The distilled UNet initialised from the teacher: kept transformer blocks, everything else by name."""
    student = new_unet(DIST_CONFIG, seed=0)
    ts, ss = teacher.state_dict(), student.state_dict()
    for k in ss:
        src = k
        for group in SHORTENED:
            m = re.match(f"({group})(\\d+)(\\..*)", k)
            if m:
                src = m.group(1) + str(KEPT[int(m.group(2))]) + m.group(3)
        if src in ts and ts[src].shape == ss[k].shape:
            ss[k] = ts[src].clone()
    student.load_state_dict(ss)
    return student


def save_unet(model, folder: Path) -> None:
    model.save_pretrained(folder / "unet")


def load_unet(folder: Path):
    from diffusers import UNet2DConditionModel

    m = UNet2DConditionModel.from_pretrained(folder / "unet")
    m.eval()
    return m


def build(root: Path, b: Budget, log) -> dict:
    t0 = time.perf_counter()
    d = digits()
    timings, info = {}, {}
    t = time.perf_counter()
    v1 = new_unet(seed=1)
    info["v1_final_train_loss"] = train(v1, list(v1.parameters()), Batches(d["x"], d["y"], b.batch, seed=31), b.v1_steps, b.lr)
    save_unet(v1, root / "v1")
    timings["train_v1_s"] = time.perf_counter() - t
    log(f"diffusion: v1 trained ({b.v1_steps} steps, {timings['train_v1_s']:.0f} s, last loss {info['v1_final_train_loss']:.3f})")

    t = time.perf_counter()
    v2 = new_unet(seed=1)
    v2.load_state_dict(v1.state_dict())
    w = torch.where(d["y"] >= 5, 3.0, 1.0)
    info["v2_final_train_loss"] = train(v2, list(v2.parameters()), Batches(d["x"], d["y"], b.batch, seed=32, weights=w, shift=True), b.v2_steps, b.lr * 0.5)
    save_unet(v2, root / "v2")
    timings["train_v2_s"] = time.perf_counter() - t

    t = time.perf_counter()
    dist = distilled_from(v2)
    for p in v2.parameters():
        p.requires_grad_(False)
    info["distilled_final_train_loss"] = train(dist, list(dist.parameters()), Batches(d["x"], d["y"], b.batch, seed=33, weights=w, shift=True),
                                               b.distill_steps, b.lr * 0.5, teacher=v2)
    for p in v2.parameters():
        p.requires_grad_(True)
    save_unet(dist, root / "distilled")
    timings["train_distilled_s"] = time.perf_counter() - t
    log(f"diffusion: v2 (+{b.v2_steps} steps, shifted mix) and distilled ({b.distill_steps} distillation steps) trained")

    t = time.perf_counter()
    style = invert(d["x"])
    for name, model, fam in (("v1", v1, SRC_FAMILY), ("v2", v2, SRC_FAMILY), ("distilled", dist, DIST_FAMILY)):
        hooks = train_lora(model, Batches(style, d["y"], b.batch, seed=41), b, seed=42)
        lorareg.save(hooks.to_lora(fam, "unet"), root / f"lora-{name}.safetensors", format="diffusers", force=True)
    timings["train_loras_s"] = time.perf_counter() - t
    info["weight_change_v1_v2"] = weight_change(v1.state_dict(), v2.state_dict())
    info["timings"] = timings
    info["build_s"] = time.perf_counter() - t0
    log(f"diffusion: LoRAs trained ({timings['train_loras_s']:.0f} s); ‖W2−W1‖/‖W1‖ = {info['weight_change_v1_v2']:.3f}")
    return info


class DenoiseEval:
    """Held-out ε-prediction MSE on inverted held-out digits at fixed timesteps and noise."""

    def __init__(self, repeats: int):
        d = digits()
        g = torch.Generator().manual_seed(7)
        x0 = invert(d["x_heldout"]).repeat(repeats, 1, 1, 1)
        self.y = d["y_heldout"].repeat(repeats)
        self.t = torch.randint(0, T_TRAIN, (len(self.y),), generator=g)
        self.noise = torch.randn(x0.shape, generator=g)
        self.xt = noisy(x0, self.t, self.noise, alphas_cumprod())

    @torch.no_grad()
    def __call__(self, model, deltas=None) -> float:
        with with_deltas(model, deltas or {}):
            total = 0.0
            for i in range(0, len(self.y), 512):
                sl = slice(i, i + 512)
                pred = model(self.xt[sl], self.t[sl], encoder_hidden_states=cond(self.y[sl])).sample
                total += float(F.mse_loss(pred, self.noise[sl], reduction="sum"))
        return total / self.noise.numel()


@torch.no_grad()
def sample(model, deltas, steps: int, seed: int = 5) -> torch.Tensor:
    """One DDIM sample per class 0-9 (same starting noise for every model): [10, 8, 8] in [0, 1]."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=T_TRAIN, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    sched.set_timesteps(steps)
    x = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    c = cond(torch.arange(10))
    with with_deltas(model, deltas or {}):
        for t in sched.timesteps:
            eps = model(x, t.expand(10), encoder_hidden_states=c).sample
            x = sched.step(eps, t, x).prev_sample
    return ((x.clamp(-1, 1) + 1) / 2)[:, 0]


def evaluate(root: Path, b: Budget, methods: list[str], thresholds: list[float], log) -> dict:
    ev = DenoiseEval(b.eval_repeats)
    src_lora = lorareg.load(root / "lora-v1.safetensors", family=SRC_FAMILY)
    v1 = load_unet(root / "v1")
    out = {"source": {"loss_none": ev(v1), "loss_lora": ev(v1, deltas_of(src_lora))}, "pairs": {}, "samples": {}}
    out["samples"]["v1 + LoRA (source)"] = sample(v1, deltas_of(src_lora), b.sample_steps).tolist()
    for target, kind, fam in (("v2", "checkpoint upgrade", SRC_FAMILY), ("distilled", "distillation (SSD-1B-like)", DIST_FAMILY)):
        model = load_unet(root / target)
        none = ev(model)
        retrained = lorareg.load(root / f"lora-{target}.safetensors", family=fam)
        ref = ev(model, deltas_of(retrained))
        rows, sweeps, per_layer = {}, {}, {}
        variants = [(m, {}) for m in methods]
        if target == "distilled":
            variants.append(("copy", {"align_blocks": False}))
        ported_for_grid = None
        for method, kw in variants:
            label = method + ("" if kw.get("align_blocks", True) else " (no block alignment)")
            tag = label.replace(" ", "_").replace("(", "").replace(")", "")
            ported, report, secs = port(src_lora, root / "v1", root / target, method,
                                        root / "ported" / f"{target}-{tag}.safetensors", to=fam, **kw)
            loss = ev(model, deltas_of(ported))
            aligned = sum(1 for l in report.layers if "aligned by similarity" in l.rule and not l.skipped)
            rows[label] = {"loss": loss, "gain": gain(none, loss, ref), "ported": report.totals.ported, "skipped": report.totals.skipped,
                           "mean_similarity": report.totals.mean_similarity, "min_similarity": report.totals.min_similarity,
                           "energy_kept": report.totals.energy_kept, "aligned_layers": aligned, "port_s": secs}
            if method in ("copy", "prolora-full") and not kw:
                sims = layer_similarities(report)
                if method == "copy":
                    per_layer = sims
                    ported_for_grid = ported
                sweep = []
                for th in thresholds:
                    keep = {l.target for l in report.layers if l.target and not l.skipped and (sims.get(l.source) or 0.0) >= th}
                    loss_th = ev(model, deltas_of(ported, keep))
                    sweep.append({"threshold": th, "layers": len(keep), "loss": loss_th, "gain": gain(none, loss_th, ref)})
                sweeps[method] = sweep
        out["pairs"][f"v1->{target}"] = {"kind": kind, "loss_none": none, "loss_retrained": ref, "methods": rows,
                                          "threshold_sweep": sweeps, "layer_similarity": per_layer}
        out["samples"][f"{target}: no adapter"] = sample(model, None, b.sample_steps).tolist()
        if ported_for_grid is not None:
            out["samples"][f"{target}: ported (copy)"] = sample(model, deltas_of(ported_for_grid), b.sample_steps).tolist()
        out["samples"][f"{target}: retrained"] = sample(model, deltas_of(retrained), b.sample_steps).tolist()
        log(f"diffusion: v1->{target}: none {none:.4f}, retrained {ref:.4f}, " + ", ".join(f"{m} {100 * r['gain']:.0f}%" for m, r in rows.items()))
    return out


def evaluate_distill(root: Path, b: Budget, steps_list: list[int], log, lrs: tuple[float, ...] = (3e-4, 3e-3)) -> dict:
    """lorareg port --refine distill of lora-v1 onto v2 and the distilled UNet at several step budgets.

    The conditions are the ten one-hot class vectors (this UNet has no text encoder; they play the
    part of prompts). All other settings are lorareg's defaults. Per budget: gain recovered, the
    fraction of the teacher's own score (v1 + LoRA, read with the target's gain formula), the loss on
    plain (not inverted) held-out digits as a side-effect check, the final MSE to the teacher, and the
    wall time as a ratio to retraining the LoRA on the target (timed here with build()'s budget).
    Extra rows at 100 steps (or the largest budget) with other learning rates.
    """
    ev = DenoiseEval(b.eval_repeats)
    ev_plain = PlainEval(b.eval_repeats)
    src_lora = lorareg.load(root / "lora-v1.safetensors", family=SRC_FAMILY)
    v1 = load_unet(root / "v1")
    teacher_loss = ev(v1, deltas_of(src_lora))
    del v1
    conditions = cond(torch.arange(10))
    d = digits()
    out = {"conditions": "10 one-hot class vectors", "pairs": {}}
    for target, kind, fam in (("v2", "checkpoint upgrade", SRC_FAMILY), ("distilled", "distillation (SSD-1B-like)", DIST_FAMILY)):
        model = load_unet(root / target)
        none = ev(model)
        ref = ev(model, deltas_of(lorareg.load(root / f"lora-{target}.safetensors", family=fam)))
        t = time.perf_counter()
        train_lora(load_unet(root / target), Batches(invert(d["x"]), d["y"], b.batch, seed=41), b, seed=42)
        retrain_s = time.perf_counter() - t
        teacher_gain = gain(none, teacher_loss, ref)
        pair = {"kind": kind, "loss_none": none, "loss_retrained": ref, "loss_teacher": teacher_loss, "teacher_gain": teacher_gain,
                "retrain_s": retrain_s, "plain_loss_none": ev_plain(model), "rows": []}
        copy, _, _ = port(src_lora, root / "v1", root / target, "copy", root / "ported" / f"{target}-copy-d.safetensors", to=fam)
        copy_loss = ev(model, deltas_of(copy))
        pair["copy"] = {"loss": copy_loss, "gain": gain(none, copy_loss, ref), "plain_loss": ev_plain(model, deltas_of(copy))}
        cache = root / "distill-cache"
        sample_s = 0.0  # the teacher's latents are made once; later rows read them from the cache, and every row is charged for them
        lr_steps = 100 if 100 in steps_list else steps_list[-1]
        for steps, lr in [(s, None) for s in steps_list] + [(lr_steps, lr) for lr in lrs]:
            dest = root / "ported" / f"{target}-distill-{steps}-{lr or 'default'}.safetensors"
            t = time.perf_counter()
            res = lorareg.port(src_lora, source_model=str(root / "v1"), target_model=str(root / target), to=fam, output=dest, force=True,
                               progress=False, device="cpu", refine="distill", refine_steps=steps, refine_lr=lr,
                               refine_conditions=conditions, cache_dir=cache)
            wall = time.perf_counter() - t
            refined = lorareg.load(dest, family=fam)
            loss = ev(model, deltas_of(refined))
            r = res.report.refine
            if not r["samples_cached"]:
                sample_s = r["sample_s"]
            total_s = r["wall_s"] + (sample_s if r["samples_cached"] else 0.0)
            g = gain(none, loss, ref)
            pair["rows"].append({"steps": steps, "lr": r["lr"], "loss": loss, "gain": g, "teacher_fraction": g / teacher_gain,
                                 "plain_loss": ev_plain(model, deltas_of(refined)), "mse_start": r["mse_start"], "mse_end": r["mse_end"],
                                 "refine_s": r["wall_s"], "sample_s": r["sample_s"], "samples_cached": r["samples_cached"],
                                 "port_s": wall, "refine_with_sampling_s": total_s, "time_ratio": total_s / retrain_s,
                                 "settings": {k: r[k] for k in ("samples", "noisings", "sampler_steps", "latent_size", "batch", "guidance")}})
            log(f"diffusion: distill v1->{target} {steps} steps lr {r['lr']:g}: gain {100 * g:.1f}% (copy {100 * pair['copy']['gain']:.1f}%), "
                f"MSE {r['mse_start']:.4f} -> {r['mse_end']:.4f}, {total_s:.1f} s = {total_s / retrain_s:.2f}x retraining")
        out["pairs"][f"v1->{target}"] = pair
    return out


class PlainEval(DenoiseEval):
    """Held-out ε-prediction MSE on plain (not inverted) digits: what the style LoRA should leave alone."""

    def __init__(self, repeats: int):
        d = digits()
        g = torch.Generator().manual_seed(8)
        x0 = d["x_heldout"].repeat(repeats, 1, 1, 1)
        self.y = d["y_heldout"].repeat(repeats)
        self.t = torch.randint(0, T_TRAIN, (len(self.y),), generator=g)
        self.noise = torch.randn(x0.shape, generator=g)
        self.xt = noisy(x0, self.t, self.noise, alphas_cumprod())
