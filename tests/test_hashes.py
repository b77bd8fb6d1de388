"""The four file hashes and the embedded-hash check, against values computed independently here:
hashlib over byte ranges of the file, and sd-scripts' own recipe (re-serialise with the real
safetensors library keeping only ss_* metadata, hash the 64 KiB at 1 MiB)."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import save, save_file

import lorareg
from lorareg.core.hashes import check_embedded, file_hashes
from lorareg.core.io import read_header

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


SMALL, LARGE = (320, 4), (1280, 64)  # SD1.5 down block 0 / 2 attention widths: ~40 KB and ~2.6 MB files


def _kohya_tensors(dim: int, rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    block = {320: 0, 1280: 2}[dim]
    out = {}
    for mod in ["to_q", "to_k", "to_v", "to_out_0"]:
        key = f"lora_unet_down_blocks_{block}_attentions_0_transformer_blocks_0_attn1_{mod}"
        out[f"{key}.lora_down.weight"] = torch.randn(rank, dim, generator=g).to(torch.float16)
        out[f"{key}.lora_up.weight"] = torch.randn(dim, rank, generator=g).to(torch.float16)
        out[f"{key}.alpha"] = torch.tensor(float(rank))
    return out


def _independent(path, tensors, metadata):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    data = raw[8 + n :]
    ss_only = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    return {
        "sha256": hashlib.sha256(raw).hexdigest(),
        "tensor": hashlib.sha256(data).hexdigest(),
        "tensor_of_ss_only": hashlib.sha256(ss_only[8 + struct.unpack("<Q", ss_only[:8])[0] :]).hexdigest(),
        "legacy": hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8],
    }


@pytest.mark.parametrize("size", [SMALL, LARGE])  # under and over 1 MiB: the legacy window empty / in the data
def test_hashes_match_independent_computation(tmp_path, size):
    # mixed dtypes: the legacy hash depends on the safetensors library's layout (by dtype, then name)
    tensors = {**_kohya_tensors(*size), "z.steps": torch.arange(3, dtype=torch.int64),
               "a.bf16": torch.ones(70_000, dtype=torch.bfloat16), "b.u8": torch.ones(5, dtype=torch.uint8)}
    metadata = {"ss_network_dim": "32", "ss_tag_frequency": json.dumps({"a": {"cat": 3}}),
                "modelspec.title": "x" * 5000, "other": "y"}
    path = tmp_path / "a.safetensors"
    save_file(tensors, path, metadata)
    want = _independent(path, tensors, metadata)
    got, _ = file_hashes(read_header(path))
    assert got.sha256 == want["sha256"]
    assert got.autov2 == want["sha256"][:10]
    assert got.tensor_sha256 == want["tensor"] == want["tensor_of_ss_only"]
    assert got.autov3 == want["tensor"][:12]
    assert got.legacy == want["legacy"]
    if size == SMALL:
        assert path.stat().st_size < 0x100000 and got.legacy == EMPTY_SHA256[:8]
    else:
        assert got.legacy != EMPTY_SHA256[:8]


def test_embedded_hash_check(tmp_path):
    tensors = _kohya_tensors(*LARGE)
    base = {"ss_network_dim": "32"}
    probe = tmp_path / "probe.safetensors"
    save_file(tensors, probe, base)
    want = _independent(probe, tensors, base)
    good = tmp_path / "good.safetensors"
    save_file(tensors, good, {**base, "sshs_model_hash": want["tensor"], "sshs_legacy_hash": want["legacy"],
                              "modelspec.hash_sha256": "0x" + want["tensor"].upper()})
    h = read_header(good)
    status = {c.key: c.status for c in check_embedded(h.metadata, *file_hashes(h))}
    assert status == {"sshs_model_hash": "ok", "sshs_legacy_hash": "ok", "modelspec.hash_sha256": "ok"}

    bad = tmp_path / "bad.safetensors"  # the trainer bug: the SHA-256 of empty input in every file
    save_file(tensors, bad, {**base, "sshs_model_hash": EMPTY_SHA256})
    info = lorareg.inspect(bad)
    by_key = {c.key: c for c in info.embedded_hashes}
    assert by_key["sshs_model_hash"].status == "wrong"
    assert by_key["sshs_model_hash"].expected == want["tensor"]
    assert by_key["sshs_legacy_hash"].status == "absent"
    assert [c.key for c in info.wrong_hashes] == ["sshs_model_hash"]
    assert info.hashes.sha256 == hashlib.sha256(bad.read_bytes()).hexdigest() == info.sha256


def test_written_files_carry_their_own_hashes(tmp_path):
    tensors = _kohya_tensors(*SMALL)
    src = tmp_path / "src.safetensors"
    src_meta = {"ss_network_dim": "4", "sshs_model_hash": EMPTY_SHA256, "sshs_legacy_hash": "deadbeef",
                "modelspec.hash_sha256": "0x" + "1" * 64, "modelspec.title": "t"}
    save_file(tensors, src, src_meta)
    src_raw = src.read_bytes()
    for fmt, out in [("diffusers", tmp_path / "d.safetensors"), ("kohya", tmp_path / "k.safetensors"),
                     ("peft", tmp_path / "peft")]:
        lorareg.convert(src, out, to=fmt)
        weights = out / "adapter_model.safetensors" if out.is_dir() else out
        raw = weights.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        meta = json.loads(raw[8 : 8 + n])["__metadata__"]
        own = hashlib.sha256(raw[8 + n :]).hexdigest()
        assert meta["sshs_model_hash"] == own
        assert meta["modelspec.hash_sha256"] == "0x" + own
        assert meta["sshs_legacy_hash"] == EMPTY_SHA256[:8]  # under 1 MiB
        assert meta["lorareg.source_sha256"] == hashlib.sha256(src_raw).hexdigest()
        (sn,) = struct.unpack("<Q", src_raw[:8])
        assert meta["lorareg.source_tensor_sha256"] == hashlib.sha256(src_raw[8 + sn :]).hexdigest()
        assert all(c.status == "ok" for c in lorareg.inspect(out).embedded_hashes)


def test_written_legacy_hash_matches_sd_scripts_recipe(tmp_path):
    src = tmp_path / "src.safetensors"
    save_file(_kohya_tensors(*LARGE), src, {"ss_network_dim": "32", "ss_network_alpha": "32"})
    out = tmp_path / "out.safetensors"
    lorareg.convert(src, out, to="kohya")
    from safetensors.torch import load_file

    h = read_header(out)
    tensors = load_file(out)
    want = _independent(out, tensors, h.metadata)
    assert h.metadata["sshs_legacy_hash"] == want["legacy"]
    assert h.metadata["sshs_model_hash"] == want["tensor"]


def test_cli_inspect_flags_a_wrong_embedded_hash(tmp_path):
    from click.testing import CliRunner

    from lorareg.apps.cli.main import main

    path = tmp_path / "bad.safetensors"
    save_file(_kohya_tensors(*SMALL), path, {"sshs_model_hash": EMPTY_SHA256})
    res = CliRunner().invoke(main, ["inspect", str(path)])
    assert res.exit_code == 0, res.output
    assert "WARNING     sshs_model_hash" in res.output and "AutoV2" in res.output
    doc = json.loads(CliRunner().invoke(main, ["inspect", str(path), "--json"]).output)
    assert doc["hashes"]["autov2"] == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert {c["key"]: c["status"] for c in doc["embedded_hashes"]}["sshs_model_hash"] == "wrong"


def test_a_file_is_hashed_once_per_fingerprint(tmp_path, monkeypatch):
    """A second load of the same file reuses its hashes; a rewritten file (new fingerprint) is hashed again."""
    from lorareg.core import hash_memory

    monkeypatch.setenv("LORAREG_CACHE", str(tmp_path / "cache"))
    calls = []
    real = hash_memory.file_hashes
    monkeypatch.setattr(hash_memory, "file_hashes", lambda header, *a: calls.append(header.path) or real(header, *a))
    src = tmp_path / "src.safetensors"
    save_file(_kohya_tensors(*SMALL), src, {"ss_network_dim": "4"})
    first = lorareg.load(src)
    second = lorareg.load(src)
    assert len(calls) == 1 and first.source_hashes == second.source_hashes
    assert first.source_sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    save_file(_kohya_tensors(*SMALL), src, {"ss_network_dim": "4", "ss_comment": "edited"})  # new bytes, new fingerprint
    third = lorareg.load(src)
    assert len(calls) == 2 and third.source_sha256 == hashlib.sha256(src.read_bytes()).hexdigest() != first.source_sha256
