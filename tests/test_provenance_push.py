"""Provenance of published ports, against the loopback Hub (tests/hub_server.py) and the loopback Civitai
(tests/civitai_server.py): source, creator, licence and hashes in the card; derivatives refused when the
creator forbids them; local target folders named by their weights; report.json pushed byte for byte;
a rerun with --force makes no commit."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
import yaml
from click.testing import CliRunner

import lorareg
from civitai_server import CivitaiServer, Model, Version
from lora_factory import make_lora, tiny_family_config, write
from lorareg.apps.cli.main import main
from lorareg.sources import civitai

REPO = "me/x"
SDXL_ATTN = r"unet:down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn[12]\.to_(q|k|v|out\.0)$"


def front_matter(card: bytes) -> dict:
    return yaml.safe_load(card.decode().split("---\n", 2)[1])


@pytest.fixture
def civ(tmp_path, monkeypatch, hub_server):
    with CivitaiServer() as server:
        monkeypatch.setenv("CIVITAI_ENDPOINT", server.url)
        monkeypatch.setenv("LORAREG_CIVITAI_CACHE", str(tmp_path / "civitai-cache"))
        monkeypatch.delenv("CIVITAI_API_TOKEN", raising=False)
        monkeypatch.setattr(civitai, "_RESOLVED", {})
        lora = make_lora("sdxl", SDXL_ATTN, rank=4, alpha=4.0, dtype=torch.float16)
        # a trainer's wrong hash fields: they must not travel into the port as its own
        lora.metadata.update({"ss_network_dim": "4", "sshs_model_hash": hashlib.sha256(b"").hexdigest(),
                              "modelspec.hash_sha256": "0x" + "ab" * 32})
        data = write(lora, tmp_path / "src.safetensors", "kohya").read_bytes()
        server.add(Model(1, "Pixel Style", "alice"), Version(11, 1, data, "pixel_style.safetensors", trained_words=["pxl style"]))
        server.add(Model(2, "No Remix", "bob", allow_derivatives=False), Version(21, 2, data, "noremix.safetensors"))
        server.data = data
        yield server


def port_push(tmp_path, hub, *args, sub="out", expect=0):
    res = CliRunner().invoke(main, ["port", *args, "-o", str(tmp_path / sub / "x.safetensors"), "--push", REPO],
                             env={"HF_TOKEN": hub.token})
    assert res.exit_code == expect, res.output
    return res


def test_civitai_port_pushed_end_to_end(civ, hub_server, tmp_path):
    port_push(tmp_path, hub_server, "civitai:11", "--to", "ssd-1b")
    files = hub_server.repo_files(REPO)
    card = files["README.md"].decode()
    meta = front_matter(files["README.md"])
    src_sha = hashlib.sha256(civ.data).hexdigest()
    # model tree: the target family's reference repo (no target weights were read); licence by link
    assert meta["base_model"] == "segmind/SSD-1B" and meta["license"] == "other"
    assert meta["license_link"] == f"{civ.url}/models/1?modelVersionId=11"
    assert meta["instance_prompt"] == "pxl style"  # Civitai's trained words
    # source, creator with a link, licence facts, hashes
    assert f"[Pixel Style — v1.0]({civ.url}/models/1?modelVersionId=11) (`civitai:11`, Civitai) by [alice]({civ.url}/user/alice)" in card
    assert "- derivatives allowed: **yes**" in card and "- commercial use: Image, RentCivit" in card
    assert src_sha in card
    weights = files["x.safetensors"]
    (n,) = struct.unpack("<Q", weights[:8])
    own_tensor = hashlib.sha256(weights[8 + n:]).hexdigest()
    assert hashlib.sha256(weights).hexdigest() in card and own_tensor in card
    # the weights carry their own hash fields and the source's as lorareg.source_*
    md = json.loads(weights[8:8 + n])["__metadata__"]
    assert md["sshs_model_hash"] == own_tensor and md["modelspec.hash_sha256"] == "0x" + own_tensor
    assert md["lorareg.source_sha256"] == src_sha
    assert json.loads(md["lorareg.source_civitai"])["creator"] == "alice"
    # report.json: the same bytes as the local one, naming the source page and hashes
    local = (tmp_path / "out" / "x.report.json").read_bytes()
    assert files["report.json"] == local
    report = json.loads(local)
    assert report["source_lora"]["path"] == "civitai:11" and report["source_lora"]["civitai"]["page_url"].endswith("modelVersionId=11")
    assert report["source_lora"]["hashes"]["sha256"] == src_sha
    assert str(tmp_path) not in local.decode() and str(tmp_path) not in card


def test_derivatives_forbidden_unless_the_owner_permitted(civ, hub_server, tmp_path):
    res = port_push(tmp_path, hub_server, "civitai:21", "--to", "ssd-1b", expect=2)
    assert "bob does not allow derivatives on Civitai (allowDerivatives: false)" in res.stderr
    assert "--owner-permission" in res.stderr and not hub_server.repo_exists(REPO)
    port_push(tmp_path, hub_server, "civitai:21", "--to", "ssd-1b", "--force",
              "--owner-permission", "bob agreed by e-mail on 2026-11-20")
    card = hub_server.repo_files(REPO)["README.md"].decode()
    assert "- derivatives allowed: **no**" in card
    assert "Published with the owner's permission: bob agreed by e-mail on 2026-11-20" in card


def test_unknown_licence_is_said(hub_server, tmp_path):
    src = write(make_lora("sdxl", SDXL_ATTN, rank=2), tmp_path / "mine.safetensors", "kohya")
    lora = lorareg.load(src, family="sdxl")  # a few attention layers fit Vega and SSD-1B as well
    res = lorareg.port(lora, to="ssd-1b", method="copy", output=tmp_path / "out" / "x.safetensors", progress=False)
    lorareg.push(res, REPO, token=hub_server.token, endpoint=hub_server.endpoint)
    files = hub_server.repo_files(REPO)
    assert "**The source LoRA's licence is unknown**" in files["README.md"].decode()
    assert "license" not in front_matter(files["README.md"])


@pytest.fixture(scope="module")
def llama_models(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llamas")
    cfg = LlamaConfig(**tiny_family_config("tiny-llama", "model"))
    torch.manual_seed(0)
    v1 = LlamaForCausalLM(cfg)
    v1.save_pretrained(root / "v1")
    v2 = LlamaForCausalLM(cfg)
    v2.load_state_dict({k: v + 0.02 * v.std() * torch.randn_like(v) for k, v in v1.state_dict().items()})
    v2.save_pretrained(root / "v2")
    return root


@pytest.mark.usefixtures("tiny_families")
def test_local_target_is_named_by_its_weights_and_rerun_with_force_makes_no_commit(hub_server, tmp_path, llama_models):
    lora = make_lora("tiny-llama", r"self_attn\.(q|v)_proj$", rank=2, alpha=4.0, dtype=torch.float32)
    src = write(lora, tmp_path / "adapter", "peft")
    args = [str(src), "--source-model", str(llama_models / "v1"), "--target-model", str(llama_models / "v2"), "--method", "prolora"]
    port_push(tmp_path, hub_server, *args)
    files = hub_server.repo_files(REPO)
    meta = front_matter(files["README.md"])
    assert "base_model" not in meta  # a local folder may be any checkpoint: no Hub id is claimed
    card = files["README.md"].decode()
    weights_sha = hashlib.sha256((llama_models / "v2" / "model.safetensors").read_bytes()).hexdigest()
    assert f"`model.safetensors` sha256 `{weights_sha}`" in card
    assert files["report.json"] == (tmp_path / "out" / "x.safetensors" / "report.json").read_bytes()  # a PEFT folder
    assert json.loads(files["report.json"])["target_model"]["weights_sha256"] == {"model.safetensors": weights_sha}
    n = len(hub_server.commits(REPO))
    res = port_push(tmp_path, hub_server, *args, "--force")  # the same port again, over its own output
    assert "nothing to push" in res.stdout and len(hub_server.commits(REPO)) == n
    assert "--force" not in hub_server.repo_files(REPO)["README.md"].decode()
    # the user names the Hub id: then it is claimed
    port_push(tmp_path, hub_server, *args, "--force", "--base-model-id", "lorareg-test/tiny-llama-v2")
    assert front_matter(hub_server.repo_files(REPO)["README.md"])["base_model"] == "lorareg-test/tiny-llama-v2"
