"""The examples that ship inside the package (lorareg/examples); the LM example has no registry entry (its
family is derived from its own model folders)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

EXAMPLE = "sd15-kohya-example.safetensors"
LM_EXAMPLE = "lm"


def example_path() -> Path:
    return Path(str(resources.files("lorareg") / "examples" / EXAMPLE))


def lm_example_path() -> Path:
    return Path(str(resources.files("lorareg") / "examples" / LM_EXAMPLE))


