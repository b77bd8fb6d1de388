"""lorareg port end to end on small models built from configs (test families in tests/data)."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import lorareg
from lorareg.apps.cli.main import main
from lora_factory import make_lora, ssd_like, tiny_family_config, write

pytestmark = pytest.mark.usefixtures("tiny_families")
KEPT = [0, 2, 5]  # the SSD-like model keeps these of the SDXL-like model's 6 blocks per attention
ATTN = r"attn[12]\.to_(q|k|v|out\.0)$"




@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from diffusers import UNet2DConditionModel
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    cfg = lambda fid: tiny_family_config(fid, "unet")  # noqa: E731
    sdxl = UNet2DConditionModel.from_config(cfg("tiny-sdxl"))
    sdxl.save_pretrained(root / "sdxl" / "unet")
    ssd = ssd_like(sdxl, UNet2DConditionModel.from_config(cfg("tiny-ssd")), KEPT)
    ssd.save_pretrained(root / "ssd" / "unet")
    llama_cfg = tiny_family_config("tiny-llama", "model")
    v1 = LlamaForCausalLM(LlamaConfig(**llama_cfg))
    v1.save_pretrained(root / "llama-v1", max_shard_size="100KB")  # sharded, with an index
    v2 = LlamaForCausalLM(LlamaConfig(**llama_cfg))
    v2.load_state_dict({k: v + 0.02 * v.std() * torch.randn_like(v) for k, v in v1.state_dict().items()})
    v2.save_pretrained(root / "llama-v2")
    other = LlamaForCausalLM(LlamaConfig(**llama_cfg))  # unrelated: another seed
    other.save_pretrained(root / "llama-other")
    return root


@pytest.fixture()
def llama_lora(tmp_path):
    lora = make_lora("tiny-llama", r"self_attn\.(q|k|v|o)_proj$|mlp\.(gate|up|down)_proj$", rank=4, alpha=8.0, dtype=torch.float32)
    out = tmp_path / "adapter"
    lorareg.save(lora, out, format="peft")
    return out


def test_sharded_transformers_folder_is_read(models):
    assert (models / "llama-v1" / "model.safetensors.index.json").exists()


def test_same_model_is_a_no_op_for_the_default_method(models, llama_lora, tmp_path):
    res = lorareg.port(llama_lora, source_model=str(models / "llama-v1"), target_model=str(models / "llama-v1"),
                       output=tmp_path / "out", progress=False)
    assert res.report.totals.skipped == 0 and res.report.totals.mean_similarity == 1.0
    a = load_file(llama_lora / "adapter_model.safetensors")
    b = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["lora_alpha"] == 8


@pytest.mark.parametrize("method", ["copy", "lora-x", "prolora", "prolora-full"])
def test_checkpoint_pair_port(models, llama_lora, tmp_path, method):
    res = lorareg.port(llama_lora, source_model=str(models / "llama-v1"), target_model=str(models / "llama-v2"),
                       method=method, output=tmp_path / "out", progress=False)
    rep = res.report
    assert rep.totals.ported == 14 and rep.totals.skipped == 0
    for layer in rep.layers:
        if method == "copy":  # the streamed check: v2 = v1 + 2% noise
            assert layer.cosine > 0.999 and 0.015 < layer.relative_distance < 0.025
        else:
            assert layer.similarity is not None and 0.5 < layer.similarity <= 1.0 + 1e-6 and layer.cosine is None
        assert layer.kept_energy is not None and layer.rank_out <= 4
    ported = lorareg.load(tmp_path / "out")
    assert ported.family == "tiny-llama" and len(ported.modules) == 14
    report = json.loads(res.report_path.read_text())
    assert report["method"] == method and report["source_lora"]["sha256"] and len(report["layers"]) == 14
    if method == "copy":
        assert rep.totals.energy_kept == pytest.approx(1.0)
    if method == "lora-x":
        assert rep.totals.energy_kept < 1.0  # projects even on a near-identical model


def test_second_port_hits_the_cache(models, llama_lora, tmp_path):
    args = dict(source_model=str(models / "llama-v1"), target_model=str(models / "llama-v2"), method="prolora", progress=False)
    lorareg.port(llama_lora, output=tmp_path / "a", **args)
    res = lorareg.port(llama_lora, output=tmp_path / "b", **args)
    assert res.report.cache["built"] == 0 and res.report.cache["hits"] >= 28


def test_unrelated_model_is_flagged_by_the_threshold(models, llama_lora, tmp_path):
    res = lorareg.port(llama_lora, source_model=str(models / "llama-v1"), target_model=str(models / "llama-other"),
                       method="prolora", threshold=0.5, progress=False)
    assert res.report.totals.ported == 0 and res.report.totals.skipped == 14
    assert all("below threshold" in l.skipped for l in res.report.layers)
    assert res.report.totals.mean_similarity is None


def test_distilled_blocks_are_aligned_by_similarity(models, tmp_path):
    lora = make_lora("tiny-sdxl", ATTN, rank=4, alpha=4.0, dtype=torch.float32)
    src = write(lora, tmp_path / "l.safetensors", "kohya")
    res = lorareg.port(src, source_model=str(models / "sdxl"), target_model=str(models / "ssd"), to="tiny-ssd",
                       output=tmp_path / "out.safetensors", progress=False)
    rep = {l.source: l for l in res.report.layers}
    for group in ("down_blocks.1.attentions.0", "up_blocks.0.attentions.1"):
        for j, kept in enumerate(KEPT):
            layer = rep[f"unet:{group}.transformer_blocks.{kept}.attn1.to_q"]
            assert layer.target == f"unet:{group}.transformer_blocks.{j}.attn1.to_q", layer
            assert "aligned by similarity" in layer.rule and layer.similarity > 0.9
        assert "no counterpart" in rep[f"unet:{group}.transformer_blocks.1.attn1.to_q"].skipped
    assert "no mid attention" in rep["unet:mid_block.attentions.0.transformer_blocks.0.attn1.to_q"].skipped
    out = lorareg.load(tmp_path / "out.safetensors")
    assert out.family == "tiny-ssd" and out.format_state.format == "kohya"
    # without alignment block i pairs with block i
    plain = lorareg.port(src, source_model=str(models / "sdxl"), target_model=str(models / "ssd"), to="tiny-ssd",
                         align_blocks=False, progress=False)
    layer = {l.source: l for l in plain.report.layers}["unet:down_blocks.1.attentions.0.transformer_blocks.2.attn1.to_q"]
    assert layer.target == "unet:down_blocks.1.attentions.0.transformer_blocks.2.attn1.to_q"


def test_component_file_reference(models, tmp_path):
    lora = make_lora("tiny-sdxl", r"down_blocks\.1\.attentions\.0\.transformer_blocks\.0\." + ATTN, rank=2, dtype=torch.float32)
    src = write(lora, tmp_path / "l.safetensors", "diffusers")
    weights = models / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors"
    res = lorareg.port(src, source_model=str(weights), target_model=str(weights), method="prolora", progress=False)
    assert res.report.source_model.layout == "component_file" and res.report.totals.ported == 8


def test_missing_tensor_is_a_clear_error(models, tmp_path):
    broken = tmp_path / "broken" / "unet"
    broken.mkdir(parents=True)
    sd = load_file(models / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors")
    del sd["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
    save_file(sd, broken / "diffusion_pytorch_model.safetensors")
    lora = make_lora("tiny-sdxl", r"down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q$", rank=2, dtype=torch.float32)
    src = write(lora, tmp_path / "l.safetensors", "diffusers")
    res = CliRunner().invoke(main, ["port", str(src), "--source-model", str(models / "sdxl"), "--target-model",
                                    str(tmp_path / "broken"), "-o", str(tmp_path / "o.safetensors")])
    # the target is no tiny-sdxl (a weight is missing): its own family is derived, the missing module listed
    assert res.exit_code != 0 and "has no module unet:down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in res.stderr
    assert res.stderr.count("\n") == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_port_json_and_errors(models, llama_lora, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["port", str(llama_lora), "--source-model", str(models / "llama-v1"), "--target-model",
                                    str(models / "llama-v2"), "--method", "prolora", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["totals"]["ported"] == 14 and (out / "report.json").exists()
    bad = CliRunner().invoke(main, ["port", str(llama_lora), "--method", "lora-x", "-o", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "needs --source-model" in bad.stderr
    bad = CliRunner().invoke(main, ["port", str(llama_lora), "--source-model", str(tmp_path / "nope"), "--target-model",
                                    str(models / "llama-v2"), "-o", str(tmp_path / "y")])
    assert bad.exit_code != 0 and "no such file" in bad.stderr
    bad = CliRunner().invoke(main, ["port", str(llama_lora), "--method", "magic", "-o", str(tmp_path / "z")])
    assert bad.exit_code != 0 and "unknown method" in bad.stderr


def test_copy_needs_no_models(llama_lora, tmp_path):
    res = lorareg.port(llama_lora, method="copy", output=tmp_path / "out", progress=False)
    assert res.report.totals.ported == 14 and res.report.totals.mean_similarity is None


def test_basis_build_fills_the_cache(models):
    res = CliRunner().invoke(main, ["basis", "build", str(models / "llama-v1"), "--family", "tiny-llama", "--json"])
    assert res.exit_code == 0, res.output
    first = json.loads(res.stdout)
    assert first["modules"] == 15
    again = json.loads(CliRunner().invoke(main, ["basis", "build", str(models / "llama-v1"), "--family", "tiny-llama", "--json"]).stdout)
    assert again["built"] == 0 and again["cached"] == 15


def test_unrelated_models_are_flagged_without_a_threshold(models, llama_lora):
    res = lorareg.port(llama_lora, source_model=str(models / "llama-v1"), target_model=str(models / "llama-other"), progress=False)
    assert res.report.totals.related is False and res.report.warnings
    assert "WARNING" in res.summary and "unrelated" in res.summary
    assert res.report.totals.related_by == "cosine" and abs(res.report.totals.mean_cosine) < 0.1  # another seed: orthogonal
    ok = lorareg.port(llama_lora, source_model=str(models / "llama-v1"), target_model=str(models / "llama-v2"), progress=False)
    assert ok.report.totals.related is True and not ok.report.warnings and ok.report.totals.mean_cosine > 0.999
    by_bases = lorareg.port(llama_lora, source_model=str(models / "llama-v1"), target_model=str(models / "llama-other"), check="bases",
                            progress=False)
    assert by_bases.report.totals.related is False and by_bases.report.totals.related_by == "subspace"


def test_copy_port_default_check_is_streamed(models, llama_lora, tmp_path):
    """Copy ports compare the base weights in one streamed read each: no basis is built, nothing hashed."""
    from lorareg.registry import get_registry
    from lorareg.sources.weights import open_model

    args = dict(source_model=str(models / "llama-v1"), target_model=str(models / "llama-v2"), progress=False,
                cache_dir=tmp_path / "empty-cache")
    res = lorareg.port(llama_lora, method="copy", **args)
    rep = res.report
    fam = get_registry().family("tiny-llama")
    v1, v2 = open_model(fam, str(models / "llama-v1")), open_model(fam, str(models / "llama-v2"))
    expected = sum(v1.stored(*l.source.split(":")).nbytes + v2.stored(*l.target.split(":")).nbytes for l in rep.layers)
    assert rep.check["kind"] == "streamed" and rep.check["bytes_read"] == expected and rep.check["layers"] == 14
    assert rep.cache["built"] == 0 and not any((tmp_path / "empty-cache").rglob("*.safetensors"))
    assert all(l.similarity is None and l.cosine > 0.999 for l in rep.layers)  # no cached bases: no subspace similarity
    assert "streamed check" in res.summary and "cosine mean" in res.summary
    from lorareg.hub.card import CardInfo, build_card

    card = build_card(rep.model_dump(), CardInfo(repo_id="me/x", weight_name="p.safetensors", output_format="peft/peft"))
    assert f"cosine mean {rep.totals.mean_cosine:.4f}" in card  # the card shows what the relatedness verdict used
    # with the bases in the cache (built by a projection port), the copy port's report gets the similarity too
    lorareg.port(llama_lora, method="prolora", **args)
    again = lorareg.port(llama_lora, method="copy", **args).report
    assert again.check["kind"] == "streamed" and again.cache["built"] == 0
    assert all(l.similarity is not None and l.similarity > 0.5 and l.cosine > 0.999 for l in again.layers)
    # a threshold is on subspace similarity: the bases path; a projection cannot run on the streamed check
    assert lorareg.port(llama_lora, method="copy", threshold=0.1, **args).report.check["kind"] == "bases"
    with pytest.raises(lorareg.InputError, match="--check streamed is for copy ports"):
        lorareg.port(llama_lora, method="lora-x", check="streamed", **args)
    with pytest.raises(lorareg.InputError, match="needs --source-model"):
        lorareg.port(llama_lora, method="copy", check="streamed", progress=False)
    bad = CliRunner().invoke(main, ["port", str(llama_lora), "--source-model", str(models / "llama-v1"), "--target-model",
                                    str(models / "llama-v2"), "--check", "bases", "--json", "-o", str(tmp_path / "o")])
    assert bad.exit_code == 0, bad.output
    report = json.loads(bad.stdout)
    assert report["check"]["kind"] == "bases" and report["layers"][0]["cosine"] is None and report["layers"][0]["similarity"] > 0.5


def test_cross_family_shape_mismatch_uses_align_or_is_skipped(models, tmp_path):
    """SD1.5 -> SDXL style: equal widths, but cross-attention key/value inputs differ (24 vs 32 here)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    sd15 = UNet2DConditionModel.from_config(tiny_family_config("tiny-sd15", "unet"))
    sd15.save_pretrained(tmp_path / "sd15" / "unet")
    lora = make_lora("tiny-sd15", ATTN, rank=2, alpha=2.0, dtype=torch.float32)
    src = write(lora, tmp_path / "l.safetensors", "kohya")
    res = lorareg.port(src, source_model=str(tmp_path / "sd15"), target_model=str(models / "sdxl"), to="tiny-sdxl",
                       output=tmp_path / "out.safetensors", progress=False)
    layers = {l.source: l for l in res.report.layers}
    k = layers["unet:down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]
    q = layers["unet:down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert k.method == "align" and not k.skipped and k.target_shape == [64, 32] and k.rank_out <= 2
    assert q.method == "copy" and not q.skipped
    out = lorareg.load(tmp_path / "out.safetensors")
    assert tuple(out.modules["unet:down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"].delta_weight().shape) == (64, 32)
    copy = lorareg.port(src, source_model=str(tmp_path / "sd15"), target_model=str(models / "sdxl"), to="tiny-sdxl",
                        method="copy", progress=False)
    k = {l.source: l for l in copy.report.layers}["unet:down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert "needs --method align" in k.skipped
