"""The streamed relatedness check: distance and cosine from safetensors shards, read once, in chunks."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lorareg.engine.relatedness import (ByteRange, RangeReader, StoredWeight, WeightPair, check_pairs,
                                         compare, stored_in_file)
from lorareg.core.io import DTYPES, read_header


def _sharded(folder, tensors: dict[str, torch.Tensor], per_shard: int) -> dict[str, StoredWeight]:
    """Write ``tensors`` as a multi-shard safetensors model with an index; locate them back from the files."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    shards = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for j, group in enumerate(shards):
        fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, folder / fname)
        weight_map.update({n: fname for n in group})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = {}
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for name, fname in index.items():
        h = read_header(folder / fname)
        info = h.tensors[name]
        out[name] = stored_in_file(h.path, h.data_offset, info.begin, info.end, info.shape, DTYPES[info.dtype][0])
    return out


def _reference(ws: torch.Tensor, wt: torch.Tensor) -> tuple[float, float]:
    s, t = ws.double().flatten(), wt.double().flatten()
    return float((t - s).norm() / s.norm()), float(s @ t / (s.norm() * t.norm()))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A source model and a fine-tune of it (+3% noise) in bf16, an f32 copy, and an unrelated model."""
    root = tmp_path_factory.mktemp("shards")
    g = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (96, 64), "b.weight": (64, 96), "conv.weight": (32, 16, 3, 3), "c.weight": (128, 40)}
    src = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    tgt = {n: w + 0.03 * torch.randn(w.shape, generator=g) for n, w in src.items()}
    other = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    return {
        "src16": (src, _sharded(root / "src16", {n: w.bfloat16() for n, w in src.items()}, 2)),
        "tgt16": (tgt, _sharded(root / "tgt16", {n: w.bfloat16() for n, w in tgt.items()}, 3)),
        "src32": (src, _sharded(root / "src32", src, 1)),
        "tgt32": (tgt, _sharded(root / "tgt32", tgt, 4)),
        "other": (other, _sharded(root / "other", {n: w.bfloat16() for n, w in other.items()}, 2)),
    }


@pytest.mark.parametrize("a,b", [("src16", "tgt16"), ("src32", "tgt32"), ("src16", "tgt32"), ("src16", "other")])
@pytest.mark.parametrize("prefetch", [True, False])
def test_distance_and_cosine_match_torch(models, a, b, prefetch):
    (ta, sa), (tb, sb) = models[a], models[b]
    pairs = [WeightPair(n, sa[n], sb[n]) for n in sa]
    res = check_pairs(pairs, chunk_elems=1000, prefetch=prefetch)  # several chunks per weight
    assert [l.name for l in res.layers] == list(sa)
    for layer in res.layers:
        # the reference reads the same stored values (bf16 rounding included)
        ws, wt = ta[layer.name].to(sa[layer.name].dtype), tb[layer.name].to(sb[layer.name].dtype)
        dist, cos = _reference(ws, wt)
        assert layer.relative_distance == pytest.approx(dist, rel=1e-5, abs=1e-7)
        assert layer.cosine == pytest.approx(cos, rel=1e-5, abs=1e-6)
        assert layer.chunks > 1 and layer.numel == ws.numel()
    if b == "other":
        assert abs(res.mean_cosine) < 0.2 and res.related is False
    else:
        assert res.min_cosine > 0.999 and res.related is True and 0.02 < res.mean_relative_distance < 0.04


def test_every_byte_is_read_once_in_chunks_of_whole_rows(models):
    (_, sa), (_, sb) = models["src16"], models["tgt16"]
    calls = []

    class Counting(RangeReader):
        def read(self, weight, start, count, out=None):
            calls.append((weight, start, count))
            return super().read(weight, start, count, out)

    pairs = [WeightPair(n, sa[n], sb[n]) for n in sa]
    with Counting() as reader:
        res = check_pairs(pairs, chunk_elems=1000, reader=reader)
    assert res.bytes_read == reader.bytes_read == sum(p.source.nbytes + p.target.nbytes for p in pairs)
    for p in pairs:
        for side in (p.source, p.target):
            runs = sorted((start, count) for w, start, count in calls if w is side)
            # contiguous, non-overlapping, covering the weight: each element read exactly once
            assert runs[0][0] == 0 and all(x[0] + x[1] == y[0] for x, y in zip(runs, runs[1:]))
            assert runs[-1][0] + runs[-1][1] == side.numel
            # chunks are whole rows, at most chunk_elems (or one row when a row is larger)
            assert all(c % side.row_elems == 0 or s + c == side.numel for s, c in runs)
            assert all(c <= max(1000, side.row_elems) for _, c in runs) and len(runs) > 1
    assert res.max_chunk_elems <= 1000


def test_identical_weights_and_zero_weights():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        w = torch.randn(40, 30).bfloat16()
        save_file({"w": w, "z": torch.zeros(8, 8)}, Path(d) / "m.safetensors")
        h = read_header(Path(d) / "m.safetensors")
        sw = {n: stored_in_file(h.path, h.data_offset, i.begin, i.end, i.shape, DTYPES[i.dtype][0]) for n, i in h.tensors.items()}
        same = compare(sw["w"], sw["w"], chunk_elems=64)
        assert same.identical and same.relative_distance == 0.0 and same.cosine == pytest.approx(1.0)
        zero = compare(sw["z"], sw["z"])
        assert zero.relative_distance is None and zero.cosine is None and zero.identical


def test_a_weight_split_over_byte_ranges(tmp_path):
    """A fused tensor's part: its rows are byte ranges of the fused tensor, read in the module's row order."""
    fused = torch.randn(30, 8)
    save_file({"qkv": fused}, tmp_path / "f.safetensors")
    h = read_header(tmp_path / "f.safetensors")
    base = h.data_offset + h.tensors["qkv"].begin
    row = 8 * 4
    # the module is rows 20..30 then rows 0..5 of the fused tensor
    split = StoredWeight((ByteRange(h.path, base + 20 * row, 10 * row), ByteRange(h.path, base, 5 * row)), (15, 8), torch.float32)
    module = torch.cat([fused[20:30], fused[0:5]])
    save_file({"m": module + 0.1}, tmp_path / "m.safetensors")
    hm = read_header(tmp_path / "m.safetensors")
    im = hm.tensors["m"]
    plain = stored_in_file(hm.path, hm.data_offset, im.begin, im.end, im.shape, torch.float32)
    layer = compare(split, plain, chunk_elems=24)  # 3 rows a chunk: chunks straddle the two ranges
    dist, cos = _reference(module, module + 0.1)
    assert layer.relative_distance == pytest.approx(dist, rel=1e-5) and layer.cosine == pytest.approx(cos, rel=1e-5)
    with pytest.raises(ValueError, match="byte ranges hold"):
        StoredWeight((ByteRange(h.path, base, 5 * row),), (15, 8), torch.float32)


def test_shape_mismatch_and_truncated_file(tmp_path):
    save_file({"a": torch.randn(4, 4), "b": torch.randn(4, 5)}, tmp_path / "m.safetensors")
    h = read_header(tmp_path / "m.safetensors")
    a, b = (stored_in_file(h.path, h.data_offset, i.begin, i.end, i.shape, torch.float32) for i in (h.tensors["a"], h.tensors["b"]))
    with pytest.raises(ValueError, match="equal shapes"):
        compare(a, b)
    beyond = StoredWeight((ByteRange(h.path, h.file_size - 8, 64),), (4, 4), torch.float32)
    with pytest.raises(OSError, match="file ends"):
        compare(beyond, beyond, prefetch=False)

