"""`lorareg batch --ray-address` on a real Ray cluster that this module starts on 127.0.0.1 and stops itself.

The cluster is a head node with one CPU, so Ray runs the rows in one worker process. It is started in a
session of its own and stopped by signalling that process group only (never `ray stop`, which ends every
Ray process on the machine). Ray 2.60 on Linux resolves 127.0.0.1 to the machine's network address unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with that setting `ray start --address` refuses to add a worker
node: so one node, whose address is checked to be 127.0.0.1 before any work is sent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'lorareg[ray]')")

import lorareg  # noqa: E402
from lorareg.library.ledger import Ledger  # noqa: E402
from batch_library import base_models, broken_files, sdxl_loras  # noqa: E402

pytestmark = pytest.mark.usefixtures("tiny_families")
LOOPBACK = "127.0.0.1"
_CLUSTER: dict[str, int] = {}  # the process group of the cluster this module started


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``127.0.0.1:PORT`` of a Ray head started here (and stopped here, by its process group)."""
    port = _free_port()
    temp = Path("/tmp") / f"lorareg-ray-{os.getpid()}"  # Ray's socket paths must stay short
    # no token auth (a ~/.ray/auth_token left by another Ray run would otherwise switch it on for the head only)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    ray_bin = Path(sys.executable).with_name("ray")
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "wb")
    proc = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--node-ip-address", LOOPBACK, "--port", str(port),
                             "--num-cpus", "1", "--object-store-memory", str(100 * 2**20), "--include-dashboard", "false",
                             "--temp-dir", str(temp), "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # this process is the driver: it must keep 127.0.0.1 as given too (Ray read the variable at import)
    from ray._private import ray_constants

    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    address = f"{LOOPBACK}:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, "the Ray head exited at start (see head.log in the test's temp folder)"
            try:
                with socket.create_connection((LOOPBACK, port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline:
                    raise AssertionError("the Ray head did not start in 90 s")
                time.sleep(0.5)
        ray.init(address=address, log_to_driver=False)
        try:
            nodes = [n for n in ray.nodes() if n["Alive"]]
            addresses = {n["NodeManagerAddress"] for n in nodes} | {n["NodeName"] for n in nodes if n.get("NodeName")}
        finally:
            ray.shutdown()
        if addresses != {LOOPBACK}:
            pytest.skip(f"the Ray nodes advertise {sorted(addresses)}, not only {LOOPBACK}: no work is sent")
        _CLUSTER["pgid"] = proc.pid
        yield address
    finally:
        mp.undo()
        _stop_group(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group this module started, then SIGKILL what is left of it."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_data):
    return base_models(tmp_path_factory.mktemp("models"))


def test_batch_on_ray_same_rows_same_outputs_as_local(cluster, models, tmp_path):
    good = sdxl_loras(tmp_path / "lib", 3)
    bad = broken_files(tmp_path / "bad")
    rows = [{"lora": str(p), "to": "tiny-ssd", "source_model": str(models / "sdxl"), "target_model": str(models / "ssd")}
            for p in good + [bad["broken"]]]
    cache = tmp_path / "bases"  # the path every node sees (one node here)
    res = lorareg.batch(rows, tmp_path / "ray-out", ray_address=cluster, cache_dir=cache, progress=False)
    assert res.summary.backend == "ray"
    assert Counter(r.status for r in res.rows) == {"done": 3, "failed": 1}
    assert next(r for r in res.rows if r.status == "failed").error.startswith("broken:")
    records = Ledger(tmp_path / "ray-out").records()
    assert len(records) == 4
    # the bases were built once by the driver: every Ray task found them in the shared cache
    assert all(r["cache"]["hits"] > 0 and r["cache"].get("built", 0) == 0 for r in records if r["status"] == "done")

    local = lorareg.batch(rows, tmp_path / "local-out", workers=1, cache_dir=cache, progress=False)
    for a, b in zip(res.rows, local.rows):
        if a.status == "done":
            assert (tmp_path / "ray-out" / a.output).read_bytes() == (tmp_path / "local-out" / b.output).read_bytes()

    again = lorareg.batch(rows, tmp_path / "ray-out", ray_address=cluster, cache_dir=cache, progress=False)
    assert Counter(r.status for r in again.rows) == {"skipped": 3, "failed": 1}


def test_ray_task_retried_when_its_worker_is_killed(cluster, models, tmp_path):
    """SIGKILL the Ray worker process (started by this module's cluster) while it ports: Ray retries the row."""
    good = sdxl_loras(tmp_path / "lib", 5, rank=8)
    rows = [{"lora": str(p), "to": "tiny-ssd", "source_model": str(models / "sdxl"), "target_model": str(models / "ssd")}
            for p in good]
    out = tmp_path / "out"
    killed: list[int] = []
    seen: list = []

    def kill_worker(rec: dict) -> None:
        if killed:
            return
        seen.append(sorted(_titles()))
        for pid in _ray_task_workers():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    res = lorareg.batch(rows, out, ray_address=cluster, cache_dir=tmp_path / "bases", progress=False, on_record=kill_worker)
    assert killed, f"no Ray worker process found to kill: {seen}"
    assert res.ok and Counter(r.status for r in res.rows) == {"done": 5}
    records = Ledger(out).records()
    assert Counter(r["key"] for r in records) == Counter({r["key"]: 1 for r in records}) and len(records) == 5


def _ray_task_workers() -> list[int]:
    """PIDs of this module's cluster's Ray worker processes running a lorareg task (title ray::_remote_run)."""
    out = []
    pgid = _CLUSTER["pgid"]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"ray::") and b"_remote_run" in cmd and _descends_from(int(proc.name), pgid):
            out.append(int(proc.name))
    return out


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state is the parent's pid
    return False


def test_cli_ray_json(cluster, tiny_data, tmp_path):  # noqa: ARG001
    from click.testing import CliRunner
    from lorareg.apps.cli import main

    good = sdxl_loras(tmp_path / "lib", 2)
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps({"lora": str(p), "to": "tiny-ssd", "method": "copy"}) + "\n" for p in good))
    res = CliRunner().invoke(main, ["batch", str(m), "-o", str(tmp_path / "o"), "--ray-address", cluster, "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["summary"]["backend"] == "ray" and doc["summary"]["done"] == 2


def _titles():
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::"):
                out.append((cmd[:60], _descends_from(int(proc.name), _CLUSTER["pgid"])))
    return out
