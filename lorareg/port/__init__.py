"""Porting a LoRA to another base model: options, pairs, bases, the layer loop, the report.

:func:`port` runs the stages of :mod:`.run` in order; each stage is a module of its own.
"""

from .bases import BasesStore
from .options import PortOptions
from .pairs import Pair, resolve_pairs
from .report import PortReport, PortResult
from .run import port

__all__ = ["BasesStore", "Pair", "PortOptions", "PortReport", "PortResult", "port", "resolve_pairs"]
