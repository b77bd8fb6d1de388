"""The wheel carries schemas/ and adapters/: install it into a fresh venv and use it there."""

import json
import os
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("lorareg-*.whl")
    return whl


def test_wheel_contains_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "lorareg/_data/schemas/family.schema.json" in names
    assert "lorareg/_data/adapters/adapter.schema.json" in names
    for fam in ("sd15", "sd21", "sdxl", "ssd-1b", "segmind-vega", "hunyuan-video", "tinyllama"):
        assert f"lorareg/_data/schemas/families/{fam}.json" in names
        assert f"lorareg/_data/schemas/modules/{fam}.json" in names
    for fmt in ("kohya", "diffusers", "diffusers-old", "peft", "ldm", "musubi"):
        assert f"lorareg/_data/adapters/{fmt}.json" in names


def test_wheel_runs_from_a_fresh_venv(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # dependencies (torch, ...) come from the test environment; lorareg itself only from the wheel
    fresh_site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True
    ).stdout.strip()
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(fresh_site, "test_deps.pth").write_text("\n".join(deps) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LORAREG_DATA_PATH")}
    where = subprocess.run([str(py), "-c", "import lorareg, lorareg.registry.data as d; print(lorareg.__file__); print(d.builtin_root())"],
                           capture_output=True, text=True, check=True, cwd=tmp_path, env=env).stdout.split()
    assert where[0].startswith(str(env_dir)) and where[1].startswith(str(env_dir)), where
    res = subprocess.run([str(env_dir / "bin" / "lorareg"), "families", "--json"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    ids = {f["id"] for f in json.loads(res.stdout)}
    assert {"sd15", "sd21", "sdxl", "ssd-1b", "segmind-vega", "hunyuan-video", "tinyllama"} <= ids
    res = subprocess.run([str(env_dir / "bin" / "lorareg"), "formats", "--json"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert {f["id"] for f in json.loads(res.stdout)} >= {"kohya", "diffusers", "diffusers-old", "peft", "ldm", "musubi"}
