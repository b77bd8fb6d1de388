"""Bring your own model: families derived from a model's own safetensors headers and config.

Models are built from real transformers / diffusers configs at tiny sizes and saved with save_pretrained;
LoRAs are written by PEFT (get_peft_model + save_pretrained) and diffusers (save_lora_weights); the
outputs are loaded back by PEFT and diffusers on the target model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lorareg.apps.cli.main import main
from lorareg.registry import get_registry
from lorareg.sources.derive import family_for_model, is_derived, match_family
from lorareg.sources.model_files import read_model_files

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# tiny GQA configs that no registry family has (hidden 64, 2 layers, 4 heads / 2 KV heads)
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=288, max_position_embeddings=64, tie_word_embeddings=False)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


def _save(model, path, **kw):
    model.save_pretrained(str(path), **kw)
    return path


def _lm(arch: str, seed: int = 0, **overrides):
    cfg_cls, model_cls = (getattr(transformers, n) for n in ARCHS[arch])
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**{**BASE, **overrides}))


def _perturbed(model, scale=0.004, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    """Per architecture: v1, a sibling checkpoint v2 (perturbed weights) and a PEFT LoRA trained-like on v1."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lms")
    out = {}
    for arch in ARCHS:
        m = _lm(arch)
        v1 = _save(m, root / arch / "v1")
        v2 = _save(_perturbed(m), root / arch / "v2")
        pm = get_peft_model(_lm(arch), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        lora = root / arch / "lora"
        pm.save_pretrained(str(lora))
        out[arch] = (v1, v2, lora)
    return out


def _cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res


def _json(*args):
    res = _cli(*args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _peft_deltas(model) -> dict[str, torch.Tensor]:
    """ΔW of every LoRA layer of a PEFT-wrapped model, as PEFT computes it (module name -> ΔW)."""
    out = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "get_delta_weight") and getattr(mod, "active_adapters", None):
            out[name.split("base_model.model.", 1)[-1]] = mod.get_delta_weight(mod.active_adapters[0]).detach().float()
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lm_lora_inspect_convert_port_load(lms, tmp_path, arch, monkeypatch):
    v1, v2, lora = lms[arch]
    # without a model, nothing in the registry fits (the error); derived families of earlier tests
    # live in this process's registry only, as in any one lorareg run: set them aside
    reg = get_registry()
    monkeypatch.setattr(reg, "families", {k: f for k, f in reg.families.items() if not is_derived(f)})
    bad = _cli("inspect", lora)
    assert bad.exit_code != 0 and "no known LoRA key format" in bad.stderr
    info = _json("inspect", lora, "--model", v1)
    assert info["family"].startswith(f"derived:{arch}:") and info["format"] == "peft"
    assert info["num_modules"] == 14 and not info["unmapped_keys"]
    assert any("derived from the model's own weights" in e for e in info["evidence"])
    # convert (PEFT -> PEFT, through the derived family)
    conv = _json("convert", lora, "--to", "peft", "-o", tmp_path / "conv", "--model", v1)
    assert conv["family"] == info["family"] and conv["modules_out"] == 14
    # port to the sibling checkpoint: same shapes, so the same derived family and identity pairs
    rep = _json("port", lora, "--source-model", v1, "--target-model", v2, "-o", tmp_path / "ported")
    assert rep["source_model"]["family"] == rep["target_model"]["family"] == info["family"]
    assert rep["totals"]["ported"] == 14 and rep["totals"]["skipped"] == 0
    assert all(layer["rule"].startswith("identity") for layer in rep["layers"])
    # PEFT loads the output on the target; its ΔW is the source LoRA's (auto = copy on same shapes)
    from peft import PeftModel

    model_cls = getattr(transformers, ARCHS[arch][1])
    src = _peft_deltas(PeftModel.from_pretrained(model_cls.from_pretrained(str(v1)), str(lora)))
    out = _peft_deltas(PeftModel.from_pretrained(model_cls.from_pretrained(str(v2)), str(tmp_path / "ported")))
    assert set(out) == set(src) and len(out) == 14
    for name in src:
        torch.testing.assert_close(out[name], src[name], rtol=1e-5, atol=1e-6)


def test_projection_methods_and_basis_cache_on_derived(lms, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAREG_CACHE", str(tmp_path / "cache"))
    v1, v2, lora = lms["qwen2"]
    built = _json("basis", "build", v1, "--rank-k", "4")  # no --family: the model's own (derived) one
    assert built["modules"] == 16 and built["built"] == 16
    k4 = ("--rank-k", "4", "--source-model", v1, "--target-model", v2)
    first = _json("port", lora, *k4, "--method", "prolora-full", "-o", tmp_path / "a")
    again = _json("port", lora, *k4, "--method", "lora-x", "-o", tmp_path / "b")
    assert first["totals"]["ported"] == again["totals"]["ported"] == 14
    assert first["cache"]["hits"] >= 14 and first["cache"]["built"] == 14  # the source's bases were built ahead
    assert again["cache"]["built"] == 0 and again["cache"]["hits"] == 28
    assert 0.5 < again["totals"]["mean_similarity"] <= 1.0 + 1e-6


def test_model_files_read_headers_only(lms, tmp_path):
    v1, _, _ = lms["mistral"]
    files = read_model_files(str(v1))
    assert files.kind == "transformers" and files.folders[""].config["model_type"] == "mistral"
    fam = family_for_model(str(v1))
    comp = fam.components["model"]
    assert comp.modules["model.layers.0.self_attn.k_proj"] == (32, 64)  # GQA: 2 KV heads of 16
    assert comp.spec.architecture.class_ == "MistralForCausalLM" and fam.spec.kind == "text"
    # the same model sharded (with an index) or as one file derives the same family
    sharded = _save(_lm("mistral"), tmp_path / "sharded", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert family_for_model(str(sharded)).id == fam.id
    single = family_for_model(str(v1 / "model.safetensors"))
    assert single.id == fam.id and "single_file" in [l.type for l in single.spec.layouts]


def test_registered_family_wins_only_on_an_exact_match(tiny_families, tmp_path):
    from lora_factory import tiny_family_config

    cfg = tiny_family_config("tiny-llama", "model")
    same = _save(transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)), tmp_path / "same")
    assert family_for_model(str(same)).id == "tiny-llama"
    # one layer deeper: every tiny-llama module is there with its shape, but it is not tiny-llama
    deeper = _save(transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, "num_hidden_layers": 3})), tmp_path / "deeper")
    m = match_family(get_registry().family("tiny-llama"), read_model_files(str(deeper)))
    assert m is not None and not m.exact
    fam = family_for_model(str(deeper))
    assert is_derived(fam) and fam.id.startswith("derived:llama:")


def test_pairs_between_derived_families(lms, tmp_path):
    v1, _, lora = lms["llama"]
    wider = _save(_lm("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=2), tmp_path / "wider")
    deeper = _save(_lm("llama", num_hidden_layers=3), tmp_path / "deeper")
    for other, word in ((wider, "width"), (deeper, "depth")):
        res = _cli("port", lora, "--source-model", v1, "--target-model", other, "-o", tmp_path / f"out-{word}")
        assert res.exit_code != 0 and "unrelated models" in res.stderr and word in res.stderr, res.output
        assert res.stderr.count("\n") == 1
    # a resized vocabulary and tied embeddings: the rest pairs by name, the changes are listed
    revocab = _save(_lm("llama", vocab_size=300, tie_word_embeddings=True), tmp_path / "revocab")
    pairs = _json("pairs", v1, revocab, "--all")
    by = {p["source_module"]: p for p in pairs}
    assert "shapes differ" in by["model.embed_tokens"]["skipped"]
    assert "has no module model:lm_head" in by["lm_head"]["skipped"]
    assert by["model.layers.1.mlp.up_proj"]["skipped"] is None and by["model.layers.1.mlp.up_proj"]["rule"].startswith("same name")


def test_families_from_and_write(lms, tmp_path, monkeypatch):
    v1, _, lora = lms["llama"]
    shown = _json("families", "--from", v1)
    assert shown["derived"] and shown["id"].startswith("derived:llama:") and shown["components"]["model"]["modules"] == 16
    text = _cli("families", "--from", v1, "--write", tmp_path / "data")
    assert text.exit_code == 0 and "wrote" in text.stdout
    fid = shown["id"].replace(":", "-")
    assert (tmp_path / "data" / "schemas" / "families" / f"{fid}.json").exists()
    # the written files are registry data: loaded (and schema-validated) from LORAREG_DATA_PATH, they match the model
    monkeypatch.setenv("LORAREG_DATA_PATH", str(tmp_path / "data"))
    fam = get_registry().family(fid)
    assert not is_derived(fam) and get_registry().family(shown["id"]).id == fid  # the derived name is an alias
    assert family_for_model(str(v1)).id == fid
    assert _json("inspect", lora)["family"] == fid  # detection now knows it without --model
    bad = _cli("families", "--write", tmp_path / "x")
    assert bad.exit_code != 0 and "--from" in bad.stderr
    bad = _cli("families", "--from", lora)  # a LoRA is no base model
    assert bad.exit_code == 2 and "PEFT adapter folder, not a base model" in bad.stderr
    bad = _cli("families", "--from", tmp_path / "x")
    assert bad.exit_code == 2 and "no such file or folder" in bad.stderr


def test_diffusers_unet_with_non_registry_shapes(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    cfg = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=24, attention_head_dim=4)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg)
    unet.save_pretrained(str(tmp_path / "v1" / "unet"))
    _perturbed(unet).save_pretrained(str(tmp_path / "v2" / "unet"))
    from diffusers import DDIMScheduler

    for v in ("v1", "v2"):
        (tmp_path / v / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
        DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction").save_pretrained(str(tmp_path / v / "scheduler"))
    src_unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "v1" / "unet"))
    src_unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for n, p in src_unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=get_peft_model_state_dict(src_unet), weight_name="lora.safetensors")
    lora = tmp_path / "lora.safetensors"
    info = _json("inspect", lora, "--model", tmp_path / "v1")
    assert info["family"].startswith("derived:stablediffusionpipeline:") and info["format"] == "diffusers"
    assert info["components"] == ["unet"] and not info["unmapped_keys"]
    # kohya's flat names are generic: the derived module table gives them too
    _json("convert", lora, "--to", "kohya", "-o", tmp_path / "kohya.safetensors", "--model", tmp_path / "v1")
    kohya = _json("inspect", tmp_path / "kohya.safetensors", "--model", tmp_path / "v1")
    assert kohya["format"] == "kohya" and kohya["family"] == info["family"] and kohya["num_modules"] == info["num_modules"]
    rep = _json("port", lora, "--source-model", tmp_path / "v1", "--target-model", tmp_path / "v2", "--method", "prolora-full",
                "-o", tmp_path / "ported.safetensors")
    assert rep["target_model"]["family"] == info["family"] and rep["totals"]["skipped"] == 0
    # diffusers loads the ported LoRA on the target UNet; ΔW matches what lorareg wrote
    import lorareg

    ported = lorareg.load(tmp_path / "ported.safetensors", model=str(tmp_path / "v2"))
    tgt = UNet2DConditionModel.from_pretrained(str(tmp_path / "v2" / "unet"))
    sd = StableDiffusionPipeline.lora_state_dict(str(tmp_path / "ported.safetensors"))[0]
    tgt.load_lora_adapter(sd, prefix="unet", adapter_name="p")
    deltas = {n: m.get_delta_weight("p").float() for n, m in tgt.named_modules() if hasattr(m, "get_delta_weight") and "p" in getattr(m, "lora_A", {})}
    assert len(deltas) == len(ported.modules) > 0
    for key, m in ported.modules.items():
        torch.testing.assert_close(deltas[m.name], m.delta_weight().float().reshape(deltas[m.name].shape), rtol=1e-4, atol=1e-6)
    assert diffusers  # imported for the loaders above
    # the denoiser's diffusion data come from the pipeline folder (scheduler config): --refine distill runs
    fam = get_registry().family(info["family"])
    assert fam.spec.diffusion.prediction_type == "v_prediction" and fam.spec.kind == "image"
    res = lorareg.port(lora, source_model=str(tmp_path / "v1"), target_model=str(tmp_path / "v2"), refine="distill", refine_steps=2,
                       refine_samples=2, refine_noisings=1, refine_sampler_steps=2, refine_batch=2, refine_conditions=torch.randn(1, 4, 24),
                       progress=False, device="cpu", cache_dir=tmp_path / "cache", output=tmp_path / "refined.safetensors")
    assert res.report.refine["steps"] == 2 and res.report.target_model.family == info["family"]


def test_refine_distill_on_derived_lms(lms, tmp_path):
    v1, v2, lora = lms["llama"]
    rep = _json("port", lora, "--source-model", v1, "--target-model", v2, "--refine", "distill", "--steps", "2", "--samples", "4",
                "--sample-length", "8", "-o", tmp_path / "refined")
    assert rep["target_model"]["family"].startswith("derived:llama:") and rep["refine"]["steps"] == 2
    assert (tmp_path / "refined" / "adapter_model.safetensors").exists()


def test_hub_model_read_by_headers(hub_server, lms, tmp_path, monkeypatch):
    import time

    v1, v2, lora = lms["qwen2"]
    files = {name: {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} for name, folder in (("v1", v1), ("v2", v2))}
    r1 = hub_server.add_commit("byom/qwen-v1", files["v1"])
    hub_server.add_commit("byom/qwen-v2", files["v2"])
    info = _json("inspect", lora, "--model", f"byom/qwen-v1@{r1}")
    assert info["family"].startswith("derived:qwen2:")
    local = _json("families", "--from", v1)
    assert local["id"] == info["family"]  # the same table read over HTTP range requests as from the folder
    from huggingface_hub import constants

    cached = [p.name for p in Path(constants.HF_HUB_CACHE).rglob("*") if p.is_file() and "snapshots" in p.parts]
    assert "config.json" in cached and not any(n.endswith(".safetensors") for n in cached)  # headers only, no weights
    rep = _json("port", lora, "--source-model", f"byom/qwen-v1@{r1}", "--target-model", "byom/qwen-v2", "-o", tmp_path / "out")
    assert rep["target_model"]["family"] == info["family"] and rep["totals"]["ported"] == 14
    assert rep["source_model"]["revision"] == r1
    # offline, the same model is read from the weights the port cached, with no request
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    time.sleep(0.3)  # the server logs a request just after answering it
    seen = len(hub_server.requests)
    assert _json("inspect", lora, "--model", f"byom/qwen-v1@{r1}")["family"] == info["family"]
    assert len(hub_server.requests) == seen
    never = _cli("inspect", lora, "--model", "byom/never-seen")
    assert never.exit_code == 2 and "not in the Hugging Face cache" in never.stderr


def test_action_ports_and_pushes_on_derived_families(hub_server, lms, tmp_path, monkeypatch):
    """The Action (its script layer, as action.yml runs it): port to a model the registry does not know, push with a card."""
    import shutil

    from lorareg.apps import action

    v1, v2, lora = lms["mistral"]
    monkeypatch.chdir(tmp_path)
    shutil.copytree(lora, tmp_path / "style-adapter")
    gh = tmp_path / "gh"
    gh.mkdir()
    env = {"INPUT_LORA": "style-adapter", "INPUT_SOURCE_MODEL": str(v1), "INPUT_TARGET_MODELS": str(v2),
           "INPUT_PUSH_TO": "{owner}/{name}-{target}", "INPUT_HF_TOKEN": hub_server.token,
           "GITHUB_STEP_SUMMARY": str(gh / "summary.md"), "GITHUB_OUTPUT": str(gh / "output"),
           "GITHUB_REPOSITORY": "lorareg-tester/loras", "GITHUB_REPOSITORY_OWNER": "lorareg-tester"}
    assert action.main(env, cwd=tmp_path) == 0, (gh / "summary.md").read_text()
    files = hub_server.repo_files("lorareg-tester/style-adapter-v2")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "report.json"} <= set(files)
    report = json.loads(files["report.json"])
    assert report["target_model"]["family"].startswith("derived:mistral:") and report["totals"]["ported"] == 14
    card = files["README.md"].decode()
    assert report["target_model"]["family"] in card and "--to" not in card


def _sparse_safetensors(path: Path, shapes: dict) -> Path:
    """A safetensors file with these tensor shapes whose data section is a hole (real header, no bytes written)."""
    import math
    import struct

    header, off = {}, 0
    for key, shape in shapes.items():
        n = 2 * math.prod(shape)
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)
    return path


def test_real_registered_families_still_win(tmp_path):
    """Checkpoints with the shapes of the built-in families (real sizes, headers only) are those families."""
    from lorareg.registry import CANONICAL

    reg = get_registry()
    # a TinyLlama folder: every Linear of the family plus what the generator leaves out (embeddings, norms)
    tl = reg.family("tinyllama").components["model"]
    shapes = {f"{n}.weight": s for n, s in tl.modules.items()}
    shapes.update({"model.embed_tokens.weight": (32000, 2048), "model.norm.weight": (2048,)})
    _sparse_safetensors(tmp_path / "tinyllama" / "model.safetensors", shapes)
    (tmp_path / "tinyllama" / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    assert family_for_model(str(tmp_path / "tinyllama")).id == "tinyllama"
    # a fine-tune with a resized vocabulary: no registered family matches it exactly, so it is derived; for a
    # LoRA of tinyllama it is still tinyllama (1 of 155 modules changes shape)
    shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"] = (32008, 2048)
    _sparse_safetensors(tmp_path / "resized" / "model.safetensors", shapes)
    assert is_derived(family_for_model(str(tmp_path / "resized")))
    assert family_for_model(str(tmp_path / "resized"), prefer=reg.family("tinyllama")).id == "tinyllama"
    # an SD1.5 single-file checkpoint: LDM names (the family's ldm scheme) under model.diffusion_model., the VAE beside it
    sd15 = reg.family("sd15")
    layout = next(lay for lay in sd15.spec.layouts if lay.type == "single_file")
    shapes = {"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3), "model.diffusion_model.out.0.weight": (320,)}
    for cid, lc in layout.components.items():
        comp = sd15.components[cid]
        assert lc.scheme in (CANONICAL, "ldm")
        shapes.update({f"{lc.prefix}{comp.name_in(lc.scheme, n)}.weight": s for n, s in comp.modules.items()})
    ckpt = _sparse_safetensors(tmp_path / "v1-5-finetune.safetensors", shapes)
    m = match_family(sd15, read_model_files(str(ckpt)))
    assert m.exact and m.layout == "single_file" and m.modules == sum(len(c.modules) for c in sd15.components.values())
    assert family_for_model(str(ckpt)).id == "sd15"
