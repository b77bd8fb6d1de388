"""Names and small rules shared by every stage: output file names, pickle suffixes, shapes."""

from __future__ import annotations

import math
from typing import Iterable

#: the port report, beside the weights (``<stem>.report.json``) or inside a PEFT folder (``report.json``)
REPORT_NAME = "report.json"
#: the model card of a Hub repo
CARD_NAME = "README.md"
#: file suffixes of pickled checkpoints: never opened, only named in errors
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def numel(shape: Iterable[int]) -> int:
    """Number of elements of a tensor of this shape."""
    return math.prod(int(s) for s in shape)
