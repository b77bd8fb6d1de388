"""The batch's tasks on a Ray cluster (`lorareg batch --ray` / `--ray-address ADDR`; extra ``lorareg[ray]``).

The same task as the local pool (tasks.run_task) runs as a Ray task; the driver records each result in
the ledger as it arrives (progress from the driver). A worker or node lost mid-task is retried by Ray
(``max_retries``); a task that fails for its own reasons returns a failed record and is not retried.
The basis cache is the path given to the batch: on a multi-node cluster it must be a path every node
sees (a shared file system); each worker reads the bases the driver built.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from ..core.errors import InputError
from .tasks import run_task
from .workers import _sync_hub_constants

#: environment a worker needs to see what the driver sees (registry data, caches, Hub endpoint)
FORWARDED_ENV = ("LORAREG_DATA_PATH", "LORAREG_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT", "HF_HUB_OFFLINE",
                 "HF_HUB_DISABLE_XET", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_DISABLE_PROGRESS_BARS", "NO_PROXY", "no_proxy",
                 "OMP_NUM_THREADS")


def _ray():
    try:
        import ray  # optional: only `--ray` needs it
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'lorareg[ray]'") from None
    return ray


def _remote_run(task: dict) -> dict:
    _sync_hub_constants()
    return run_task(task)


def run_on_ray(payloads: list[dict], record: Callable[[dict], None], *, address: Optional[str], retries: int, bar=None) -> None:
    """Run the tasks on Ray (``address``: an existing cluster, e.g. ``127.0.0.1:6379``; None: Ray's default)."""
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, log_to_driver=False,
                 include_dashboard=False if address is None else None, ignore_reinit_error=True)
    try:
        remote = ray.remote(num_cpus=1, max_retries=retries, retry_exceptions=False)(_remote_run)
        refs = {remote.remote(p): p for p in payloads}
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            for ref in done:
                p = refs[ref]
                try:
                    rec = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a task Ray gave up on (worker lost more than `retries` times)
                    rec = {k: v for k, v in p.items() if k not in ("token", "endpoint", "row", "cache_dir", "output_path")}
                    rec.update(status="failed", error=f"ray: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                record(rec)
                if bar is not None:
                    bar.update(1)
    finally:
        if started_here:
            ray.shutdown()
