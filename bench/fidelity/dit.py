"""DiT pairs: a tiny flow-matching HunyuanVideoTransformer3DModel on short clips of scikit-learn's digits.

The clips: 3 frames of an 8×8 digit moving one pixel per frame (v1's data: to the right); no VAE, the
latents are the pixels in [-1, 1] (1 channel, one latent frame per frame). No text encoder: each class
0-9 has a fixed random text sequence, mask and pooled vector (the "prompts", given as tensors).
Rectified flow: x_σ = (1 − σ)·x0 + σ·noise, target velocity noise − x0, σ = s·u / (1 + (s − 1)·u)
with u uniform and the family's shift s; the transformer's timestep is σ × 1000.

v1: text-to-video from scratch. v2 (checkpoint upgrade): v1 trained further on a shifted mix (start
position jittered by a pixel, classes 5-9 three times as often). i2v: v1 turned into an image-to-video
model like HunyuanVideo-I2V-33ch (x_embedder widened with zero columns to 2C+1 channels: noisy latents,
the clean first frame repeated on every frame, a first-frame mask) and fine-tuned with the first frame
given. unrelated: v1's recipe from another seed (negative control). The task LoRA learns another motion:
the digit moves down instead of right.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import lorareg

from common import LoraHooks, deltas_of, digits, fit, gain, port, weight_change, with_deltas

FAMILY, I2V_FAMILY = "fid-dit", "fid-dit-i2v"
_FAM = Path(__file__).parent / "data/schemas/families"
_DOC = json.loads((_FAM / f"{FAMILY}.json").read_text())
CONFIG = _DOC["components"]["transformer"]["architecture"]["config"]
I2V_CONFIG = {**CONFIG, **json.loads((_FAM / f"{I2V_FAMILY}.json").read_text())["config_overrides"]["transformer"]}
SHIFT = float(_DOC["diffusion"]["noise_schedule"]["shift"])
C = CONFIG["in_channels"]
FRAMES, SIZE, TEXT_LEN = 3, 8, 4
#: motion per frame (dy, dx): the base models' clips move right, the task LoRA's clips move down
BASE_MOTION, TASK_MOTION = (0, 1), (1, 0)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
#: the distill rows' step budget on the negative control (forced past the refusal)
UNRELATED_STEPS = 100
#: retrainings timed per target (the median is the time ratios' denominator)
RETRAIN_REPEATS = 3


@dataclass
class Budget:
    v1_steps: int = 1200
    v2_steps: int = 300
    i2v_steps: int = 400
    lora_steps: int = 200
    batch: int = 32
    lr: float = 2e-3
    lora_lr: float = 3e-3
    rank: int = 4
    alpha: float = 4.0
    eval_repeats: int = 4
    ceiling_steps: int = 400
    refine_samples: Optional[int] = None  # None: lorareg's default for transformers (32)


TINY = Budget(v1_steps=6, v2_steps=3, i2v_steps=3, lora_steps=3, batch=8, eval_repeats=1, ceiling_steps=3, refine_samples=4)


# ------------------------------------------------------------------ data


def shift_images(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """[N, 1, 8, 8] images each moved by (dy, dx) pixels (|d| ≤ 3), filled with background."""
    p = 3
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    out = torch.empty_like(x)
    for a, b in {(int(a), int(b)) for a, b in zip(dy, dx)}:
        sel = (dy == a) & (dx == b)
        out[sel] = padded[sel, :, p - a : p - a + SIZE, p - b : p - b + SIZE]
    return out


def clips(x: torch.Tensor, motion: tuple[int, int], start: torch.Tensor | None = None) -> torch.Tensor:
    """[N, 1, 8, 8] digits -> [N, 1, FRAMES, 8, 8] clips moving ``motion`` pixels per frame from ``start`` ([N, 2])."""
    start = torch.zeros(len(x), 2, dtype=torch.long) if start is None else start
    frames = [shift_images(x, start[:, 0] + k * motion[0], start[:, 1] + k * motion[1]) for k in range(FRAMES)]
    return torch.stack(frames, dim=2)


def conditions() -> dict[str, torch.Tensor]:
    """The ten classes' "prompts": a fixed random text sequence [10, L, D], its mask [10, L] and a pooled vector [10, D']."""
    g = torch.Generator().manual_seed(1234)
    return {"text": torch.randn(10, TEXT_LEN, CONFIG["text_embed_dim"], generator=g),
            "text_mask": torch.ones(10, TEXT_LEN, dtype=torch.long),
            "pooled": torch.randn(10, CONFIG["pooled_projection_dim"], generator=g)}


def sigmas(u: torch.Tensor) -> torch.Tensor:
    return SHIFT * u / (1 + (SHIFT - 1) * u)


class Batches:
    """Random clips (with their class, σ and noise) from a digit set, a motion and optional start jitter / class weights."""

    def __init__(self, x, y, batch, seed, motion=BASE_MOTION, weights=None, jitter=False):
        self.x, self.y, self.batch, self.motion, self.jitter = x, y, batch, motion, jitter
        self.g = torch.Generator().manual_seed(seed)
        self.w = torch.ones(len(y)) if weights is None else weights

    def __call__(self):
        i = torch.multinomial(self.w, self.batch, replacement=True, generator=self.g)
        start = torch.randint(-1, 2, (self.batch, 2), generator=self.g) if self.jitter else None
        x0 = clips(self.x[i], self.motion, start)
        s = sigmas(torch.rand(self.batch, generator=self.g))
        noise = torch.randn(x0.shape, generator=self.g)
        return x0, self.y[i], s, noise


# ------------------------------------------------------------------ models


def new_dit(config=CONFIG, seed=0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel.from_config(config)


def model_input(x0, s, noise, i2v: bool) -> torch.Tensor:
    """x_σ, and for the I2V model the HunyuanVideo-I2V-33ch channels [x_σ, clean first frame on every frame, first-frame mask]."""
    xs = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * noise
    if not i2v:
        return xs
    image = x0[:, :, :1].expand_as(x0)
    mask = torch.zeros_like(x0[:, :1])
    mask[:, :, 0] = 1.0
    return torch.cat([xs, image, mask], dim=1)


def velocity(model, x_in, s, y, cond) -> torch.Tensor:
    return model(hidden_states=x_in, timestep=s * 1000.0, encoder_hidden_states=cond["text"][y],
                 encoder_attention_mask=cond["text_mask"][y], pooled_projections=cond["pooled"][y]).sample


def train(model, params, batches: Batches, steps: int, lr: float, i2v: bool = False, teacher=None, warmup: int = 20) -> float:
    """Flow matching (MSE to noise − x0, all frames); with ``teacher``: MSE to the teacher's velocity on the T2V input instead."""
    cond = conditions()

    def loss_at() -> torch.Tensor:
        x0, y, s, noise = batches()
        pred = velocity(model, model_input(x0, s, noise, i2v), s, y, cond)
        if teacher is None:
            target = noise - x0
        else:
            with torch.no_grad():
                target = velocity(teacher, model_input(x0, s, noise, False), s, y, cond)
        return F.mse_loss(pred, target)

    return fit(model, params, loss_at, steps, lr, warmup)


def widen_to_i2v(v1) -> torch.nn.Module:
    """The I2V model initialised from v1: every weight copied, x_embedder.proj widened with zeros for the image and mask channels."""
    i2v = new_dit(I2V_CONFIG, seed=0)
    src, dst = v1.state_dict(), i2v.state_dict()
    for k, w in dst.items():
        if k == "x_embedder.proj.weight":
            w.zero_()
            w[:, :C] = src[k]
        else:
            dst[k] = src[k].clone()
    i2v.load_state_dict(dst)
    return i2v


def save_dit(model, folder: Path) -> None:
    model.save_pretrained(folder / "transformer")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": SHIFT}, indent=1) + "\n")


def load_dit(folder: Path):
    from diffusers import HunyuanVideoTransformer3DModel

    m = HunyuanVideoTransformer3DModel.from_pretrained(folder / "transformer")
    m.eval()
    return m


def lora_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and n.startswith(("transformer_blocks.", "single_transformer_blocks.")) and n.endswith(LORA_TARGETS)]


def train_lora(model, batches: Batches, b: Budget, seed: int, i2v: bool = False, teacher=None, steps=None, init=None) -> LoraHooks:
    """The task LoRA recipe (rank b.rank on the blocks' attention / feed-forward linears); ``init``: a LoRA to start from."""
    for p in model.parameters():
        p.requires_grad_(False)
    hooks = LoraHooks(model, lora_names(model), b.rank, b.alpha, seed)
    if init is not None:
        with torch.no_grad():
            for m in init.modules.values():
                if m.name in hooks.A:
                    down, up = m.factors["down"].float(), m.factors["up"].float()
                    scale = m.scale / hooks.scale
                    hooks.A[m.name].copy_(down)
                    hooks.B[m.name].copy_(up * scale)
    train(model, hooks.parameters(), batches, steps or b.lora_steps, b.lora_lr, i2v=i2v, teacher=teacher, warmup=10)
    hooks.remove()
    for p in model.parameters():
        p.requires_grad_(True)
    return hooks


# ------------------------------------------------------------------ build


def build(root: Path, b: Budget, log) -> dict:
    t0 = time.perf_counter()
    d = digits()
    timings, info = {}, {}

    def timed(name, fn):
        t = time.perf_counter()
        r = fn()
        timings[name] = time.perf_counter() - t
        return r

    v1 = new_dit(seed=1)
    info["v1_final_train_loss"] = timed("train_v1_s", lambda: train(v1, list(v1.parameters()), Batches(d["x"], d["y"], b.batch, seed=31), b.v1_steps, b.lr))
    save_dit(v1, root / "v1")
    log(f"dit: v1 trained ({b.v1_steps} steps, {timings['train_v1_s']:.0f} s, last loss {info['v1_final_train_loss']:.3f})")

    v2 = new_dit(seed=1)
    v2.load_state_dict(v1.state_dict())
    w = torch.where(d["y"] >= 5, 3.0, 1.0)
    info["v2_final_train_loss"] = timed("train_v2_s", lambda: train(v2, list(v2.parameters()), Batches(d["x"], d["y"], b.batch, seed=32, weights=w, jitter=True),
                                                                     b.v2_steps, b.lr * 0.5))
    save_dit(v2, root / "v2")

    i2v = widen_to_i2v(v1)
    info["i2v_final_train_loss"] = timed("train_i2v_s", lambda: train(i2v, list(i2v.parameters()), Batches(d["x"], d["y"], b.batch, seed=33), b.i2v_steps,
                                                                       b.lr * 0.5, i2v=True))
    save_dit(i2v, root / "i2v")

    un = new_dit(seed=2)
    info["unrelated_final_train_loss"] = timed("train_unrelated_s", lambda: train(un, list(un.parameters()), Batches(d["x"], d["y"], b.batch, seed=34), b.v1_steps, b.lr))
    save_dit(un, root / "unrelated")
    log(f"dit: v2 (+{b.v2_steps} steps, shifted mix), i2v (+{b.i2v_steps} steps, first frame given) and unrelated trained")

    t = time.perf_counter()
    for name, model, fam, is_i2v in (("v1", v1, FAMILY, False), ("v2", v2, FAMILY, False), ("i2v", i2v, I2V_FAMILY, True)):
        hooks = train_lora(model, Batches(d["x"], d["y"], b.batch, seed=41, motion=TASK_MOTION), b, seed=42, i2v=is_i2v)
        lorareg.save(hooks.to_lora(fam, "transformer"), root / f"lora-{name}.safetensors", format="diffusers", force=True)
    timings["train_loras_s"] = time.perf_counter() - t
    sd1 = v1.state_dict()
    info["weight_change_v1_v2"] = weight_change(sd1, v2.state_dict())
    info["weight_change_v1_i2v"] = weight_change(sd1, i2v.state_dict())
    info["weight_change_v1_unrelated"] = weight_change(sd1, un.state_dict())
    info["timings"] = timings
    info["build_s"] = time.perf_counter() - t0
    (root / "build.json").write_text(json.dumps(info, indent=1) + "\n")  # --reuse-work reports it again
    log(f"dit: LoRAs trained ({timings['train_loras_s']:.0f} s); ‖W−W1‖/‖W1‖: v2 {info['weight_change_v1_v2']:.3f}, "
        f"i2v {info['weight_change_v1_i2v']:.3f}, unrelated {info['weight_change_v1_unrelated']:.3f}")
    return info


# ------------------------------------------------------------------ evaluation


class FlowEval:
    """Held-out velocity MSE on clips of held-out digits at fixed σ and noise; I2V: first frame given, frames 1.. scored."""

    def __init__(self, repeats: int, motion=TASK_MOTION, seed: int = 7):
        d = digits()
        g = torch.Generator().manual_seed(seed)
        self.x0 = clips(d["x_heldout"], motion).repeat(repeats, 1, 1, 1, 1)
        self.y = d["y_heldout"].repeat(repeats)
        self.s = sigmas(torch.rand(len(self.y), generator=g))
        self.noise = torch.randn(self.x0.shape, generator=g)
        self.cond = conditions()

    @torch.no_grad()
    def __call__(self, model, deltas=None, i2v: bool = False) -> float:
        frames = slice(1, None) if i2v else slice(None)
        with with_deltas(model, deltas or {}):
            total, n = 0.0, 0
            for i in range(0, len(self.y), 256):
                sl = slice(i, i + 256)
                x0, s, noise = self.x0[sl], self.s[sl], self.noise[sl]
                err = velocity(model, model_input(x0, s, noise, i2v), s, self.y[sl], self.cond) - (noise - x0)
                err = err[:, :, frames]
                total += float(err.pow(2).sum())
                n += err.numel()
        return total / n


TARGETS = {"v2": ("checkpoint upgrade", FAMILY, False), "i2v": ("T2V → I2V (latent concat, 2C+1 channels)", I2V_FAMILY, True)}


def distill_available() -> str | None:
    """None if lorareg has the DiT refiner, else why the distill rows are skipped."""
    try:
        import lorareg.refine.dit  # noqa: F401  (the flow-matching transformer refiner, issue 16)
    except ImportError:
        return "lorareg.refine.dit is not in this lorareg yet (issue 16): distill rows skipped"
    return None


def _refine_kw(b: Budget, steps: int, cache: Path) -> dict:
    return {"refine": "distill", "refine_steps": steps, "refine_conditions": conditions(), "refine_samples": b.refine_samples,
            "refine_frames": FRAMES, "refine_latent_size": SIZE, "cache_dir": cache}


#: extra distill rows (steps, label, port keywords), run when the budgets include 100: the UNets' learning rate and twice the
#: default samples on both targets, and for the I2V target the sample's own velocity as the target instead of the teacher's
_COMMON_EXTRAS = [(100, "lr 1e-3", {"refine_lr": 1e-3}), (100, "64 samples", {"refine_samples": 64})]
EXTRAS = {"v2": _COMMON_EXTRAS,
          "i2v": _COMMON_EXTRAS + [(n, "target sample", {"refine_target": "sample"}) for n in (25, 100, 200)]}


def evaluate(root: Path, b: Budget, steps_list: list[int], log) -> dict:
    """Per target: no adapter, copy, distill at each budget, retrained (timed), the teacher ceiling; then the negative control."""
    ev = FlowEval(b.eval_repeats)
    ev_base = FlowEval(b.eval_repeats, motion=BASE_MOTION, seed=8)
    d = digits()
    src_lora = lorareg.load(root / "lora-v1.safetensors", family=FAMILY)
    v1 = load_dit(root / "v1")
    teacher_deltas = deltas_of(src_lora)
    out = {"source": {"loss_none": ev(v1), "loss_lora": ev(v1, teacher_deltas)},
           "conditions": "10 classes: a fixed random text sequence [4, 16] with its mask and a pooled vector [16] each",
           "pairs": {}}
    # v1 + LoRA on frames 1.. alone (the part the I2V loss scores), for reference
    out["source"]["loss_lora_frames_1"] = _frames_loss(ev, v1, teacher_deltas)
    skip = distill_available()
    if skip and steps_list:
        log(f"dit: {skip}")
        out["distill_skipped"] = skip
    for target, (kind, fam, is_i2v) in TARGETS.items():
        model = load_dit(root / target)
        none = ev(model, i2v=is_i2v)
        retrained = lorareg.load(root / f"lora-{target}.safetensors", family=fam)
        ref = ev(model, deltas_of(retrained), i2v=is_i2v)
        # the denominator of every time ratio: the median of RETRAIN_REPEATS timed retrainings (single timings moved by ±25%)
        walls, cpus = [], []
        for _ in range(RETRAIN_REPEATS if b.v1_steps > 100 else 1):
            t, c = time.perf_counter(), time.process_time()
            train_lora(load_dit(root / target), Batches(d["x"], d["y"], b.batch, seed=41, motion=TASK_MOTION), b, seed=42, i2v=is_i2v)
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        retrain = {"wall": sorted(walls)[len(walls) // 2], "cpu": sorted(cpus)[len(cpus) // 2]}
        retrain_s = retrain["wall"]
        copy, report, copy_s = port(src_lora, root / "v1", root / target, "copy", root / "ported" / f"{target}-copy.safetensors", to=fam)
        copy_loss = ev(model, deltas_of(copy), i2v=is_i2v)
        pair = {"kind": kind, "family": fam, "loss_none": none, "loss_retrained": ref, "retrain_s": retrain_s, "retrain_cpu_s": retrain["cpu"], "retrain_walls_s": walls,
                "base_motion_loss_none": ev_base(model, i2v=is_i2v), "base_motion_loss_retrained": ev_base(model, deltas_of(retrained), i2v=is_i2v),
                "copy": {"loss": copy_loss, "gain": gain(none, copy_loss, ref), "port_s": copy_s, "ported": report.totals.ported,
                         "skipped": report.totals.skipped, "mean_similarity": report.totals.mean_similarity,
                         "base_motion_loss": ev_base(model, deltas_of(copy), i2v=is_i2v)},
                "related": report.totals.related, "related_similarity": report.totals.related_similarity}
        if not is_i2v:
            pair["loss_teacher"] = out["source"]["loss_lora"]
            pair["teacher_gain"] = gain(none, pair["loss_teacher"], ref)
        # the ceiling of distillation: the copied LoRA trained on the teacher's (v1 + LoRA) velocity on real task clips, many steps
        t = time.perf_counter()
        with with_deltas(v1, teacher_deltas):
            for p in v1.parameters():
                p.requires_grad_(False)
            hooks = train_lora(load_dit(root / target), Batches(d["x"], d["y"], b.batch, seed=43, motion=TASK_MOTION), b, seed=42,
                               i2v=is_i2v, teacher=v1, steps=b.ceiling_steps, init=copy)
        ceiling = ev(model, deltas_of(hooks.to_lora(fam, "transformer")), i2v=is_i2v)
        pair["ceiling"] = {"loss": ceiling, "gain": gain(none, ceiling, ref), "steps": b.ceiling_steps, "train_s": time.perf_counter() - t}
        pair["rows"] = [] if skip else _distill_rows(root, b, target, fam, is_i2v, src_lora, model, ev, ev_base, none, ref, retrain,
                                                    steps_list, EXTRAS.get(target, []) if 100 in steps_list else [], log)
        out["pairs"][f"v1->{target}"] = pair
        log(f"dit: v1->{target}: none {none:.4f}, retrained {ref:.4f} ({retrain_s:.1f} s), copy {100 * pair['copy']['gain']:.1f}%, "
            f"ceiling {100 * pair['ceiling']['gain']:.1f}%" + "".join(f", {r['steps']} steps {100 * r['gain']:.1f}% ({r['time_ratio']:.2f}x)"
                                                                        for r in pair["rows"]))
    out["negative"] = negative_control(root, b, src_lora, skip, log)
    return out


def _frames_loss(ev: FlowEval, model, deltas) -> float:
    """A T2V model's loss on frames 1.. only (no frame given)."""
    with torch.no_grad(), with_deltas(model, deltas):
        err = velocity(model, model_input(ev.x0, ev.s, ev.noise, False), ev.s, ev.y, ev.cond) - (ev.noise - ev.x0)
    return float(err[:, :, 1:].pow(2).mean())


def _distill_rows(root, b, target, fam, is_i2v, src_lora, model, ev, ev_base, none, ref, retrain, steps_list, extras, log) -> list[dict]:
    """The distill rows of one target. The teacher's samples are made once (a 0-step refinement into a fresh cache, timed
    whole: sampling plus loading and scoring, so a little more than the sampling) and that time is charged to every row."""
    rows = []
    cache = root / f"distill-cache-{target}"
    shutil.rmtree(cache, ignore_errors=True)
    t, c = time.perf_counter(), time.process_time()
    lorareg.port(src_lora, source_model=str(root / "v1"), target_model=str(root / target), to=fam, method="copy",
                 output=root / "ported" / f"{target}-distill-0.safetensors", force=True, progress=False, device="cpu", **_refine_kw(b, 0, cache))
    sample_wall, sample_cpu = time.perf_counter() - t, time.process_time() - c
    for steps, label, kw in [(s, "default", {}) for s in steps_list] + list(extras):
        dest = root / "ported" / f"{target}-distill-{steps}-{label.replace(' ', '-')}.safetensors"
        t, c = time.perf_counter(), time.process_time()
        res = lorareg.port(src_lora, source_model=str(root / "v1"), target_model=str(root / target), to=fam, method="copy", output=dest,
                           force=True, progress=False, device="cpu", **{**_refine_kw(b, steps, cache), **kw})
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        refined = lorareg.load(dest, family=fam)
        loss = ev(model, deltas_of(refined), i2v=is_i2v)
        r = res.report.refine
        cached = bool(r.get("samples_cached"))  # a row with other sampling settings made (and timed) its own samples
        total_s, total_cpu = (wall + sample_wall, cpu + sample_cpu) if cached else (wall, cpu)
        g = gain(none, loss, ref)
        rows.append({"steps": steps, "variant": label, "lr": r.get("lr"), "loss": loss, "gain": g, "base_motion_loss": ev_base(model, deltas_of(refined), i2v=is_i2v),
                     "mse_start": r["mse_start"], "mse_end": r["mse_end"], "target": r.get("target"), "refine_s": r["wall_s"],
                     "samples_cached": cached, "port_s": wall, "port_cpu_s": cpu, "sampling_s": sample_wall,
                     "sampling_cpu_s": sample_cpu, "refine_with_sampling_s": total_s, "refine_with_sampling_cpu_s": total_cpu,
                     "time_ratio": total_s / retrain["wall"], "cpu_ratio": total_cpu / retrain["cpu"],
                     "settings": {k: r[k] for k in ("samples", "noisings", "sampler_steps", "latent_size", "frames", "batch") if k in r}})
        log(f"dit: distill v1->{target} {steps} steps ({label}, lr {r.get('lr')}, target {r.get('target')}): gain {100 * g:.1f}%, "
            f"MSE {r['mse_start']:.4f} -> {r['mse_end']:.4f}, {total_s:.1f} s = {total_s / retrain['wall']:.2f}x retraining "
            f"(CPU {total_cpu / retrain['cpu']:.2f}x)")
    return rows


def negative_control(root: Path, b: Budget, src_lora, skip: str | None, log) -> dict:
    """The v1 LoRA ported to the unrelated DiT: flagged? does --refine distill refuse? (and, forced, what it does)."""
    ev = FlowEval(b.eval_repeats)
    model = load_dit(root / "unrelated")
    none = ev(model)
    copy, report, _ = port(src_lora, root / "v1", root / "unrelated", "copy", root / "ported" / "unrelated-copy.safetensors", to=FAMILY)
    sims = [l.similarity for l in report.layers if l.similarity is not None]
    out = {"loss_none": none, "copy_loss": ev(model, deltas_of(copy)), "related": report.totals.related,
           "related_similarity": report.totals.related_similarity, "mean_similarity": report.totals.mean_similarity,
           "layers_below_0.5": sum(1 for s in sims if s < 0.5), "layers": len(sims), "refused": None, "rows": []}
    if skip:
        log(f"dit: unrelated: related={out['related']} (similarity {out['related_similarity']}), {out['layers_below_0.5']}/{out['layers']} layers below 0.5")
        return out
    cache = root / "distill-cache-unrelated"
    try:
        lorareg.port(src_lora, source_model=str(root / "v1"), target_model=str(root / "unrelated"), to=FAMILY, method="copy",
                     output=root / "ported" / "unrelated-refused.safetensors", force=True, progress=False, device="cpu",
                     **{**_refine_kw(b, 1, cache), "refine_samples": 1})
    except Exception as e:  # noqa: BLE001 - the refusal's type is lorareg's business; its message is the result
        out["refused"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    if out["refused"]:
        steps = UNRELATED_STEPS if b.v1_steps > 100 else 2
        res = lorareg.port(src_lora, source_model=str(root / "v1"), target_model=str(root / "unrelated"), to=FAMILY, method="copy",
                           output=root / "ported" / "unrelated-forced.safetensors", force=True, progress=False, device="cpu",
                           force_unrelated=True, **_refine_kw(b, steps, cache))
        refined = lorareg.load(root / "ported" / "unrelated-forced.safetensors", family=FAMILY)
        r = res.report.refine
        out["rows"].append({"steps": steps, "loss": ev(model, deltas_of(refined)), "mse_start": r["mse_start"], "mse_end": r["mse_end"]})
    log(f"dit: unrelated: related={out['related']} (similarity {out['related_similarity']}), refused: {out['refused']}")
    return out


# ------------------------------------------------------------------ report

HEADING = "## DiT pairs: flow-matching transformer (HunyuanVideo layout), copy and `--refine distill`"


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


#: the issue's goals: (target, gain recovered at least, time ratio at most)
GOALS = {"v1->v2": (0.90, 0.5), "v1->i2v": (0.80, 0.5)}


def goal_check(name: str, p: dict) -> str:
    want, ratio = GOALS[name]
    rows = [row for row in p["rows"] if row.get("variant", "default") == "default"]
    ok = [row for row in rows if row["gain"] >= want and row["cpu_ratio"] <= ratio]
    if ok:
        row = min(ok, key=lambda row: row["steps"])
        return f"**met** at {row['steps']} steps ({_pct(row['gain'])} at {row['cpu_ratio']:.2f}× retraining's CPU time, {row['time_ratio']:.2f}× its wall time)"
    if not rows:
        return "not measured"
    fast = [row for row in rows if row["cpu_ratio"] <= ratio]
    at = max(fast, key=lambda row: row["gain"]) if fast else None
    first = min((row for row in rows if row["gain"] >= want), key=lambda row: row["steps"], default=None)
    return ("**not met**: " + (f"{_pct(at['gain'])} at {at['steps']} steps within {ratio}× ({at['cpu_ratio']:.2f}× CPU)" if at else f"no row within {ratio}×")
            + (f"; {_pct(first['gain'])} first at {first['steps']} steps, {first['cpu_ratio']:.2f}× CPU / {first['time_ratio']:.2f}× wall" if first else ""))


def markdown(r: dict) -> list[str]:
    """RESULTS.md's DiT section from results_dit.json's content."""
    b = r["budget"]
    L = [HEADING, ""]
    if r.get("tiny"):
        L += ["**Tiny variant: a few steps of everything; the numbers mean nothing.**", ""]
    L += [f"Produced by `{r.get('command', 'python bench/fidelity/run.py --only dit')}` (fixed seeds) in {r['wall_s'] / 60:.1f} min on "
          f"{r.get('threads', '?')} CPU thread(s)" + (f"; load average at the end {', '.join(f'{x:.1f}' for x in r['load_average'])}" if r.get("load_average") else "")
          + f"; torch {r.get('environment', {}).get('torch', '?')}. Models: diffusers' `HunyuanVideoTransformer3DModel` (2 double + 2 single blocks, "
          "1 refiner block, 2 heads × 16, patch 2×2, 1 latent channel) on 3-frame clips of 8×8 digits, rectified flow with shift "
          f"{SHIFT:g}; v1 {b['v1_steps']} steps, v2 = v1 + {b['v2_steps']} steps on a shifted mix, i2v = v1 widened to 3 input channels "
          f"+ {b['i2v_steps']} steps with the first frame given, unrelated = v1's recipe from another seed. Task LoRA: the digit moves down "
          f"instead of right (rank {b['rank']}, {b['lora_steps']} steps). Loss: held-out velocity MSE at fixed σ and noise (I2V: first frame "
          "given, frames 1.. scored). Gain recovered = (loss none − loss) / (loss none − loss retrained); time ratio = "
          "refinement wall time / retraining the LoRA on the target (same run, same thread; median of 3 timed retrainings). The refinement's time is the whole "
          "`lorareg.port(..., refine=\"distill\")` call with cached teacher samples plus the time of making them (a 0-step refinement "
          "into a fresh cache, timed whole, so slightly more than the sampling). Single timings on a shared machine: wall-clock ratios "
          "move between rows and runs; the CPU-time ratio (process CPU seconds) is steadier, and the goal column uses it.", ""]
    build = r.get("build", {})
    if "weight_change_v1_v2" in build:
        L += [f"‖W−W₁‖/‖W₁‖: v2 {build['weight_change_v1_v2']:.3f}, i2v {build['weight_change_v1_i2v']:.3f}, unrelated "
              f"{build['weight_change_v1_unrelated']:.3f}; training {build['build_s']:.0f} s"
              + (" (by an earlier run into the same work folder, reused here)" if build.get("reused") else "") + " "
              f"({', '.join(f'{k} {v:.0f} s' for k, v in build['timings'].items())}).", ""]
    if r.get("distill_skipped"):
        L += [f"Distill rows: **not run** ({r['distill_skipped']}).", ""]
    budgets = sorted({row["steps"] for p in r["pairs"].values() for row in p["rows"] if row.get("variant", "default") == "default"})
    L += ["| pair | kind | loss none | loss retrained | copy | " + "".join(f"distill {s} | " for s in budgets)
          + "ceiling | teacher on v1 | retrain time | × retraining at distill 100 (wall / CPU) | goal |",
          "|---|---|---|---|---|" + "---|" * len(budgets) + "---|---|---|---|---|"]
    for name, p in r["pairs"].items():
        default = {row["steps"]: row for row in p["rows"] if row.get("variant", "default") == "default"}
        want = GOALS.get(name)
        L.append(f"| DiT {name} | {p['kind']} | {p['loss_none']:.4f} | {p['loss_retrained']:.4f} | {_pct(p['copy']['gain'])} | "
                 + "".join(f"{_pct(default[s]['gain']) if s in default else ''} | " for s in budgets)
                 + f"{_pct(p['ceiling']['gain'])} | {_pct(p.get('teacher_gain'))} | {p['retrain_s']:.1f} s ({p.get('retrain_cpu_s', float('nan')):.1f} CPU-s) | "
                 + (f"{default[100]['time_ratio']:.2f} / {default[100].get('cpu_ratio', float('nan')):.2f}" if 100 in default else "–")
                 + (f" | ≥ {100 * want[0]:.0f}% at ≤ {want[1]}× (CPU): {goal_check(name, p)} |" if want else " | |"))
    L.append("")
    L += [f"Ceiling: the copied LoRA trained for {b['ceiling_steps']} steps on the teacher's (v1 + LoRA) velocity at real task clips "
          "(what the teacher's targets can teach the target at best, with real data instead of the teacher's samples); teacher on v1: "
          "v1 + LoRA scored with the target's formula (defined only for the upgrade, whose inputs are v1's). Source: v1 {:.4f} → "
          "v1 + LoRA {:.4f} (all frames), {:.4f} on frames 1...".format(r["source"]["loss_none"], r["source"]["loss_lora"],
                                                                        r["source"]["loss_lora_frames_1"]), ""]
    for name, p in r["pairs"].items():
        if not p["rows"]:
            continue
        L += [f"### DiT {name}", "", "| steps | variant | lr | target | gain recovered | task loss | base-motion loss | MSE start → end | wall time | × retraining | CPU time | × retraining (CPU) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in p["rows"]:
            L.append(f"| {row['steps']} | {row.get('variant', 'default')} | {row['lr']:g} | {row.get('target')} | {_pct(row['gain'])} | {row['loss']:.4f} | "
                     f"{row['base_motion_loss']:.4f} | {row['mse_start']:.4f} → {row['mse_end']:.4f} | {row['refine_with_sampling_s']:.1f} s | "
                     f"{row['time_ratio']:.2f} | {row.get('refine_with_sampling_cpu_s', float('nan')):.1f} s | {row.get('cpu_ratio', float('nan')):.2f} |")
        L += ["", f"Base-motion loss (clips moving right, the base models' motion; the task LoRA moves every class down, so it rises "
              f"with any LoRA: compare with the retrained one): no LoRA {p['base_motion_loss_none']:.4f}, retrained "
              f"{p.get('base_motion_loss_retrained', float('nan')):.4f}, copy {p['copy']['base_motion_loss']:.4f}. "
              f"Settings (lorareg's defaults but samples, frames, latent size): {p['rows'][0]['settings']}.", ""]
    n = r["negative"]
    L += [f"Negative control (v1's LoRA onto the unrelated DiT, copy with the bases check): `totals.related` = {n['related']}, "
          f"related similarity {n['related_similarity']}, {n['layers_below_0.5']} of {n['layers']} layers below 0.5; loss none "
          f"{n['loss_none']:.4f}, copied LoRA {n['copy_loss']:.4f}. `--refine distill`: "
          + ("not run (no DiT refiner)." if r.get("distill_skipped") else (f"refused (`{n['refused']}`)" if n["refused"] else "**not refused**")
             + "".join(f"; forced with force_unrelated, {row['steps']} steps: loss {row['loss']:.4f}, MSE {row['mse_start']:.4f} → {row['mse_end']:.4f} "
                       "(it then retrains the LoRA on v1's samples; no retrained reference exists for this pair)"
                       for row in n["rows"]) + "."), ""]
    return L
