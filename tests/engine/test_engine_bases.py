"""Top-k bases, subspace similarity and the basis cache."""

from __future__ import annotations

import os

import pytest
import torch

from lorareg.engine import (
    Basis,
    BasisCache,
    BasisKey,
    default_cache_root,
    default_k,
    subspace_similarity,
    top_k,
    top_k_batched,
    weight_digest,
)


def trained_like(m: int, n: int, k: int, alpha: float = 0.5, noise: float = 0.5, seed: int = 0):
    """Power-law spectrum σ_i = i^-α plus a Gaussian noise bulk whose top sits at noise·σ_k."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -alpha
    N = torch.randn(m, n, generator=g) / (m**0.5 + n**0.5)
    return (U * s) @ V.T + noise * s[k - 1] * N


def exact(W: torch.Tensor, k: int):
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U[:, :k].float(), S[:k].float(), Vh[:k].T.float()


@pytest.mark.parametrize(
    "m,n,k,alpha,noise",
    [(192, 256, 24, 0.5, 0.5), (256, 160, 32, 1.0, 0.5), (256, 256, 64, 0.5, 1.0)],
)
def test_randomized_matches_full_svd(m, n, k, alpha, noise):
    W = trained_like(m, n, k, alpha, noise)
    Ue, Se, Ve = exact(W, k)
    b = top_k(W, k, method="randomized")
    assert b.shape == (m, n) and b.k == k
    assert subspace_similarity(b.U, Ue) >= 0.99
    assert subspace_similarity(b.V, Ve) >= 0.99
    torch.testing.assert_close(b.S, Se, rtol=2e-2, atol=0)
    # orthonormal columns on both sides
    eye = torch.eye(k)
    torch.testing.assert_close(b.U.T @ b.U, eye, atol=1e-4, rtol=0)
    torch.testing.assert_close(b.V.T @ b.V, eye, atol=1e-3, rtol=0)


def test_gram_path_is_exact_and_auto_picks_it():
    W = trained_like(96, 128, 24)
    Ue, Se, Ve = exact(W, 24)
    for method in ("gram", "auto"):
        b = top_k(W, 24, method=method)
        assert subspace_similarity(b.U, Ue) > 0.999
        assert subspace_similarity(b.V, Ve) > 0.999
        torch.testing.assert_close(b.S, Se, rtol=1e-4, atol=1e-6)


def test_fp16_input_and_determinism():
    W = trained_like(128, 96, 16).half()
    a = top_k(W, 16, method="randomized", seed=3)
    b = top_k(W, 16, method="randomized", seed=3)
    assert a.U.dtype == torch.float32
    assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V) and torch.equal(a.S, b.S)


def test_batched_equals_single():
    ws = [trained_like(64, 96, 8, seed=i) for i in range(3)] + [trained_like(80, 48, 8, seed=9)]
    bs = top_k_batched(ws, 8, method="randomized")
    for w, b in zip(ws, bs):
        ref = top_k(w, 8, method="randomized")
        assert b.shape == w.shape
        torch.testing.assert_close(b.U, ref.U, atol=1e-4, rtol=0)
        torch.testing.assert_close(b.S, ref.S, atol=1e-4, rtol=1e-4)
    # k as a function of the shape (default_k when None)
    bs = top_k_batched(ws, None)
    assert [b.k for b in bs] == [default_k(w.shape) for w in ws]


def test_default_k_rule():
    assert default_k((1280, 1280)) == 320
    assert default_k((640, 2048)) == 160
    assert default_k((3072, 15360)) == 320
    assert default_k((3, 5)) == 1


def test_similarity_identical_and_random():
    g = torch.Generator().manual_seed(0)
    n, k = 400, 20
    A, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    assert subspace_similarity(A, A) == pytest.approx(1.0, abs=1e-5)
    sims = []
    for _ in range(5):
        B, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
        sims.append(subspace_similarity(A, B))
    assert sum(sims) / len(sims) == pytest.approx(k / n, rel=0.25)
    # different k's: normalised by the smaller one (a subspace inside a bigger one scores 1)
    C, _ = torch.linalg.qr(torch.cat([A, torch.randn(n, 10, generator=g)], 1))
    assert subspace_similarity(A, C) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError):
        subspace_similarity(A, A[:10])


# -- cache -------------------------------------------------------------------------------------


def test_cache_hit_miss_and_slicing(tmp_path):
    W = trained_like(64, 80, 16)
    cache = BasisCache(tmp_path)
    calls = []

    def builder(w, k):
        calls.append(k)
        return top_k(w, k)

    a = cache.get_or_build(W, 16, builder)
    b = cache.get_or_build(W, 16, builder)
    assert calls == [16] and cache.hits == 1 and cache.misses == 1
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.V, b.V)
    c = cache.get_or_build(W, 8, builder)  # served from the k=16 entry
    assert calls == [16] and c.k == 8 and torch.equal(c.U, a.U[:, :8])
    assert cache.get(BasisKey(weight_digest(W), 32)) is None  # larger k is a miss


def _corrupt_truncate(p):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _corrupt_flip(p):
    data = bytearray(p.read_bytes())
    for off in (-5, -1000, -2001):
        data[off] ^= 0x5A
    p.write_bytes(bytes(data))


def _corrupt_header(p):
    data = bytearray(p.read_bytes())
    data[10:20] = b"\xff" * 10
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_flip, _corrupt_header])
def test_cache_detects_corruption_and_rebuilds(tmp_path, corrupt):
    W = trained_like(64, 48, 8, seed=1)
    cache = BasisCache(tmp_path)
    first = cache.get_or_build(W, 8)
    path = cache.path(BasisKey(weight_digest(W), 8))
    assert path.exists()
    del first
    corrupt(path)
    again = cache.get_or_build(W, 8)
    assert cache.corrupt == 1 and cache.misses == 2 and cache.hits == 0
    assert path.exists()  # rebuilt and stored again
    third = cache.get_or_build(W, 8)
    assert cache.hits == 1
    torch.testing.assert_close(again.U, third.U)


def test_cache_wrong_shapes_detected(tmp_path):
    cache = BasisCache(tmp_path)
    W = trained_like(32, 40, 4)
    key = BasisKey(weight_digest(W), 4)
    b = top_k(W, 4)
    # a well-formed file whose tensors disagree with its metadata
    from safetensors.torch import save_file

    cache.put(key, b)
    p = cache.path(key)
    bad = Basis(b.U[:, :3], b.S[:3], b.V[:, :3])
    from lorareg.engine.cache import FORMAT, tensor_checksum

    tensors = {"U": bad.U.contiguous(), "S": bad.S.contiguous(), "V": bad.V.contiguous()}
    meta = {"format": FORMAT, "digest": key.digest, "version": key.version, "k": "4", "m": "32", "n": "40"}
    meta.update({f"checksum.{n}": tensor_checksum(t) for n, t in tensors.items()})
    save_file(tensors, str(p), metadata=meta)
    assert cache.get(key) is None and cache.corrupt == 1 and not p.exists()


def test_no_temp_files_left_and_digest(tmp_path):
    cache = BasisCache(tmp_path)
    W = trained_like(32, 32, 4)
    cache.get_or_build(W, 4)
    leftovers = [f for _, _, fs in os.walk(tmp_path) for f in fs if f.startswith(".tmp-")]
    assert leftovers == []
    assert weight_digest(W) == weight_digest(W.clone())
    assert weight_digest(W) != weight_digest(W.half())
    assert weight_digest(W) != weight_digest(W.reshape(16, 64))
    assert weight_digest(W.bfloat16()) == weight_digest(W.bfloat16())


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAREG_CACHE", str(tmp_path / "x"))
    assert default_cache_root() == tmp_path / "x"
    monkeypatch.delenv("LORAREG_CACHE")
    from huggingface_hub import constants

    assert default_cache_root() == __import__("pathlib").Path(constants.HF_HOME) / "lorareg" / "bases"
