"""Low-rank recompression and every projection method against its dense formula."""

from __future__ import annotations

import pytest
import torch

from lorareg.engine import (
    METHODS,
    MissingBasisError,
    ShapeMismatchError,
    energy,
    get_method,
    recompress,
    top_k,
)

torch.set_default_dtype(torch.float32)


def rand_lora(m, n, r, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) * scale, torch.randn(r, n, generator=g) / n**0.5


def rand_weight(m, n, seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    s = torch.arange(1, min(m, n) + 1, dtype=torch.float32) ** -0.7
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
    return (U * s) @ V.T


def dense_svd_trunc(M, r):
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


# -- recompress --------------------------------------------------------------------------------


def test_recompress_exact_when_rank_allows():
    B, A = rand_lora(50, 40, 6)
    up, down = recompress(B, A, 8)
    assert up.shape == (50, 6) and down.shape == (6, 40)
    torch.testing.assert_close(up @ down, B @ A, atol=1e-5, rtol=1e-5)
    # balanced: both factors carry sqrt(σ)
    torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1), atol=1e-5, rtol=1e-4)


def test_recompress_optimal_when_truncating():
    B, A = rand_lora(60, 45, 12, seed=1)
    up, down = recompress(B, A, 5)
    assert up.shape == (60, 5)
    ref = dense_svd_trunc(B @ A, 5)
    torch.testing.assert_close((up @ down).double(), ref, atol=1e-5, rtol=1e-4)


def test_recompress_wide_R_and_energy():
    B, A = rand_lora(10, 12, 30, seed=2)  # R > m, n
    up, down = recompress(B, A, 4)
    torch.testing.assert_close((up @ down).double(), dense_svd_trunc(B @ A, 4), atol=1e-4, rtol=1e-4)
    assert energy(B, A) == pytest.approx(float((B @ A).double().pow(2).sum()), rel=1e-5)


# -- methods vs dense formulas -----------------------------------------------------------------

M, N, R, K = 48, 40, 6, 12


@pytest.fixture(scope="module")
def setup():
    Ws = rand_weight(M, N, 0)
    Wt = Ws + 0.05 * rand_weight(M, N, 1)
    src, tgt = top_k(Ws, K), top_k(Wt, K)
    B, A = rand_lora(M, N, R, seed=3)
    return src, tgt, B, A


def P(U):
    return U @ U.T


def dense_expected(name, src, tgt, dW):
    I_m, I_n = torch.eye(M), torch.eye(N)
    Ps, Qs, Pt, Qt = P(src.U), P(src.V), P(tgt.U), P(tgt.V)
    if name == "copy":
        return dW
    if name == "lora-x":
        return Pt @ dW @ Qt
    if name == "prolora":
        par = Ps @ dW @ Qs
        return Pt @ par @ Qt + (I_m - Pt) @ (dW - par) @ (I_n - Qt)
    if name == "prolora-full":
        return (Pt @ Ps + (I_m - Pt) @ (I_m - Ps)) @ dW @ (Qs @ Qt + (I_n - Qs) @ (I_n - Qt))
    if name == "align":
        d = torch.sign((src.U * tgt.U).sum(0) + (src.V * tgt.V).sum(0))
        Pout = tgt.U @ torch.diag(d) @ src.U.T
        Pin = tgt.V @ torch.diag(d) @ src.V.T
        return Pout @ dW @ Pin.T
    raise AssertionError(name)


@pytest.mark.parametrize("name", list(METHODS))
def test_method_matches_dense_formula(setup, name):
    src, tgt, B, A = setup
    dW = B @ A
    # rank large enough for the exact result (prolora sums up to 3r columns)
    out = get_method(name)(B, A, source=src, target=tgt, rank=3 * R)
    expected = dense_expected(name, src, tgt, dW)
    torch.testing.assert_close(out.up @ out.down, expected, atol=1e-5, rtol=1e-4)
    assert out.up.dtype == torch.float32 and out.up.shape[1] <= 3 * R
    assert out.kept_energy == pytest.approx(float(expected.pow(2).sum() / dW.pow(2).sum()), rel=1e-4)
    assert 0.0 <= out.similarity <= 1.0 and out.method == name
    # at rank r: the best rank-r approximation of the dense result
    out_r = get_method(name)(B, A, source=src, target=tgt, rank=R)
    assert out_r.up.shape[1] <= R
    torch.testing.assert_close(
        (out_r.up @ out_r.down).double(), dense_svd_trunc(expected, R), atol=1e-5, rtol=1e-4
    )


def test_identical_target():
    W = rand_weight(M, N, 0)
    b = top_k(W, K)
    B, A = rand_lora(M, N, R, seed=4)
    dW = B @ A
    for name in ("copy", "prolora-full"):
        out = get_method(name)(B, A, source=b, target=b, rank=R)
        torch.testing.assert_close(out.up @ out.down, dW, atol=1e-5, rtol=1e-4)
        assert out.kept_energy == pytest.approx(1.0, abs=1e-5) and out.similarity == pytest.approx(1.0, abs=1e-5)
    # lora-x (and align, and published prolora) drop what lies outside the top-k subspaces
    for name in ("lora-x", "prolora", "align"):
        out = get_method(name)(B, A, source=b, target=b, rank=R)
        assert out.kept_energy < 0.9
    lx = get_method("lora-x")(B, A, source=b, target=b, rank=R)
    al = get_method("align")(B, A, source=b, target=b, rank=R)
    torch.testing.assert_close(lx.up @ lx.down, al.up @ al.down, atol=1e-5, rtol=1e-4)


def test_align_mismatched_shapes():
    # SD1.5-like cross-attention k/v (in 768) -> SDXL-like (in 2048), scaled down 8x
    Ws, Wt = rand_weight(40, 96, 0), rand_weight(80, 256, 1)
    src, tgt = top_k(Ws, 10), top_k(Wt, 12)
    B, A = rand_lora(40, 96, 4, seed=5)
    out = get_method("align")(B, A, source=src, target=tgt, rank=4)
    assert out.shape == (80, 256) and out.up.shape[1] <= 4
    assert out.similarity is None and out.similarity_out is None and out.similarity_in is None
    k = 10
    Pout = tgt.U[:, :k] @ src.U.T  # canonical signs when no side agrees
    Pin = tgt.V[:, :k] @ src.V.T
    torch.testing.assert_close(out.up @ out.down, Pout @ (B @ A) @ Pin.T, atol=1e-5, rtol=1e-4)
    for name in ("copy", "lora-x", "prolora", "prolora-full"):
        with pytest.raises(ShapeMismatchError):
            get_method(name)(B, A, source=src, target=tgt, rank=4)
    assert issubclass(ShapeMismatchError, ValueError)


def test_missing_bases_and_copy_without_bases():
    B, A = rand_lora(M, N, R)
    out = get_method("copy")(B, A, source=None, target=None, rank=R)
    assert torch.equal(out.up, B) and torch.equal(out.down, A) and out.similarity is None
    for name in ("lora-x", "prolora", "prolora-full", "align"):
        with pytest.raises(MissingBasisError):
            get_method(name)(B, A, source=None, target=None, rank=R)
    with pytest.raises(ValueError):
        get_method("nope")


def test_rank_reduction_in_copy():
    B, A = rand_lora(M, N, 8, seed=6)
    out = get_method("copy")(B, A, source=None, target=None, rank=3)
    assert out.up.shape == (M, 3)
    torch.testing.assert_close((out.up @ out.down).double(), dense_svd_trunc(B @ A, 3), atol=1e-5, rtol=1e-4)
    assert out.kept_energy < 1.0 and out.notes
