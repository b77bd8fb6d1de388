"""SVDiff spectral shifts: read, inspected, converted to LoRA through the base weight's SVD, ported
(spectral: the same shifts on the target's spectrum; or the LoRA form with the other methods).

svdiff-pytorch (0.2.0) pins diffusers==0.14.0, so it is not installed next to this project's diffusers:
the files here are written in its key layout (the named parameters of its SVD layers: one
``<module path>.delta`` per Linear/Conv2d of length min(out, in·kh·kw), and one of length 1 per
GroupNorm/LayerNorm), and W' follows its layers' forward: U diag(ReLU(σ + δ)) Vᵀ of the flattened weight.
"""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import lorareg
from lorareg.apps.cli.main import main
from lorareg.core.errors import ConversionError, DetectionError, InputError
from lora_factory import tiny_family_config

pytestmark = pytest.mark.usefixtures("tiny_families")
ADAPTED = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"


def _unet(seed):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(tiny_family_config("tiny-sd15", "unet"))


def _reference(weight, delta):
    """svdiff-pytorch's forward, written from the paper: the SVD of the flattened weight (here in
    float64: svdiff-pytorch's fp32 SVD differs from it by fp32 rounding only)."""
    U, S, Vh = torch.linalg.svd(weight.reshape(weight.shape[0], -1).double(), full_matrices=False)
    return (U @ torch.diag(torch.relu(S + delta.double())) @ Vh).reshape(weight.shape).float()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("svdiff")
    v1 = _unet(0)
    v1.save_pretrained(root / "v1" / "unet")
    v2 = _unet(0)  # v1 with its rows rescaled and some noise: another spectrum, related singular vectors
    v2.load_state_dict({k: v * (1 + 0.2 * torch.rand(v.shape[0], *[1] * (v.dim() - 1))) + 0.02 * v.std() * torch.randn_like(v)
                        for k, v in v1.state_dict().items()})
    v2.save_pretrained(root / "v2" / "unet")
    gen = torch.Generator().manual_seed(3)
    sd = {}
    for name, mod in v1.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            _, S, _ = torch.linalg.svd(mod.weight.detach().reshape(mod.weight.shape[0], -1), full_matrices=False)
            sd[f"{name}.delta"] = 0.3 * S * torch.randn(S.shape, generator=gen)
        elif isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and mod.weight is not None:
            sd[f"{name}.delta"] = 0.01 * torch.randn(1, generator=gen)
    (root / "shifts").mkdir()
    save_file(sd, str(root / "shifts" / "spectral_shifts.safetensors"))
    return root


def _weights(root):
    from diffusers import UNet2DConditionModel

    return {n.removesuffix(".weight"): p.detach() for n, p in UNet2DConditionModel.from_pretrained(root / "unet").named_parameters()
            if n.endswith(".weight")}


def test_inspect_names_svdiff_and_lists_norm_shifts(models):
    info = lorareg.inspect(models / "shifts" / "spectral_shifts.safetensors")
    assert (info.format, info.family, info.adapter_type) == ("svdiff", "tiny-sd15", "svdiff")
    norms = [k for k in load_file(models / "shifts" / "spectral_shifts.safetensors") if "norm" in k and "attn" not in k]
    assert norms and all(k in info.unmapped_keys for k in norms)  # listed, never dropped silently


def test_wrong_length_is_not_read_as_svdiff(models, tmp_path):
    bad = {f"{ADAPTED}.delta": torch.zeros(5)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(DetectionError, match="no known LoRA key format"):
        lorareg.load(tmp_path / "bad.safetensors")  # [5] fits no weight: the shape check keeps it out


def test_convert_to_lora_needs_the_base_and_reports_the_error(models, tmp_path):
    src = models / "shifts" / "spectral_shifts.safetensors"
    out = tmp_path / "lora.safetensors"
    with pytest.raises(ConversionError, match="SVDiff.*--model"):
        lorareg.convert(src, out, to="diffusers", rank=8, allow_unmapped=True)
    assert not out.exists()
    res = CliRunner().invoke(main, ["convert", str(src), "--to", "diffusers", "-o", str(out), "--rank", "8"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    report = lorareg.convert(src, out, to="diffusers", rank=64, allow_unmapped=True, model=str(models / "v1"))
    assert {r.from_type for r in report.refactored} == {"svdiff"} and len(report.refactored) == 83
    lora, W = lorareg.load(out), _weights(models / "v1")
    shifts = load_file(src)
    for r in report.refactored:
        name = r.module.split(":", 1)[1]
        want = _reference(W[name], shifts[f"{name}.delta"]) - W[name]
        got = lora.modules[r.module].delta_weight().reshape(want.shape)
        err = float((got - want).norm() / want.norm())
        assert abs(err - r.relative_error) < 1e-3 + 1e-3 * r.relative_error, name  # the error reported is the error made
        if min(want.shape[0], want[0].numel()) <= 64:
            assert err < 1e-4, name
    low = lorareg.convert(src, tmp_path / "low.safetensors", to="diffusers", rank=2, allow_unmapped=True, model=str(models / "v1"))
    assert max(r.relative_error for r in low.refactored) > 0.1


def test_spectral_port_applies_the_shifts_to_the_target_spectrum(models, tmp_path):
    src = models / "shifts" / "spectral_shifts.safetensors"
    res = lorareg.port(src, method="spectral", output=tmp_path / "s.safetensors", progress=False)
    assert res.report.totals.ported == 83 and all(l.method == "spectral" for l in res.report.layers)
    a, b = load_file(src), load_file(tmp_path / "s.safetensors")
    assert all(torch.equal(b[k], a[k]) for k in b) and len(b) == 83
    assert len(res.report.output["dropped"]) == len(a) - 83  # the norm shifts, listed
    # as a LoRA on the target: W'_t − W_t with W'_t = U_t diag(ReLU(σ_t + δ)) V_tᵀ
    with pytest.raises(InputError, match="--target-model"):
        lorareg.port(src, method="spectral", format="diffusers", output=tmp_path / "x.safetensors", progress=False)
    lorareg.port(src, method="spectral", source_model=str(models / "v1"), target_model=str(models / "v2"), rank=64,
                 format="diffusers", output=tmp_path / "l.safetensors", progress=False)
    lora, W2 = lorareg.load(tmp_path / "l.safetensors"), _weights(models / "v2")
    name = ADAPTED
    want = _reference(W2[name], a[f"{name}.delta"]) - W2[name]
    assert float((lora.modules[f"unet:{name}"].delta_weight().reshape(want.shape) - want).norm() / want.norm()) < 1e-4


def test_lora_form_port_and_its_refusal(models, tmp_path):
    src = models / "shifts" / "spectral_shifts.safetensors"
    with pytest.raises(InputError, match="--method spectral"):
        lorareg.port(src, output=tmp_path / "x.safetensors", progress=False)
    res = lorareg.port(src, method="copy", source_model=str(models / "v1"), target_model=str(models / "v2"), rank=64,
                       format="diffusers", output=tmp_path / "l.safetensors", progress=False)
    assert res.report.totals.ported == 83
    lora, W1, shifts = lorareg.load(tmp_path / "l.safetensors"), _weights(models / "v1"), load_file(src)
    want = _reference(W1[ADAPTED], shifts[f"{ADAPTED}.delta"]) - W1[ADAPTED]  # copy: the source's ΔW
    assert float((lora.modules[f"unet:{ADAPTED}"].delta_weight().reshape(want.shape) - want).norm() / want.norm()) < 1e-4
    out = CliRunner().invoke(main, ["port", str(src), "--method", "spectral", "-o", str(tmp_path / "c.safetensors"), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["totals"]["ported"] == 83


def test_real_sd15_unet_and_text_encoder_layouts(tmp_path):
    """Every Linear/Conv2d of the real SD1.5 UNet (built on meta: shapes only) and CLIP-L: detected as sd15."""
    from peer_files import meta_unet

    unet = meta_unet("sd15")
    sd = {f"{n}.delta": torch.zeros(min(m.weight.shape[0], m.weight[0].numel())) for n, m in unet.named_modules()
          if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    sd.update({f"{n}.delta": torch.zeros(1) for n, m in unet.named_modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))})
    save_file(sd, str(tmp_path / "spectral_shifts.safetensors"))
    info = lorareg.inspect(tmp_path / "spectral_shifts.safetensors")
    assert (info.format, info.family, info.adapter_type, info.components) == ("svdiff", "sd15", "svdiff", ["unet"])
    assert all(k.endswith(".delta") and ("norm" in k) for k in info.unmapped_keys)
    te = {f"text_model.encoder.layers.{i}.self_attn.{p}.delta": torch.zeros(768) for i in range(12) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    te["text_model.final_layer_norm.delta"] = torch.zeros(1)
    save_file(te, str(tmp_path / "spectral_shifts_te.safetensors"))
    info = lorareg.inspect(tmp_path / "spectral_shifts_te.safetensors")
    assert (info.format, info.family, info.components, info.num_modules) == ("svdiff", "sd15", ["text_encoder"], 48)
