"""Which files of a folder hold a model component's weights: one rule for local folders and Hub listings."""

from __future__ import annotations

from typing import Iterable

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")


def weight_files_in(names: Iterable[str]) -> list[str]:
    """The files (names relative to one folder) that hold its weights: a safetensors index and its shards,
    else the known single weight file, else every ``.safetensors`` file there."""
    here = sorted(names)
    for index in INDEX_FILES:
        if index in here:
            stem = index[: -len(".safetensors.index.json")]
            return [index] + [f for f in here if f.startswith(stem + "-") and f.endswith(".safetensors")]
    for fname in WEIGHT_FILES:
        if fname in here:
            return [fname]
    return [f for f in here if f.endswith(".safetensors")]


def is_index(name: str) -> bool:
    return name.rsplit("/", 1)[-1] in INDEX_FILES
