"""lorareg: a registry of model families and LoRA key formats; detect, convert and port LoRAs."""

__version__ = "0.1.0"

from .api import Inspection, convert, detect, inspect, load, save  # noqa: E402
from .hub import HubError, PushResult, push  # noqa: E402
from .errors import ConversionError, DetectionError, InputError, LoraregError, RegistryError  # noqa: E402
from .lora import Lora, Module  # noqa: E402
from .port import PortReport, PortResult, port  # noqa: E402
from .resolve import Pair, resolve_pairs as pairs  # noqa: E402
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
    "PortReport",
    "PortResult",
    "PushResult",
    "push",
    "Pair",
    "batch",
    "scan",
    "save",
]
