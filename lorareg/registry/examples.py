"""The examples that ship inside the package (lorareg/examples), and the registry data of the LM example's family."""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional

EXAMPLE = "sd15-kohya-example.safetensors"
LM_EXAMPLE = "lm"


def example_path() -> Path:
    return Path(str(resources.files("lorareg") / "examples" / EXAMPLE))


def lm_example_path() -> Path:
    return Path(str(resources.files("lorareg") / "examples" / LM_EXAMPLE))


@contextmanager
def example_registry():
    """Make the LM example's registry family (its own data root) visible while the block runs."""
    root = str(lm_example_path() / "data")
    old = os.environ.get("LORAREG_DATA_PATH")
    parts = [p for p in (old or "").split(os.pathsep) if p]
    os.environ["LORAREG_DATA_PATH"] = os.pathsep.join(parts + ([root] if root not in parts else []))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LORAREG_DATA_PATH", None)
        else:
            os.environ["LORAREG_DATA_PATH"] = old


def example_registry_for(paths: Iterable[Optional[object]]):
    """:func:`example_registry` when any of ``paths`` lies in the LM example, else a no-op context."""
    ex = lm_example_path().resolve()
    for p in paths:
        if p is not None and ex in Path(str(p)).resolve().parents:
            return example_registry()
    return nullcontext()
