"""LoRAs (hf://..., org/repo) and base weights (org/name@rev) pulled from the loopback Hub through
huggingface_hub's cache, and the same again offline (HF_HUB_OFFLINE=1) from the cache."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save as st_save

import lorareg
from lorareg.apps.cli.main import main
from lorareg.hub.pull import select_weight_files, snapshot_for_family
from lorareg.core.io import read_header
from lorareg.registry import get_registry
from lorareg.sources.weights import open_model
from lora_factory import make_lora, tiny_family_config, write

DATA = Path(__file__).parent / "data"
pytestmark = pytest.mark.usefixtures("tiny_families")
PROGRESS = re.compile(r"%\||\d+it \[|\[\d+:\d+")  # tqdm lines (huggingface_hub's transfer bars, lorareg's)
ATTN = r"attn[12]\.to_(q|k|v|out\.0)$"




@pytest.fixture(scope="module")
def llama_files(tmp_path_factory):
    """Two related tiny Llama checkpoints as transformers writes them: {name: {path: bytes}}."""
    import os

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = tiny_family_config("tiny-llama", "model")
    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    v1 = LlamaForCausalLM(LlamaConfig(**cfg))
    v1.save_pretrained(root / "v1", max_shard_size="100KB")  # sharded, with an index
    v2 = LlamaForCausalLM(LlamaConfig(**cfg))
    v2.load_state_dict({k: v + 0.02 * v.std() * torch.randn_like(v) for k, v in v1.state_dict().items()})
    v2.save_pretrained(root / "v2")
    return {name: {p.name: p.read_bytes() for p in (root / name).iterdir()} for name in ("v1", "v2")}


def kohya_lora(tmp_path: Path, seed: int = 0) -> Path:
    lora = make_lora("tiny-sdxl", ATTN, rank=2, alpha=2.0, dtype=torch.float32, seed=seed)
    return write(lora, tmp_path / f"lora{seed}.safetensors", "kohya")


def offline(monkeypatch, hub) -> int:
    """HF_HUB_OFFLINE=1 from here on (as a user sets it, after huggingface_hub was imported); returns the
    number of requests the server has seen, once the last one is logged."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    time.sleep(0.3)
    return len(hub.requests)


def error_line(res) -> str:
    lines = [ln for ln in res.stderr.replace("\r", "\n").splitlines() if ln.strip() and not PROGRESS.search(ln)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.stderr
    return lines[0]


def test_lora_from_an_hf_path(hub_server, tmp_path, monkeypatch):
    src = kohya_lora(tmp_path)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    commit = hub_server.add_commit("alice/dog-lora", {
        "loras/dog.safetensors": src.read_bytes(),
        "loras/dog.ckpt": b"\x80\x04 not read",
        "README.md": b"---\nlicense: mit\ntags: [lora]\n---\n# dog\n",
    })
    ref = "hf://alice/dog-lora/loras/dog.safetensors@main"
    info = lorareg.inspect(ref)
    assert info.sha256 == sha and info.family == "tiny-sdxl" and info.format == "kohya"
    res = CliRunner().invoke(main, ["inspect", "hf://alice/dog-lora@main/loras/dog.safetensors", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["sha256"] == sha
    fetched = {r["path"] for r in hub_server.requests if r["endpoint"] in ("resolve", "resolve_head")}
    assert not any(p.endswith(".ckpt") for p in fetched)

    # port it (copy) and push: the card names the Hub source, its commit and its card's license
    out = lorareg.port(ref, method="copy", output=tmp_path / "out.safetensors", progress=False)
    assert out.report.source_lora["sha256"] == sha
    pushed = lorareg.push(out, "lorareg-tester/dog-ported", token=hub_server.token, endpoint=hub_server.endpoint)
    card = hub_server.repo_files("lorareg-tester/dog-ported")["README.md"].decode()
    assert f"`hf://alice/dog-lora/loras/dog.safetensors@main` at commit `{commit}`" in card
    assert "\nlicense: mit\n" in card and pushed.changed
    report = json.loads(hub_server.repo_files("lorareg-tester/dog-ported")["report.json"])
    assert report["source_lora"]["path"] == "hf://alice/dog-lora/loras/dog.safetensors@main"
    assert report["source_lora"]["commit"] == commit

    # the Hub failing (5xx) is not fatal for what the cache holds, as with huggingface_hub itself
    hub_server.fail_next("repo_info", 502)
    assert lorareg.inspect(ref).sha256 == sha
    hub_server.fail_next("repo_info", 502)
    res = CliRunner().invoke(main, ["inspect", "alice/never-cached"])
    assert res.exit_code == 6 and "Hub answered 502" in error_line(res)

    # offline: the same reference comes from the cache; an uncached one fails in one line
    n = offline(monkeypatch, hub_server)
    assert lorareg.load(ref).source_sha256 == sha
    assert lorareg.inspect(ref.replace("@main", f"@{commit}")).sha256 == sha
    assert len(hub_server.requests) == n
    res = CliRunner().invoke(main, ["inspect", "hf://alice/other-lora/x.safetensors"])
    assert res.exit_code == 2 and "not in the Hugging Face cache" in error_line(res) and "HF_HUB_OFFLINE=1" in res.stderr
    assert len(hub_server.requests) == n


def test_repo_with_one_lora_or_a_peft_adapter(hub_server, tmp_path):
    src = kohya_lora(tmp_path)
    hub_server.add_commit("alice/one", {"dog.safetensors": src.read_bytes(), "notes.txt": b"hi"})
    assert lorareg.load("alice/one").family == "tiny-sdxl"
    peft = make_lora("tiny-llama", r"self_attn\.(q|v)_proj$", rank=2, dtype=torch.float32)
    lorareg.save(peft, tmp_path / "adapter", format="peft")
    files = {f"ckpt/{p.name}": p.read_bytes() for p in (tmp_path / "adapter").iterdir()}
    sha = hub_server.add_commit("alice/peft", files)
    for ref in ("alice/peft", f"alice/peft@{sha}", "hf://alice/peft/ckpt"):
        lora = lorareg.load(ref)
        assert lora.format_state.format == "peft" and len(lora.modules) == 4, ref
    # two candidates: a one-line error that names them
    hub_server.add_commit("alice/two", {"a.safetensors": src.read_bytes(), "b.safetensors": src.read_bytes()})
    res = CliRunner().invoke(main, ["inspect", "alice/two"])
    assert res.exit_code == 2 and "2 LoRA files (a.safetensors, b.safetensors)" in error_line(res)
    assert "hf://alice/two/a.safetensors" in res.stderr
    # nothing there / no such repo / no such revision: one line each, never a traceback
    for ref, words in (("alice/nothing-here", "no such Hub repo"), ("alice/one@v9", "no such revision"),
                       ("hf://alice/one/missing.safetensors", "no file or folder")):
        res = CliRunner().invoke(main, ["inspect", ref])
        assert res.exit_code == 2 and words in error_line(res), (ref, res.stderr)
    # a bad token: the one authentication line, without the token
    bad = "hf_notTheRightToken0123456789"
    res = CliRunner().invoke(main, ["inspect", "alice/one"], env={"HF_TOKEN": bad})
    assert res.exit_code == 6 and error_line(res) == "error: authentication failed (check HF_TOKEN / huggingface-cli login)"
    assert bad not in res.output
    # a local path that does not exist is still "no such file"
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "missing.safetensors")])
    assert res.exit_code != 0 and "no such file" in res.stderr


def test_port_with_base_weights_from_the_hub_then_offline(hub_server, llama_files, tmp_path, monkeypatch):
    v1 = hub_server.add_commit("lorareg-test/tiny-llama-v1", {
        **llama_files["v1"],
        "pytorch_model.bin": b"\x80\x04 never fetched",
        "original/consolidated.safetensors": b"never fetched",
    })
    v2 = hub_server.add_commit("lorareg-test/tiny-llama", llama_files["v2"], revision="main")
    assert "model.safetensors.index.json" in llama_files["v1"]
    lora = make_lora("tiny-llama", r"self_attn\.(q|k|v|o)_proj$|mlp\.(gate|up|down)_proj$", rank=4, alpha=8.0, dtype=torch.float32)
    adapter = tmp_path / "adapter"
    lorareg.save(lora, adapter, format="peft")
    args = ["port", str(adapter), "--source-model", f"lorareg-test/tiny-llama-v1@{v1}", "--target-model",
            "lorareg-test/tiny-llama", "--method", "prolora", "--json"]
    res = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["totals"]["ported"] == 14
    assert report["source_model"]["revision"] == v1 and report["target_model"]["revision"] == v2
    assert report["source_model"]["layout"] == "transformers"
    meta = read_header(tmp_path / "a" / "adapter_model.safetensors").metadata
    assert meta["lorareg.port.source_revision"] == v1 and meta["lorareg.port.target_revision"] == v2
    assert meta["lorareg.source_sha256"] == report["source_lora"]["sha256"]
    time.sleep(0.3)  # the server logs a request just after answering it
    fetched = {r["path"].split("/resolve/", 1)[1].split("/", 1)[1] for r in hub_server.requests if r["endpoint"] == "resolve"}
    assert fetched == {n for n in llama_files["v1"] if n.endswith((".safetensors", ".index.json"))} | {"model.safetensors"}

    # the same port again with no network: everything from the cache, same bytes
    n = offline(monkeypatch, hub_server)
    res = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    again = json.loads(res.stdout)
    assert again["source_model"]["revision"] == v1 and again["target_model"]["revision"] == v2
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    # a model that was never downloaded: one clear line
    res = CliRunner().invoke(main, ["port", str(adapter), "--source-model", "lorareg-test/tiny-llama-v1@main",
                                    "--target-model", "lorareg-test/never-seen", "-o", str(tmp_path / "c")])
    assert res.exit_code == 2 and "not in the Hugging Face cache" in error_line(res)
    assert not (tmp_path / "c").exists()
    assert len(hub_server.requests) == n  # not one request while offline


def test_diffusers_component_folder_only(hub_server):
    fam = get_registry().family("tiny-sdxl")
    unet = {f"{name}.weight": torch.randn(*shape) for name, shape in fam.components["unet"].modules.items()}
    data = st_save(unet)
    sha = hub_server.add_commit("lorareg-test/tiny-sdxl", {
        "unet/diffusion_pytorch_model.safetensors": data,
        "unet/diffusion_pytorch_model.fp16.safetensors": b"variant, not fetched",
        "unet/diffusion_pytorch_model.bin": b"\x80\x04 pickle, not fetched",
        "unet/config.json": b"{}",
        "vae/diffusion_pytorch_model.safetensors": b"another component, not fetched",
    })
    folder, rev = snapshot_for_family(fam, "lorareg-test/tiny-sdxl", None, ["unet"])
    assert rev == sha and folder.name == sha
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == ["unet/diffusion_pytorch_model.safetensors"]
    w = open_model(fam, "lorareg-test/tiny-sdxl", ["unet"])
    assert w.revision == sha and w.layout == "diffusers"
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert torch.equal(w.weight("unet", name), unet[name + ".weight"])
    # one named file (a single-file or component checkpoint), for callers that have a path in the repo
    one, rev = snapshot_for_family(fam, "lorareg-test/tiny-sdxl", sha[:12], ["unet"], path="unet/diffusion_pytorch_model.safetensors")
    assert rev == sha and one.is_file() and one.read_bytes() == data
    with pytest.raises(lorareg.InputError, match="never unpickles"):
        snapshot_for_family(fam, "lorareg-test/tiny-sdxl", None, ["unet"], path="unet/diffusion_pytorch_model.bin")


def test_weight_file_selection():
    fam = get_registry().family("tiny-sdxl")
    names = ["unet/diffusion_pytorch_model.safetensors.index.json", "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
             "unet/diffusion_pytorch_model-00002-of-00002.safetensors", "unet/diffusion_pytorch_model.fp16-00001-of-00001.safetensors",
             "unet/diffusion_pytorch_model.bin", "text_encoder/model.safetensors"]
    assert select_weight_files(fam, ["unet"], names, "x") == names[:3]
    with pytest.raises(lorareg.InputError, match="only pickle checkpoints"):
        select_weight_files(fam, ["unet"], ["unet/diffusion_pytorch_model.bin"], "x")
    llama = get_registry().family("tiny-llama")
    assert select_weight_files(llama, None, ["model.safetensors", "pytorch_model.bin", "config.json"], "x") == ["model.safetensors"]
