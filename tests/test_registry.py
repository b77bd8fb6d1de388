"""The registry: data files validated by JSON Schema, and new formats/families added as data only."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorareg
from lorareg.core.errors import RegistryError
from lorareg.registry import get_registry
from lorareg.registry.data import builtin_root

ROOT = builtin_root()


def test_every_correspondence_names_known_families_and_matches_its_file():
    reg = get_registry()
    files = sorted((ROOT / "schemas" / "correspondences").glob("*.json"))
    assert len(files) >= 5
    for path in files:
        doc = json.loads(path.read_text())
        assert path.stem == f"{doc['source']}__{doc['target']}"
        src, tgt = reg.family(doc["source"]), reg.family(doc["target"])
        for scid, tcid in doc["components"].items():
            assert scid in src.components and (tcid is None or tcid in tgt.components)


def test_every_adapter_validates_and_has_a_writable_or_read_only_variant():
    reg = get_registry()
    assert set(reg.formats) >= {"kohya", "diffusers", "diffusers-old", "peft", "ldm", "musubi"}
    for fmt in reg.formats.values():
        assert fmt.variants
        if fmt.spec.writable:
            assert fmt.default_write_variant is not None


def test_invalid_data_file_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "broken.json").write_text(json.dumps({"schema_version": 1, "id": "broken", "title": "x",
                                                                  "container": "zip", "writable": True, "variants": []}))
    monkeypatch.setenv("LORAREG_DATA_PATH", str(tmp_path))
    with pytest.raises(RegistryError, match="broken.json: invalid at"):
        get_registry()


def test_a_new_key_format_is_a_data_file(tmp_path, monkeypatch):
    """A made-up format ('onefile': dotted names under model., factors .down/.up, alpha tensors) works
    for detection, reading and writing without any code."""
    (tmp_path / "adapters").mkdir()
    doc = {
        "schema_version": 1, "id": "onefile", "title": "test format", "container": "safetensors", "writable": True,
        "variants": [{"id": "v1", "separator": ".", "schemes": ["canonical"],
                      "prefixes": [{"prefix": "model.unet.", "components": ["unet"]}],
                      "factors": {"lora": {"down": [".down"], "up": [".up"]}},
                      "alpha": {"store": "tensor", "suffix": ".scale_alpha", "missing": "rank"}}],
    }
    (tmp_path / "adapters" / "onefile.json").write_text(json.dumps(doc))
    monkeypatch.setenv("LORAREG_DATA_PATH", str(tmp_path))
    g = torch.Generator().manual_seed(0)
    base = "model.unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    p = tmp_path / "x.safetensors"
    save_file({base + ".down": torch.randn(4, 768, generator=g), base + ".up": torch.randn(640, 4, generator=g),
               base + ".scale_alpha": torch.tensor(2.0)}, p)
    det = lorareg.detect(p)
    assert (det.format, det.family) == ("onefile", "sd15")
    out = tmp_path / "k.safetensors"
    lorareg.convert(p, out, to="kohya")
    back = tmp_path / "back.safetensors"
    lorareg.convert(out, back, to="onefile")
    a, b = lorareg.load(p), lorareg.load(back)
    key = "unet:down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    assert a.modules[key].scale == 0.5 and torch.equal(a.modules[key].delta_weight(), b.modules[key].delta_weight())


def test_family_aliases_resolve():
    reg = get_registry()
    assert reg.family("SDXL 1.0").id == "sdxl"
    assert reg.family("sdxl_base_v1-0").id == "sdxl"
    assert reg.family("sd_v1").id == "sd15"
    assert reg.family("Hunyuan Video").id == "hunyuan-video"
