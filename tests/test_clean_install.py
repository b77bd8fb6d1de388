"""A clean install works: the wheel alone, with torch, in a fresh venv, as users and the Action install it.

The wheel is built once (``pip wheel`` of the source tree, build isolation: the PEP 517 build that
``pip install $GITHUB_ACTION_PATH`` in action.yml runs) and installed with ``torch==2.13.0`` into a
fresh venv by pip, which resolves the declared dependencies from the package index: no ``--no-deps``,
no path borrowed from the test environment. So the venv holds what ``pip install lorareg`` and the
Action's install step give, and a command that needs an undeclared package (numpy, transformers...)
fails here. The main commands then run end to end on the examples shipped in the wheel, and the
Action's script layer runs in that venv as action.yml's "Port" step does. One more fresh venv per extra
(:data:`EXTRA_COMMANDS`) runs that extra's commands with only that extra installed.

Slow by nature (pip installs torch: about a minute per venv), so one venv per module or extra.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import venv
import zipfile
from contextlib import contextmanager, nullcontext
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hub_server import HubServer
from ray_cluster import RAY_ENV, LocalRayCluster

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # the version the README and action.yml install
OWNER = "lorareg-tester"  # the loopback Hub's user
FAMILIES = {"sd15", "sd21", "sdxl", "ssd-1b", "segmind-vega", "hunyuan-video", "tinyllama"}
FORMATS = {"kohya", "diffusers", "diffusers-old", "peft", "ldm", "musubi"}
LM = "{ex}/lm/lora-v1 --source-model {ex}/lm/v1 --target-model {ex}/lm/v2"

# extra -> (command, text its output must hold) run in order with only that extra installed ({ex}: the
# installed examples, {out}: one empty folder for the extra's commands, {ray}: the address of a Ray head that
# venv started on 127.0.0.1). One line per command; a new extra is one more entry.
EXTRA_COMMANDS: dict[str, list[tuple[str, str]]] = {
    "refine": [
        (f"port {LM} --method copy -o {{out}}/refined --refine distill --steps 2 --samples 4 --sample-length 16 --batch 2 --device cpu",
         "refined (distill, 2 steps"),
    ],
    "ray": [
        ("scan {ex}/sd15-kohya-example.safetensors --json --no-cache -o {out}/scan.json", "1 files (1 ok, 0 failed)"),
        ("batch --from-scan {out}/scan.json --to sd15 -o {out}/ported --ray-address {ray}", "1 rows: 1 done, 0 already done, 0 failed (ray"),
    ],
}

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------- helpers


class Venv:
    """A fresh venv holding the wheel (plus ``extra``) and torch, and a clean environment to run it in."""

    def __init__(self, root: Path, wheel: Path, extra: str | None = None) -> None:
        self.root = root
        self.py = root / "venv" / "bin" / "python"
        venv.EnvBuilder(with_pip=True).create(root / "venv")
        self.env = clean_env(root)
        spec = f"{wheel}[{extra}]" if extra else str(wheel)
        # the machine's pip configuration (index, find-links) stays: that is where users' pip looks too.
        # --no-compile only skips compiling every module ahead (30 s for torch); resolution and install are unchanged
        res = subprocess.run([str(self.py), "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check", TORCH, spec],
                             capture_output=True, text=True, cwd=root, env=self.env)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        check = subprocess.run([str(self.py), "-m", "pip", "check"], capture_output=True, text=True, env=self.env)
        assert check.returncode == 0, check.stdout + check.stderr
        self.site = Path(self.python("import lorareg, os; print(os.path.dirname(lorareg.__file__))").strip())
        self.examples = self.site / "examples"

    def python(self, code: str) -> str:
        res = subprocess.run([str(self.py), "-c", code], capture_output=True, text=True, cwd=self.root, env=self.env)
        assert res.returncode == 0, res.stderr
        return res.stdout

    def importable(self, module: str) -> bool:
        code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
        return subprocess.run([str(self.py), "-c", code], cwd=self.root, env=self.env).returncode == 0

    def lorareg(self, command: str, env: dict | None = None, **fmt: str) -> subprocess.CompletedProcess:
        """Run the venv's ``lorareg`` script; assert it exits 0 without a traceback or a numpy complaint."""
        argv = shlex.split(command.format(ex=self.examples, **fmt))
        res = subprocess.run([str(self.py.parent / "lorareg"), *argv], capture_output=True, text=True, cwd=self.root,
                             env={**self.env, **(env or {})})
        assert res.returncode == 0, f"lorareg {command} -> {res.returncode}\n{res.stderr[-3000:]}"
        assert "Traceback" not in res.stderr and "numpy" not in res.stderr.lower(), res.stderr[-3000:]
        return res


def clean_env(root: Path) -> dict[str, str]:
    """The process environment without anything that would let the venv see the source tree, the test
    venv or the developer's Hub token and caches."""
    # PYTHONDONTWRITEBYTECODE goes too: the venv is installed with --no-compile, so its first commands
    # write the .pyc files of the modules they import and the later ones reuse them
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV", "LORAREG_DATA_PATH",
            "LORAREG_CACHE")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(LORAREG_CACHE=str(root / "cache"), HF_HOME=str(root / "hf"), HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               PYTHONNOUSERSITE="1")
    return env


def lm_env(v: Venv) -> dict[str, str]:
    """The LM example has no registry entry: its family is derived from its model folders (nothing to add)."""
    return {}


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel as pip builds it from the source tree (isolated PEP 517 build, as the Action's install)."""
    out = tmp_path_factory.mktemp("dist")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    (whl,) = out.glob("lorareg-*.whl")
    return whl


@pytest.fixture(scope="module")
def installs(wheel, tmp_path_factory):
    """Every venv of the module (plain install, one per extra), installed concurrently: pip spends much of
    its time waiting on the index, so two at once take little more than one."""
    jobs: dict[str | None, tuple[Path, str | None]] = {None: (tmp_path_factory.mktemp("core"), None)}
    jobs.update({extra: (tmp_path_factory.mktemp(extra), extra) for extra in EXTRA_COMMANDS})
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {name: pool.submit(Venv, root, wheel, extra) for name, (root, extra) in jobs.items()}


@pytest.fixture(scope="module")
def core(installs: dict[str | None, Future]) -> Venv:
    """The plain install: ``pip install torch==2.13.0 lorareg`` (no extras), as action.yml installs it."""
    return installs[None].result()


@pytest.fixture(scope="module")
def lm_port(core) -> Path:
    """The LM example ported v1 -> v2 by projection (lora-x), in the clean venv."""
    core.lorareg(f"port {LM} --method lora-x -o {{out}}", env=lm_env(core), out=str(core.root / "lorax"))
    return core.root / "lorax"


# ------------------------------------------------------------------------------------- the wheel


def test_wheel_contains_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "lorareg/_data/schemas/family.schema.json" in names
    assert "lorareg/_data/adapters/adapter.schema.json" in names
    for fam in FAMILIES:
        assert f"lorareg/_data/schemas/families/{fam}.json" in names
        assert f"lorareg/_data/schemas/modules/{fam}.json" in names
    for fmt in FORMATS:
        assert f"lorareg/_data/adapters/{fmt}.json" in names
    assert "lorareg/examples/sd15-kohya-example.safetensors" in names
    assert "lorareg/examples/lm/v1/model.safetensors" in names


# ------------------------------------------------------------------------------------- the plain install


def test_only_declared_dependencies(core):
    # the point of the test: nothing that the test environment has and the wheel does not declare
    for module in ("numpy", "transformers", "diffusers", "peft", "pytest"):
        assert not core.importable(module), f"{module} is installed in the clean venv"
    where = core.python("import lorareg, lorareg.registry.data as d; print(lorareg.__file__); print(d.builtin_root())").split()
    assert all(p.startswith(str(core.root / "venv")) for p in where), where


def test_families_and_formats(core):
    assert {f["id"] for f in json.loads(core.lorareg("families --json").stdout)} >= FAMILIES
    assert {f["id"] for f in json.loads(core.lorareg("formats --json").stdout)} >= FORMATS


def test_inspect(core):
    info = json.loads(core.lorareg("inspect {ex}/sd15-kohya-example.safetensors --json").stdout)
    assert (info["format"], info["family"], info["num_tensors"]) == ("kohya", "sd15", 168)


def test_convert_round_trip(core):
    """kohya -> diffusers (renames, splits alphas into the factors: materialises tensors) -> kohya, bit-exact."""
    out = core.root / "convert"
    core.lorareg("convert {ex}/sd15-kohya-example.safetensors --to diffusers -o {out}/d.safetensors", out=str(out))
    core.lorareg("convert {out}/d.safetensors --to kohya -o {out}/k.safetensors", out=str(out))
    d, back = load_file(out / "d.safetensors"), load_file(out / "k.safetensors")
    original = load_file(core.examples / "sd15-kohya-example.safetensors")
    assert len(d) == 112 and not set(d) & set(original)
    assert set(back) == set(original)
    for k, t in original.items():
        assert back[k].dtype == t.dtype and back[k].reshape(-1).view(torch.uint8).equal(t.reshape(-1).view(torch.uint8)), k


@pytest.mark.parametrize("method", ["copy", "lora-x"])
def test_port(core, lm_port, method):
    out = lm_port if method == "lora-x" else core.root / method
    if method != "lora-x":
        core.lorareg(f"port {LM} --method {method} -o {{out}}", env=lm_env(core), out=str(out))
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["totals"]["ported"] == 28 == report["totals"]["layers"]
    assert len(load_file(out / "adapter_model.safetensors")) == 56


def test_push(core, lm_port):
    """`lorareg push` from the clean venv to the loopback Hub (HF_ENDPOINT and HF_TOKEN, as a user sets them)."""
    with HubServer() as hub:
        res = core.lorareg(f"push {{out}} {OWNER}/lm-lorax --json", env={"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.token},
                           out=str(lm_port))
        files = hub.repo_files(f"{OWNER}/lm-lorax")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "report.json"} <= set(files)
    assert files["adapter_model.safetensors"] == (lm_port / "adapter_model.safetensors").read_bytes()
    assert hub.token not in res.stdout + res.stderr


def test_demo(core):
    res = core.lorareg("demo")
    assert "round trip bit-exact: yes" in res.stdout


def test_action_script(core):
    """action.yml's "Port" step (``$venv/bin/python -m <its module>``) in the venv its install step makes
    (this one: same pip install, no extras): two targets ported and pushed."""
    port_step = next(s for s in yaml.safe_load((ROOT / "action.yml").read_text())["runs"]["steps"] if s.get("id") == "port")
    module = re.search(r"-m ([\w.]+)", port_step["run"]).group(1)
    out = core.root / "action"
    out.mkdir()
    summary, outputs = out / "summary.md", out / "outputs"
    with HubServer() as hub:
        env = {**core.env, **lm_env(core), "HF_ENDPOINT": hub.endpoint, "GITHUB_REPOSITORY": f"{OWNER}/loras",
               "GITHUB_REPOSITORY_OWNER": OWNER, "GITHUB_STEP_SUMMARY": str(summary), "GITHUB_OUTPUT": str(outputs),
               "INPUT_LORA": str(core.examples / "lm" / "lora-v1"), "INPUT_SOURCE_MODEL": str(core.examples / "lm" / "v1"),
               "INPUT_TARGET_MODELS": f"{core.examples / 'lm' / 'v2'}\n{core.examples / 'lm' / 'v1'}", "INPUT_METHOD": "auto",
               "INPUT_PUSH_TO": "{owner}/{name}-{target}", "INPUT_HF_TOKEN": hub.token, "INPUT_DEVICE": "cpu",
               "INPUT_OUTPUT_DIR": "ported"}
        res = subprocess.run([str(core.py), "-m", module], capture_output=True, text=True, cwd=out, env=env)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "2 of 2 targets succeeded" in summary.read_text(), summary.read_text()
        repos = set(re.findall(re.escape(hub.endpoint) + r"/([\w.-]+/[\w.-]+)", outputs.read_text()))
        assert len(repos) == 2 and all("adapter_model.safetensors" in hub.repo_files(r) for r in repos), repos
    assert "numpy" not in (res.stdout + res.stderr).lower() and hub.token not in res.stdout + res.stderr


# ------------------------------------------------------------------------------------- each extra


@pytest.mark.parametrize("extra", sorted(EXTRA_COMMANDS))
def test_extra(extra, installs):
    """``pip install 'lorareg[extra]'`` alone: that extra's commands work."""
    v = installs[extra].result()
    out = v.root / "out"
    out.mkdir()
    with (ray_head(v) if extra == "ray" else nullcontext(None)) as ray:
        for command, expect in EXTRA_COMMANDS[extra]:
            env = {**lm_env(v), **(RAY_ENV if ray else {})}
            res = v.lorareg(command, env=env, out=str(out), ray=ray or "")
            assert expect in res.stdout + res.stderr, (res.stdout + res.stderr)[-3000:]


@contextmanager
def ray_head(v: Venv):
    """``127.0.0.1:PORT`` of a one-CPU Ray head started from the venv's own Ray (tests/ray_cluster.py: every address
    kept on 127.0.0.1, stopped by the PIDs it started, never `ray stop`); skipped, sending nothing, if a node
    advertises any other address."""
    logs = Path(tempfile.mkdtemp(prefix="lorareg-ci-ray-logs-"))
    cluster = LocalRayCluster(logs, python=str(v.py), base_env=dict(v.env))
    try:
        cluster.start_head(num_cpus=1)
        code = (f"import ray; ray.init(address='{cluster.address}', log_to_driver=False); "
                "print(sorted({n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']})); ray.shutdown()")
        seen = subprocess.run([str(v.py), "-c", code], capture_output=True, text=True, env={**v.env, **RAY_ENV}, timeout=120).stdout.strip()
        if seen != "['127.0.0.1']":
            pytest.skip(f"the Ray node advertises {seen}, not only 127.0.0.1: no work is sent")
        yield cluster.address
    finally:
        cluster.stop()
        shutil.rmtree(logs, ignore_errors=True)

