"""Local worker processes for scan and batch: started warm, with this process's environment.

Workers come from a fork server that has imported lorareg (torch included) once, so a new worker
starts in milliseconds rather than seconds, and forks from a process that holds no threads. A fork
server is started once per interpreter, with the environment of that moment: each worker therefore
takes the caller's current environment (registry data path, caches, Hub endpoint) as it starts.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor


def default_workers() -> int:
    """One worker per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _context():
    if sys.platform.startswith("linux"):
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["lorareg", "lorareg.port", "lorareg.library._preload"])
        return ctx
    return multiprocessing.get_context("spawn")


def _init_worker(env: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(env)
    # each worker is one of several processes on the machine: one math thread each, unless told otherwise
    if "OMP_NUM_THREADS" not in env:
        import torch

        torch.set_num_threads(1)
    _sync_hub_constants()


def _sync_hub_constants() -> None:
    """huggingface_hub reads some settings at import: align them with this environment."""
    if "huggingface_hub" not in sys.modules:
        return
    from huggingface_hub import constants

    for name in ("HF_HUB_DISABLE_XET", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        if name in os.environ and hasattr(constants, name):
            setattr(constants, name, os.environ[name].strip().lower() in ("1", "true", "yes", "on"))
    for name in ("HF_HOME", "HF_HUB_CACHE"):
        if name in os.environ and hasattr(constants, name):
            setattr(constants, name, os.environ[name])


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes carrying this process's environment."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=_context(), initializer=_init_worker, initargs=(dict(os.environ),))
