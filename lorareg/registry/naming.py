"""Declarative module renaming: the rule language of a family's naming schemes.

A rule ``{"from": "down_blocks.{i}.resnets.{j}", "to": "input_blocks.{3*i+j+1}.0"}`` matches a run of
dot-separated segments (anywhere, or at the start when the pattern begins with ``^``); ``{var}``
matches an all-digit segment. The template's ``{expr}`` segments are integer expressions over the
bound variables. Rules apply in order, each at most once. A fuse group names one original module
whose weight is the row-wise concatenation of (slices of) several canonical modules.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..core.errors import RegistryError

_VAR = re.compile(r"^\{([a-z]\w*)\}$")
_EXPR = re.compile(r"^\{([^{}]+)\}$")


def _eval_int(expr: str, env: Mapping[str, int]) -> int:
    """Evaluate + - * over ints and bound variables; anything else is a data error."""

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in env:
                raise RegistryError(f"rename template uses unbound variable {node.id!r} in {{{expr}}}")
            return env[node.id]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) else a * b
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise RegistryError(f"unsupported rename expression {{{expr}}}")

    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError:
        raise RegistryError(f"invalid rename expression {{{expr}}}") from None
    return ev(tree)


@dataclass(frozen=True)
class Pattern:
    segments: tuple[str, ...]
    anchored: bool

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        anchored = text.startswith("^")
        return cls(tuple(text.lstrip("^").split(".")), anchored)

    def _match_at(self, segs: Sequence[str], start: int) -> dict[str, int] | None:
        env: dict[str, int] = {}
        for k, p in enumerate(self.segments):
            s = segs[start + k]
            m = _VAR.match(p)
            if m:
                if not s.isdigit():
                    return None
                v = int(s)
                if env.setdefault(m.group(1), v) != v:
                    return None
            elif p != s:
                return None
        return env

    def search(self, segs: Sequence[str]) -> tuple[int, dict[str, int]] | None:
        n = len(self.segments)
        starts = [0] if self.anchored else range(len(segs) - n + 1)
        for start in starts:
            if start + n > len(segs):
                break
            env = self._match_at(segs, start)
            if env is not None:
                return start, env
        return None

    def fullmatch(self, name: str) -> dict[str, int] | None:
        segs = name.split(".")
        if len(segs) != len(self.segments):
            return None
        return self._match_at(segs, 0)


def render(template: str, env: Mapping[str, int]) -> str:
    out = []
    for seg in template.split("."):
        m = _EXPR.match(seg)
        out.append(str(_eval_int(m.group(1), env)) if m else seg)
    return ".".join(out)


@dataclass(frozen=True)
class Rule:
    pattern: Pattern
    template: str

    def apply(self, segs: list[str]) -> list[str]:
        found = self.pattern.search(segs)
        if found is None:
            return segs
        start, env = found
        replacement = render(self.template, env).split(".")
        return segs[:start] + replacement + segs[start + len(self.pattern.segments) :]


@dataclass(frozen=True)
class FusePart:
    pattern: Pattern
    rows: tuple[int, int] | None


@dataclass(frozen=True)
class FuseGroup:
    template: str
    parts: tuple[FusePart, ...]


@dataclass(frozen=True)
class Slice:
    """Rows [start, stop) of canonical module ``module`` sit at rows [at, at+stop-start) of the fused one."""

    module: str
    start: int
    stop: int
    at: int


@dataclass(frozen=True)
class FusedModule:
    name: str  # the name in the scheme
    slices: tuple[Slice, ...]
    out_features: int


class Scheme:
    """One naming scheme of a component: canonical module name -> name in that scheme."""

    def __init__(self, name: str, spec: Mapping):
        self.name = name
        try:
            self.rules = tuple(Rule(Pattern.parse(r["from"]), r["to"]) for r in spec.get("rules", ()))
            self.fuse = tuple(
                FuseGroup(
                    g["to"],
                    tuple(
                        FusePart(Pattern.parse("^" + p["from"].lstrip("^")), tuple(p["rows"]) if p.get("rows") else None)
                        for p in g["parts"]
                    ),
                )
                for g in spec.get("fuse", ())
            )
        except (KeyError, TypeError) as e:
            raise RegistryError(f"naming scheme {name!r}: malformed rule ({e})") from None

    def rename(self, canonical: str) -> str:
        segs = canonical.split(".")
        for rule in self.rules:
            segs = rule.apply(segs)
        return ".".join(segs)

    def fused_modules(self, shapes: Mapping[str, Sequence[int]]) -> list[FusedModule]:
        """Resolve every fuse group against a component's module table."""
        result = []
        for group in self.fuse:
            first = group.parts[0].pattern
            for name in shapes:
                env = first.fullmatch(name)
                if env is None:
                    continue
                slices, at = [], 0
                for part in group.parts:
                    member = render(".".join(part.pattern.segments), env)
                    if member not in shapes:
                        break
                    out = shapes[member][0]
                    start, stop = part.rows if part.rows else (0, out)
                    if not (0 <= start < stop <= out):
                        raise RegistryError(f"scheme {self.name!r}: rows {part.rows} outside {member} ({out} rows)")
                    slices.append(Slice(member, start, stop, at))
                    at += stop - start
                else:
                    result.append(FusedModule(render(group.template, env), tuple(slices), at))
        return result


def flatten(name: str) -> str:
    """kohya-style flat name: dots become underscores."""
    return name.replace(".", "_")
