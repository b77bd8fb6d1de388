"""HunyuanVideo-I2V, Wan 2.1/2.2 and FLUX.1/Chroma: families, trainers' key layouts, detection, ports.

The LoRA files are written here key by key in each trainer's documented layout (kohya sd-scripts
networks/lora_flux.py, musubi-tuner networks/lora_wan.py / lora.py, diffusion-pipe / ComfyUI
``diffusion_model.`` with lora_A/lora_B, ai-toolkit / diffusers ``transformer.``, OneTrainer
``lora_transformer_``, XLabs ``processor.qkv_lora1``): none of those trainers is pip-installable on a
CPU-only torch here (musubi's Wan package needs CUDA at import; sd-scripts and ai-toolkit are not on
PyPI), so the layouts come from their code as read, and the files carry no lorareg metadata.
Copy ports need no base weights, so the real (full-size) family tables are used with rank-2 factors.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorareg
from lorareg.apps.cli.main import main
from lorareg.core.errors import InputError
from lorareg.port import port

R = 2


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


DTYPE = {"dtype": torch.float16}  # sd-scripts / musubi save dtype; tests that multiply big ΔW switch to float32


def _kohya(sd: dict, key: str, out: int, inn: int, gen, alpha: float = 1.0, prefix="lora_unet_"):
    dt = DTYPE["dtype"]
    sd[f"{prefix}{key}.lora_down.weight"] = torch.randn(R, inn, generator=gen).to(dt)
    sd[f"{prefix}{key}.lora_up.weight"] = torch.randn(out, R, generator=gen).to(dt)
    sd[f"{prefix}{key}.alpha"] = torch.tensor(alpha, dtype=dt)


def _peft(sd: dict, key: str, out: int, inn: int, gen):
    sd[f"{key}.lora_A.weight"] = torch.randn(R, inn, generator=gen).to(torch.bfloat16)
    sd[f"{key}.lora_B.weight"] = torch.randn(out, R, generator=gen).to(torch.bfloat16)


def _save(sd, path, meta=None):
    save_file(sd, str(path), meta or {})
    return path


def _keys(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def _meta(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


# ---------------------------------------------------------------------------------------- trainers' files

def kohya_flux(path, blocks=range(19), singles=range(38), te=True, meta=None):
    """sd-scripts networks/lora_flux.py: original names flattened, fused qkv / linear1, modulation included."""
    g, sd = _gen(1), {}
    for i in blocks:
        for s in ("img", "txt"):
            _kohya(sd, f"double_blocks_{i}_{s}_attn_qkv", 9216, 3072, g)
            _kohya(sd, f"double_blocks_{i}_{s}_attn_proj", 3072, 3072, g)
            _kohya(sd, f"double_blocks_{i}_{s}_mlp_0", 12288, 3072, g)
            _kohya(sd, f"double_blocks_{i}_{s}_mlp_2", 3072, 12288, g)
            _kohya(sd, f"double_blocks_{i}_{s}_mod_lin", 18432, 3072, g)
    for i in singles:
        _kohya(sd, f"single_blocks_{i}_linear1", 21504, 3072, g)
        _kohya(sd, f"single_blocks_{i}_linear2", 3072, 15360, g)
        _kohya(sd, f"single_blocks_{i}_modulation_lin", 9216, 3072, g)
    if te:
        _kohya(sd, "text_model_encoder_layers_0_self_attn_q_proj", 768, 768, g, prefix="lora_te1_")
        _kohya(sd, "encoder_block_0_layer_0_SelfAttention_q", 4096, 4096, g, prefix="lora_te3_")
    return _save(sd, path, meta)


def musubi_wan(path, blocks=range(40), i2v=False, meta=None, dim=5120, ffn=13824):
    """musubi-tuner networks/lora_wan.py: Wan's original names flattened after lora_unet_."""
    g, sd = _gen(2), {}
    for i in blocks:
        for a in ("self_attn", "cross_attn"):
            for p in ("q", "k", "v", "o"):
                _kohya(sd, f"blocks_{i}_{a}_{p}", dim, dim, g)
        if i2v:
            _kohya(sd, f"blocks_{i}_cross_attn_k_img", dim, dim, g)
            _kohya(sd, f"blocks_{i}_cross_attn_v_img", dim, dim, g)
        _kohya(sd, f"blocks_{i}_ffn_0", ffn, dim, g)
        _kohya(sd, f"blocks_{i}_ffn_2", dim, ffn, g)
    return _save(sd, path, meta)


def musubi_hunyuan(path, meta=None):
    """musubi-tuner networks/lora.py on HunyuanVideo: fused img_attn_qkv / linear1, img_mlp_fc1, no modulation."""
    g, sd = _gen(3), {}
    for i in range(20):
        for s in ("img", "txt"):
            _kohya(sd, f"double_blocks_{i}_{s}_attn_qkv", 9216, 3072, g)
            _kohya(sd, f"double_blocks_{i}_{s}_attn_proj", 3072, 3072, g)
            _kohya(sd, f"double_blocks_{i}_{s}_mlp_fc1", 12288, 3072, g)
            _kohya(sd, f"double_blocks_{i}_{s}_mlp_fc2", 3072, 12288, g)
    for i in range(40):
        _kohya(sd, f"single_blocks_{i}_linear1", 21504, 3072, g)
        _kohya(sd, f"single_blocks_{i}_linear2", 3072, 15360, g)
    return _save(sd, path, meta if meta is not None else {"ss_base_model_version": "hunyuan_video"})


# ---------------------------------------------------------------------------------------- families

def test_families_listed_with_configs_and_aliases():
    reg = lorareg.get_registry()
    for fid in ("hunyuan-video-i2v", "hunyuan-video-i2v-33ch", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.1-i2v-14b",
                "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b", "flux.1-dev", "flux.1-schnell", "flux.1-krea-dev",
                "flux.1-kontext-dev", "chroma"):
        assert fid in reg.families
    assert reg.family("Flux.1 Krea").id == "flux.1-krea-dev"
    assert reg.family("Wan Video 2.2 T2V-A14B").id == "wan2.2-t2v-a14b"
    assert reg.family("Wan Video 14B t2v").id == "wan2.1-t2v-14b"
    assert reg.family("Flux.1 D").id == "flux.1-dev"
    assert reg.family("Chroma").id == "chroma"
    # architecture facts, from the configs of diffusers' conversion scripts
    hv33 = reg.family("hunyuan-video-i2v-33ch").components["transformer"]
    assert hv33.modules["x_embedder.proj"][1] == 33 and "time_text_embed.guidance_embedder.linear_1" not in hv33.modules
    assert reg.family("hunyuan-video-i2v").components["transformer"].modules == reg.family("hunyuan-video").components["transformer"].modules
    w22 = reg.family("wan2.2-t2v-a14b")
    assert w22.components["transformer"].modules == w22.components["transformer_2"].modules
    assert w22.spec.experts.boundary_ratio == 0.875 and reg.family("wan2.2-i2v-a14b").spec.experts.boundary_ratio == 0.9
    assert "blocks.0.attn2.add_k_proj" in reg.family("wan2.1-i2v-14b").components["transformer"].modules
    assert "blocks.0.attn2.add_k_proj" not in reg.family("wan2.2-i2v-a14b").components["transformer"].modules
    assert abs(reg.family("chroma").components["transformer"].num_parameters / 1e9 - 8.90) < 0.01
    assert abs(reg.family("wan2.1-t2v-14b").components["transformer"].num_parameters / 1e9 - 14.29) < 0.01
    assert "time_text_embed.guidance_embedder.linear_1" not in reg.family("flux.1-schnell").components["transformer"].modules
    out = CliRunner().invoke(main, ["families"])
    assert out.exit_code == 0 and "wan2.2-t2v-a14b" in out.output and "two experts" in out.output


def test_variant_families_share_tables(tmp_path):
    """Krea/Kontext and HunyuanVideo-I2V (token replace) ship no module table of their own."""
    from pathlib import Path

    modules = Path(lorareg.__file__).resolve().parent.parent / "schemas" / "modules"
    for fid in ("flux.1-krea-dev", "flux.1-kontext-dev", "hunyuan-video-i2v"):
        assert not (modules / f"{fid}.json").exists()
    for path in modules.glob("*.json"):
        assert path.stat().st_size < 100_000, path  # shipped in the wheel: keep them small
    w22 = json.loads((modules / "wan2.2-t2v-a14b.json").read_text())
    assert w22["components"]["transformer_2"] == {"same_as": "transformer"}


# ---------------------------------------------------------------------------------------- detection

def test_kohya_flux_detected_and_undecided_without_metadata(tmp_path):
    p = kohya_flux(tmp_path / "flux.safetensors")
    det = lorareg.detect(p)
    assert (det.format, det.variant, det.family) == ("kohya", "flux", "flux.1-dev"), det.evidence
    # Chroma lacks the modulation layers, HunyuanVideo has 20/40 blocks: only FLUX.1 files fit all 19/38
    assert "chroma" not in det.fitting_families and "hunyuan-video" not in det.fitting_families
    assert det.undecided == ["flux.1-dev", "flux.1-kontext-dev", "flux.1-krea-dev", "flux.1-schnell"]
    assert any("port needs --family" in e for e in det.evidence)
    info = CliRunner().invoke(main, ["inspect", str(p), "--json"])
    assert json.loads(info.output)["undecided"] == det.undecided
    with pytest.raises(InputError, match="pass --family"):
        port(p, to="chroma", output=tmp_path / "c.safetensors", progress=False)


def test_metadata_decides_between_same_shapes(tmp_path):
    krea = kohya_flux(tmp_path / "krea.safetensors", blocks=[0], singles=[0], te=False,
                      meta={"modelspec.architecture": "flux-1-krea-dev/lora"})
    det = lorareg.detect(krea)
    assert det.family == "flux.1-krea-dev" and det.undecided == []
    wan22 = musubi_wan(tmp_path / "w.safetensors", blocks=[0], meta={"modelspec.architecture": "wan2.2-t2v-a14b"})
    assert lorareg.detect(wan22).family == "wan2.2-t2v-a14b"
    pony = tmp_path / "pony.safetensors"
    g, sd = _gen(), {}
    _kohya(sd, "input_blocks_8_1_transformer_blocks_9_attn1_to_q", 1280, 1280, g)
    _save(sd, pony, {"ss_base_model_version": "sdxl_base_v1-0", "ss_sd_model_name": "Pony"})
    det = lorareg.detect(pony)
    assert det.family == "sdxl" and det.named_variant == "pony"


def test_hunyuan_and_flux_told_apart_by_block_counts(tmp_path):
    hv = lorareg.detect(musubi_hunyuan(tmp_path / "hv.safetensors", meta={}))
    assert (hv.format, hv.family) == ("musubi", "hunyuan-video")
    # both I2V variants have every block of T2V; the token-replace one every module
    assert hv.undecided == ["hunyuan-video", "hunyuan-video-i2v", "hunyuan-video-i2v-33ch"]
    # a FLUX.1 LoRA on all 19 double blocks in diffusers names also fits HunyuanVideo (which has 20): block counts decide
    g, sd = _gen(4), {}
    for i in range(19):
        _peft(sd, f"transformer.transformer_blocks.{i}.attn.to_q", 3072, 3072, g)
    det = lorareg.detect(_save(sd, tmp_path / "aitk.safetensors"))
    assert det.family in ("chroma", "flux.1-dev") and "hunyuan-video" in det.fitting_families
    assert set(det.undecided) >= {"chroma", "flux.1-dev"} and "hunyuan-video" not in det.undecided


def test_wan_i2v_decided_by_image_cross_attention(tmp_path):
    det = lorareg.detect(musubi_wan(tmp_path / "i2v.safetensors", blocks=[0, 1], i2v=True))
    assert (det.format, det.family, det.undecided) == ("musubi", "wan2.1-i2v-14b", [])
    t2v = lorareg.detect(musubi_wan(tmp_path / "t2v.safetensors", blocks=range(40)))
    assert t2v.family == "wan2.1-t2v-14b" and "wan2.2-t2v-a14b" in t2v.undecided
    small = lorareg.detect(musubi_wan(tmp_path / "s.safetensors", blocks=range(30), dim=1536, ffn=8960))
    assert small.family == "wan2.1-t2v-1.3b" and small.undecided == []


def test_other_trainers_layouts_are_read(tmp_path):
    g = _gen(5)
    # diffusion-pipe / musubi convert_lora --target other / ComfyUI: diffusion_model. + lora_A/B, alpha baked
    sd = {}
    for i in range(40):
        _peft(sd, f"diffusion_model.blocks.{i}.self_attn.q", 5120, 5120, g)
        _peft(sd, f"diffusion_model.blocks.{i}.cross_attn.k_img", 5120, 5120, g)
    det = lorareg.detect(_save(sd, tmp_path / "dp.safetensors"))
    assert (det.format, det.variant, det.family) == ("musubi", "other", "wan2.1-i2v-14b")
    # OneTrainer: lora_transformer_ + flattened diffusers names
    sd = {}
    for i in range(19):
        _kohya(sd, f"transformer_blocks_{i}_norm1_linear", 18432, 3072, g, prefix="lora_transformer_")
    det = lorareg.detect(_save(sd, tmp_path / "ot.safetensors"))
    assert (det.format, det.family) == ("kohya", "flux.1-dev")
    # XLabs x-flux: processor.qkv_lora1 (image stream) / proj_lora2 (text stream), no alpha
    sd = {}
    for i in range(19):
        sd[f"double_blocks.{i}.processor.qkv_lora1.down.weight"] = torch.randn(R, 3072, generator=g)
        sd[f"double_blocks.{i}.processor.qkv_lora1.up.weight"] = torch.randn(9216, R, generator=g)
        sd[f"double_blocks.{i}.processor.proj_lora2.down.weight"] = torch.randn(R, 3072, generator=g)
        sd[f"double_blocks.{i}.processor.proj_lora2.up.weight"] = torch.randn(3072, R, generator=g)
    p = _save(sd, tmp_path / "xlabs.safetensors")
    det = lorareg.detect(p)
    assert (det.format, det.family) == ("xlabs", "flux.1-dev"), det.evidence
    lora = lorareg.load(p, family="flux.1-dev")
    q = lora.modules["transformer:transformer_blocks.3.attn.to_k"]
    want = sd["double_blocks.3.processor.qkv_lora1.up.weight"][3072:6144] @ sd["double_blocks.3.processor.qkv_lora1.down.weight"]
    assert torch.allclose(q.delta_weight().float(), want, atol=1e-5) and q.scale == 1.0
    out = tmp_path / "xlabs_kohya.safetensors"
    lorareg.convert(p, out, to="kohya", family="flux.1-dev")
    assert "lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight" in _keys(out)


# ---------------------------------------------------------------------------------------- conversion

@pytest.fixture
def fp32(monkeypatch):
    monkeypatch.setitem(DTYPE, "dtype", torch.float32)  # fp16 matmuls of 21504 x 3072 ΔW are slow on CPU


def test_kohya_flux_round_trip_bit_exact_and_split_delta(tmp_path, fp32):
    src = kohya_flux(tmp_path / "k.safetensors", blocks=[18], singles=[37])
    d = tmp_path / "d.safetensors"
    rep = lorareg.convert(src, d, to="diffusers", family="flux.1-dev")
    assert not rep.dropped
    keys = _keys(d)
    assert "transformer.transformer_blocks.18.attn.to_q.lora_A.weight" in keys
    assert "transformer.single_transformer_blocks.37.proj_mlp.lora_B.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight" in keys
    a, b = lorareg.load(src, family="flux.1-dev"), lorareg.load(d, family="flux.1-dev")
    assert set(a.modules) == set(b.modules)
    for key in ("transformer:single_transformer_blocks.37.proj_mlp", "transformer:transformer_blocks.18.attn.add_v_proj",
                "transformer:norm_out.linear" if "transformer:norm_out.linear" in a.modules else "transformer:transformer_blocks.18.attn.to_k"):
        assert torch.equal(a.modules[key].delta_weight(), b.modules[key].delta_weight()), key
    back = tmp_path / "k2.safetensors"
    lorareg.convert(d, back, to="kohya", family="flux.1-dev")
    x, y = load_file(str(src)), load_file(str(back))
    assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)
    # ComfyUI spelling of the same file
    c = tmp_path / "c.safetensors"
    lorareg.convert(src, c, to="ldm", family="flux.1-dev", allow_unmapped=False)
    assert "diffusion_model.double_blocks.18.img_attn.qkv.lora_down.weight" in _keys(c)


def test_wan_musubi_round_trips_through_every_format(tmp_path):
    src = musubi_wan(tmp_path / "w.safetensors", blocks=[0, 39], i2v=True)
    x = load_file(str(src))
    for fmt, probe in (("diffusers", "transformer.blocks.0.attn2.add_k_proj.lora_A.weight"),
                       ("ldm", "diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight"),
                       ("kohya", "lora_unet_blocks_0_attn2_add_k_proj.lora_down.weight")):
        mid = tmp_path / f"{fmt}.safetensors"
        lorareg.convert(src, mid, to=fmt)
        assert probe in _keys(mid), sorted(_keys(mid))[:4]
        back = tmp_path / f"{fmt}_back.safetensors"
        lorareg.convert(mid, back, to="musubi")
        y = load_file(str(back))
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x), fmt


# ---------------------------------------------------------------------------------------- ports

def test_hunyuan_video_to_i2v_port(tmp_path):
    src = musubi_hunyuan(tmp_path / "hv.safetensors")  # ss_base_model_version says T2V
    out = tmp_path / "hv_i2v.safetensors"
    r = port(src, to="hunyuan-video-i2v", output=out, progress=False)
    assert r.report.totals.skipped == 0 and r.report.totals.ported == len(lorareg.load(src).modules)
    x, y = load_file(str(src)), load_file(str(out))
    assert all(torch.equal(x[k], y[k]) for k in x)  # a copy keeps the bits, same musubi keys
    assert _meta(out)["lorareg.port.target_family"] == "hunyuan-video-i2v"
    assert lorareg.detect(out).family == "hunyuan-video-i2v"  # the port's output says what it is
    # the 33-channel variant: its image-input projection differs, guidance embedder absent
    g, sd = _gen(6), {}
    _kohya(sd, "img_in_proj", 3072, 16 * 4, g)
    _kohya(sd, "guidance_in_mlp_0", 3072, 256, g)
    _kohya(sd, "double_blocks_0_img_attn_proj", 3072, 3072, g)
    p2 = _save(sd, tmp_path / "hv2.safetensors", {"ss_base_model_version": "hunyuan_video"})
    r = port(p2, to="hunyuan-video-i2v-33ch", output=tmp_path / "o33.safetensors", progress=False)
    skipped = {l.source: l.skipped for l in r.report.layers if l.skipped}
    assert "33 channels" in skipped["transformer:x_embedder.proj"]
    assert "guidance" in skipped["transformer:time_text_embed.guidance_embedder.linear_1"]
    assert r.report.totals.ported == 1


def test_pairs_cli_reasons_every_skip():
    runner = CliRunner()
    for a, b in (("hunyuan-video", "hunyuan-video-i2v"), ("wan2.1-t2v-14b", "wan2.2-t2v-a14b"), ("flux.1-dev", "chroma")):
        res = runner.invoke(main, ["pairs", a, b, "--json"])
        assert res.exit_code == 0, res.output
        pairs = json.loads(res.output)
        assert pairs and all(p["target_module"] or p["skipped"] for p in pairs)
        assert all(len(p["skipped"]) > 20 for p in pairs if p["skipped"])
    wan = json.loads(runner.invoke(main, ["pairs", "wan2.1-t2v-14b", "wan2.2-t2v-a14b", "--json"]).output)
    assert {p["target_component"] for p in wan} == {"transformer", "transformer_2"}
    text = runner.invoke(main, ["pairs", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b"]).output
    assert "REFUSED unless --method align" in text


def test_wan21_to_wan22_writes_both_experts(tmp_path):
    src = musubi_wan(tmp_path / "w21.safetensors", blocks=[0, 1])
    with pytest.raises(InputError, match="--family"):
        port(src, to="wan2.2-t2v-a14b", output=tmp_path / "x.safetensors", progress=False)
    # musubi / ComfyUI load one expert per file
    r = port(src, to="wan2.2-t2v-a14b", family="wan2.1-t2v-14b", output=tmp_path / "w22.safetensors", progress=False)
    assert [f.name for f in r.files] == ["w22_high_noise.safetensors", "w22_low_noise.safetensors"]
    assert "the high-noise expert (transformer)" in r.summary and "the low-noise expert (transformer_2)" in r.summary
    x = load_file(str(src))
    for f, which in zip(r.files, ("high_noise", "low_noise")):
        y = load_file(str(f))
        assert set(y) == set(x) and all(torch.equal(x[k], y[k]) for k in x)
        assert _meta(f)["lorareg.expert"] == which
        assert lorareg.detect(f).family == "wan2.2-t2v-a14b"
    # a single-expert file says which expert it is: porting it again to its own family keeps it there
    again = port(r.files[1], output=tmp_path / "again.safetensors", format="diffusers", progress=False)
    assert {l.target.split(":")[0] for l in again.report.layers} == {"transformer_2"}
    # diffusers: both experts in one file, transformer. and transformer_2.
    d = port(src, to="wan2.2-t2v-a14b", family="wan2.1-t2v-14b", format="diffusers", output=tmp_path / "w22d.safetensors", progress=False)
    keys = _keys(d.output)
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in keys and "transformer_2.blocks.1.ffn.net.2.lora_B.weight" in keys
    assert d.report.experts == {"transformer": "high_noise", "transformer_2": "low_noise"}
    assert d.report.totals.energy_kept == pytest.approx(1.0)
    # --expert low: only the low-noise expert
    lo = port(src, to="wan2.2-t2v-a14b", family="wan2.1-t2v-14b", expert="low", output=tmp_path / "lo.safetensors", progress=False)
    assert [f.name for f in lo.files] == ["lo_low_noise.safetensors"]


def test_single_expert_file_needs_expert(tmp_path):
    src = musubi_wan(tmp_path / "e.safetensors", blocks=[0], meta={"modelspec.architecture": "wan2.2-t2v-a14b"})
    with pytest.raises(InputError, match="--expert"):
        port(src, output=tmp_path / "o.safetensors", progress=False)
    r = port(src, expert="low", format="diffusers", output=tmp_path / "o.safetensors", progress=False)
    assert all(k.startswith("transformer_2.") for k in _keys(r.output) if "lora_" in k)


def test_wan21_i2v_to_wan22_i2v_drops_image_cross_attention(tmp_path):
    src = musubi_wan(tmp_path / "i2v.safetensors", blocks=[0, 1], i2v=True)
    r = port(src, to="wan2.2-i2v-a14b", output=tmp_path / "o.safetensors", format="diffusers", progress=False)
    skipped = [l for l in r.report.layers if l.skipped]
    assert len(skipped) == 4 and all("no image cross-attention" in l.skipped for l in skipped)
    assert 0.1 < r.report.totals.energy_skipped < 0.2  # 4 of 24 equal-size layers
    assert "energy of the LoRA in skipped layers" in r.summary
    keys = _keys(r.output)
    assert not any("add_k_proj" in k for k in keys) and "transformer_2.blocks.0.attn2.to_k.lora_A.weight" in keys
    # T2V -> I2V within 2.1: a copy, the image-only layers untouched
    t2v = musubi_wan(tmp_path / "t2v.safetensors", blocks=[0])
    r = port(t2v, family="wan2.1-t2v-14b", to="wan2.1-i2v-14b", output=tmp_path / "ti.safetensors", progress=False)
    assert r.report.totals.skipped == 0


def test_flux_to_krea_kontext_chroma(tmp_path, fp32):
    src = kohya_flux(tmp_path / "f.safetensors", blocks=[0], singles=[1],
                     meta={"ss_base_model_version": "flux1"})
    for target in ("flux.1-krea-dev", "flux.1-kontext-dev"):
        r = port(src, to=target, output=tmp_path / f"{target}.safetensors", progress=False)
        assert r.report.totals.skipped == 0 and _meta(r.output)["lorareg.port.target_family"] == target
    r = port(src, to="chroma", output=tmp_path / "chroma.safetensors", progress=False)
    skipped = {l.source: l.skipped for l in r.report.layers if l.skipped}
    assert set(skipped) >= {"transformer:transformer_blocks.0.norm1.linear", "transformer:single_transformer_blocks.1.norm.linear"}
    assert all("modulation" in why for k, why in skipped.items() if k.startswith("transformer:"))
    assert "no counterpart of component text_encoder" in skipped["text_encoder:text_model.encoder.layers.0.self_attn.q_proj"]
    # the share of the LoRA's energy that lived in the dropped layers is reported
    lora = lorareg.load(src)

    def energy(m):  # ‖up @ down‖² · scale², from the factors
        up, down = m.factors["up"].torch().double(), m.factors["down"].torch().double()
        return float(torch.trace((up.T @ up) @ (down @ down.T))) * m.scale ** 2

    total = sum(energy(m) for m in lora.modules.values())
    dropped = sum(energy(lora.modules[k]) for k in skipped)
    assert r.report.totals.energy_skipped == pytest.approx(dropped / total, rel=1e-3)
    keys = _keys(r.output)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys and not any("mod_lin" in k for k in keys)
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight" not in keys  # Chroma's T5 is text_encoder


def test_name_only_pairs_refused(tmp_path):
    src = musubi_wan(tmp_path / "s.safetensors", blocks=[0], dim=1536, ffn=8960)
    with pytest.raises(InputError, match="only share a name"):
        port(src, to="wan2.1-t2v-14b", output=tmp_path / "o.safetensors", progress=False)
    res = CliRunner().invoke(main, ["port", str(src), "--to", "wan2.1-t2v-14b", "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code != 0 and "refused" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o.safetensors").exists()


def test_lycoris_on_flux_and_wan_read_and_converted(tmp_path):
    """LyCORIS through sd-scripts / musubi (lycoris.kohya): LoKr / LoHa factors on the original names."""
    g = _gen(7)
    sd = {"lora_unet_double_blocks_3_img_mlp_2.lokr_w1": torch.randn(4, 4, generator=g),
          "lora_unet_double_blocks_3_img_mlp_2.lokr_w2": torch.randn(768, 3072, generator=g) * 0.01,
          "lora_unet_double_blocks_3_img_mlp_2.alpha": torch.tensor(1.0)}
    p = _save(sd, tmp_path / "lokr.safetensors")
    det = lorareg.detect(p)
    assert (det.format, det.variant) == ("kohya", "flux") and "flux.1-dev" in det.undecided
    lora = lorareg.load(p, family="flux.1-dev")
    assert lora.adapter_types == ["lokr"] and "transformer:transformer_blocks.3.ff.net.2" in lora.modules
    out = tmp_path / "lokr_comfy.safetensors"
    lorareg.convert(p, out, to="ldm", family="flux.1-dev")
    assert "diffusion_model.double_blocks.3.img_mlp.2.lokr_w2" in _keys(out)
    sd = {}
    for f in ("hada_w1_a", "hada_w2_a"):
        sd[f"lora_unet_blocks_5_ffn_2.{f}"] = torch.randn(5120, 2, generator=g)
    for f in ("hada_w1_b", "hada_w2_b"):
        sd[f"lora_unet_blocks_5_ffn_2.{f}"] = torch.randn(2, 13824, generator=g)
    p = _save(sd, tmp_path / "loha.safetensors")
    assert lorareg.detect(p).format == "musubi"
    out = tmp_path / "loha_d.safetensors"
    lorareg.convert(p, out, to="kohya", family="wan2.1-t2v-14b")
    assert "lora_unet_blocks_5_ffn_net_2.hada_w1_a" in _keys(out)
