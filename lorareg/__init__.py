"""lorareg: a registry of model families and LoRA key formats; detect, convert and port LoRAs."""

import warnings

# torch warns on import when numpy is absent; lorareg does not use numpy (not a dependency), so the
# warning would only alarm users of a plain install
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

from .core.version import __version__  # noqa: E402
from .core.errors import ConversionError, DetectionError, InputError, LoraregError, RegistryError  # noqa: E402
from .core.lora import Lora, Module  # noqa: E402
from .formats.api import Inspection, convert, detect, inspect, load, save  # noqa: E402
from .hub.client import HubError  # noqa: E402
from .hub.push import PushResult, push  # noqa: E402
from .port import Pair, PortOptions, PortReport, PortResult, port  # noqa: E402
from .port import resolve_pairs as pairs  # noqa: E402
from .registry import get_registry  # noqa: E402
from . import batch  # noqa: E402  (the package, callable: lorareg.batch(...) runs a batch)
from .batch import scan  # noqa: E402

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
    "scan",
    "save",
]
