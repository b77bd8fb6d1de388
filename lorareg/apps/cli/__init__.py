"""The `lorareg` command line: the group in :mod:`.main`, one module per command group."""

from . import bases, demo, files, hub, library, porting  # noqa: F401  (each registers its commands on main)
from .main import main

__all__ = ["main"]
