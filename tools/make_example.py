"""Write the embedded example LoRA (lorareg/examples/) deterministically.

A kohya-format SD1.5 LoRA: rank 2 on the cross-attention key/value projections of the UNet and the
query/value projections of the text encoder, fixed seed. It exercises detection and conversion
offline; it was not trained.
"""

from pathlib import Path

import torch

import lorareg
from lorareg.core.io import LazyTensor
from lorareg.core.lora import Lora, Module
from lorareg.registry import get_registry

OUT = Path(__file__).resolve().parent.parent / "lorareg" / "examples" / "sd15-kohya-example.safetensors"


def main() -> None:
    fam = get_registry().family("sd15")
    g = torch.Generator().manual_seed(20261125)
    modules = {}
    for cid, comp in fam.components.items():
        for name, shape in comp.modules.items():
            if not (name.endswith(("attn2.to_k", "attn2.to_v", "self_attn.q_proj", "self_attn.v_proj"))):
                continue
            down = torch.randn(2, shape[1], generator=g) / shape[1] ** 0.5
            up = torch.randn(shape[0], 2, generator=g) * 0.01
            m = Module(cid, name, "lora", {"down": LazyTensor.from_torch(down.half()), "up": LazyTensor.from_torch(up.half())}, 1.0, None, shape)
            modules[m.key] = m
    lora = Lora("sd15", modules, metadata={"ss_base_model_version": "sd_v1", "ss_network_dim": "2", "ss_network_alpha": "1.0",
                                             "ss_training_comment": "lorareg embedded example (random factors, not trained)"})
    OUT.unlink(missing_ok=True)
    lorareg.save(lora, OUT, format="kohya")
    print(OUT, OUT.stat().st_size)


if __name__ == "__main__":
    main()
