"""lorareg: a registry of model families and LoRA key formats; detect, convert and port LoRAs."""

import warnings

# torch warns on import when numpy is absent; lorareg does not use numpy (not a dependency), so the
# warning would only alarm users of a plain install
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

from .core.version import __version__
from .core.errors import ConversionError, DetectionError, InputError, LoraregError, RegistryError
from .core.lora import Lora, Module
from .formats.api import Inspection, convert, detect, inspect, load, save
from .hub.client import HubError
from .hub.push import PushResult, push
from .port import Pair, PortOptions, PortReport, PortResult, port
from .port import resolve_pairs as pairs
from .registry import get_registry
from .library import BatchResult, ScanResult, batch, scan

__all__ = [
    "ConversionError",
    "DetectionError",
    "HubError",
    "InputError",
    "Inspection",
    "Lora",
    "LoraregError",
    "Module",
    "RegistryError",
    "__version__",
    "convert",
    "detect",
    "get_registry",
    "inspect",
    "load",
    "pairs",
    "port",
    "PortOptions",
    "PortReport",
    "PortResult",
    "PushResult",
    "push",
    "Pair",
    "batch",
    "BatchResult",
    "ScanResult",
    "scan",
    "save",
]
