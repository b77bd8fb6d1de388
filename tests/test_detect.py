"""Detection: format and family from keys and shapes first, metadata second, with evidence."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import lorareg
from lorareg.apps.cli.main import main
from lorareg.core.lora import FormatState
from lora_factory import make_lora, write

ATTN = r"^unet:.*transformer_blocks\.\d+\.attn[12]\.to_(q|k|v|out\.0)$"


@pytest.mark.parametrize("family", ["sd15", "sd21", "sdxl", "ssd-1b", "segmind-vega"])
@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "ldm"])
def test_unet_attention_lora_detected(tmp_path, family, fmt):
    lora = make_lora(family, ATTN, rank=2)
    if fmt == "kohya" and family != "sd15":
        lora.format_state = FormatState(format="kohya", variant="kohya", schemes={"unet": "ldm"})
    det = lorareg.detect(write(lora, tmp_path / "l.safetensors", fmt))
    assert (det.format, det.family) == (fmt, family)
    assert det.confidence >= 0.85, det


def test_sd15_and_sd21_differ_by_cross_attention_width(tmp_path):
    for family in ("sd15", "sd21"):
        det = lorareg.detect(write(make_lora(family, r"attn2\.to_k$", rank=2), tmp_path / f"{family}.safetensors", "kohya"))
        assert det.family == family and det.fitting_families == [family]


def test_ssd1b_lora_fits_sdxl_too_and_says_so(tmp_path):
    det = lorareg.detect(write(make_lora("ssd-1b", ATTN, rank=2), tmp_path / "l.safetensors", "diffusers"))
    assert det.family == "ssd-1b"
    assert set(det.fitting_families) >= {"ssd-1b", "sdxl"}
    assert any("also fit" in e for e in det.evidence)


def test_sdxl_lora_does_not_fit_distilled_models(tmp_path):
    det = lorareg.detect(write(make_lora("sdxl", ATTN, rank=2), tmp_path / "l.safetensors", "diffusers"))
    assert det.family == "sdxl" and det.fitting_families == ["sdxl"]


def test_text_encoder_only_lora_is_ambiguous(tmp_path):
    """CLIP-L is the same in SD1.5 and SDXL: the result lists both and confidence drops."""
    lora = make_lora("sd15", r"^text_encoder:.*self_attn\.q_proj", rank=2)
    det = lorareg.detect(write(lora, tmp_path / "te.safetensors", "kohya"))
    assert {"sd15", "sdxl"} <= set(det.fitting_families)
    assert det.confidence < 0.9


def test_metadata_breaks_a_structural_tie(tmp_path):
    lora = make_lora("sd15", r"^text_encoder:.*self_attn\.q_proj", rank=2)
    lora.metadata = {"ss_base_model_version": "sdxl_base_v1-0"}
    det = lorareg.detect(write(lora, tmp_path / "te.safetensors", "kohya"))
    assert det.family == "sdxl"
    assert any("ss_base_model_version=sdxl_base_v1-0" in e for e in det.evidence)


def test_hunyuan_musubi_vs_kohya(tmp_path):
    sel = r"^transformer:(transformer_blocks\.0\.(attn\.(to_|add_)|ff\.net)|single_transformer_blocks\.0\.(attn\.to_|proj_))"
    musubi = lorareg.detect(write(make_lora("hunyuan-video", sel, rank=2), tmp_path / "m.safetensors", "musubi"))
    assert (musubi.format, musubi.variant, musubi.family) == ("musubi", "default", "hunyuan-video")
    assert any("original" in e for e in musubi.evidence)
    kohya = lorareg.detect(write(make_lora("hunyuan-video", sel, rank=2), tmp_path / "k.safetensors", "kohya"))
    assert (kohya.format, kohya.family) == ("kohya", "hunyuan-video")


def test_hybrid_dotted_paths_with_kohya_suffixes(tmp_path):
    sd = load_file(write(make_lora("sdxl", ATTN, rank=2), tmp_path / "d.safetensors", "diffusers"))
    hybrid = {}
    for k, v in sd.items():
        k = k.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight")
        hybrid[k] = v
        if k.endswith(".lora_down.weight"):
            hybrid[k.replace(".lora_down.weight", ".alpha")] = torch.tensor(1.0)
    p = tmp_path / "hybrid.safetensors"
    save_file(hybrid, p)
    det = lorareg.detect(p)
    assert (det.format, det.variant, det.family) == ("diffusers", "hybrid", "sdxl")
    lora = lorareg.load(p)
    m = next(iter(lora.modules.values()))
    assert m.alpha == 1.0 and m.scale == 0.5


def test_doubled_prefix_is_handled(tmp_path):
    sel = r"^transformer:transformer_blocks\.0\.attn\.to_(q|k)$"
    sd = load_file(write(make_lora("hunyuan-video", sel, rank=2), tmp_path / "d.safetensors", "diffusers"))
    p = tmp_path / "doubled.safetensors"
    save_file({"transformer." + k: v for k, v in sd.items()}, p)
    det = lorareg.detect(p)
    assert (det.format, det.family) == ("diffusers", "hunyuan-video")
    assert any("doubled" in e for e in det.evidence)
    assert len(lorareg.load(p).modules) == 2


def test_diffusers_old_processor_keys(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for blk in ("down_blocks.1.attentions.0", "up_blocks.2.attentions.2"):
        for p, proj in (("to_q_lora", "to_q"), ("to_out_lora", "to_out.0")):
            base = f"unet.{blk}.transformer_blocks.0.attn1.processor.{p}"
            sd[base + ".down.weight"] = torch.randn(4, 640, generator=g)
            sd[base + ".up.weight"] = torch.randn(640, 4, generator=g)
        base = f"unet.{blk}.transformer_blocks.0.attn2.processor.to_k_lora"  # cross-attention: 768 wide in SD1.5
        sd[base + ".down.weight"] = torch.randn(4, 768, generator=g)
        sd[base + ".up.weight"] = torch.randn(640, 4, generator=g)
    path = tmp_path / "old.safetensors"
    save_file(sd, path)
    det = lorareg.detect(path)
    assert (det.format, det.family) == ("diffusers-old", "sd15")
    lora = lorareg.load(path)
    assert "unet:up_blocks.2.attentions.2.transformer_blocks.0.attn1.to_out.0" in lora.modules
    out = tmp_path / "new.safetensors"
    lorareg.convert(path, out, to="diffusers")
    assert lorareg.detect(out).format == "diffusers"


def test_shape_mismatch_is_not_a_match(tmp_path):
    """An SD1.5 key with SDXL-width tensors does not parse as SD1.5."""
    p = tmp_path / "bad.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, 4)}, p)
    info = lorareg.inspect(p)
    assert info.family != "sd15" or info.unmapped_keys


def test_inspect_json_fields(tmp_path):
    lora = make_lora("sdxl", ATTN + r"|^text_encoder_2:.*layers\.0\.self_attn", rank=4, alpha=2.0)
    p = write(lora, tmp_path / "l.safetensors", "kohya")
    res = CliRunner().invoke(main, ["inspect", str(p), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    for field in ("format", "family", "adapter_type", "components", "num_modules", "ranks", "alphas", "unmapped_keys", "metadata", "evidence", "confidence"):
        assert field in info
    assert info["format"] == "kohya" and info["family"] == "sdxl" and info["adapter_type"] == "lora"
    assert info["components"] == ["text_encoder_2", "unet"]
    assert info["ranks"] == {"4": len(lora.modules)} and info["alphas"] == {"2": len(lora.modules)}
    text = CliRunner().invoke(main, ["inspect", str(p)]).stdout
    assert "kohya" in text and "sdxl" in text


def test_locon_reported_as_locon(tmp_path):
    lora = make_lora("sd15", r"^unet:down_blocks\.0\.resnets\.0\.conv1$", rank=2)
    info = lorareg.inspect(write(lora, tmp_path / "c.safetensors", "kohya"))
    assert info.adapter_type == "locon"
