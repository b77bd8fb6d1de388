"""The batch's tasks on a Ray cluster (`lorareg batch --ray` / `--ray-address ADDR`; extra ``lorareg[ray]``).

The same task as the local pool (tasks.run_task) runs as a Ray task, spread over the nodes; the driver
records each result in the ledger as it arrives (progress from the driver), with the node that ran it. A
worker or node lost mid-task is retried by Ray (``max_retries``) on a node still alive; a task that fails
for its own reasons returns a failed record and is not retried.

Bases: the driver built them into its basis cache. A node that sees that path (a shared file system) reads
them there. Where a node does not (checked per node with a marker file the driver writes), the driver puts
each base-model pair's cache files into Ray's object store once, and the first task of that pair on such a
node copies them into the node's own cache (its ``$LORAREG_CACHE``, else ``$HF_HOME/lorareg/bases``);
later tasks on the node find them there.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Optional

from ..core.errors import InputError
from ..core.io import atomic_write, atomic_write_text
from ..engine.cache import default_cache_root
from .tasks import PRIVATE, run_task
from .workers import _sync_hub_constants

#: environment a worker needs to see what the driver sees (registry data, Hub endpoint and cache). Not
#: LORAREG_CACHE: the driver's cache travels as an explicit path, and a node's own cache stays its own.
FORWARDED_ENV = ("LORAREG_DATA_PATH", "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE",
                 "HF_HUB_DISABLE_XET", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_DISABLE_PROGRESS_BARS", "NO_PROXY", "no_proxy",
                 "OMP_NUM_THREADS")
#: seconds to wait for each node's answer to "do you see the driver's cache?"
PROBE_TIMEOUT = 120
_MARKER = ".lorareg-batch-visible-{}"


def _ray():
    try:
        import ray  # optional: only `--ray` needs it
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'lorareg[ray]'") from None
    return ray


def _sees(marker: str, token: str) -> bool:
    try:
        return Path(marker).read_text() == token
    except OSError:
        return False


def _bases_on_node(ship: dict[str, Any], shared: Optional[str]) -> tuple[str, str]:
    """The cache this task reads its bases from, and how they got there: shared / node (copied before) / shipped."""
    if shared and not ship["force"] and _sees(ship["marker"], ship["token"]):
        return shared, "shared"
    root = default_cache_root().resolve()
    done = root / ".shipped" / ship["id"]
    if done.exists():
        return str(root), "node"
    ray = _ray()
    files: dict[str, bytes] = ray.get(ship["ref"])
    for rel, data in files.items():
        dest = (root / rel).resolve()
        if root not in dest.parents:  # names come from the driver's cache listing; never write outside the cache
            raise InputError(f"shipped bases: {rel} is outside the cache")
        if not dest.exists():  # content-addressed: an existing file already holds these bytes
            atomic_write(dest, lambda f, d=data: f.write(d))
    atomic_write_text(done, "\n".join(sorted(files)) + "\n")
    return str(root), "shipped"


def _remote_run(task: dict) -> dict:
    _sync_hub_constants()
    ship = task.pop("ship", None)
    how = None
    if ship is not None:
        try:
            task["cache_dir"], how = _bases_on_node(ship, task.get("cache_dir"))
        except OSError as e:  # the port then builds the bases itself, as without a cache
            how = f"not copied ({e.__class__.__name__}: {e})"
    rec = run_task(task)
    rec["node"] = _ray().get_runtime_context().get_node_id()
    if how is not None:
        rec["bases"] = how
    return rec


def run_on_ray(payloads: list[dict], record: Callable[[dict], None], *, address: Optional[str], retries: int, bar=None,
               cache_dir: Optional[str] = None, bundles: Optional[list[tuple[list[str], list[int]]]] = None,
               ship: Optional[bool] = None) -> dict[str, Any]:
    """Run the tasks on Ray (``address``: an existing cluster, e.g. ``127.0.0.1:6379``; None: Ray's default).

    ``bundles``: per base-model pair, the basis-cache files (relative to ``cache_dir``) and the indexes of its
    tasks. ``ship``: None ships a pair's files through the object store only if a node does not see
    ``cache_dir``; True always (every node copies them into its own cache); False never. Returns what the
    cluster was: ``nodes`` and ``shipped`` (the nodes that could not see the cache, or "all").
    """
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, log_to_driver=False,
                 include_dashboard=False if address is None else None, ignore_reinit_error=True)
    marker = None
    try:
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        info: dict[str, Any] = {"nodes": len(nodes), "shipped": []}
        bundles = [b for b in (bundles or []) if b[0]] if cache_dir else []
        if bundles and ship is not False:
            token = secrets.token_hex(16)
            marker = Path(cache_dir) / _MARKER.format(token[:12])
            atomic_write_text(marker, token)
            blind = nodes if ship else _blind_nodes(ray, nodes, str(marker), token)
            if blind:
                info["shipped"] = "all" if ship else blind
                _attach(ray, payloads, bundles, cache_dir, str(marker), token, force=bool(ship))
        remote = ray.remote(num_cpus=1, max_retries=retries, retry_exceptions=False)(_remote_run)
        # SPREAD: a batch's rows are independent, so use every node rather than fill the driver's first
        refs = {remote.options(scheduling_strategy="SPREAD").remote(p): p for p in payloads}
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            for ref in done:
                p = refs[ref]
                try:
                    rec = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a task Ray gave up on (worker lost more than `retries` times)
                    rec = {k: v for k, v in p.items() if k not in (*PRIVATE, "ship")}
                    rec.update(status="failed", error=f"ray: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                record(rec)
                if bar is not None:
                    bar.update(1)
        return info
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)
        if started_here:
            ray.shutdown()


def _blind_nodes(ray, nodes: list[str], marker: str, token: str) -> list[str]:
    """The nodes that do not see the marker the driver wrote into its cache (one tiny task pinned to each)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_sees)
    refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(marker, token): n
            for n in nodes}
    blind = []
    for ref, node in refs.items():
        try:
            seen = ray.get(ref, timeout=PROBE_TIMEOUT)
        except Exception:  # noqa: BLE001 - a node that cannot answer is treated as one that cannot see
            seen = False
        if not seen:
            blind.append(node)
    return blind


def _attach(ray, payloads: list[dict], bundles, cache_dir: str, marker: str, token: str, force: bool) -> None:
    """Put each base-model pair's cache files into the object store once; its tasks get the reference."""
    by_index = {p["index"]: p for p in payloads}
    root = Path(cache_dir)
    for files, indexes in bundles:
        blob = {rel: (root / rel).read_bytes() for rel in files}
        bundle_id = hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()[:32]  # names are content hashes
        ref = ray.put(blob)
        del blob
        for i in indexes:
            if i in by_index:
                by_index[i]["ship"] = {"ref": ref, "id": bundle_id, "marker": marker, "token": token, "force": force}
