"""DoRA: the magnitude's port (rescaled to the target's norms), its layouts, never a silent drop."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lorareg
from lorareg.engine.dora import IN, OUT, magnitude_axis, merged_norms, merged_weight, transfer_magnitude
from lorareg.core.errors import InputError
from lora_factory import tiny_family_config

pytestmark = pytest.mark.usefixtures("tiny_families")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _factors(out, inn, r, gen):
    return torch.randn(out, r, generator=gen, dtype=torch.float64), torch.randn(r, inn, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("axis,shape", [(OUT, (12, 7)), (IN, (12, 7)), (OUT, (6, 4, 3, 3)), (IN, (6, 4, 3, 3))])
def test_magnitude_port_properties(axis, shape):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=gen, dtype=torch.float64)
    up, down = _factors(shape[0], W[0].numel(), 3, gen)
    dW = (up @ down).reshape(shape) * 0.5
    units = shape[axis]
    m = torch.rand(units, generator=gen, dtype=torch.float64) + 0.5
    W1 = merged_weight(W, dW, m, axis)
    n_src = merged_norms(W, up, down, 0.5, axis, shape)

    # low-rank norms agree with the dense ones
    dense = merged_norms(W + dW, None, None, 1.0, axis, shape)
    assert torch.allclose(n_src, dense, rtol=1e-10)

    # (a) the same model and the same direction: the magnitude, and so W', come back
    assert torch.allclose(transfer_magnitude(m, n_src, merged_norms(W, up, down, 0.5, axis, shape)), m, rtol=1e-12)

    # (b) a target that is the source rescaled per unit, the direction rescaled alike: W' rescaled
    d = torch.rand(units, generator=gen, dtype=torch.float64) + 0.5
    view = [-1] + [1] * (len(shape) - 1) if axis == OUT else [1, -1] + [1] * (len(shape) - 2)
    Wt, dWt = W * d.reshape(view), dW * d.reshape(view)
    flat_dt = dWt.reshape(shape[0], -1)
    n_tgt = merged_norms(Wt, flat_dt, torch.eye(flat_dt.shape[1], dtype=torch.float64), 1.0, axis, shape)
    m_t = transfer_magnitude(m, n_src, n_tgt)
    assert torch.allclose(merged_weight(Wt, dWt, m_t, axis), W1 * d.reshape(view), rtol=1e-9, atol=1e-12)

    # (c) copying the magnitude does not: it drags every unit back to the source's scale
    copied = merged_weight(Wt, dWt, m, axis)
    assert not torch.allclose(copied, W1 * d.reshape(view), rtol=1e-3)
    assert torch.allclose(copied, W1, rtol=1e-9)


def test_magnitude_layouts():
    assert magnitude_axis([12], (12, 7), peft=True) == OUT  # PEFT Linear
    assert magnitude_axis([1, 6, 1, 1], (6, 6, 3, 3), peft=True) == OUT  # PEFT Conv2d
    assert magnitude_axis([12, 1], (12, 7)) == OUT  # LyCORIS wd_on_out=True
    assert magnitude_axis([1, 7], (12, 7)) == IN  # LyCORIS wd_on_out=False
    assert magnitude_axis([1, 4, 1, 1], (6, 4, 3, 3)) == IN


# --- end to end with real PEFT DoRA adapters on tiny Llamas ---------------------------------------------


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("dora")
    cfg = LlamaConfig(**tiny_family_config("tiny-llama", "model"))
    torch.manual_seed(0)
    v1 = LlamaForCausalLM(cfg)
    v1.save_pretrained(root / "v1")
    v2 = LlamaForCausalLM(cfg)  # v1 with its rows rescaled and a little noise: norms differ
    v2.load_state_dict({k: v * (1 + 0.3 * torch.rand(v.shape[0], *[1] * (v.dim() - 1))) + 0.01 * v.std() * torch.randn_like(v)
                        for k, v in v1.state_dict().items()})
    v2.save_pretrained(root / "v2")
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(root / "v1"),
                                LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.rand_like(p))  # a trained magnitude, not the initial norms
    peft_model.save_pretrained(root / "dora")
    return root


def _merged(base_dir, adapter_dir):
    """W' of every adapted module as PEFT computes it (PEFT is the consumer)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), adapter_dir).merge_and_unload()
    return {n: p.detach().clone() for n, p in model.named_parameters() if any(t in n for t in TARGETS)}


def test_inspect_names_dora(llamas):
    info = lorareg.inspect(llamas / "dora")
    assert info.adapter_type == "dora" and info.adapter_types == ["dora"]


def test_same_model_port_keeps_the_magnitude_bit_for_bit(llamas, tmp_path):
    res = lorareg.port(llamas / "dora", source_model=str(llamas / "v1"), target_model=str(llamas / "v1"), output=tmp_path / "out", progress=False)
    a, b = load_file(llamas / "dora" / "adapter_model.safetensors"), load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["use_dora"] is True
    assert res.report.dora == "transfer" and {l.dora for l in res.report.layers} == {"kept (same weight)"}


def test_same_model_projection_reproduces_w_prime(llamas, tmp_path):
    """(a) off the bit-keeping path (another rank: the magnitude is recomputed): W' to float tolerance."""
    res = lorareg.port(llamas / "dora", source_model=str(llamas / "v1"), target_model=str(llamas / "v1"), method="prolora-full",
                       rank=8, output=tmp_path / "out", progress=False)
    assert {l.dora for l in res.report.layers} == {"transferred"}
    want, got = _merged(llamas / "v1", llamas / "dora"), _merged(llamas / "v1", tmp_path / "out")
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-5, rtol=1e-4), n


def test_port_to_another_model_transfers_the_change(llamas, tmp_path):
    from transformers import LlamaForCausalLM

    res = lorareg.port(llamas / "dora", source_model=str(llamas / "v1"), target_model=str(llamas / "v2"), method="copy",
                       output=tmp_path / "out", progress=False)
    assert "DoRA magnitude (transfer): 6 transferred" in res.summary
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["use_dora"] is True
    # PEFT loads it; each unit of W'_tgt is W_tgt + ΔW scaled by the source's factor m / ‖W_src + ΔW‖
    src, tgt = _merged(llamas / "v1", llamas / "dora"), _merged(llamas / "v2", tmp_path / "out")
    w1 = {n: p for n, p in LlamaForCausalLM.from_pretrained(llamas / "v1").named_parameters()}
    w2 = {n: p for n, p in LlamaForCausalLM.from_pretrained(llamas / "v2").named_parameters()}
    lora = lorareg.load(llamas / "dora")
    for n in src:
        key = "model:" + n.removesuffix(".weight")
        dw = lora.modules[key].delta_weight().double()
        s = src[n].double().norm(dim=1) / (w1[n].double() + dw).norm(dim=1)
        want = (w2[n].double() + dw) * s[:, None]
        assert torch.allclose(tgt[n].double(), want, atol=1e-5, rtol=1e-4), n
    # copying the magnitude instead gives another W'
    copied = lorareg.port(llamas / "dora", target_model=None, method="copy", dora="copy", output=tmp_path / "copied", progress=False)
    assert any("copied as stored" in w for w in copied.report.warnings)
    tc = _merged(llamas / "v2", tmp_path / "copied")
    assert any(not torch.allclose(tc[n], tgt[n], atol=1e-4) for n in tgt)


def test_dora_without_models_or_with_drop_is_never_silent(llamas, tmp_path):
    with pytest.raises(InputError, match="DoRA.*--source-model"):
        lorareg.port(llamas / "dora", output=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    # PEFT stores one magnitude per output only: a per-input magnitude (LyCORIS wd_on_out=False) has no place there
    from dataclasses import replace

    from lorareg.core.io import LazyTensor
    from lorareg.port.dora import check_output_format

    per_input = {k: replace(m, dora_scale=LazyTensor.from_torch(torch.ones(1, m.weight_shape[1])))
                 for k, m in lorareg.load(llamas / "dora").modules.items()}
    with pytest.raises(InputError, match="cannot store their magnitudes.*--dora drop"):
        check_output_format(per_input, "peft")
    res = lorareg.port(llamas / "dora", dora="drop", output=tmp_path / "out", progress=False)
    assert "DoRA magnitude (drop): 6 dropped" in res.summary and "WARNING: DoRA magnitude dropped" in res.summary
    report = json.loads(res.report_path.read_text())
    assert report["dora"] == "drop" and any("dropped" in w for w in report["warnings"])
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["use_dora"] is False


def test_cli_port_dora_option(llamas, tmp_path):
    from click.testing import CliRunner

    from lorareg.apps.cli.main import main

    res = CliRunner().invoke(main, ["port", str(llamas / "dora"), "-o", str(tmp_path / "o"), "--json"])
    assert res.exit_code != 0 and "--dora drop" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["port", str(llamas / "dora"), "-o", str(tmp_path / "o"), "--dora", "drop", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["dora"] == "drop"
