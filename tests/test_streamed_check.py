"""BaseWeights.stored: the byte ranges the streamed check reads are the weights BaseWeights.weight returns."""

import torch
from safetensors.torch import save_file

from lorareg.engine.relatedness import RangeReader, WeightPair, check_pairs
from lorareg.registry import get_registry
from lorareg.sources.weights import open_model


def test_fused_parts_of_a_single_file_checkpoint(tmp_path):
    """HunyuanVideo's original checkpoint fuses q, k, v into img_attn_qkv: each part is a row range of it."""
    fam = get_registry().family("hunyuan-video")
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(9216, 3072, generator=g).bfloat16()
    proj = torch.randn(3072, 3072, generator=g).bfloat16()
    save_file({"double_blocks.0.img_attn_qkv.weight": qkv, "double_blocks.0.img_attn_proj.weight": proj}, tmp_path / "hv.safetensors")
    model = open_model(fam, str(tmp_path / "hv.safetensors"))
    assert model.layout == "single_file"
    names = [f"transformer_blocks.0.attn.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")]
    with RangeReader() as reader:
        for name in names:
            stored = model.stored("transformer", name)
            flat = reader.read(stored, 0, stored.numel)
            assert torch.equal(flat.reshape(stored.shape), model.weight("transformer", name))
    # k against v: different rows of one fused tensor, unrelated random values
    k, v = model.stored("transformer", names[1]), model.stored("transformer", names[2])
    res = check_pairs([WeightPair("k-v", k, v), WeightPair("q-q", model.stored("transformer", names[0]), model.stored("transformer", names[0]))])
    assert abs(res.layers[0].cosine) < 0.01 and res.layers[1].identical and res.related is not None
