"""lorareg port --refine distill on the tiny-llama test family (data-free self-distillation)."""

import hashlib

import pytest
import torch
from click.testing import CliRunner

import lorareg
from lorareg.apps.cli.main import main
from lorareg.core.errors import InputError
from lora_factory import make_lora, tiny_family_config

pytestmark = pytest.mark.usefixtures("tiny_families")
pytest.importorskip("transformers")
FAST = dict(refine="distill", refine_steps=6, refine_samples=8, refine_sample_length=24, progress=False, device="cpu")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("refine-models")
    torch.manual_seed(0)
    cfg = tiny_family_config("tiny-llama", "model")
    v1 = LlamaForCausalLM(LlamaConfig(**cfg))
    v1.save_pretrained(root / "v1")
    v2 = LlamaForCausalLM(LlamaConfig(**cfg))
    v2.load_state_dict({k: v + 0.05 * v.std() * torch.randn_like(v) for k, v in v1.state_dict().items()})
    v2.save_pretrained(root / "v2")
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(root / "other")  # unrelated: another seed
    return root


@pytest.fixture()
def adapter(tmp_path):
    torch.manual_seed(1)
    lora = make_lora("tiny-llama", r"self_attn\.(q|k|v|o)_proj$|mlp\.(gate|up|down)_proj$", rank=4, alpha=8.0, dtype=torch.float32)
    out = tmp_path / "adapter"
    lorareg.save(lora, out, format="peft")
    return out


def _sha(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _factors(lora):
    return {k: (m.factors["up"].torch().clone(), m.factors["down"].torch().clone()) for k, m in lora.modules.items()}


def test_distill_lowers_the_kl_and_writes_a_loadable_lora(llamas, adapter, tmp_path):
    before = {n: _sha(llamas / n) for n in ("v1", "v2")}
    out = tmp_path / "refined"
    res = lorareg.port(adapter, source_model=str(llamas / "v1"), target_model=str(llamas / "v2"), output=out,
                       cache_dir=tmp_path / "cache", **FAST)
    r = res.report.refine
    assert r and r["method"] == "distill" and r["steps"] == 6 and r["start_method"] == "auto"
    assert r["kl_end"] < r["kl_start"]
    assert r["teacher_storage"] == "full" and not r["samples_cached"]
    assert "refined" in res.summary and "KL" in res.summary
    assert {n: _sha(llamas / n) for n in ("v1", "v2")} == before  # base weights untouched
    back = lorareg.load(out, family="tiny-llama")
    src = lorareg.load(adapter, family="tiny-llama")
    assert set(back.modules) == set(src.modules)
    for k, m in back.modules.items():
        assert m.rank == src.modules[k].rank and m.alpha == src.modules[k].alpha
        assert m.factors["up"].dtype == src.modules[k].factors["up"].dtype
    assert any(not torch.equal(m.factors["up"].torch(), src.modules[k].factors["up"].torch()) for k, m in back.modules.items())
    # a second port to the same target reuses the cached teacher samples
    again = lorareg.port(adapter, source_model=str(llamas / "v1"), target_model=str(llamas / "v2"), cache_dir=tmp_path / "cache", **FAST)
    assert again.report.refine["samples_cached"]
    # the model card records the refinement and its final KL; the published report drops wall times
    from lorareg.hub.card import CardInfo, build_card
    from lorareg.port.report import public_report

    card = build_card(res.report.model_dump(), CardInfo(repo_id="me/refined", weight_name="adapter_model.safetensors",
                                                        output_format="peft/peft"))
    assert "distillation KL" in card and f"{r['kl_end']:.4f}" in card
    public = public_report(res.report.model_dump(), "adapter_model.safetensors")
    assert "wall_s" not in public["refine"] and public["refine"]["kl_end"] == r["kl_end"]


def test_distill_is_deterministic(llamas, adapter, tmp_path):
    runs = [lorareg.port(adapter, source_model=str(llamas / "v1"), target_model=str(llamas / "v2"), cache_dir=tmp_path / f"c{i}", **FAST)
            for i in range(2)]
    a, b = (_factors(r.lora) for r in runs)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1])
    assert runs[0].report.refine["kl_end"] == runs[1].report.refine["kl_end"]


def test_unrelated_models_are_refused_without_the_flag(llamas, adapter, tmp_path):
    kw = dict(source_model=str(llamas / "v1"), target_model=str(llamas / "other"), cache_dir=tmp_path / "cache")
    with pytest.raises(InputError, match="unrelated.*--force-unrelated"):
        lorareg.port(adapter, **kw, **FAST)
    res = lorareg.port(adapter, **kw, **{**FAST, "refine_steps": 1}, force_unrelated=True)
    assert res.report.refine["steps"] == 1


def test_language_model_to_image_model_is_refused(llamas, adapter, tmp_path):
    # (the source model is read first: it names the LoRA's family when the registry has none for it)
    with pytest.raises(InputError, match="two language models, two diffusion UNets or two diffusion transformers"):
        lorareg.port(adapter, to="tiny-sdxl", source_model=str(llamas / "v1"), target_model=str(tmp_path), **FAST)


def test_top_k_teacher_storage(llamas, adapter, tmp_path, monkeypatch):
    """Large vocabularies keep the teacher's top-k log-probs plus a remainder bucket (forced here on a 300-token vocab)."""
    from lorareg.refine import lm as distill_lm

    monkeypatch.setattr(distill_lm, "FULL_VOCAB_MAX", 64)
    monkeypatch.setattr(distill_lm, "TOP_K", 16)
    res = lorareg.port(adapter, source_model=str(llamas / "v1"), target_model=str(llamas / "v2"), cache_dir=tmp_path / "cache",
                       **{**FAST, "refine_steps": 12})
    r = res.report.refine
    assert r["teacher_storage"] == "top-16+remainder"
    assert r["kl_end"] < r["kl_start"]


def test_top_k_kl_is_a_lower_bound_that_is_exact_on_the_full_support():
    """Merging the tail into one bucket can only lose information: KL_topk <= KL_full, equal when k = vocab."""
    from lorareg.refine.lm import _kl

    g = torch.Generator().manual_seed(0)
    teacher = torch.log_softmax(torch.randn(3, 5, 40, generator=g) * 3, dim=-1)
    student = torch.randn(3, 5, 40, generator=g) * 3
    full = float(_kl(student, teacher, None))
    for k in (1, 4, 16):
        v, idx = teacher.topk(k, dim=-1)
        assert float(_kl(student, v, idx.to(torch.int32))) <= full + 1e-6
    v, idx = teacher.topk(40, dim=-1)
    assert abs(float(_kl(student, v, idx.to(torch.int32))) - full) < 1e-4


def test_refine_needs_both_models(adapter):
    with pytest.raises(InputError, match="source-model"):
        lorareg.port(adapter, **FAST)


def test_different_vocabularies_are_refused(llamas, adapter, tmp_path):
    import json
    import shutil

    other = tmp_path / "v2-vocab"
    shutil.copytree(llamas / "v2", other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["vocab_size"] += 1
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="vocab"):
        lorareg.port(adapter, source_model=str(llamas / "v1"), target_model=str(other), **FAST)


def test_cli_refine(llamas, adapter, tmp_path):
    out = tmp_path / "cli"
    res = CliRunner().invoke(main, ["port", str(adapter), "--source-model", str(llamas / "v1"), "--target-model", str(llamas / "v2"),
                                    "-o", str(out), "--refine", "distill", "--steps", "3", "--samples", "4", "--sample-length", "16",
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "refined (distill, 3 steps" in res.output and "KL" in res.output


def test_a_refinement_that_moves_away_from_the_teacher_keeps_the_projection(llamas, adapter, tmp_path):
    """On the very same model the copy is already exact (KL 0): training can only move away, so the copy is kept."""
    copy = lorareg.port(adapter, method="copy", progress=False)
    res = lorareg.port(adapter, source_model=str(llamas / "v1"), target_model=str(llamas / "v1"), cache_dir=tmp_path / "cache",
                       **{**FAST, "refine_lr": 0.05})
    r = res.report.refine
    assert r["kl_end"] > r["kl_start"] and r["kept_projection"] is True
    assert "kept unchanged" in res.summary
    for key, (up, down) in _factors(copy.lora).items():
        got_up, got_down = _factors(res.lora)[key]
        assert torch.equal(got_up, up) and torch.equal(got_down, down)
