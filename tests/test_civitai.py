"""Civitai as a source, against the loopback Civitai-compatible server (tests/civitai_server.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import lorareg
from civitai_server import CivitaiServer, Model, Version
from lora_factory import make_lora, write
from lorareg.apps.cli.main import main
from lorareg.core.errors import InputError, LoraregError
from lorareg.sources import civitai
from lorareg.sources.civitai_refs import CivitaiRef, parse_civitai_ref

TOKEN = "civitai-secret-token-123"
#: a few SDXL attention projections that SSD-1B keeps
SDXL_ATTN = r"unet:down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn[12]\.to_(q|k|v|out\.0)$"


def sdxl_lora_bytes(tmp_path: Path, **meta) -> bytes:
    lora = make_lora("sdxl", SDXL_ATTN, rank=4, alpha=4.0, dtype=torch.float16)
    lora.metadata.update(meta)
    return write(lora, tmp_path / "made.safetensors", "kohya").read_bytes()


@pytest.fixture
def civ(tmp_path, monkeypatch, hf_offline_env):
    with CivitaiServer(token=TOKEN) as server:
        monkeypatch.setenv("CIVITAI_ENDPOINT", server.url)
        monkeypatch.setenv("LORAREG_CIVITAI_CACHE", str(tmp_path / "civitai-cache"))
        monkeypatch.delenv("CIVITAI_API_TOKEN", raising=False)
        monkeypatch.delenv("CIVITAI_OFFLINE", raising=False)
        monkeypatch.setattr(civitai, "_RESOLVED", {})
        data = sdxl_lora_bytes(tmp_path, ss_network_dim="4")
        server.add(Model(1, "Pixel Style", "alice"), Version(11, 1, data, "pixel_style.safetensors", trained_words=["pxl style", "8bit"]))
        server.data = data
        yield server


def cache_files(tmp_path) -> list[str]:
    root = tmp_path / "civitai-cache" / "files"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


@pytest.mark.parametrize("text,want", [
    ("civitai:11", CivitaiRef(11)),
    ("https://civitai.com/models/1/pixel-style?modelVersionId=11", CivitaiRef(11, 1)),
    ("https://civitai.com/models/1", CivitaiRef(None, 1)),
    ("https://civitai.com/api/download/models/11", CivitaiRef(11)),
    ("urn:air:sdxl:lora:civitai:1@11", CivitaiRef(11, 1)),
    ("urn:air:sdxl:lora:civitai:1", CivitaiRef(None, 1)),
])
def test_refs(text, want):
    assert parse_civitai_ref(text) == want


@pytest.mark.parametrize("text", ["civitai:abc", "urn:air:sdxl:checkpoint:civitai:1@2", "https://civitai.com/images/5"])
def test_bad_refs(text):
    with pytest.raises(InputError):
        parse_civitai_ref(text)


def test_resolve_downloads_verifies_and_records_facts(civ, tmp_path, monkeypatch):
    monkeypatch.setenv("CIVITAI_API_TOKEN", TOKEN)
    path, facts = civitai.resolve("urn:air:sdxl:lora:civitai:1@11")
    assert path.read_bytes() == civ.data
    assert facts.sha256 == hashlib.sha256(civ.data).hexdigest()
    assert (facts.model_name, facts.version_name, facts.creator, facts.base_model) == ("Pixel Style", "v1.0", "alice", "SDXL 1.0")
    assert facts.families == ["sdxl"] and facts.trained_words == ["pxl style", "8bit"]
    assert facts.allow_derivatives is True and facts.allow_commercial_use == ["Image", "RentCivit"]
    assert facts.page_url == f"{civ.url}/models/1?modelVersionId=11"
    # the download went through the redirect; the token went to the API as a Bearer header, never to the file host
    sent = {(p, a) for _, p, a, _ in civ.requests}
    assert ("/api/v1/model-versions/11", f"Bearer {TOKEN}") in sent
    assert [a for _, p, a, _ in civ.requests if p.startswith("/files/")] == [None]
    assert cache_files(tmp_path) == [f"{facts.sha256}.safetensors"]
    for f in (tmp_path / "civitai-cache").rglob("*"):  # the token is never written
        assert not f.is_file() or TOKEN.encode() not in f.read_bytes()


def test_load_a_civitai_lora(civ):
    lora = lorareg.load("civitai:11")
    assert lora.family == "sdxl" and lora.source_path == "civitai:11"
    assert lora.source_sha256 == hashlib.sha256(civ.data).hexdigest()
    assert lora.metadata["modelspec.trigger_phrase"] == "pxl style, 8bit"  # the API's trained words
    assert '"creator": "alice"' in lora.metadata["lorareg.source_civitai"]


def test_token_required_and_never_shown(civ, monkeypatch):
    civ.add(Model(2, "Gated", "bob"), Version(21, 2, civ.data, "gated.safetensors", needs_token=True))
    with pytest.raises(LoraregError, match="set CIVITAI_API_TOKEN"):
        civitai.resolve("civitai:21")
    monkeypatch.setenv("CIVITAI_API_TOKEN", "wrong-token-456")
    with pytest.raises(LoraregError, match="refused the token") as e:
        civitai.resolve("civitai:21")
    assert "wrong-token-456" not in str(e.value)
    monkeypatch.setenv("CIVITAI_API_TOKEN", TOKEN)
    assert civitai.resolve("civitai:21")[0].read_bytes() == civ.data


def test_not_found_and_rate_limit(civ):
    with pytest.raises(LoraregError, match=r"civitai:999: not found on Civitai \(HTTP 404\)"):
        civitai.resolve("civitai:999")
    civ.rate_limit, civ.retry_after = 1, "1"  # a short wait is waited for
    assert civitai.resolve("civitai:11")[1].version_id == 11
    civ.rate_limit, civ.retry_after = 5, "3600"  # a long one is reported
    with pytest.raises(LoraregError, match=r"rate limit.*retry after 3600 s"):
        civitai.resolve("civitai:11")


@pytest.mark.parametrize("kind", ["corrupt", "api_hash"])
def test_a_download_that_does_not_match_the_api_hash_is_refused(civ, tmp_path, kind):
    v = Version(31, 1, civ.data, "bad.safetensors", corrupt=kind == "corrupt",
                api_sha256=hashlib.sha256(b"other").hexdigest() if kind == "api_hash" else None)
    civ.add(civ.models[1], v)
    with pytest.raises(LoraregError, match="differs from the one the API gives; nothing was kept|nothing was kept"):
        civitai.resolve("civitai:31")
    assert cache_files(tmp_path) == []


def test_interrupted_download_resumes_with_a_range_request(civ, tmp_path):
    civ.add(civ.models[1], Version(41, 1, civ.data, "cut.safetensors", cut_after=1000))
    with pytest.raises(LoraregError, match="interrupted.*resume"):
        civitai.resolve("civitai:41")
    partial = [n for n in cache_files(tmp_path) if n.endswith(".partial")]
    assert len(partial) == 1
    path, _ = civitai.resolve("civitai:41")
    assert path.read_bytes() == civ.data
    ranges = [r for _, p, _, r in civ.requests if p.startswith("/files/41/")]
    assert ranges == [None, "bytes=1000-"]
    assert cache_files(tmp_path) == [path.name]


def test_offline_reuses_the_cache(civ, monkeypatch):
    path, _ = civitai.resolve("civitai:11")
    civitai._RESOLVED.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(civ.requests)
    again, facts = civitai.resolve("civitai:11")
    assert again == path and facts.creator == "alice" and len(civ.requests) == n
    with pytest.raises(InputError, match="not in the Civitai cache"):
        civitai.resolve("civitai:12")


def test_pickles_and_unknown_base_models_are_refused(civ, tmp_path):
    civ.add(civ.models[1], Version(51, 1, b"\x80\x04junk", "pickled.pt", safetensors=False))
    with pytest.raises(InputError, match="no safetensors file .*never unpickles"):
        civitai.resolve("civitai:51")
    civ.add(civ.models[1], Version(52, 1, civ.data, "odd.safetensors", base_model="Quantum 9"))
    with pytest.raises(InputError, match=r"'Quantum 9' is no known family's \(known: .*SDXL 1.0"):
        civitai.resolve("civitai:52")
    assert not [p for _, p, _, _ in civ.requests if p.startswith(("/files/51", "/files/52"))]


def test_cli_inspect_a_civitai_ref_and_errors_are_one_line(civ):
    res = CliRunner().invoke(main, ["inspect", "civitai:11", "--json"])
    assert res.exit_code == 0, res.output
    assert '"family": "sdxl"' in res.stdout
    bad = CliRunner().invoke(main, ["inspect", "civitai:999"])
    assert bad.exit_code != 0 and bad.stderr.strip().startswith("error: civitai:999: not found")
    assert "Traceback" not in bad.output


def test_lookup_by_sha256_then_by_tensor_hash(civ, tmp_path):
    exact = tmp_path / "exact.safetensors"
    exact.write_bytes(civ.data)
    res = CliRunner().invoke(main, ["lookup", str(exact), "--json"])
    assert res.exit_code == 0, res.output
    import json

    doc = json.loads(res.stdout)
    assert doc["found"] and doc["matched_by"] == "sha256" and doc["civitai"]["version_id"] == 11
    assert doc["civitai"]["page_url"].endswith("/models/1?modelVersionId=11")
    # metadata edited: the SHA-256 changes, the tensor-data hash does not
    from lorareg.core.io import open_tensors, write_safetensors

    tensors, meta, _ = open_tensors(exact)
    edited = tmp_path / "edited.safetensors"
    write_safetensors(edited, tensors, {**meta, "ss_comment": "renamed by a library manager"})
    res = CliRunner().invoke(main, ["lookup", str(edited)])
    assert res.exit_code == 0 and "civitai:11 (same tensors, other metadata (AutoV3))" in res.stdout
    assert f"page      {civ.url}/models/1?modelVersionId=11" in res.stdout
    other = tmp_path / "other.safetensors"
    write(make_lora("sdxl", SDXL_ATTN, seed=3), other, "kohya")
    res = CliRunner().invoke(main, ["lookup", str(other)])
    assert res.exit_code == 0 and "not on Civitai" in res.stdout


def test_scan_looks_files_up_on_civitai(civ, tmp_path):
    from lorareg.library.scan import scan

    lib = tmp_path / "library"
    lib.mkdir()
    (lib / "exact.safetensors").write_bytes(civ.data)
    write(make_lora("sdxl", SDXL_ATTN, seed=3), lib / "other.safetensors", "kohya")
    rows = {Path(r.path).name: r for r in scan([lib], cache=False, progress=False, workers=1, civitai=True).rows}
    assert rows["exact.safetensors"].civitai["version_id"] == 11 and rows["exact.safetensors"].civitai["matched_by"] == "sha256"
    assert rows["exact.safetensors"].civitai["page_url"].endswith("/models/1?modelVersionId=11")
    assert rows["other.safetensors"].civitai == {}
    assert all(r.civitai is None for r in scan([lib], cache=False, progress=False, workers=1).rows)  # only when asked
