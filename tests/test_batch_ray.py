"""`lorareg batch` on a real two-node Ray cluster that this module starts on 127.0.0.1 and stops itself.

A head and one worker node (each its own raylet, object store and ports, one CPU each), started through
tests/ray_node.py so that every address stays 127.0.0.1; every node's advertised address is checked
before any work is sent. Where the machine allows it, the worker node runs in a mount namespace of its own
in which one folder (the "driver-only" cache) is an empty tmpfs: a node that does not see the driver's
basis cache, as on a cluster without a shared file system. The cluster is stopped by the PIDs this module
started and their descendants, never `ray stop`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'lorareg[ray]')")

import lorareg  # noqa: E402
from lorareg.library.ledger import Ledger  # noqa: E402
from batch_library import base_models, broken_files, sdxl_loras  # noqa: E402
from ray_cluster import LOOPBACK, LocalRayCluster  # noqa: E402

pytestmark = pytest.mark.usefixtures("tiny_families")


def _can_hide(folder: Path) -> bool:
    """Can a process get a private view of ``folder`` (an empty tmpfs over it)? Needs mount namespaces."""
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount -t tmpfs none "$0"', str(folder)],
                       capture_output=True, timeout=30)
    return r.returncode == 0


class Cluster:
    """The module's cluster: its address, the head's and the worker node's ids, the folder the worker node does not
    see (None where mount namespaces are not available) and each node's own basis cache."""

    def __init__(self, c: LocalRayCluster, head_id: str, worker, hidden: "Path | None", caches: dict[str, Path]):
        self.c, self.address, self.head_id, self.worker = c, c.address, head_id, worker
        self.hidden, self.caches = hidden, caches


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    logs = tmp_path_factory.mktemp("ray-logs")
    c = LocalRayCluster(logs)
    private = Path("/tmp") / f"lorareg-ray-driver-only-{os.getpid()}"
    private.mkdir(exist_ok=True)
    hidden = private if _can_hide(private) else None
    caches = {"head": tmp_path_factory.mktemp("head-cache"), "worker": tmp_path_factory.mktemp("worker-cache")}
    # this process is the driver: it must keep 127.0.0.1 as given too (Ray read the variable at import)
    from ray._private import ray_constants

    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    try:
        c.start_head(num_cpus=1, env={"LORAREG_CACHE": str(caches["head"])})
        worker = c.add_node(num_cpus=1, resources='{"worker": 1}', env={"LORAREG_CACHE": str(caches["worker"])}, hide=hidden)
        ray.init(address=c.address, log_to_driver=False)
        try:
            nodes = c.alive_nodes(ray, 2)
            head_id = next(n["NodeID"] for n in nodes if "node:__internal_head__" in n["Resources"])
            worker.node_id = next(n["NodeID"] for n in nodes if "worker" in n["Resources"])
            addresses = {n["NodeManagerAddress"] for n in nodes} | {n["NodeName"] for n in nodes}
        finally:
            ray.shutdown()
        if addresses != {LOOPBACK}:
            pytest.skip(f"the Ray nodes advertise {sorted(addresses)}, not only {LOOPBACK}: no work is sent")
        c.nodes[0].node_id = head_id
        yield Cluster(c, head_id, worker, hidden, caches)
    finally:
        mp.undo()
        c.stop()
        shutil.rmtree(private, ignore_errors=True)


@pytest.fixture(scope="module")
def driver(cluster):
    """This process connected to the cluster for the rest of the module, so that the batches share one Ray job
    and its warm worker processes (each new job starts its own: seconds per node). The first test below runs
    without it: `lorareg batch` then connects (and forwards the environment) itself."""
    from lora_factory import TEST_DATA

    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": {"LORAREG_DATA_PATH": str(TEST_DATA)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_data):
    return base_models(tmp_path_factory.mktemp("models"))


def _rows(paths, models):
    return [{"lora": str(p), "to": "tiny-ssd", "source_model": str(models / "sdxl"), "target_model": str(models / "ssd")}
            for p in paths]


def test_cluster_is_two_nodes_on_loopback(cluster):
    """What every test below relies on: two alive nodes, both advertising 127.0.0.1 only."""
    assert not ray.is_initialized()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
    finally:
        ray.shutdown()
    assert {n["NodeID"] for n in nodes} == {cluster.head_id, cluster.worker.node_id}
    assert {n["NodeManagerAddress"] for n in nodes} == {LOOPBACK} == {n["NodeName"] for n in nodes}


def test_batch_on_both_nodes_same_outputs_as_local(cluster, models, tmp_path):
    good = sdxl_loras(tmp_path / "lib", 4)
    bad = broken_files(tmp_path / "bad")
    rows = _rows(good + [bad["broken"]], models)
    cache = tmp_path / "bases"  # both nodes see it
    res = lorareg.batch(rows, tmp_path / "ray-out", ray_address=cluster.address, cache_dir=cache, progress=False)
    assert res.summary.backend == "ray" and res.summary.nodes == 2 and res.summary.bases_shipped is None
    assert Counter(r.status for r in res.rows) == {"done": 4, "failed": 1}
    assert next(r for r in res.rows if r.status == "failed").error.startswith("broken:")
    records = Ledger(tmp_path / "ray-out").records()
    assert len(records) == 5
    done = [r for r in records if r["status"] == "done"]
    # the rows were spread: both nodes ported some
    assert {r["node"] for r in done} == {cluster.head_id, cluster.worker.node_id}
    # the bases were built once by the driver: every task, on either node, found them in the shared cache
    assert all(r["cache"]["hits"] > 0 and r["cache"].get("built", 0) == 0 and "bases" not in r for r in done)

    local = lorareg.batch(rows, tmp_path / "local-out", workers=1, cache_dir=cache, progress=False)
    for a, b in zip(res.rows, local.rows):
        if a.status == "done":
            assert (tmp_path / "ray-out" / a.output).read_bytes() == (tmp_path / "local-out" / b.output).read_bytes()

    again = lorareg.batch(rows, tmp_path / "ray-out", ray_address=cluster.address, cache_dir=cache, progress=False)
    assert Counter(r.status for r in again.rows) == {"skipped": 4, "failed": 1}


def test_bases_through_the_object_store_to_a_node_without_the_cache(cluster, driver, models, tmp_path):
    """The driver's cache is in a folder the worker node does not see (or, without mount namespaces, shipping
    is forced): the worker node gets the bases from the object store into its own cache, once."""
    good = sdxl_loras(tmp_path / "lib", 4, start=10)
    rows = _rows(good, models)
    if cluster.hidden is not None:
        cache, ship = cluster.hidden / "bases", None  # automatic: the probe finds the worker blind
    else:
        cache, ship = tmp_path / "bases", True
    res = lorareg.batch(rows, tmp_path / "out", ray_address=cluster.address, cache_dir=cache, ship_bases=ship, progress=False)
    assert res.ok and res.summary.done == 4, [r.error for r in res.rows]
    assert res.summary.bases_shipped == ([cluster.worker.node_id] if ship is None else "all")
    on_worker = [r for r in res.rows if r.node == cluster.worker.node_id]
    assert on_worker, "no row ran on the worker node"
    assert sorted(r.bases for r in on_worker) == ["node"] * (len(on_worker) - 1) + ["shipped"]  # copied once per node
    records = {r["index"]: r for r in Ledger(tmp_path / "out").records()}
    for r in on_worker:  # every basis found in the node's own cache; none built by the task
        rec = records[r.index]
        assert rec["cache"]["hits"] > 0 and rec["cache"].get("built", 0) == 0 and rec["cache"].get("misses", 0) == 0, rec["cache"]
    worker_cache = cluster.caches["worker"]
    shipped = list((worker_cache / ".shipped").iterdir())
    assert len(shipped) == 1
    names = shipped[0].read_text().split()
    assert names and all((worker_cache / n).is_file() and (cache / n).read_bytes() == (worker_cache / n).read_bytes() for n in names)
    if cluster.hidden is not None:
        assert all(r.bases == "shared" for r in res.rows if r.node == cluster.head_id)

    local = lorareg.batch(rows, tmp_path / "local", workers=1, cache_dir=cache, progress=False)
    for a, b in zip(res.rows, local.rows):
        assert (tmp_path / "out" / a.output).read_bytes() == (tmp_path / "local" / b.output).read_bytes()


def test_cli_ray_json_ship_bases(cluster, driver, models, tiny_data, tmp_path):  # noqa: ARG001
    from click.testing import CliRunner
    from lorareg.apps.cli import main

    good = sdxl_loras(tmp_path / "lib", 3)
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in _rows(good, models)))
    res = CliRunner().invoke(main, ["batch", str(m), "-o", str(tmp_path / "o"), "--ray-address", cluster.address, "--ship-bases",
                                    "--cache-dir", str(tmp_path / "bases"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    s = doc["summary"]
    assert s["backend"] == "ray" and s["done"] == 3 and s["nodes"] == 2 and s["bases_shipped"] == "all"
    assert all(r["node"] in (cluster.head_id, cluster.worker.node_id) and r["bases"] in ("shipped", "node") for r in doc["rows"])


def test_ray_task_retried_when_its_worker_is_killed(cluster, driver, models, tmp_path):
    """SIGKILL a Ray worker process (of this module's cluster) while it ports: Ray retries the row."""
    rows = _rows(sdxl_loras(tmp_path / "lib", 5, rank=8), models)
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_worker(rec: dict) -> None:
        if killed:
            return
        deadline = time.time() + 10
        while not killed and time.time() < deadline:
            for node in cluster.c.nodes:
                for pid in node.task_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    res = lorareg.batch(rows, out, ray_address=cluster.address, cache_dir=tmp_path / "bases", progress=False, on_record=kill_worker)
    assert killed, "no Ray task process found to kill"
    assert res.ok and Counter(r.status for r in res.rows) == {"done": 5}
    records = Ledger(out).records()
    assert len(records) == 5 and len({r["key"] for r in records}) == 5


def test_rows_redone_when_the_worker_node_is_lost(cluster, driver, models, tmp_path):
    """SIGKILL the worker node's raylet (then the rest of that node) while it ports a row: nothing is lost, the
    rows in flight there are redone on the head, each row is in the ledger once. (Runs last: it ends the node.)"""
    rows = _rows(sdxl_loras(tmp_path / "lib", 8, rank=8, start=20), models)
    out = tmp_path / "out"
    lost: dict = {}

    def lose_node(rec: dict) -> None:
        if lost:
            return
        deadline = time.time() + 20
        while time.time() < deadline:
            running = cluster.worker.task_pids()
            if running:  # a row is being ported on the worker node right now
                lost["running"] = running
                lost["raylets"] = cluster.c.kill_node(cluster.worker)
                lost["at"] = time.time()
                return
            time.sleep(0.02)
        lost["running"] = []

    res = lorareg.batch(rows, out, ray_address=cluster.address, cache_dir=tmp_path / "bases", progress=False,
                        on_record=lose_node, retries=3)
    assert lost.get("running"), "no row was running on the worker node to lose"
    assert lost["raylets"], "the worker node's raylet was not found"
    assert res.ok and Counter(r.status for r in res.rows) == {"done": 8}, [r.error for r in res.rows]
    records = Ledger(out).records()
    assert len(records) == 8 and len({r["key"] for r in records}) == 8
    nodes = Counter(r["node"] for r in records)
    assert nodes[cluster.head_id] > 0 and set(nodes) <= {cluster.head_id, cluster.worker.node_id}
    # after the loss every row finished on the head
    assert nodes[cluster.worker.node_id] < 8
