"""The fidelity benchmark's tiny variant: the whole pipeline runs and produces a finite table (not the headline numbers)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent.parent / "bench" / "fidelity" / "run.py"

pytest.importorskip("transformers")
pytest.importorskip("diffusers")


@pytest.mark.skipif(not RUN.exists(), reason="bench/fidelity is not part of this checkout")
def test_tiny_fidelity_benchmark(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LORAREG_DATA_PATH"}
    res = subprocess.run([sys.executable, str(RUN), "--tiny", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "RESULTS.md").read_text().startswith("# Fidelity benchmark")
    results = json.loads((out / "results.json").read_text())
    domains = ["lm"] + (["diffusion"] if "pairs" in results.get("diffusion", {}) else [])
    for domain in domains:
        for name, pair in results[domain]["pairs"].items():
            assert math.isfinite(pair["loss_none"]) and math.isfinite(pair["loss_retrained"]), name
            assert set(results["methods"]) <= set(pair["methods"]), name
            for method, row in pair["methods"].items():
                assert math.isfinite(row["loss"]), (name, method)
                assert row["ported"] + row["skipped"] > 0
            for sweep in pair["threshold_sweep"].values():
                assert len(sweep) > 1 and all(math.isfinite(s["loss"]) for s in sweep)
    lm = results["lm"]["pairs"]
    flag = results["flag_threshold"]
    # the related pair passes the similarity filter, the negative control (another seed) is flagged
    assert min(lm["v1->v2"]["layer_similarity"].values()) >= flag
    assert max(lm["v1->v3"]["layer_similarity"].values()) < flag
    if "diffusion" in domains:
        dist = results["diffusion"]["pairs"]["v1->distilled"]["methods"]["copy"]
        assert dist["aligned_layers"] > 0 and dist["skipped"] > 0  # blocks re-paired by similarity, removed ones skipped
    if importlib.util.find_spec("matplotlib"):
        for png in ("gain_recovered.png", "loss_vs_threshold.png", "digits_grid.png"):
            assert (out / png).stat().st_size > 1000, png
    # the `--refine distill` rows on the same (tiny) models: LM v2 / far v4 / unrelated v3, UNet v2 / distilled
    res = subprocess.run([sys.executable, str(RUN), "--tiny", "--out", str(out), "--work", str(tmp_path / "work"), "--reuse-work",
                          "--skip-methods", "--refine-steps", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    distill = json.loads((out / "results_distill.json").read_text())
    assert set(distill["lm_distill"]) == {"v2", "v4", "v3"}
    assert distill["lm_distill"]["v3"]["related"] is False and "unrelated" in distill["lm_distill"]["v3"]["refused"]
    for target, d in distill["lm_distill"].items():
        assert all(math.isfinite(r["gain"]) and r["kl_end"] >= 0 for r in d["rows"]), target
    if "diffusion" in domains:
        assert set(distill["diffusion_distill"]["pairs"]) == {"v1->v2", "v1->distilled"}
        for name, p in distill["diffusion_distill"]["pairs"].items():
            assert p["rows"] and all(math.isfinite(r["gain"]) and r["mse_end"] <= r["mse_start"] for r in p["rows"]), name
    text = (out / "RESULTS.md").read_text()
    assert "## Refinement: data-free self-distillation (LM)" in text and "## Gain recovered" in text


@pytest.mark.skipif(not RUN.exists(), reason="bench/fidelity is not part of this checkout")
def test_tiny_dit_pairs(tmp_path):
    """`run.py --only dit --tiny`: the flow-matching DiT pairs (T2V upgrade, T2V -> I2V, unrelated control) end to end."""
    pytest.importorskip("sklearn")
    env = {k: v for k, v in os.environ.items() if k != "LORAREG_DATA_PATH"}
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(RUN), "--only", "dit", "--tiny", "--out", str(out), "--work", str(tmp_path / "work")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((out / "results_dit.json").read_text())
    assert set(r["pairs"]) == {"v1->v2", "v1->i2v"}
    for name, p in r["pairs"].items():
        assert all(math.isfinite(p[k]) for k in ("loss_none", "loss_retrained", "retrain_s")), name
        assert p["related"] is True and p["copy"]["ported"] > 0 and math.isfinite(p["copy"]["loss"]), name
        assert math.isfinite(p["ceiling"]["loss"]), name
        assert all(math.isfinite(row["gain"]) and row["mse_end"] >= 0 for row in p["rows"]), name
    neg = r["negative"]
    assert neg["related"] is False and neg["layers_below_0.5"] == neg["layers"] > 0
    if not r.get("distill_skipped"):
        assert all(p["rows"] for p in r["pairs"].values())
        assert neg["refused"] and "unrelated" in neg["refused"].lower()
    assert "## DiT pairs" in (out / "RESULTS.md").read_text()
