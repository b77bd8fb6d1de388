"""The fields every refinement report has (report.json's ``refine`` entry); each model kind adds its own."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel


class RefineReportBase(BaseModel):
    method: str = "distill"
    model: str
    loss: str  # the name of the report's <loss>_start / <loss>_end fields
    steps: int
    steps_requested: int
    samples: int
    batch: int
    lr: float
    start_method: Optional[str] = None
    samples_cached: bool
    sample_s: float
    train_s: float
    wall_s: float
    device: str
    dtype: str
    seed: int
    stopped_by_budget: bool = False
