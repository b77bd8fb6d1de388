"""Model families: components, their modules and shapes, naming schemes, aliases, layouts."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..core.errors import RegistryError
from .naming import FusedModule, Scheme, flatten

CANONICAL = "canonical"


class Architecture(BaseModel):
    model_config = ConfigDict(extra="allow")
    library: str
    class_: str = Field(alias="class")
    config: dict


class ComponentSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["unet", "transformer", "text_encoder", "llm"]
    architecture: Architecture
    module_prefix: str = ""
    schemes: dict[str, dict] = Field(default_factory=dict)


class Aliases(BaseModel):
    names: list[str] = Field(default_factory=list)
    civitai: list[str] = Field(default_factory=list)
    kohya: list[str] = Field(default_factory=list)
    modelspec: list[str] = Field(default_factory=list)


class Hub(BaseModel):
    model_config = ConfigDict(extra="allow")
    default_repo: Optional[str] = None
    repos: list[str] = Field(default_factory=list)


class LayoutComponent(BaseModel):
    model_config = ConfigDict(extra="allow")
    path: str = ""
    prefix: str = ""
    scheme: str = CANONICAL


class Layout(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["diffusers", "single_file", "transformers"]
    filename: Optional[str] = None
    components: dict[str, LayoutComponent]


class Detection(BaseModel):
    model_config = ConfigDict(extra="allow")
    notes: list[str] = Field(default_factory=list)
    key_modules: list[str] = Field(default_factory=list)
    rank_on_tie: int = 0


class NoiseSchedule(BaseModel):
    """DDPM betas (UNets)."""

    type: Literal["betas"] = "betas"
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012


class FlowSchedule(BaseModel):
    """A flow-matching schedule (DiTs): sigma(s) = shift s / (1 + (shift - 1) s), timestep = sigma x num_train_timesteps."""

    type: Literal["flow_match"] = "flow_match"
    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096


class TextConditioning(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    component: str
    class_: Optional[str] = Field(default=None, alias="class")  # when the family lists no such component
    tokenizer: str
    layer: Literal["last", "penultimate"] = "last"
    hidden_layer: Optional[int] = None  # from the end; overrides layer
    pooled: bool = False
    hidden: bool = True
    max_length: Optional[int] = None
    attention_mask: bool = False
    unmasked_padding: int = 0  # padding tokens after the text left unmasked in the mask the denoiser gets
    zero_padding: bool = False


class Guidance(BaseModel):
    value: float
    multiplier: float = 1.0


class ImageCondition(BaseModel):
    type: Literal["concat", "token_replace", "sequence"]
    order: list[Literal["latents", "image", "mask"]] = Field(default_factory=lambda: ["latents", "image", "mask"])
    mask_channels: int = 1
    image_frames: Literal["first", "all"] = "first"
    image_embeds: bool = False
    required: bool = True


DenoiserInput = Literal["latents", "timestep", "text", "text_mask", "pooled", "guidance", "image_ids", "text_ids", "image_embeds", "joint_mask"]


class DenoiserSpec(BaseModel):
    """How a transformer denoiser is called: named values lorareg builds, passed to the keywords given here."""

    component: str
    latent_channels: int
    latents: Literal["video", "packed_2x2"]
    temporal_compression: int = 1
    timestep_scale: float = 1000.0
    inputs: dict[str, DenoiserInput]
    guidance: Optional[Guidance] = None
    classifier_free_guidance: float = 1.0
    image_condition: Optional[ImageCondition] = None

    def embedded_guidance(self, config: dict) -> Optional[Guidance]:
        """The embedded guidance a transformer of this ``config`` takes: only one with ``guidance_embeds`` has the embedder."""
        return self.guidance if self.guidance is not None and config.get("guidance_embeds") else None


class DiffusionSpec(BaseModel):
    """What a denoiser needs to run as a distillation teacher or student (see family.schema.json)."""

    latent_space: str
    prediction_type: Literal["epsilon", "v_prediction", "flow"]
    noise_schedule: Union[NoiseSchedule, FlowSchedule] = Field(discriminator="type")
    scheduler_path: str = "scheduler"
    vae_scale_factor: int = 8
    conditioning: list[TextConditioning] = Field(default_factory=list)
    denoiser: Optional[DenoiserSpec] = None
    notes: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _schedule_type(cls, data):
        # family files written before flow schedules existed give betas without a type
        if isinstance(data, dict) and isinstance(data.get("noise_schedule"), dict) and "type" not in data["noise_schedule"]:
            data = {**data, "noise_schedule": {**data["noise_schedule"], "type": "betas"}}
        return data


class Experts(BaseModel):
    """Mixture-of-experts denoisers (Wan 2.2 A14B): which component serves which noise range."""

    high_noise: str
    low_noise: str
    boundary_ratio: Optional[float] = None
    low_noise_guidance: Optional[float] = None  # the low-noise expert's classifier-free guidance where it differs
    file_suffix: dict[str, str] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)

    def suffix(self, which: str) -> str:
        return self.file_suffix.get(which, f"_{which}")

    def component(self, which: str) -> str:
        return self.high_noise if which == "high_noise" else self.low_noise


class NamedVariant(BaseModel):
    """A community fine-tune sharing the family's shapes, recognised from metadata only."""

    id: str
    name: str
    aliases: Aliases = Field(default_factory=Aliases)
    hub: Optional[Hub] = None
    notes: list[str] = Field(default_factory=list)

    def matches_alias(self, value: str) -> bool:
        v = value.strip().lower()
        a = self.aliases
        return any(v == p.lower() for p in [self.id, *a.names, *a.civitai, *a.kohya, *a.modelspec])


class FamilySpec(BaseModel):
    """The hand-written family file."""

    model_config = ConfigDict(extra="allow")
    schema_version: int
    id: str
    name: str
    kind: Literal["image", "video", "text"]
    pipeline_tag: Optional[str] = None
    library_name: Optional[str] = None
    tags: list[str] = Field(default_factory=list)
    aliases: Aliases = Field(default_factory=Aliases)
    hub: Hub = Field(default_factory=Hub)
    layouts: list[Layout] = Field(default_factory=list)
    components: dict[str, ComponentSpec]
    detection: Detection = Field(default_factory=Detection)
    diffusion: Optional[DiffusionSpec] = None
    variant_of: Optional[str] = None
    experts: Optional[Experts] = None
    variants: list[NamedVariant] = Field(default_factory=list)


Target = Union[str, FusedModule]  # a canonical module name, or a fused original module


@dataclass
class Component:
    family: str
    id: str
    spec: ComponentSpec
    modules: dict[str, tuple[int, ...]]  # canonical name -> weight shape
    num_parameters: Optional[int] = None

    @property
    def role(self) -> str:
        return self.spec.role

    @cached_property
    def schemes(self) -> dict[str, Scheme]:
        return {name: Scheme(name, spec) for name, spec in self.spec.schemes.items()}

    def has_scheme(self, scheme: str) -> bool:
        return scheme == CANONICAL or scheme in self.spec.schemes

    @cached_property
    def _fused(self) -> dict[str, list[FusedModule]]:
        return {name: s.fused_modules(self.modules) for name, s in self.schemes.items()}

    def scheme_names(self, scheme: str) -> dict[str, Target]:
        """name in ``scheme`` -> target, for every module of this component."""
        return self._tables(scheme)[0]

    def flat_names(self, scheme: str) -> dict[str, Target]:
        """kohya-flattened name in ``scheme`` -> target."""
        return self._tables(scheme)[1]

    def fused_group_of(self, scheme: str) -> dict[str, FusedModule]:
        """canonical module -> the fused module that holds it in ``scheme``."""
        return self._tables(scheme)[2]

    _table_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def _tables(self, scheme: str):
        if scheme not in self._table_cache:
            self._table_cache[scheme] = self._build_tables(scheme)
        return self._table_cache[scheme]

    def _build_tables(self, scheme: str):
        dotted: dict[str, Target] = {}
        member_of: dict[str, FusedModule] = {}
        if scheme != CANONICAL:
            if scheme not in self.schemes:
                raise RegistryError(f"family {self.family!r} component {self.id!r} has no naming scheme {scheme!r}")
            for fused in self._fused[scheme]:
                dotted[fused.name] = fused
                for s in fused.slices:
                    member_of[s.module] = fused
        rename = self.schemes[scheme].rename if scheme != CANONICAL else None
        for name in self.modules:
            if name in member_of:
                continue
            out = rename(name) if rename else name
            if out in dotted and dotted[out] != name:
                raise RegistryError(
                    f"family {self.family!r}: scheme {scheme!r} maps two modules to {out!r} ({dotted[out]!s:.60}, {name})"
                )
            dotted[out] = name
        # Files in the wild often omit the component's module prefix (transformers 5 CLIP, and vice versa).
        prefix = self.spec.module_prefix
        if prefix and scheme == CANONICAL:
            for out, target in list(dotted.items()):
                if out.startswith(prefix):
                    dotted.setdefault(out[len(prefix) :], target)
        flat: dict[str, Target] = {}
        for out, target in dotted.items():
            key = flatten(out)
            if key in flat and flat[key] != target:
                # an ambiguous flat name can only be used through its dotted form
                flat[key] = None  # type: ignore[assignment]
            else:
                flat[key] = target
        flat = {k: v for k, v in flat.items() if v is not None}
        return dotted, flat, member_of

    def name_in(self, scheme: str, canonical: str) -> str:
        if scheme == CANONICAL:
            return canonical
        return self.schemes[scheme].rename(canonical)


@dataclass
class Family:
    spec: FamilySpec
    components: dict[str, Component]
    path: Path
    #: this family's id, then its parent's (variant_of), and so on; set by the registry
    lineage: tuple[str, ...] = ()

    @property
    def root(self) -> str:
        return self.lineage[-1] if self.lineage else self.id

    @property
    def id(self) -> str:
        return self.spec.id

    def named_variant(self, value: str) -> Optional[NamedVariant]:
        """The named variant (Pony, Illustrious... of SDXL) a metadata value or user name means, if any."""
        return next((v for v in self.spec.variants if v.matches_alias(value)), None)

    def matches_alias(self, value: str) -> bool:
        v = value.strip().lower()
        a = self.spec.aliases
        pool = [self.id, *a.names, *a.civitai, *a.kohya, *a.modelspec, *self.spec.hub.repos]
        if self.spec.hub.default_repo:
            pool.append(self.spec.hub.default_repo)
        return any(v == p.lower() for p in pool)


def build_family(spec: FamilySpec, modules_doc: dict, path: Path) -> Family:
    components = {}
    generated = modules_doc.get("components", {})
    for cid, cspec in spec.components.items():
        table = generated.get(cid)
        if table is not None and "same_as" in table:  # an identical component stored once (Wan 2.2 experts)
            table = generated.get(table["same_as"])
        if table is None or "modules" not in table:
            raise RegistryError(f"family {spec.id!r}: no generated module table for component {cid!r}")
        modules = {name: tuple(shape) for name, shape in table["modules"].items()}
        components[cid] = Component(spec.id, cid, cspec, modules, table.get("num_parameters"))
    return Family(spec=spec, components=components, path=path)
