"""Whole libraries (``lorareg.library``): scan a catalog of LoRAs (``scan``) and port many LoRAs x targets (``batch``).

scan.py      one row per file (format, family, hashes, problems), parallel, fingerprint cache
manifest.py  the rows of a batch: JSONL / CSV / a scan, spelled as `lorareg port`'s options
ledger.py    the append-only record of finished rows in OUTDIR (resume, idempotence)
runner.py    the batch: plan, warm, run on a local process pool (or Ray), record, summarise
ray_runner.py the same tasks on a Ray cluster
plan.py      key every row, name its output, group rows by base-model pair, warm the bases
tasks.py     what a worker runs for one row (port, write, push)
workers.py   warm local worker processes (fork server) with the caller's environment
(the `lorareg scan` and `lorareg batch` commands are in lorareg/apps/cli/library.py)
"""

from .runner import BatchResult, batch
from .scan import ScanResult, ScanRow, scan

__all__ = ["BatchResult", "ScanResult", "ScanRow", "batch", "scan"]
