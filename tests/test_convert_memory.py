"""A repeated convert reuses what the first learnt about a file (hashes, NaN scan, detection verdict, the
output's data hash) and writes exactly the same file; a changed file is learnt again; the one-pass NaN scan
and the header-last writer agree with the plain ways, checked here with hashlib and torch directly."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorareg
from lorareg.core.errors import ConversionError
from lorareg.core.io import LazyTensor, file_nonfinite, read_header, scan_nonfinite, write_safetensors


def _kohya(dim: int = 1280, rank: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """An SD1.5 down-block-2 attention LoRA (~2.6 MB: the legacy window falls in the data)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for mod in ["to_q", "to_k", "to_v", "to_out_0"]:
        key = f"lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn1_{mod}"
        out[f"{key}.lora_down.weight"] = torch.randn(rank, dim, generator=g).to(torch.float16)
        out[f"{key}.lora_up.weight"] = torch.randn(dim, rank, generator=g).to(torch.float16)
        out[f"{key}.alpha"] = torch.tensor(float(rank // 2))
    return out


def _data(path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])["__metadata__"], raw[8 + n :]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LORAREG_CACHE", str(root))
    return root


def test_a_repeated_convert_writes_the_same_file_from_memory(tmp_path, cache, monkeypatch):
    src = tmp_path / "src.safetensors"
    save_file(_kohya(), src, {"ss_network_dim": "64"})
    outs = [tmp_path / f"out{i}.safetensors" for i in range(3)]
    lorareg.convert(src, outs[0], to="diffusers")
    kinds = {p.parent.parent.name for p in cache.rglob("*.json")}
    assert kinds == {"file-hashes", "file-nonfinite", "detection", "output-data-sha256"}
    lorareg.convert(src, outs[1], to="diffusers")
    lorareg.convert(src, outs[2], to="diffusers")
    assert outs[0].read_bytes() == outs[1].read_bytes() == outs[2].read_bytes()
    meta, data = _data(outs[1])
    own = hashlib.sha256(data).hexdigest()
    assert meta["sshs_model_hash"] == own and meta["modelspec.hash_sha256"] == "0x" + own
    assert meta["lorareg.source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["lorareg.source_tensor_sha256"] == hashlib.sha256(_data_bytes(src)).hexdigest()
    # the same file written without any memory
    fresh = tmp_path / "fresh.safetensors"
    monkeypatch.setenv("LORAREG_CACHE", str(tmp_path / "empty"))
    lorareg.convert(src, fresh, to="diffusers")
    assert fresh.read_bytes() == outs[0].read_bytes()


def _data_bytes(path) -> bytes:
    raw = path.read_bytes()
    return raw[8 + struct.unpack("<Q", raw[:8])[0] :]


def test_a_changed_file_is_learnt_again(tmp_path, cache):
    src = tmp_path / "src.safetensors"
    save_file(_kohya(seed=0), src, {"ss_network_dim": "64"})
    lorareg.convert(src, tmp_path / "a.safetensors", to="diffusers")
    save_file(_kohya(seed=1), src, {"ss_network_dim": "64"})  # new bytes: a new fingerprint
    lorareg.convert(src, tmp_path / "b.safetensors", to="diffusers")
    meta, data = _data(tmp_path / "b.safetensors")
    assert meta["sshs_model_hash"] == hashlib.sha256(data).hexdigest() != _data(tmp_path / "a.safetensors")[0]["sshs_model_hash"]
    assert meta["lorareg.source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    # a NaN appearing in the rewritten file is found, not taken from the memory of the clean one
    bad = _kohya(seed=1)
    k = next(k for k in bad if k.endswith("lora_up.weight"))
    bad[k][3, 5] = float("nan")
    save_file(bad, src, {"ss_network_dim": "64"})
    with pytest.raises(ConversionError, match="NaN/Inf"):
        lorareg.convert(src, tmp_path / "c.safetensors", to="diffusers")
    with pytest.raises(ConversionError, match="1 factor tensors hold NaN/Inf"):  # and again, from memory
        lorareg.convert(src, tmp_path / "c.safetensors", to="diffusers")
    assert not (tmp_path / "c.safetensors").exists()


def test_a_nonfinite_alpha_is_not_a_nonfinite_factor(tmp_path, cache):
    t = _kohya()
    k = next(k for k in t if k.endswith(".alpha"))
    t[k] = torch.tensor(float("inf"))
    src = tmp_path / "src.safetensors"
    save_file(t, src)
    for name in ("a", "b"):  # first and remembered scan alike
        lorareg.convert(src, tmp_path / f"{name}.safetensors", to="diffusers")


def test_one_pass_nan_scan_equals_the_per_tensor_scan(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"{d}.{i}": torch.randn(64, 33, generator=g).to(d) for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
               for i in range(4)}
    tensors.update({"e4m3.0": torch.randn(8, 8, generator=g).to(torch.float8_e4m3fn), "int.0": torch.arange(5),
                    "empty.0": torch.zeros(0, dtype=torch.float16)})
    tensors["torch.float16.1"][2, 3] = float("nan")
    tensors["torch.bfloat16.3"][0, 0] = -float("inf")
    tensors["torch.float32.0"][5, 5] = float("inf")
    tensors["torch.float32.0"][6, 5] = -float("inf")
    tensors["torch.float16.2"].fill_(60000.0)  # finite, but its sum overflows half precision
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, path)
    header = read_header(path)
    lazy = {n: LazyTensor(i.dtype, i.shape, header=header, info=i) for n, i in header.tensors.items()}
    assert file_nonfinite(header) == {nf.name for nf in scan_nonfinite(lazy)} == {"torch.float16.1", "torch.bfloat16.3", "torch.float32.0"}
    clean = tmp_path / "clean.safetensors"
    save_file({k: v for k, v in tensors.items() if k not in ("torch.float16.1", "torch.bfloat16.3", "torch.float32.0")}, clean)
    assert file_nonfinite(read_header(clean)) == frozenset()


def test_header_last_writer_lays_the_file_out_again_when_a_final_value_is_longer(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.float32), "a": torch.ones(3, dtype=torch.float16)}
    data = b"".join(bytes(LazyTensor.from_torch(tensors[k]).buffer()) for k in ("a", "b"))
    for final in ("x" * 64, "y" * 3, "z" * 200):
        path = tmp_path / f"f{len(final)}.safetensors"
        seen = []
        write_safetensors(path, tensors, {"h": "0" * 64, "k": "v"},
                          finish=lambda sha, final=final: seen.append(sha) or {"h": final, "k": "v"})
        meta, got = _data(path)
        assert seen == [hashlib.sha256(data).hexdigest()] and got == data and meta == {"h": final, "k": "v"}
        assert torch.equal(load_file(str(path))["b"], tensors["b"])


def test_a_stopped_hash_is_not_remembered(tmp_path):
    import threading

    from lorareg.core.hash_memory import remembered_file_hashes
    from lorareg.core.hashes import HashingStopped

    src = tmp_path / "src.safetensors"
    save_file(_kohya(), src)
    stop = threading.Event()
    stop.set()
    with pytest.raises(HashingStopped):
        remembered_file_hashes(read_header(src), tmp_path / "cache", stop)
    assert not (tmp_path / "cache").exists()
    got = remembered_file_hashes(read_header(src), tmp_path / "cache", threading.Event())
    assert got.sha256 == hashlib.sha256(src.read_bytes()).hexdigest() and (tmp_path / "cache" / "file-hashes").is_dir()
