"""Which torch device a command runs on."""

from __future__ import annotations

import torch

from .errors import InputError


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when torch sees one, else the CPU; ``cuda`` without a CUDA device is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but torch sees no CUDA device")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"unknown device {device!r} (auto, cpu, cuda)")
    return torch.device(device)
