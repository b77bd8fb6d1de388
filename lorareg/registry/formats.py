"""Key formats (the files in adapters/): prefixes, naming schemes, factor suffixes, alpha storage."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from .naming import Rule, Pattern


class PrefixRule(BaseModel):
    prefix: str
    components: list[str]
    write_when_family_has: list[str] = Field(default_factory=list)
    read_only: bool = False


class NameRule(BaseModel):
    from_: str = Field(alias="from")
    to: str


class AlphaSpec(BaseModel):
    store: Literal["tensor", "metadata", "config", "baked"]
    suffix: Optional[str] = None
    missing: Optional[Literal["rank"]] = None


class VariantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    description: str = ""
    read_only: bool = False
    separator: Literal["_", "."]
    schemes: list[str]
    prefixes: list[PrefixRule]
    name_rules: list[NameRule] = Field(default_factory=list)
    factors: dict[str, dict[str, list[str]]]
    dora_scale: list[str] = Field(default_factory=list)
    alpha: AlphaSpec
    families: list[str] = Field(default_factory=list)


class FormatSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    schema_: Optional[str] = Field(default=None, alias="$schema")
    schema_version: int
    id: str
    title: str
    description: str = ""
    container: Literal["safetensors", "peft_dir"]
    writable: bool
    priority: int = 0
    variants: list[VariantSpec]


@dataclass(frozen=True)
class Suffix:
    """What a key's ending says: adapter type and factor role (or alpha / dora), and which spelling."""

    text: str
    kind: str  # "lora" | "loha" | "lokr" | "full" | "alpha" | "dora_scale"
    role: str
    spelling: int


class Variant:
    def __init__(self, fmt: "Format", spec: VariantSpec):
        self.format = fmt
        self.spec = spec

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def qualified_id(self) -> str:
        return f"{self.format.id}/{self.spec.id}"

    def applies_to(self, family) -> bool:
        """A variant limited to some families (kohya's Flux spelling) reads and writes only those and their variants."""
        if not self.spec.families:
            return True
        return any(f in self.spec.families for f in (family.lineage or (family.id,)))

    @cached_property
    def suffixes(self) -> list[Suffix]:
        """Every accepted key ending, longest first so that the most specific wins."""
        out: list[Suffix] = []
        for kind, roles in self.spec.factors.items():
            for role, spellings in roles.items():
                out += [Suffix(s, kind, role, i) for i, s in enumerate(spellings)]
        out += [Suffix(s, "dora_scale", "dora_scale", i) for i, s in enumerate(self.spec.dora_scale)]
        if self.spec.alpha.suffix:
            out.append(Suffix(self.spec.alpha.suffix, "alpha", "alpha", 0))
        return sorted(out, key=lambda s: -len(s.text))

    @cached_property
    def _suffix_index(self) -> tuple[int, dict[str, list[Suffix]]]:
        """The suffixes by their last n characters (n: the shortest suffix's length), longest first: a key
        can only end with those filed under its own last n characters."""
        n = min((len(s.text) for s in self.suffixes), default=0)
        index: dict[str, list[Suffix]] = {}
        for s in self.suffixes:
            index.setdefault(s.text[len(s.text) - n :], []).append(s)
        return n, index

    def match_suffix(self, key: str) -> Optional[Suffix]:
        n, index = self._suffix_index
        for s in index.get(key[len(key) - n :], ()):
            if key.endswith(s.text) and len(key) > len(s.text):
                return s
        return None

    @cached_property
    def read_prefixes(self) -> list[PrefixRule]:
        return sorted(self.spec.prefixes, key=lambda p: -len(p.prefix))

    def write_prefix(self, component: str, family_components: set[str]) -> Optional[str]:
        for rule in self.spec.prefixes:
            if rule.read_only or component not in rule.components:
                continue
            if not set(rule.write_when_family_has) <= family_components:
                continue
            return rule.prefix
        return None

    @cached_property
    def name_rules(self) -> tuple[Rule, ...]:
        return tuple(Rule(Pattern.parse(r.from_), r.to) for r in self.spec.name_rules)

    def suffix_text(self, kind: str, role: str, spelling: int = 0) -> str:
        if kind == "alpha":
            assert self.spec.alpha.suffix
            return self.spec.alpha.suffix
        spellings = self.spec.dora_scale if kind == "dora_scale" else self.spec.factors[kind][role]
        return spellings[spelling] if spelling < len(spellings) else spellings[0]

    def supports(self, kind: str, role: str) -> bool:
        return role in self.spec.factors.get(kind, {})


@dataclass
class Format:
    spec: FormatSpec
    path: Path

    @property
    def id(self) -> str:
        return self.spec.id

    @cached_property
    def variants(self) -> list[Variant]:
        return [Variant(self, v) for v in self.spec.variants]

    def variant(self, vid: str) -> Variant:
        for v in self.variants:
            if v.id == vid:
                return v
        raise KeyError(vid)

    @property
    def default_write_variant(self) -> Optional[Variant]:
        for v in self.variants:
            if not v.spec.read_only and not v.spec.families:
                return v
        return None

    def write_variant_for(self, family) -> Optional[Variant]:
        """The first writable variant made for this family (kohya's Flux spelling for Flux), else the default one."""
        for v in self.variants:
            if not v.spec.read_only and v.spec.families and v.applies_to(family):
                return v
        return self.default_write_variant
