"""Imported once by the local fork server (workers.py): lorareg, torch and the registry of the server's
environment are then loaded in every worker forked from it, at no cost per worker."""

from ..registry import get_registry
from . import tasks  # noqa: F401

try:
    get_registry()
except Exception:  # noqa: BLE001 - a bad data path is reported by the worker that uses it, not here
    pass
