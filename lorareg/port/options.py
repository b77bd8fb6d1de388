"""Every setting of a port in one place, with its default; the CLI, the API, the Action and the recorded
command all derive from :class:`PortOptions`."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from ..core.errors import InputError
from ..engine import METHODS
from ..refine.options import RefineOptions
from ..sources.refs import public_lora_ref, public_model_ref
from .svdiff import SPECTRAL

AUTO = "auto"
DEFAULT_THRESHOLD = 0.0
#: how the two base models are compared: streamed weight distance/cosine (copy ports) or top-k bases
CHECKS = ("streamed", "bases")
#: prefix of the keyword arguments of :func:`lorareg.port` that set a :class:`RefineOptions` field
REFINE_PREFIX = "refine_"


class PortOptions(BaseModel):
    """How to port: the target, the method and its parameters, the output, and the refinement."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")
    source_model: Optional[str] = None
    target_model: Optional[str] = None
    to: Optional[str] = None
    method: str = AUTO
    rank_k: Optional[int] = None
    threshold: float = DEFAULT_THRESHOLD
    rank: Optional[int] = None
    device: str = "auto"
    dtype: Optional[str] = None
    output: Optional[Path] = None
    format: Optional[str] = None
    force: bool = False
    cache_dir: Optional[Path] = None
    align_blocks: bool = True
    progress: bool = True
    refine: Optional[str] = None
    refine_options: RefineOptions = RefineOptions()
    force_unrelated: bool = False
    #: how the two base models are compared (with both models): "streamed" weight distance/cosine, or "bases" (top-k SVD);
    #: None: streamed for copy ports without a threshold, else bases (port/check.py)
    check: Optional[str] = None
    #: DoRA magnitudes: transfer (rescaled to the target's norms; needs both models), copy (as stored) or drop (said in the report)
    dora: str = "transfer"
    #: the LoRA's family when its shapes and metadata fit several (HunyuanVideo T2V/I2V, Wan 2.1/2.2, FLUX.1 dev/Krea)
    family: Optional[str] = None
    #: "high" | "low": which expert a single-expert Wan 2.2 source holds, or the one expert of a Wan 2.2 target to write
    expert: Optional[str] = None

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "PortOptions":
        """The keyword arguments of :func:`lorareg.port`: ``refine_<x>`` sets ``refine_options.<x>``."""
        refine = {k[len(REFINE_PREFIX):]: v for k, v in kwargs.items() if k.startswith(REFINE_PREFIX) and k != "refine_options"}
        rest = {k: v for k, v in kwargs.items() if not (k.startswith(REFINE_PREFIX) and k != "refine_options")}
        unknown = set(refine) - set(RefineOptions.model_fields)
        if unknown:
            raise TypeError(f"port() got unexpected keyword arguments: {', '.join(REFINE_PREFIX + k for k in sorted(unknown))}")
        if refine:
            base = rest.pop("refine_options", None) or RefineOptions()
            rest["refine_options"] = base.model_copy(update=refine)
        for key in ("source_model", "target_model"):
            if rest.get(key) is not None:
                rest[key] = str(rest[key])
        return cls(**rest)

    @property
    def with_models(self) -> bool:
        return self.source_model is not None

    def check_preconditions(self) -> None:
        """The preconditions that need no file: known method, threshold range, models given together."""
        if self.method != AUTO and self.method not in METHODS and self.method != SPECTRAL:
            raise InputError(f"unknown method {self.method!r} (known: {AUTO}, {', '.join(METHODS)}, {SPECTRAL})")
        if not 0.0 <= self.threshold <= 1.0:
            raise InputError("--threshold must be between 0 and 1")
        if self.method not in ("copy", AUTO, SPECTRAL) and (self.source_model is None or self.target_model is None):
            raise InputError(f"--method {self.method} needs --source-model and --target-model (copy and auto need neither)")
        if (self.source_model is None) != (self.target_model is None):
            raise InputError("give both --source-model and --target-model, or neither")
        if self.check is not None and self.check not in CHECKS:
            raise InputError(f"unknown --check {self.check!r} (known: {', '.join(CHECKS)})")
        if self.check is not None and not self.with_models:
            raise InputError("--check compares the base models: it needs --source-model and --target-model")
        if self.refine is not None and not self.with_models:
            raise InputError("--refine distill needs --source-model and --target-model")

    def recorded(self) -> dict[str, Any]:
        """The settings that change the output (for report.json and the recorded command); not device, force, paths of caches."""
        out: dict[str, Any] = {}
        for name, flag in _OUTPUT_FLAGS:
            value = getattr(self, name)
            if value != PortOptions.model_fields[name].default:
                out[name] = value
        if self.refine is not None:
            defaults = RefineOptions()
            out["refine_options"] = {k: v for k, v in self.refine_options.model_dump(exclude={"conditions"}).items()
                                     if v != getattr(defaults, k)}
            if self.refine_options.prompts_embeds is not None:  # the file's name, never a local path
                out["refine_options"]["prompts_embeds"] = Path(self.refine_options.prompts_embeds).name
        return out

    def command(self, lora: str, output_name: Optional[str] = None) -> str:
        """The ``lorareg port`` command that gives this output, local paths cut to their names."""
        args = ["lorareg", "port", public_lora_ref(lora) or "LORA"]
        for name, flag in _OUTPUT_FLAGS:
            value = getattr(self, name)
            if value == PortOptions.model_fields[name].default:
                continue
            if isinstance(value, bool):
                args.append(flag)
            elif name in ("source_model", "target_model"):
                args += [flag, public_model_ref(value)]
            else:
                args += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        if self.refine is not None:
            defaults = RefineOptions()
            for field, flag in _REFINE_FLAGS:
                value = getattr(self.refine_options, field)
                if value != getattr(defaults, field):
                    args += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
            if self.refine_options.prompts:
                args += ["--prompts", "PROMPTS.txt"]
            if self.refine_options.prompts_embeds is not None:
                args += ["--prompts-embeds", "EMBEDS.safetensors"]
        if output_name:
            args += ["-o", output_name]
        return shlex.join(args)


#: options that change the output, with their command-line flags, in the order the command shows them
_OUTPUT_FLAGS = (
    ("source_model", "--source-model"),
    ("target_model", "--target-model"),
    ("to", "--to"),
    ("method", "--method"),
    ("rank_k", "--rank-k"),
    ("threshold", "--threshold"),
    ("rank", "--rank"),
    ("dora", "--dora"),
    ("dtype", "--dtype"),
    ("format", "--format"),
    ("align_blocks", "--no-align"),
    ("refine", "--refine"),
    ("force_unrelated", "--force-unrelated"),
    ("family", "--family"),
    ("expert", "--expert"),
)
_REFINE_FLAGS = (
    ("steps", "--steps"),
    ("samples", "--samples"),
    ("sample_length", "--sample-length"),
    ("latent_size", "--latent-size"),
    ("sampler_steps", "--sampler-steps"),
    ("noisings", "--noisings"),
    ("guidance", "--guidance"),
    ("frames", "--frames"),
    ("target", "--refine-target"),
    ("batch", "--batch"),
    ("lr", "--lr"),
    ("seed", "--seed"),
    ("budget_seconds", "--budget-seconds"),
)
