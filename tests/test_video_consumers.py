"""diffusers 0.42.1 loads what lorareg writes for Wan 2.2 (both experts), FLUX.1 and Chroma.

Tiny configs of the real classes (WanTransformer3DModel, FluxTransformer2DModel,
ChromaTransformer2DModel) are registered at test time as variant families of the real ones
(``variant_of`` + ``config_overrides``), so the real naming schemes, correspondences and expert layout
are what is exercised; their module tables come from tools/gen_modules.py. Inputs are written in the
trainers' key layouts (musubi for Wan, kohya sd-scripts for Flux), ported / converted by lorareg,
then loaded by diffusers' own loaders: every key must be used (no warning) and the fused weight change
must equal lorareg's ΔW of the input.
"""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file, save_file

import lorareg
from lorareg.port import port
from peer_files import peer_messages, rel_err
from tiny_video import DIM, tiny_config, tiny_registry

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

WAN, FLUX, CHROMA, HV = (tiny_config(kind, layers=2) for kind in ("wan", "flux", "chroma", "hv"))
FLUX = {**FLUX, "in_channels": 8}
CHROMA = {**CHROMA, "in_channels": 8}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    with tiny_registry(tmp_path_factory.mktemp("tiny-video-data"), [
            ("tiny-wan21", "wan2.1-t2v-14b", WAN, None), ("tiny-wan22", "wan2.2-t2v-a14b", WAN, None),
            ("tiny-flux", "flux.1-dev", FLUX, None), ("tiny-chroma", "chroma", CHROMA, None),
            ("tiny-hv", "hunyuan-video", HV, None), ("tiny-hv-i2v33", "hunyuan-video-i2v-33ch", HV, None)]) as root:
        yield root


def _config(fid: str, component: str = "transformer") -> dict:
    return dict(lorareg.get_registry().family(fid).components[component].spec.architecture.config)


def _put(sd, key, out, inn, gen, alpha=1.0, r=2):
    sd[f"{key}.lora_down.weight"] = torch.randn(r, inn, generator=gen) * 0.1
    sd[f"{key}.lora_up.weight"] = torch.randn(out, r, generator=gen) * 0.1
    sd[f"{key}.alpha"] = torch.tensor(alpha)


def _assert_loads_exactly(model, state, meta, want: dict, prefix: str = "transformer") -> None:
    """diffusers loads ``state`` into ``model`` with no message, uses a layer for each of ``want``'s modules and no other,
    and the fused weight change of each equals lorareg's ΔW."""
    with peer_messages() as msgs:
        model.load_lora_adapter(state, prefix=prefix, adapter_name="x", metadata=meta)
    assert msgs == [], msgs
    delta = _fused_delta(model, "x")
    assert len(delta) == len(want)
    for key, m in want.items():
        name = key.split(":", 1)[1]
        assert rel_err(delta[name], m.delta_weight().float()) < 1e-5, (prefix, name)


def _fused_delta(model, adapter: str) -> dict[str, torch.Tensor]:
    before = {n: m.base_layer.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "base_layer")}
    model.fuse_lora(adapter_names=[adapter])
    return {n: model.get_submodule(n).base_layer.weight.detach() - w for n, w in before.items()}


def test_diffusers_loads_both_wan22_experts_ported_from_wan21(tiny, tmp_path):
    from diffusers import WanPipeline, WanTransformer3DModel

    g, sd = torch.Generator().manual_seed(0), {}
    for i in range(2):  # musubi-tuner's Wan layout
        for a in ("self_attn", "cross_attn"):
            for p in ("q", "k", "v", "o"):
                _put(sd, f"lora_unet_blocks_{i}_{a}_{p}", DIM, DIM, g)
        _put(sd, f"lora_unet_blocks_{i}_ffn_0", 32, DIM, g, alpha=4.0)
        _put(sd, f"lora_unet_blocks_{i}_ffn_2", DIM, 32, g)
    src = tmp_path / "wan21_musubi.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "wan22.safetensors"
    port(src, family="tiny-wan21", to="tiny-wan22", format="diffusers", output=out, progress=False)
    want = lorareg.load(src, family="tiny-wan21")

    state, meta = WanPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    for component in ("transformer", "transformer_2"):
        model = WanTransformer3DModel.from_config(_config("tiny-wan22", component))
        _assert_loads_exactly(model, state, meta, want.modules, prefix=component)  # every module of the file, in this expert
    assert len(state) == 2 * 2 * len(want.modules)  # lora_A + lora_B, both experts, nothing else


def _double_single_blocks(sd, g, double: list[tuple[str, int, int]], single: list[tuple[str, int, int]], blocks: int = 2) -> None:
    """kohya-style keys (lora_unet_<original name>) on the double blocks' two streams and the single blocks."""
    for i in range(blocks):
        for stream in ("img", "txt"):
            for name, out, inn in double:
                _put(sd, f"lora_unet_double_blocks_{i}_{stream}_{name}", out, inn, g)
        for name, out, inn in single:
            _put(sd, f"lora_unet_single_blocks_{i}_{name}", out, inn, g)


def _kohya_flux(tmp_path, chroma_blocks_only=False):
    """sd-scripts networks/lora_flux.py layout at the tiny width: fused qkv / linear1, modulation included."""
    g, sd = torch.Generator().manual_seed(1), {}
    _double_single_blocks(sd, g, double=[("attn_qkv", 3 * DIM, DIM), ("attn_proj", DIM, DIM), ("mlp_0", 4 * DIM, DIM),
                                         ("mlp_2", DIM, 4 * DIM), ("mod_lin", 6 * DIM, DIM)],
                          single=[("linear1", 3 * DIM + 4 * DIM, DIM), ("linear2", DIM, 5 * DIM), ("modulation_lin", 3 * DIM, DIM)])
    _put(sd, "lora_unet_final_layer_adaLN_modulation_1", 2 * DIM, DIM, g)
    src = tmp_path / "flux_kohya.safetensors"
    save_file(sd, str(src))
    return src


def test_diffusers_loads_flux_converted_from_kohya_and_chroma_port(tiny, tmp_path):
    from diffusers import ChromaTransformer2DModel, FluxPipeline, FluxTransformer2DModel

    src = _kohya_flux(tmp_path)
    want = lorareg.load(src, family="tiny-flux")
    out = tmp_path / "flux_diffusers.safetensors"
    report = lorareg.convert(src, out, to="diffusers", family="tiny-flux")
    assert not report.dropped
    state, meta = FluxPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    model = FluxTransformer2DModel.from_config(_config("tiny-flux"))
    # fused img_attn_qkv / linear1 split into q, k, v (, proj_mlp); adaLN halves swapped
    _assert_loads_exactly(model, state, meta, want.modules)

    ported = tmp_path / "chroma.safetensors"
    r = port(src, family="tiny-flux", to="tiny-chroma", format="diffusers", output=ported, progress=False)
    skipped = [l for l in r.report.layers if l.skipped]
    assert skipped and all("modulation" in l.skipped for l in skipped)
    state, meta = FluxPipeline.lora_state_dict(str(ported), return_lora_metadata=True)
    chroma = ChromaTransformer2DModel.from_config(_config("tiny-chroma"))
    _assert_loads_exactly(chroma, state, meta, {l.source: want.modules[l.source] for l in r.report.layers if not l.skipped})


def test_comfyui_facing_wan22_files_use_diffusion_model_keys(tiny, tmp_path):
    g, sd = torch.Generator().manual_seed(2), {}
    _put(sd, "lora_unet_blocks_0_self_attn_q", DIM, DIM, g)
    src = tmp_path / "w.safetensors"
    save_file(sd, str(src))
    r = port(src, family="tiny-wan21", to="tiny-wan22", format="ldm", output=tmp_path / "c.safetensors", progress=False)
    assert [f.name for f in r.files] == ["c_high_noise.safetensors", "c_low_noise.safetensors"]
    for f in r.files:
        assert set(load_file(str(f))) == {"diffusion_model.blocks.0.self_attn.q.lora_down.weight",
                                           "diffusion_model.blocks.0.self_attn.q.lora_up.weight",
                                           "diffusion_model.blocks.0.self_attn.q.alpha"}


def test_push_of_a_two_expert_port_uploads_both_files_and_says_which(tiny, tmp_path, hub_server):
    g, sd = torch.Generator().manual_seed(3), {}
    _put(sd, "lora_unet_blocks_1_cross_attn_k", DIM, DIM, g)
    src = tmp_path / "w.safetensors"
    save_file(sd, str(src))
    for fmt, repo in (("musubi", "me/wan22-musubi"), ("diffusers", "me/wan22-diffusers")):
        r = port(src, family="tiny-wan21", to="tiny-wan22", format=fmt, output=tmp_path / fmt / "w22.safetensors", progress=False)
        lorareg.push(r, repo, token=hub_server.token, endpoint=hub_server.endpoint)
        files = hub_server.repo_files(repo)
        card = files["README.md"].decode()
        if fmt == "musubi":
            assert {"w22_high_noise.safetensors", "w22_low_noise.safetensors"} <= set(files)
            assert "`w22_high_noise.safetensors`: the high-noise expert (`transformer`)" in card
            assert "`w22_low_noise.safetensors`: the low-noise expert (`transformer_2`)" in card
        else:
            assert "w22.safetensors" in files and 'prefix="transformer_2"' in card


def test_diffusers_loads_hunyuan_i2v_ported_from_a_musubi_t2v_file(tiny, tmp_path):
    """musubi-tuner's HunyuanVideo layout (fused img_attn_qkv / linear1) -> HunyuanVideo-I2V-33ch, diffusers format."""
    from diffusers import HunyuanVideoImageToVideoPipeline, HunyuanVideoTransformer3DModel

    g, sd = torch.Generator().manual_seed(3), {}
    _double_single_blocks(sd, g, double=[("attn_qkv", 3 * DIM, DIM), ("attn_proj", DIM, DIM), ("mlp_fc1", 2 * DIM, DIM),
                                         ("mlp_fc2", DIM, 2 * DIM)],
                          single=[("linear1", 3 * DIM + 2 * DIM, DIM), ("linear2", DIM, 3 * DIM)])
    src = tmp_path / "hv_musubi.safetensors"
    save_file(sd, str(src), metadata={"ss_base_model_version": "hunyuan_video"})
    want = lorareg.load(src, family="tiny-hv")
    out = tmp_path / "hv_i2v.safetensors"
    r = port(src, family="tiny-hv", to="tiny-hv-i2v33", format="diffusers", output=out, progress=False)
    assert not [l for l in r.report.layers if l.skipped]
    state, meta = HunyuanVideoImageToVideoPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    model = HunyuanVideoTransformer3DModel.from_config(_config("tiny-hv-i2v33"))
    _assert_loads_exactly(model, state, meta, want.modules)  # fused qkv / linear1 split into their diffusers layers, every one used
