"""lorareg port --refine distill on flow-matching transformers: HunyuanVideo T2V -> I2V (both conditionings),
Wan 2.1 -> 2.2 (two experts), FLUX.1 -> Chroma, text encoders run from the family data, refusals.

Tiny configs of the real diffusers classes are registered as variants of the real families (tests/tiny_video.py),
so the real diffusion data (schedules, call specs, image conditioning, experts) is what runs. The flow schedule is
checked against diffusers' own FlowMatchEulerDiscreteScheduler.
"""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorareg
from lorareg.core.errors import InputError
from lorareg.refine import check_pair
from lorareg.refine.flow import sampling_sigmas
from lorareg.registry import get_registry
from lora_factory import clip_tokenizer_folder, make_lora
from tiny_video import ROOT, tiny_config, tiny_registry

diffusers = pytest.importorskip("diffusers")

HV, WAN, FLUX, CHROMA = (tiny_config(kind, layers=1) for kind in ("hv", "wan", "flux", "chroma"))
ATTN = r"transformer:.*attn\.to_(q|k|v)$"
FAST = dict(refine="distill", refine_steps=6, refine_samples=2, refine_noisings=2, refine_sampler_steps=2, refine_batch=2,
            refine_latent_size=4, refine_frames=2, progress=False, device="cpu", method="copy")


def _clip_text_diffusion() -> dict:
    """HunyuanVideo's diffusion data with its encoders swapped for tiny CLIPs (the Llama + CLIP pair, same options)."""
    diffusion = copy.deepcopy(json.loads((ROOT / "schemas" / "families" / "hunyuan-video.json").read_text())["diffusion"])
    diffusion["conditioning"] = [
        {"component": "text_encoder", "class": "CLIPTextModel", "tokenizer": "tokenizer", "hidden_layer": -2, "max_length": 16,
         "attention_mask": True},
        {"component": "text_encoder_2", "class": "CLIPTextModel", "tokenizer": "tokenizer_2", "hidden": False, "pooled": True,
         "max_length": 16}]
    return diffusion


def _wan_clip_text_diffusion() -> dict:
    """Wan 2.2 T2V's diffusion data with its UMT5 swapped for a tiny CLIP (same options)."""
    diffusion = copy.deepcopy(json.loads((ROOT / "schemas" / "families" / "wan2.2-t2v-a14b.json").read_text())["diffusion"])
    diffusion["conditioning"][0].update({"class": "CLIPTextModel", "max_length": 16})
    return diffusion


def _hv_diffusion(guidance: float) -> dict:
    """HunyuanVideo's diffusion data with another embedded guidance."""
    diffusion = copy.deepcopy(json.loads((ROOT / "schemas" / "families" / "hunyuan-video.json").read_text())["diffusion"])
    diffusion["denoiser"]["guidance"]["value"] = guidance
    return diffusion


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with tiny_registry(tmp_path_factory.mktemp("tiny-dit-data"), [
            ("tiny-hv", "hunyuan-video", HV, None),
            ("tiny-hv-i2v33", "hunyuan-video-i2v-33ch", HV, None),
            ("tiny-hv-i2v", "hunyuan-video-i2v", HV, None),
            ("tiny-wan21", "wan2.1-t2v-14b", WAN, None),
            ("tiny-wan22", "wan2.2-t2v-a14b", WAN, None),
            ("tiny-wan21-i2v", "wan2.1-i2v-14b", {**WAN, "image_dim": 12, "added_kv_proj_dim": 16}, None),
            ("tiny-flux", "flux.1-dev", FLUX, None),
            ("tiny-chroma", "chroma", CHROMA, None),
            ("tiny-hv-te", "hunyuan-video", HV, {"diffusion": _clip_text_diffusion()}),
            ("tiny-hv-g2", "hunyuan-video", HV, {"diffusion": _hv_diffusion(guidance=2.0)}),
            ("tiny-wan22-te", "wan2.2-t2v-a14b", WAN, {"diffusion": _wan_clip_text_diffusion()})]) as root:
        yield root


def _config(fid: str, component: str = "transformer") -> dict:
    return dict(get_registry().family(fid).components[component].spec.architecture.config)


def _model(folder, fid, seed, base=None, moved=0.0, shift=None):
    """A tiny transformer folder (every component of the family); ``base``: start from its weights, moved a little."""
    fam = get_registry().family(fid)
    for component in fam.components:
        cls = getattr(diffusers, fam.components[component].spec.architecture.class_)
        torch.manual_seed(seed)
        model = cls.from_config(_config(fid, component))
        if base is not None:
            folder_in = base / (component if (base / component).is_dir() else "transformer")
            own = model.state_dict()
            theirs = load_file(str(folder_in / "diffusion_pytorch_model.safetensors"))
            state = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
            model.load_state_dict(state, strict=False)
        if moved:
            g = torch.Generator().manual_seed(seed + 100)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(moved * p.std().nan_to_num() * torch.randn(p.shape, generator=g))
        model.save_pretrained(folder / component)
    if shift is not None:
        (folder / "scheduler").mkdir(parents=True, exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": shift}))
    return folder


def _lora(tmp_path, fid, pattern=ATTN, name="style.safetensors", scale=0.3):
    lora = make_lora(fid, pattern, rank=2, alpha=2.0, dtype=torch.float32, seed=3)
    for m in lora.modules.values():
        m.factors["up"] = type(m.factors["up"]).from_torch(m.factors["up"].torch() * scale)
    path = tmp_path / name
    lorareg.save(lora, path, format="diffusers")
    return path


def _conditions(text_dim=24, pooled=12, prompts=2, length=5):
    g = torch.Generator().manual_seed(7)
    return {"text": torch.randn(prompts, length, text_dim, generator=g), "pooled": torch.randn(prompts, pooled, generator=g),
            "text_mask": torch.ones(prompts, length, dtype=torch.long)}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("target_family,conditioning", [("tiny-hv-i2v33", "concat"), ("tiny-hv-i2v", "token_replace")])
def test_hunyuan_t2v_to_i2v(tiny, tmp_path, target_family, conditioning):
    src = _model(tmp_path / "t2v", "tiny-hv", seed=0, shift=5.0)
    tgt = _model(tmp_path / "i2v", target_family, seed=0, base=src, moved=0.05)
    lora = _lora(tmp_path, "tiny-hv")
    before = _sha(lora)
    out = tmp_path / "ported.safetensors"
    r = lorareg.port(lora, source_model=str(src), target_model=str(tgt), to=target_family, output=out, refine_conditions=_conditions(),
                     cache_dir=tmp_path / "cache", **FAST)
    rr = r.report.refine
    assert rr["model"] == "diffusion transformer" and rr["image_condition"] == conditioning
    assert rr["embedded_guidance"] == 6.0 and rr["guidance"] == 1.0  # HunyuanVideo: guidance-distilled, no CFG
    assert rr["target"] == "teacher" and rr["samples"] == 2
    assert rr["shift"] == 5.0 and rr["schedule_from"] == "scheduler config"
    assert rr["steps"] == 6 and len(rr["experts"]) == 1 and rr["experts"][0]["sigma_range"] == [0.0, 1.0]
    assert rr["mse_end"] <= rr["mse_start"]
    assert _sha(lora) == before
    refined = lorareg.load(out, family=target_family)
    copied = lorareg.port(lora, source_model=str(src), target_model=str(tgt), to=target_family, progress=False).lora
    changed = [k for k, m in refined.modules.items()
               if not torch.allclose(m.delta_weight().float(), copied.modules[k].delta_weight().float(), atol=1e-7)]
    assert changed or rr["kept_projection"]
    again = lorareg.port(lora, source_model=str(src), target_model=str(tgt), to=target_family, refine_conditions=_conditions(),
                         cache_dir=tmp_path / "cache", refine_target="sample", **FAST)
    assert again.report.refine["samples_cached"] and again.report.refine["target"] == "sample"


def test_wan21_to_wan22_trains_each_expert_on_its_noise_range(tiny, tmp_path):
    src = _model(tmp_path / "wan21", "tiny-wan21", seed=1)
    tgt = _model(tmp_path / "wan22", "tiny-wan22", seed=1, base=src, moved=0.05)
    lora = _lora(tmp_path, "tiny-wan21", pattern=r"transformer:.*attn1\.to_(q|v)$")
    cond = {"text": _conditions()["text"]}
    r = lorareg.port(lora, source_model=str(src), target_model=str(tgt), to="tiny-wan22", refine_conditions=cond, **FAST)
    rr = r.report.refine
    assert [e["component"] for e in rr["experts"]] == ["transformer", "transformer_2"]
    assert rr["experts"][0]["sigma_range"] == [0.875, 1.0] and rr["experts"][1]["sigma_range"] == [0.0, 0.875]
    assert rr["target"] == "teacher" and rr["guidance"] == 1.0  # given tensors carry no unconditional embedding
    assert all(e["examples"] == 4 for e in rr["experts"])  # noisings x samples in each expert's range
    mods = r.lora.modules
    high = {k.split(":", 1)[1]: m for k, m in mods.items() if m.component == "transformer"}
    low = {k.split(":", 1)[1]: m for k, m in mods.items() if m.component == "transformer_2"}
    assert high.keys() == low.keys()
    trained = [e for e in rr["experts"] if not e["kept_projection"]]
    if len(trained) == 2:  # the experts were trained apart, on different data: their factors differ
        assert any(not torch.equal(high[n].delta_weight(), low[n].delta_weight()) for n in high)


def test_flux_to_chroma_student_reads_fewer_encoders(tiny, tmp_path):
    src = _model(tmp_path / "flux", "tiny-flux", seed=2)
    tgt = _model(tmp_path / "chroma", "tiny-chroma", seed=2, base=src, moved=0.05)
    lora = _lora(tmp_path, "tiny-flux", pattern=r"transformer:transformer_blocks.*attn\.to_(q|k)$")
    r = lorareg.port(lora, source_model=str(src), target_model=str(tgt), to="tiny-chroma", refine_conditions=_conditions(),
                     **{**FAST, "refine_frames": None, "refine_latent_size": 8})
    rr = r.report.refine
    assert rr["frames"] == 1 and rr["latent_size"] == 8 and rr["image_condition"] is None
    assert rr["mse_end"] <= rr["mse_start"]


def test_text_encoders_from_the_family_data(tiny, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    folders = []
    for name, seed, moved in (("v1", 4, 0.0), ("v2", 4, 0.05)):
        folder = _model(tmp_path / name, "tiny-hv-te", seed=seed, base=folders[0] if folders else None, moved=moved)
        for te, dim in (("text_encoder", 24), ("text_encoder_2", 12)):
            torch.manual_seed(5)
            CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=dim, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=16)).save_pretrained(folder / te)
        clip_tokenizer_folder(folder / "tokenizer")
        clip_tokenizer_folder(folder / "tokenizer_2")
        folders.append(folder)
    lora = _lora(tmp_path, "tiny-hv-te")
    r = lorareg.port(lora, source_model=str(folders[0]), target_model=str(folders[1]), to="tiny-hv-te", family="tiny-hv-te",
                     refine_prompts=["a red fox", "a city at night"], refine_guidance=2.0, **FAST)
    rr = r.report.refine
    assert rr["prompts"] == 2 and rr["prompts_from"] == "--prompts" and rr["guidance"] == 2.0
    assert rr["mse_end"] <= rr["mse_start"]


def test_refusals(tiny, tmp_path):
    reg = get_registry()
    fam = reg.family
    assert check_pair("distill", fam("flux.1-dev"), fam("chroma")) == "dit"
    assert check_pair("distill", fam("wan2.1-t2v-14b"), fam("wan2.2-t2v-a14b")) == "dit"
    assert check_pair("distill", fam("hunyuan-video"), fam("hunyuan-video-i2v-33ch")) == "dit"
    with pytest.raises(InputError, match="latent spaces differ"):
        check_pair("distill", fam("wan2.1-t2v-14b"), fam("wan2.2-ti2v-5b"))
    with pytest.raises(InputError, match="latent spaces differ"):
        check_pair("distill", fam("hunyuan-video"), fam("flux.1-dev"))
    with pytest.raises(InputError, match="image-conditioned model"):
        check_pair("distill", fam("hunyuan-video-i2v-33ch"), fam("hunyuan-video-i2v"))
    with pytest.raises(InputError, match="neither|none of these"):
        check_pair("distill", fam("sdxl"), fam("flux.1-dev"))
    # Wan 2.1 I2V also takes CLIP image tokens of the conditioning frame: only --prompts-embeds can give them
    src = _model(tmp_path / "wan21", "tiny-wan21", seed=1)
    tgt = _model(tmp_path / "wan21i2v", "tiny-wan21-i2v", seed=1, base=src)
    lora = _lora(tmp_path, "tiny-wan21", pattern=r"transformer:.*attn1\.to_q$")
    with pytest.raises(InputError, match="image_embeds"):
        lorareg.port(lora, source_model=str(src), target_model=str(tgt), to="tiny-wan21-i2v", refine_conditions=_conditions(), **FAST)


def test_prompts_embeds_file(tiny, tmp_path):
    src = _model(tmp_path / "wan21", "tiny-wan21", seed=1)
    tgt = _model(tmp_path / "wan21i2v", "tiny-wan21-i2v", seed=1, base=src, moved=0.05)
    lora = _lora(tmp_path, "tiny-wan21", pattern=r"transformer:.*attn1\.to_q$")
    embeds = tmp_path / "embeds.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"text": torch.randn(2, 5, 24, generator=g), "image_embeds": torch.randn(2, 3, 12, generator=g)}, str(embeds))
    r = lorareg.port(lora, source_model=str(src), target_model=str(tgt), to="tiny-wan21-i2v", refine_prompts_embeds=embeds, **FAST)
    rr = r.report.refine
    assert rr["image_condition"] == "concat" and rr["prompts_from"] == "2 given embeddings"
    assert r.report.options["refine_options"]["prompts_embeds"] == "embeds.safetensors"  # a name, never a local path
    bad = tmp_path / "bad.safetensors"
    save_file({"hidden": torch.zeros(2, 5, 24)}, str(bad))
    with pytest.raises(InputError, match="must be named"):
        lorareg.port(lora, source_model=str(src), target_model=str(tgt), to="tiny-wan21-i2v", refine_prompts_embeds=bad, **FAST)


@pytest.mark.parametrize("shift,dynamic", [(7.0, False), (1.0, True)])
def test_flow_sigmas_match_diffusers_scheduler(shift, dynamic):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from lorareg.refine.flow import Flow
    from lorareg.registry.families import FlowSchedule

    sched = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=dynamic)
    flow = Flow(schedule=FlowSchedule(shift=shift, use_dynamic_shifting=dynamic), source="family")
    tokens = 1024
    steps = 8
    s = torch.linspace(1.0, 1.0 / steps, steps).tolist()
    if dynamic:
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)
        sched.set_timesteps(sigmas=s, mu=mu)
    else:
        sched.set_timesteps(sigmas=s)
    ours = sampling_sigmas(steps, flow.shift_for(tokens)).float()
    assert torch.allclose(ours, sched.sigmas.float(), atol=1e-5)


def test_cli_with_prompts_embeds_and_the_card(tiny, tmp_path):
    from click.testing import CliRunner

    from lorareg.apps.cli.main import main
    from lorareg.hub.card import CardInfo, build_card

    src = _model(tmp_path / "hv", "tiny-hv", seed=0)
    tgt = _model(tmp_path / "i2v", "tiny-hv-i2v33", seed=0, base=src, moved=0.05)
    lora = _lora(tmp_path, "tiny-hv")
    embeds = tmp_path / "embeds.safetensors"
    save_file(_conditions(), str(embeds))
    out = tmp_path / "i2v.safetensors"
    args = ["port", str(lora), "--source-model", str(src), "--target-model", str(tgt), "--to", "tiny-hv-i2v33", "--method", "copy",
            "-o", str(out), "--refine", "distill", "--steps", "4", "--samples", "2", "--noisings", "2", "--sampler-steps", "2",
            "--latent-size", "4", "--frames", "2", "--prompts-embeds", str(embeds), "--device", "cpu", "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    rr = report["refine"]
    assert rr["model"] == "diffusion transformer" and rr["prompts_from"] == "2 given embeddings" and rr["frames"] == 2
    assert report["options"]["refine_options"]["prompts_embeds"] == "embeds.safetensors"  # by name, never a local path
    card = build_card(report, CardInfo(repo_id="me/hv-i2v", weight_name=out.name, output_format="diffusers"))
    assert "2 latent frames of 4x4" in card and "concat image conditioning" in card and "--prompts-embeds EMBEDS.safetensors" in card
    bad = CliRunner().invoke(main, [*args[:-1], "--force", "--frames", "3", "--latent-size", "5"])
    assert bad.exit_code != 0 and "even side" in bad.output and "Traceback" not in bad.output


def _called_with(fid: str, x: torch.Tensor, sigma: torch.Tensor, cond: dict, first=None, dtype=torch.float32) -> dict:
    """The keywords a family's Denoiser passes its (tiny, real-class) transformer."""
    from lorareg.refine.dit import Denoiser

    fam = get_registry().family(fid)
    spec = fam.spec.diffusion.denoiser
    model = getattr(diffusers, fam.components[spec.component].spec.architecture.class_).from_config(_config(fid, spec.component)).to(dtype)
    seen = {}
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
        Denoiser(model, spec)(x.to(dtype), sigma, cond, first if first is None else first.to(dtype))
    return seen


def test_hunyuan_33ch_image_only_on_the_first_frame(tiny):
    # diffusers' HunyuanVideoImageToVideoPipeline (latent_concat) zeroes the image latent after the first frame
    x, first = torch.randn(1, 16, 3, 4, 4), torch.randn(1, 16, 1, 4, 4)
    cond = {k: v[:1] for k, v in _conditions().items()}
    inp = _called_with("tiny-hv-i2v33", x, torch.tensor([0.5]), cond, first)["hidden_states"]
    assert inp.shape[1] == 33
    assert torch.equal(inp[:, :16], x) and torch.equal(inp[:, 16:32, :1], first)
    assert not inp[:, 16:32, 1:].any()
    assert torch.equal(inp[:, 32, 0], torch.ones(1, 4, 4)) and not inp[:, 32, 1:].any()


@pytest.mark.parametrize("fid,frames,scale", [("tiny-hv", 2, 1000), ("tiny-wan21", 2, 1000), ("tiny-flux", 1, 1), ("tiny-chroma", 1, 1)])
def test_timestep_in_float32_under_bf16(tiny, fid, frames, scale):
    # the HunyuanVideo and Wan pipelines pass σ x 1000 in float32 whatever the transformer's dtype: bf16 would round
    # 876.5 to 876 (its spacing is 4 above 512); FLUX.1 and Chroma take σ and cast it themselves
    cond = {k: v[:1] for k, v in _conditions().items()}
    seen = _called_with(fid, torch.randn(1, 16, frames, 4, 4), torch.tensor([0.8765]), cond, dtype=torch.bfloat16)
    assert seen["timestep"].dtype == torch.float32 and torch.allclose(seen["timestep"], torch.tensor([0.8765 * scale]))


def test_teacher_cache_keyed_by_the_source_family_data(tiny, tmp_path):
    # the same folders read as a family with another embedded guidance: the teacher's velocities differ, never reused
    src = _model(tmp_path / "t2v", "tiny-hv", seed=0)
    tgt = _model(tmp_path / "i2v", "tiny-hv-i2v33", seed=0, base=src, moved=0.05)
    lora = _lora(tmp_path, "tiny-hv")
    kw = dict(source_model=str(src), target_model=str(tgt), to="tiny-hv-i2v33", refine_conditions=_conditions(),
              cache_dir=tmp_path / "cache", **{**FAST, "refine_steps": 0})
    first = lorareg.port(lora, family="tiny-hv", **kw).report.refine
    same = lorareg.port(lora, family="tiny-hv", **kw).report.refine
    other = lorareg.port(lora, family="tiny-hv-g2", **kw).report.refine
    assert not first["samples_cached"] and same["samples_cached"] and not other["samples_cached"]


def test_text_encoder_of_another_architecture_refused(tiny, tmp_path):
    # HunyuanVideo's data names a LlamaModel; a folder holding a whole Llava (HunyuanVideo-I2V's text encoder) would
    # load as a randomly initialised Llama with only a log line: refused instead
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from lorareg.refine.conditioning import TextConditioner

    folder = tmp_path / "hv"
    text = LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                       num_key_value_heads=2)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                              patch_size=16)
    LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision)).save_pretrained(folder / "text_encoder")
    CLIPTextModel(CLIPTextConfig(vocab_size=96, hidden_size=12, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=77)).save_pretrained(folder / "text_encoder_2")
    clip_tokenizer_folder(folder / "tokenizer")
    clip_tokenizer_folder(folder / "tokenizer_2")
    text_encoders = TextConditioner(get_registry().family("tiny-hv"), folder, None, torch.device("cpu"), torch.float32)
    with pytest.raises(InputError, match="weights of LlamaModel are not in the checkpoint.*model_type is llava"):
        text_encoders.encode(["a red fox"])


@pytest.mark.parametrize("extra,match", [({"invert_sigmas": True}, "invert_sigmas"),
                                         ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, "time_shift_type")])
def test_scheduler_conventions_not_followed_are_refused(tmp_path, extra, match):
    from lorareg.refine.flow import read_flow

    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, **extra}))
    with pytest.raises(InputError, match=match):
        read_flow(tmp_path, get_registry().family("flux.1-dev").spec.diffusion)
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "invert_sigmas": False, "time_shift_type": "exponential"}))
    assert read_flow(tmp_path, get_registry().family("flux.1-dev").spec.diffusion).schedule.shift == 3.0


def test_chroma_mask_keeps_one_padding_token(tiny, tmp_path):
    # diffusers' ChromaPipeline: T5 runs with the tokenizer's mask, the transformer's text mask then also lets the first
    # padding token through. Chroma's own conditioning entry, its T5 swapped for a tiny CLIP
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorareg.refine.conditioning import TextConditioner
    from lorareg.registry import families as F

    chroma = get_registry().family("chroma")
    entry = {**chroma.spec.diffusion.conditioning[0].model_dump(by_alias=True, exclude_none=True), "class": "CLIPTextModel",
             "max_length": 16}
    diffusion = chroma.spec.diffusion.model_copy(update={"conditioning": [F.TextConditioning(**entry)]})
    fam = F.Family(spec=chroma.spec.model_copy(update={"diffusion": diffusion}), components={}, path=chroma.path)
    folder = tmp_path / "chroma"
    CLIPTextModel(CLIPTextConfig(vocab_size=96, hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=16)).save_pretrained(folder / "text_encoder")
    clip_tokenizer_folder(folder / "tokenizer")
    out = TextConditioner(fam, folder, None, torch.device("cpu"), torch.float32).encode(["ab", "abc d"])
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))(["ab", "abc d"], padding="max_length", max_length=16).attention_mask
    assert out["attention_mask"].sum(1).tolist() == [sum(m) + 1 for m in tokens]
    assert out["attention_mask"][:, 0].all() and out["attention_mask"].shape == (2, 16)


def test_budget_spent_before_the_second_expert_is_reported(tiny, tmp_path):
    src = _model(tmp_path / "wan21", "tiny-wan21", seed=1)
    tgt = _model(tmp_path / "wan22", "tiny-wan22", seed=1, base=src, moved=0.05)
    lora = _lora(tmp_path, "tiny-wan21", pattern=r"transformer:.*attn1\.to_q$")
    r = lorareg.port(lora, source_model=str(src), target_model=str(tgt), to="tiny-wan22", refine_conditions={"text": _conditions()["text"]},
                     refine_budget_seconds=0.0, **FAST)
    rr = r.report.refine
    assert rr["stopped_by_budget"] and rr["steps"] == 0
    assert rr["steps_requested"] == 2 * FAST["refine_steps"]  # both experts' steps were asked for, neither ran


def test_given_embeddings_without_the_pooled_vector_refused(tiny, tmp_path):
    # HunyuanVideo's transformer takes CLIP's pooled vector: zeros in its place are a conditioning it never saw
    src = _model(tmp_path / "t2v", "tiny-hv", seed=0)
    tgt = _model(tmp_path / "i2v", "tiny-hv-i2v33", seed=0, base=src)
    lora = _lora(tmp_path, "tiny-hv")
    cond = {k: v for k, v in _conditions().items() if k != "pooled"}
    with pytest.raises(InputError, match="pooled"):
        lorareg.port(lora, source_model=str(src), target_model=str(tgt), to="tiny-hv-i2v33", refine_conditions=cond, **FAST)


def test_expert_boundary_from_the_model_folder(tiny, tmp_path):
    # diffusers' WanPipeline switches experts at its model_index.json boundary_ratio; the family's value is the fallback
    src = _model(tmp_path / "wan21", "tiny-wan21", seed=1)
    tgt = _model(tmp_path / "wan22", "tiny-wan22", seed=1, base=src)
    (tgt / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.5}))
    lora = _lora(tmp_path, "tiny-wan21", pattern=r"transformer:.*attn1\.to_q$")
    r = lorareg.port(lora, source_model=str(src), target_model=str(tgt), to="tiny-wan22", refine_conditions={"text": _conditions()["text"]},
                     **{**FAST, "refine_steps": 0})
    assert [e["sigma_range"] for e in r.report.refine["experts"]] == [[0.5, 1.0], [0.0, 0.5]]


def test_wan22_teacher_low_noise_expert_guidance(tiny, tmp_path, monkeypatch):
    # diffusers' WanPipeline guides the low-noise expert with guidance_scale_2 (Wan2.2 T2V A14B: 4.0 high, 3.0 low)
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorareg.refine import dit

    folders = []
    for name, moved in (("a", 0.0), ("b", 0.05)):
        folder = _model(tmp_path / name, "tiny-wan22-te", seed=1, base=folders[0] if folders else None, moved=moved)
        torch.manual_seed(5)
        CLIPTextModel(CLIPTextConfig(vocab_size=96, hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     max_position_embeddings=16)).save_pretrained(folder / "text_encoder")
        clip_tokenizer_folder(folder / "tokenizer")
        folders.append(folder)
    seen = []
    velocity = dit._Teacher.velocity

    def spy(self, den, x, sigma, idx, guided, scale=None):
        if guided:
            seen.append((round(float(sigma[0]), 4), scale))
        return velocity(self, den, x, sigma, idx, guided, scale)

    monkeypatch.setattr(dit._Teacher, "velocity", spy)
    lora = _lora(tmp_path, "tiny-wan22-te", pattern=r"transformer(_2)?:.*attn1\.to_q$")
    r = lorareg.port(lora, source_model=str(folders[0]), target_model=str(folders[1]), to="tiny-wan22-te", family="tiny-wan22-te",
                     refine_prompts=["a red fox"], **{**FAST, "refine_steps": 0, "refine_sampler_steps": 4})
    assert r.report.refine["guidance"] == 4.0 and r.report.refine["guidance_low_noise"] == 3.0
    assert {s for sigma, s in seen if sigma >= 0.875} == {4.0} and {s for sigma, s in seen if sigma < 0.875} == {3.0}
