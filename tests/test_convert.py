"""Conversions between formats: exact for plain LoRA, ΔW preserved, spelling kept on round trips."""

import pytest
import torch
from safetensors import safe_open

import lorareg
from lorareg.core.lora import FormatState
from lora_factory import make_lora, max_delta_error, write

SDXL_SELECT = r"^unet:.*attentions\.0\.transformer_blocks\.[01]\.attn[12]\.to_|^text_encoder(_2)?:.*layers\.[0-2]\.self_attn"
SD15_SELECT = r"^unet:(down_blocks\.1\..*(attn1|attn2|proj_in|conv1)|mid_block.*to_q)|^text_encoder:.*layers\.0\.self_attn\.q_proj"
HUNYUAN_SELECT = r"^transformer:(transformer_blocks\.[01]\.(attn\.(to_|add_)|ff\.net)|single_transformer_blocks\.0\.(attn\.to_|proj_))"


def raw(path):
    out = {}
    with safe_open(str(path), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            out[k] = (t.dtype, tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).clone() if t.numel() else t)
    return out


def assert_bit_identical(a, b):
    ra, rb = raw(a), raw(b)
    assert set(ra) == set(rb), sorted(set(ra) ^ set(rb))[:5]
    for k in ra:
        assert ra[k][0] == rb[k][0] and ra[k][1] == rb[k][1], k
        assert torch.equal(ra[k][2], rb[k][2]), k


CASES = [
    ("sdxl", SDXL_SELECT, ("kohya", {"unet": "ldm"}), ["diffusers"]),
    ("sdxl", SDXL_SELECT, ("kohya", {}), ["diffusers"]),
    ("sdxl", SDXL_SELECT.split("|")[0], ("kohya", {"unet": "ldm"}), ["ldm", "diffusers"]),
    ("sd15", SD15_SELECT, ("kohya", {}), ["diffusers"]),
    ("sd15", SD15_SELECT.split("|^text")[0], ("kohya", {}), ["ldm", "diffusers"]),
    ("hunyuan-video", HUNYUAN_SELECT, ("diffusers", {}), ["musubi", "kohya"]),
]


@pytest.mark.parametrize("family,select,source,targets", CASES, ids=[f"{c[0]}-{c[2][0]}{'-sgm' if c[2][1] else ''}-{'+'.join(c[3])}" for c in CASES])
def test_round_trip_is_bit_exact_and_preserves_delta(tmp_path, family, select, source, targets):
    fmt, schemes = source
    lora = make_lora(family, select, alpha=3.0)
    if schemes:
        lora.format_state = FormatState(format=fmt, variant="kohya", schemes=schemes)
    src = write(lora, tmp_path / "src.safetensors", fmt)
    original = lorareg.load(src)
    assert original.family == family and original.format_state.format == fmt
    assert max_delta_error(lora, original) == 0.0
    for target in targets:
        mid = tmp_path / f"via-{target}.safetensors"
        back = tmp_path / f"back-{target}.safetensors"
        report = lorareg.convert(src, mid, to=target)
        assert not report.dropped and not report.refactored
        converted = lorareg.load(mid)
        assert converted.format_state.format == target
        assert converted.family == family
        assert max_delta_error(original, converted) < 1e-6
        lorareg.convert(mid, back, to=fmt)
        assert_bit_identical(src, back)


def test_kohya_sgm_names_are_kept(tmp_path):
    lora = make_lora("sdxl", SDXL_SELECT)
    lora.format_state = FormatState(format="kohya", variant="kohya", schemes={"unet": "ldm"})
    src = write(lora, tmp_path / "k.safetensors", "kohya")
    keys = list(raw(src))
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in keys)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert any(k.startswith("lora_te2_") for k in keys)
    det = lorareg.detect(src)
    assert (det.format, det.family) == ("kohya", "sdxl")


def test_sd15_kohya_uses_lora_te_prefix(tmp_path):
    src = write(make_lora("sd15", SD15_SELECT), tmp_path / "k.safetensors", "kohya")
    keys = list(raw(src))
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys)
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_proj_in.") for k in keys)


def test_musubi_fused_qkv_round_trip(tmp_path):
    """musubi fuses q/k/v: reading splits B rows exactly, writing re-fuses with the shared A bit for bit."""
    lora = make_lora("hunyuan-video", HUNYUAN_SELECT, alpha=4.0)
    src = write(lora, tmp_path / "musubi.safetensors", "musubi")
    keys = list(raw(src))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in keys
    up = raw(src)["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert up[1][0] == 3 * 3072  # rank grows: q, k, v stacked block-diagonally
    loaded = lorareg.load(src)
    assert loaded.format_state.format == "musubi"
    assert max_delta_error(lora, loaded) < 1e-3  # fp16 factors rescaled by each part's scale
    # now a true musubi file: one shared A per fused module -> split -> fused again is bit exact
    diffusers = tmp_path / "d.safetensors"
    lorareg.convert(src, diffusers, to="diffusers")
    again = tmp_path / "again.safetensors"
    lorareg.convert(diffusers, again, to="musubi")
    assert_bit_identical(src, again)


@pytest.mark.parametrize("variant", ["other", "diffusion-pipe"])
def test_musubi_baked_alpha_variants(tmp_path, variant):
    lora = make_lora("hunyuan-video", HUNYUAN_SELECT, alpha=2.0, dtype=torch.float32)
    path = write(lora, tmp_path / "m.safetensors", "musubi", variant=variant)
    keys = list(raw(path))
    assert not any(k.endswith(".alpha") for k in keys)
    prefix = "diffusion_model." if variant == "other" else "transformer."
    assert any(k.startswith(prefix + "double_blocks.0.img_attn_qkv.lora_A") for k in keys)
    back = lorareg.load(path)
    assert back.format_state.variant == variant
    assert max_delta_error(lora, back) < 1e-5


def test_peft_folder_round_trip(tmp_path):
    lora = make_lora("tinyllama", r"model\.layers\.[01]\.self_attn\.(q|v)_proj", rank=8, alpha=16.0)
    lora.modules["model:model.layers.1.self_attn.v_proj"].alpha = 4.0
    out = tmp_path / "adapter"
    lorareg.save(lora, out, format="peft")
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    det = lorareg.detect(out)
    assert (det.format, det.family) == ("peft", "tinyllama")
    back = lorareg.load(out)
    assert max_delta_error(lora, back) == 0.0
    again = tmp_path / "again"
    lorareg.save(back, again, format="peft")
    assert_bit_identical(out / "adapter_model.safetensors", again / "adapter_model.safetensors")


def test_diffusers_alpha_lives_in_adapter_metadata(tmp_path):
    import json

    src = write(make_lora("sd15", SD15_SELECT, alpha=1.0), tmp_path / "k.safetensors", "kohya")
    out = tmp_path / "d.safetensors"
    lorareg.convert(src, out, to="diffusers")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert not any(k.endswith(".alpha") for k in f.keys())
    packed = json.loads(meta["lora_adapter_metadata"])
    assert packed["unet.r"] == 4 and packed["unet.lora_alpha"] == 1
    assert meta["lorareg.source_format"] == "kohya/kohya" and len(meta["lorareg.source_sha256"]) == 64


def test_metadata_is_carried_over(tmp_path):
    lora = make_lora("sd15", SD15_SELECT)
    lora.metadata = {"ss_training_comment": "hello", "ss_tag_frequency": '{"a": {"b": 1}}'}
    src = write(lora, tmp_path / "k.safetensors", "kohya")
    out = tmp_path / "d.safetensors"
    lorareg.convert(src, out, to="diffusers")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_training_comment"] == "hello" and meta["lorareg.version"] == lorareg.__version__


def test_ldm_format_drops_text_encoders_with_a_reason(tmp_path):
    src = write(make_lora("sd15", SD15_SELECT), tmp_path / "k.safetensors", "kohya")
    report = lorareg.convert(src, tmp_path / "l.safetensors", to="ldm")
    assert report.dropped and all("cannot name sd15 text_encoder modules" in d.reason for d in report.dropped)
    assert report.modules_out == report.modules_in - len(report.dropped)


def test_dora_magnitude_survives_kohya_diffusers_round_trip(tmp_path):
    """LyCORIS/kohya store the DoRA magnitude as a column [out, 1]; PEFT/diffusers as a vector [out]."""
    from lorareg.core.io import LazyTensor

    lora = make_lora("sd15", r"^unet:down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1\.to_(q|v)$", alpha=2.0)
    for m in lora.modules.values():
        m.dora_scale = LazyTensor.from_torch(torch.rand(m.weight_shape[0], 1).half() + 0.5)
    src = write(lora, tmp_path / "dora.safetensors", "kohya")
    assert any(k.endswith(".dora_scale") for k in raw(src))
    mid = tmp_path / "d.safetensors"
    lorareg.convert(src, mid, to="diffusers")
    vectors = {k: v for k, v in raw(mid).items() if k.endswith(".lora_magnitude_vector")}
    assert len(vectors) == 2 and all(len(v[1]) == 1 for v in vectors.values())
    back = tmp_path / "back.safetensors"
    lorareg.convert(mid, back, to="kohya")
    assert_bit_identical(src, back)
