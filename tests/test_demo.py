"""`lorareg demo`: ports the embedded LM example v1 -> v2 offline and measures it; converts the SD1.5 example."""

import json
import math

import pytest
from click.testing import CliRunner

from lorareg.apps.cli.main import main
from lorareg.apps.demo import lm_example_path

pytest.importorskip("transformers")


def test_embedded_lm_example_is_small_and_complete():
    ex = lm_example_path()
    meta = json.loads((ex / "example.json").read_text())
    for key in ("source_model", "target_model", "lora", "reference_lora", "heldout"):
        assert (ex / meta[key]).exists(), key
    assert (ex / "data" / "schemas" / "families" / f"{meta['family']}.json").exists()
    assert (ex / "data" / "schemas" / "modules" / f"{meta['family']}.json").exists()
    size = sum(p.stat().st_size for p in ex.rglob("*") if p.is_file())
    assert size < 3.2e6, size


def test_demo_json(tmp_path, monkeypatch):
    monkeypatch.delenv("LORAREG_DATA_PATH", raising=False)
    monkeypatch.setenv("LORAREG_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(main, ["demo", "--json", "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    # part 2: the convert round trip
    assert out["round_trip_bit_exact"] is True and out["max_delta_error"] == 0
    assert out["detected_family"] == "sd15"
    # part 1: the port of the embedded LM example, fully offline
    port = out["port"]
    assert port["heldout_tokens"] > 0
    for key in ("loss_source_none", "loss_source_lora", "loss_none", "loss_retrained"):
        assert math.isfinite(port[key])
    assert port["loss_retrained"] < port["loss_none"]  # the reference LoRA helps on v2
    methods = {v["method"]: v for v in port["variants"]}
    assert "copy" in methods and "prolora-full" in methods
    for v in methods.values():
        assert v["layers"] == 28 and v["layers_ported"] == 28 and v["layers_skipped"] == 0
        assert 0.5 < v["mean_similarity"] <= 1.0 + 1e-6 and math.isfinite(v["loss"])
        assert v["gain_recovered"] is not None and v["gain_recovered"] > 0.3, v
        assert (tmp_path / "out" / f"lora-v2-{v['method']}" / "adapter_model.safetensors").exists()
    # the demo leaves the registry as it found it
    import os

    assert "LORAREG_DATA_PATH" not in os.environ


def test_demo_text(tmp_path):
    res = CliRunner().invoke(main, ["demo", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "layers ported" in res.stdout and "gain recovered" in res.stdout and "round trip bit-exact: yes" in res.stdout


def test_eval_command(tmp_path):
    ex = lm_example_path()
    args = ["eval", str(ex / "lora-v1"), "--target-model", str(ex / "v1"), "--data", str(ex / "heldout.txt"), "--max-windows", "16", "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["tokenizer"] == "bytes" and r["windows"] == 16 and r["modules_applied"] == 28
    assert r["loss_lora"] < r["loss_none"]  # the LoRA helps on its own base
    # gain recovered against a reference, and gain retained against the source
    res = CliRunner().invoke(main, ["eval", str(ex / "lora-v1"), "--target-model", str(ex / "v2"), "--data", str(ex / "heldout.txt"),
                                    "--reference", str(ex / "lora-v2-retrained"), "--source-model", str(ex / "v1"),
                                    "--source-lora", str(ex / "lora-v1"), "--max-windows", "16", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert math.isfinite(r["gain_recovered"]) and math.isfinite(r["gain_retained"])
    base = CliRunner().invoke(main, ["eval", "--base-only", "--target-model", str(ex / "v2"), "--data", str(ex / "heldout.txt"), "--max-windows", "4"])
    assert base.exit_code == 0 and "no adapter" in base.stdout
    bad = CliRunner().invoke(main, ["eval", "--target-model", str(ex / "v2"), "--data", str(ex / "heldout.txt")])
    assert bad.exit_code != 0 and "--base-only" in bad.stderr
    bad = CliRunner().invoke(main, ["eval", str(ex / "lora-v1"), "--target-model", str(tmp_path), "--data", str(ex / "heldout.txt")])
    assert bad.exit_code != 0 and "config.json" in bad.stderr
