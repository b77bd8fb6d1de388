"""The task a worker runs for one row (a local process or a Ray worker): port, write, push.

A task never raises for a bad row: it returns a record with ``status`` ``done`` or ``failed`` and the
reason, and the times spent reading, computing, writing and pushing. The token travels in the task
(never in the record).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from ..core.errors import LoraregError
from ..core.hash_memory import remember_file_hashes
from ..core.hashes import FileHashes
from ..engine.cache import default_cache_root
from ..hub.push import push
from ..port import port
from ..refine.conditioning import read_prompts

#: keys of a task that the record does not repeat
PRIVATE = ("token", "endpoint", "row", "cache_dir", "output_path", "source_hashes")


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """Port (and push) one row; a record for the ledger."""
    t0 = time.perf_counter()
    rec = {k: v for k, v in task.items() if k not in PRIVATE}
    rec["status"] = "failed"
    row = task["row"]
    stage = "port"
    try:
        _remember_hashes(row["lora"], task.get("source_hashes"))
        prompts = None
        if row.get("prompts"):
            prompts = read_prompts(Path(row["prompts"]))
        result = port(
            row["lora"], source_model=row.get("source_model"), target_model=row.get("target_model"), to=row.get("to"),
            method=row["method"], rank_k=row.get("rank_k"), threshold=row["threshold"], rank=row.get("rank"),
            device=row["device"], dtype=row.get("dtype"), output=task["output_path"], format=row.get("format"),
            force=True,  # an output without a done record is a leftover of an interrupted run: redo it
            cache_dir=task.get("cache_dir"), align_blocks=not row["no_align"], check=row.get("check"), progress=False,
            refine=row.get("refine"), refine_steps=row["steps"], refine_samples=row.get("samples"),
            refine_sample_length=row["sample_length"], refine_lr=row.get("lr"), refine_seed=row["seed"],
            refine_budget_seconds=row.get("budget_seconds"), refine_batch=row.get("batch"), refine_prompts=prompts,
            refine_latent_size=row.get("latent_size"), refine_sampler_steps=row["sampler_steps"],
            refine_noisings=row["noisings"], refine_guidance=row.get("guidance"), refine_frames=row.get("frames"),
            refine_prompts_embeds=row.get("prompts_embeds"), refine_target=row.get("refine_target"), force_unrelated=row["force_unrelated"],
        )
        rep = result.report
        rec["totals"] = rep.totals.model_dump()
        rec["cache"] = rep.cache
        rec["warnings"] = rep.warnings
        rec["timings"] = _shares(rep.timings)
        if row.get("push"):
            stage = "push"
            t1 = time.perf_counter()
            pushed = push(result, row["push"], private=row["private"], create_pr=row["create_pr"],
                                  revision=row.get("revision"), commit_message=row.get("commit_message"),
                                  instance_prompt=row.get("instance_prompt"), command=task.get("command"),
                                  token=task.get("token"), endpoint=task.get("endpoint"))
            rec["timings"]["push_s"] = round(time.perf_counter() - t1, 4)
            rec["push"] = {"repo_id": pushed.repo_id, "revision": pushed.revision, "changed": pushed.changed,
                           "commit_oid": pushed.commit_oid, "pr_url": pushed.pr_url}
        rec["status"] = "done"
    except LoraregError as e:
        rec["error"] = f"{stage}: {_line(e)}"
    except MemoryError:
        rec["error"] = f"{stage}: out of memory"
    except Exception as e:  # noqa: BLE001 - one row's bug must not end the batch; it is reported with its type
        rec["error"] = f"{stage}: unexpected {e.__class__.__name__}: {_line(e)}"
    rec["seconds"] = round(time.perf_counter() - t0, 4)
    return rec


def _remember_hashes(lora: str, known: Optional[dict[str, Any]]) -> None:
    """Leave the plan's hashes of the source where the port's load looks them up by fingerprint, so that the port
    does not hash the file again; only when the file still has the fingerprint they were taken at."""
    if not known:
        return
    try:
        hashes = FileHashes(**known["hashes"])
    except (TypeError, ValueError):
        return  # the port then hashes the file itself
    remember_file_hashes(Path(lora), hashes, default_cache_root(), known["fingerprint"])


def _shares(timings: dict[str, float]) -> dict[str, float]:
    """The port's timings as reading / math / writing (the rest of the total is reading the LoRA and models)."""
    total = timings.get("total_s", 0.0)
    math_s = timings.get("project_s", 0.0) + timings.get("build_bases_s", 0.0) + timings.get("refine_s", 0.0)
    write_s = timings.get("write_s", 0.0)
    return {"read_s": round(max(0.0, total - math_s - write_s), 4), "math_s": round(math_s, 4),
            "write_s": round(write_s, 4), "port_s": round(total, 4)}


def _line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text else e.__class__.__name__
