"""lorareg port --refine distill on diffusion UNets: tiny SDXL-like -> SSD-like pair, a text-conditioned pipeline, refusals.

The noise schedule and sampler are checked against diffusers' own schedulers.
"""

import hashlib
import json

import pytest
import torch
from click.testing import CliRunner

import lorareg
from lorareg.apps.cli.main import main
from lorareg.core.errors import InputError
from lorareg.registry import get_registry
from lora_factory import clip_tokenizer_folder, make_lora, ssd_like, tiny_family_config

pytestmark = pytest.mark.usefixtures("tiny_families")
pytest.importorskip("diffusers")
KEPT = [0, 2, 5]  # the SSD-like UNet keeps these of the SDXL-like UNet's 6 blocks per attention
ATTN = r"unet:.*attn[12]\.to_(q|k|v|out\.0)$"
FAST = dict(refine="distill", refine_steps=8, refine_samples=4, refine_noisings=2, refine_sampler_steps=2, refine_batch=4,
            progress=False, device="cpu")


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = tmp_path_factory.mktemp("refine-unets")
    torch.manual_seed(0)
    cfg = lambda fid, c="unet": tiny_family_config(fid, c)  # noqa: E731
    sdxl = UNet2DConditionModel.from_config(cfg("tiny-sdxl"))
    sdxl.save_pretrained(root / "sdxl" / "unet")
    ssd = ssd_like(sdxl, UNet2DConditionModel.from_config(cfg("tiny-ssd")), KEPT)
    ssd.save_pretrained(root / "ssd" / "unet")
    # a text-conditioned pipeline (two CLIP encoders, SDXL-style pooled + size conditioning), v2 = v1 moved a little
    for name in ("xl-v1", "xl-v2"):
        torch.manual_seed(1)
        unet = UNet2DConditionModel.from_config(cfg("tiny-xl-te"))
        te1 = CLIPTextModel(CLIPTextConfig(**cfg("tiny-xl-te", "text_encoder")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg("tiny-xl-te", "text_encoder_2")))
        if name == "xl-v2":
            torch.manual_seed(2)
            for model in (unet, te1, te2):
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.02 * p.std().nan_to_num() * torch.randn_like(p))
        unet.save_pretrained(root / name / "unet")
        te1.save_pretrained(root / name / "text_encoder")
        te2.save_pretrained(root / name / "text_encoder_2")
        clip_tokenizer_folder(root / name / "tokenizer")
        clip_tokenizer_folder(root / name / "tokenizer_2")
    return root


def _small(lora, factor=0.05):
    """Shrink a random LoRA so that it changes the UNet's output without swamping it."""
    for m in lora.modules.values():
        m.factors["up"] = type(m.factors["up"]).from_torch(m.factors["up"].torch() * factor)
    return lora


@pytest.fixture()
def sdxl_lora(tmp_path):
    lora = _small(make_lora("tiny-sdxl", ATTN, rank=4, alpha=4.0, dtype=torch.float32, seed=3))
    path = tmp_path / "style.safetensors"
    lorareg.save(lora, path, format="kohya")
    return path


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sdxl_to_ssd_distill_through_the_resolved_pairs(unets, sdxl_lora, tmp_path):
    before = _sha(sdxl_lora)
    kw = dict(source_model=str(unets / "sdxl"), target_model=str(unets / "ssd"), to="tiny-ssd", cache_dir=tmp_path / "cache")
    copy = lorareg.port(sdxl_lora, **kw, progress=False, device="cpu")
    res = lorareg.port(sdxl_lora, **kw, output=tmp_path / "refined.safetensors", **FAST)
    r = res.report.refine
    assert r["model"] == "diffusion unet" and r["loss"] == "mse" and r["steps"] == 8
    assert r["mse_end"] < r["mse_start"]
    assert r["prompts_from"].startswith("the empty prompt") and r["latent_size"] == 8
    assert not r["samples_cached"] and r["device"] == "cpu" and r["dtype"] == "float32"
    assert "MSE" in res.summary and "refined (distill, 8 steps" in res.summary
    # the same modules as the training-free port, now with trained factors; the input is untouched
    out = lorareg.load(tmp_path / "refined.safetensors")
    assert out.family == "tiny-ssd" and set(out.modules) == set(copy.lora.modules)
    changed = [k for k, m in out.modules.items() if not torch.equal(m.factors["up"].torch(), copy.lora.modules[k].factors["up"].torch())]
    assert changed
    assert _sha(sdxl_lora) == before
    report = json.loads((tmp_path / "refined.report.json").read_text())
    assert report["refine"]["mse_end"] == r["mse_end"]
    from lorareg.hub.card import CardInfo, build_card

    card = build_card(res.report.model_dump(), CardInfo(repo_id="me/style-ssd", weight_name="refined.safetensors", output_format="kohya/default"))
    assert "distillation MSE" in card and f"{r['mse_end']:.4f}" in card and "teacher latents of 8x8" in card
    # deterministic, and the teacher's latents come from the cache the second time
    again = lorareg.port(sdxl_lora, **kw, **FAST)
    assert again.report.refine["samples_cached"] and again.report.refine["mse_end"] == r["mse_end"]


def test_text_conditioned_pipeline_uses_the_loras_trigger_and_tags(unets, tmp_path):
    lora = _small(make_lora("tiny-xl-te", r"unet:.*attn2\.to_(k|v)$|text_encoder:.*self_attn\.q_proj$", rank=2, alpha=2.0,
                            dtype=torch.float32, seed=4))
    lora.metadata = {"ss_tag_frequency": json.dumps({"10_sks dog": {"sks dog": 12, "grass": 5, "sky": 3, "running": 2}})}
    src = tmp_path / "dog.safetensors"
    lorareg.save(lora, src, format="kohya")
    kw = dict(source_model=str(unets / "xl-v1"), target_model=str(unets / "xl-v2"), cache_dir=tmp_path / "cache")
    res = lorareg.port(src, **kw, output=tmp_path / "out.safetensors", **{**FAST, "refine_steps": 10})
    r = res.report.refine
    assert r["prompts_from"] == "trigger phrase + ss_tag_frequency" and r["prompts"] == 4
    assert r["mse_end"] < r["mse_start"]
    # only UNet factors train; the text encoder's modules are the training-free port's, bit for bit
    out = lorareg.load(tmp_path / "out.safetensors", family="tiny-xl-te")
    copy = lorareg.port(src, **kw, progress=False, device="cpu").lora
    te = [k for k in out.modules if k.startswith("text_encoder:")]
    assert te and all(torch.equal(out.modules[k].factors["up"].torch(), copy.modules[k].factors["up"].torch()) for k in te)


def test_cli_refine_unet_with_prompts(unets, tmp_path):
    lora = _small(make_lora("tiny-xl-te", r"unet:.*attn2\.to_(k|v)$", rank=2, alpha=2.0, dtype=torch.float32, seed=5))
    src = tmp_path / "style.safetensors"
    lorareg.save(lora, src, format="diffusers")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\nwatercolor, sky\n")
    res = CliRunner().invoke(main, ["port", str(src), "--source-model", str(unets / "xl-v1"), "--target-model", str(unets / "xl-v2"),
                                    "-o", str(tmp_path / "out.safetensors"), "--refine", "distill", "--steps", "3", "--samples", "2",
                                    "--sampler-steps", "2", "--noisings", "1", "--latent-size", "8", "--prompts", str(prompts),
                                    "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)["refine"]
    assert r["prompts_from"] == "--prompts" and r["prompts"] == 2 and r["steps"] == 3
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    res = CliRunner().invoke(main, ["port", str(src), "--source-model", str(unets / "xl-v1"), "--target-model", str(unets / "xl-v2"),
                                    "-o", str(tmp_path / "o2.safetensors"), "--refine", "distill", "--prompts", str(empty)])
    assert res.exit_code != 0 and "no prompts" in res.output and "Traceback" not in res.output


def test_sd15_to_sdxl_is_refused_with_the_reason(tmp_path):
    lora = make_lora("tiny-sd15", ATTN, rank=2)
    with pytest.raises(InputError, match="latent spaces differ"):
        lorareg.port(lora, to="tiny-sdxl", source_model=str(tmp_path), target_model=str(tmp_path), **FAST)


def test_refusals_between_real_families():
    from lorareg.refine.checks import check_pair

    reg = get_registry()
    fam = reg.family
    assert check_pair("distill", fam("sdxl"), fam("ssd-1b")) == "unet"
    assert check_pair("distill", fam("sdxl"), fam("segmind-vega")) == "unet"
    assert check_pair("distill", fam("tinyllama"), fam("tinyllama")) == "lm"
    with pytest.raises(InputError, match="latent spaces differ"):
        check_pair("distill", fam("sd15"), fam("sdxl"))
    with pytest.raises(InputError, match="text encoders differ"):
        check_pair("distill", fam("sd15"), fam("sd21"))
    assert check_pair("distill", fam("hunyuan-video"), fam("hunyuan-video")) == "dit"  # tests/test_refine_dit.py
    with pytest.raises(InputError, match="none of these"):
        check_pair("distill", fam("sdxl"), fam("flux.1-dev"))
    with pytest.raises(InputError, match="unknown refinement"):
        check_pair("sharpen", fam("sdxl"), fam("sdxl"))


def test_unet_without_a_diffusers_folder_is_refused(sdxl_lora, tmp_path, unets):
    single = tmp_path / "single"
    (single / "unet").mkdir(parents=True)
    (single / "unet" / "diffusion_pytorch_model.safetensors").write_bytes((unets / "ssd" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(InputError, match="no config.json"):
        lorareg.port(sdxl_lora, source_model=str(unets / "sdxl"), target_model=str(single), to="tiny-ssd", cache_dir=tmp_path / "c", **FAST)


# ---------------------------------------------------------------- schedule and sampler against diffusers


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(schedule):
    from diffusers import DDPMScheduler

    from lorareg.refine.noise import Schedule, alphas_cumprod

    ours = alphas_cumprod(Schedule(num_train_timesteps=1000, beta_schedule=schedule, beta_start=0.00085, beta_end=0.012,
                                   prediction_type="epsilon", source="test"))
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule, beta_start=0.00085, beta_end=0.012).alphas_cumprod
    assert torch.allclose(ours.float(), theirs.float(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_sampler_matches_diffusers(prediction):
    from diffusers import DDIMScheduler

    from lorareg.refine.noise import Schedule, alphas_cumprod, ddim_sample

    s = Schedule(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 prediction_type=prediction, source="test")
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.3

    def model(x, t):  # any deterministic function of (x, t) will do
        return torch.tanh(torch.einsum("ij,bjhw->bihw", w, x)) * (1 + t.view(-1, 1, 1, 1).float() / 1000)

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = ddim_sample(model, noise, 7, s, alphas_cumprod(s))
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading", prediction_type=prediction)
    sched.set_timesteps(7)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(2)), t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-4)


def test_scheduler_config_in_the_model_folder_wins(tmp_path):
    from lorareg.refine.noise import read_schedule

    spec = get_registry().family("sd21").spec.diffusion
    assert read_schedule(tmp_path, spec).prediction_type == "v_prediction"
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon", "beta_schedule": "scaled_linear"}))
    s = read_schedule(tmp_path, spec)
    assert s.prediction_type == "epsilon" and s.source.endswith("scheduler_config.json")
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "exp"}))
    with pytest.raises(InputError, match="not supported"):
        read_schedule(tmp_path, spec)


def test_prompts_from_metadata():
    from lorareg.refine.conditioning import metadata_prompts

    meta = {"modelspec.trigger_phrase": "ohwx", "ss_tag_frequency": json.dumps({"5_ohwx man": {"ohwx man": 9, "beard": 4, "hat": 1}})}
    prompts, source = metadata_prompts(meta, 6, seed=0)
    assert source == "trigger phrase + ss_tag_frequency" and len(prompts) == 6
    assert {p.split(", ")[0] for p in prompts} == {"ohwx", "ohwx man"}
    assert prompts == metadata_prompts(meta, 6, seed=0)[0]
    assert metadata_prompts({"ss_tag_frequency": "not json"}, 3, seed=0) == ([], "none in the LoRA's metadata")
