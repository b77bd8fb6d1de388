"""DoRA files written by LyCORIS (dora_scale, per output or per input) on a tiny SD1.5-like UNet:
read as DoRA, W' as LyCORIS computes it, converted for diffusers (which loads it), refactored to plain
LoRA where the target format cannot hold the magnitude, never dropped silently."""

import pytest
import torch
from safetensors.torch import load_file

import lorareg
from lorareg.engine.dora import IN, OUT
from lorareg.core.errors import ConversionError
from lorareg.formats.base_refactor import dora_axis, dora_delta
from lora_factory import tiny_family_config
from peer_files import lycoris_preset, peer_messages, rel_err

pytestmark = pytest.mark.usefixtures("tiny_families")
NAMES = [
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.1.attentions.0.proj_in",
    "down_blocks.0.resnets.0.conv1",  # 3x3 conv
]


def _unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(tiny_family_config("tiny-sd15", "unet"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd15")
    _unet().save_pretrained(root / "unet")
    return root


def _lycoris_dora(base, path, wd_on_out: bool):
    """LyCORIS's own DoRA network on the base UNet, saved with its save_weights; returns W' per module."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    gen = torch.Generator().manual_seed(1)
    with lycoris_preset(NAMES) as Net:
        net = Net(unet, multiplier=1.0, lora_dim=4, alpha=2.0, conv_lora_dim=4, conv_alpha=2.0,
                  weight_decompose=True, wd_on_out=wd_on_out)
    net.apply_to()
    with torch.no_grad():
        for n, p in net.named_parameters():
            if p.dim() > 0:
                p.copy_(p * (1 + 0.3 * torch.rand(p.shape, generator=gen)) if "dora_scale" in n else 0.1 * torch.randn(p.shape, generator=gen))
    net.save_weights(str(path), torch.float32, {})
    probes = {}  # LyCORIS's forward is the truth: name -> (input, output)
    with torch.no_grad():
        for name in NAMES:
            mod = unet.get_submodule(name)
            x = torch.randn(3, mod.in_features, generator=gen) if isinstance(mod, torch.nn.Linear) else torch.randn(1, mod.in_channels, 6, 6, generator=gen)
            probes[name] = (x, mod(x))
    return probes


def _run(mod, x, weight):
    """The module's op with another weight (its bias, stride, padding)."""
    if isinstance(mod, torch.nn.Linear):
        return torch.nn.functional.linear(x, weight.to(x.dtype), mod.bias)
    return torch.nn.functional.conv2d(x, weight.to(x.dtype), mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)


@pytest.mark.parametrize("wd_on_out", [True, False])
def test_lycoris_dora_reads_as_dora_with_lycoris_w_prime(base, tmp_path, wd_on_out):
    from diffusers import UNet2DConditionModel

    path = tmp_path / "dora.safetensors"
    probes = _lycoris_dora(base, path, wd_on_out)
    assert any(k.endswith(".dora_scale") for k in load_file(path))
    info = lorareg.inspect(path, family="tiny-sd15")
    assert info.adapter_type == "dora"
    lora = lorareg.load(path, family="tiny-sd15")
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    for name in NAMES:
        m = lora.modules[f"unet:{name}"]
        assert dora_axis(m) == (OUT if wd_on_out else IN)
        mod = unet.get_submodule(name)
        w = mod.weight.detach()
        x, y = probes[name]
        assert rel_err(_run(mod, x, w.double() + dora_delta(m, w)), y) < 1e-5, name
    # kohya keeps the magnitude as LyCORIS wrote it
    back = tmp_path / "back.safetensors"
    lorareg.convert(path, back, to="kohya", family="tiny-sd15")
    a, b = load_file(path), load_file(back)
    for k, v in a.items():
        if k.endswith("dora_scale"):
            assert torch.equal(b[k], v), k


def test_diffusers_loads_the_converted_dora(base, tmp_path):
    """diffusers filters dora_scale keys out of kohya files; converted to its own format it keeps them."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    path = tmp_path / "dora.safetensors"
    probes = _lycoris_dora(base, path, True)
    out = tmp_path / "diffusers.safetensors"
    report = lorareg.convert(path, out, to="diffusers", family="tiny-sd15")
    assert not report.dropped
    assert sum(k.endswith("lora_magnitude_vector") for k in load_file(out)) == len(NAMES)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    with peer_messages() as msgs:
        state, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(out), return_lora_metadata=True)
        StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, adapter_name="d", metadata=meta)
    assert msgs == [], msgs
    assert all(hasattr(unet.get_submodule(n), "lora_magnitude_vector") for n in NAMES)
    with torch.no_grad():
        for name in NAMES:
            x, y = probes[name]
            assert rel_err(unet.get_submodule(name)(x), y) < 1e-5, name


def test_magnitude_a_format_cannot_hold_is_refactored_or_refused(base, tmp_path):
    """PEFT's magnitude is per output row: a per-input (wd_on_out=False) DoRA needs the base weight."""
    path = tmp_path / "dora_in.safetensors"
    probes = _lycoris_dora(base, path, False)
    out = tmp_path / "o.safetensors"
    with pytest.raises(ConversionError, match="DoRA.*--model.*--drop-dora"):
        lorareg.convert(path, out, to="diffusers", family="tiny-sd15")
    assert not out.exists()
    report = lorareg.convert(path, out, to="diffusers", family="tiny-sd15", drop_dora=True)
    assert len([d for d in report.dropped if "DoRA magnitude" in d.item]) == len(NAMES)
    out2 = tmp_path / "o2.safetensors"
    report = lorareg.convert(path, out2, to="diffusers", family="tiny-sd15", model=str(base), rank=64)
    assert {r.from_type for r in report.refactored} == {"dora"} and len(report.refactored) == len(NAMES)
    assert all(r.relative_error < 1e-5 for r in report.refactored), report.refactored  # rank 64 >= every module's rank
    assert not any(k.endswith("lora_magnitude_vector") for k in load_file(out2))
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    plain = lorareg.load(out2)
    for name in NAMES:
        mod = unet.get_submodule(name)
        x, y = probes[name]
        got = mod.weight.detach() + plain.modules[f"unet:{name}"].delta_weight().reshape(mod.weight.shape)
        assert rel_err(_run(mod, x, got), y) < 1e-4, name


def test_diffusers_loads_a_ported_dora(base, tmp_path):
    """A port (here to the same UNet, through prolora-full at another rank: the magnitude recomputed
    from the norms) written for diffusers: diffusers' forward is LyCORIS's."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    path = tmp_path / "dora.safetensors"
    probes = _lycoris_dora(base, path, True)
    out = tmp_path / "ported.safetensors"
    res = lorareg.port(lorareg.load(path, family="tiny-sd15"), source_model=str(base), target_model=str(base), method="prolora-full",
                       rank=8, format="diffusers", output=out, progress=False)
    assert {l.dora for l in res.report.layers} == {"transferred"}
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    state, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, adapter_name="p", metadata=meta)
    with torch.no_grad():
        for name in NAMES:
            x, y = probes[name]
            assert rel_err(unet.get_submodule(name)(x), y) < 1e-4, name
