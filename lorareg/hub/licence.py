"""The licence facts a port carries from its source, the credit to its creator, and the rule that a port
of a LoRA whose creator forbids derivatives is not published without the owner's permission.

Civitai states per model ``allowDerivatives``, ``allowCommercialUse``, ``allowNoCredit`` and
``allowDifferentLicense`` (REST API v1, ``/api/v1/models/{id}``); a Hub source states a ``license`` in
its card; a file may state ``modelspec.license``. A port is a derivative of its source.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel

from ..core.errors import InputError

CIVITAI_LICENSE_NAME = "civitai-model-license"


class Licence(BaseModel):
    """What is known about the source's licence, and where it comes from."""

    origin: Literal["given", "civitai", "hub", "metadata", "unknown"]
    license: Optional[str] = None  # a licence id (Hub card / modelspec / --license)
    civitai: Optional[dict[str, Any]] = None
    owner_permission: Optional[str] = None

    @property
    def derivatives_forbidden(self) -> bool:
        return bool(self.civitai) and self.civitai.get("allow_derivatives") is False

    def front_matter(self) -> dict[str, str]:
        """The card's ``license`` keys: an id when one is known, else Civitai's terms by link."""
        if self.license:
            return {"license": self.license}
        if self.civitai and self.civitai.get("page_url"):
            return {"license": "other", "license_name": CIVITAI_LICENSE_NAME, "license_link": self.civitai["page_url"]}
        return {}


def licence_of(*, given: Optional[str], civitai: Optional[dict], hub_license: Optional[str], file_license: Optional[str],
               owner_permission: Optional[str] = None) -> Licence:
    if given:
        origin, lic = "given", given
    elif hub_license:
        origin, lic = "hub", hub_license
    elif civitai:
        origin, lic = "civitai", file_license
    elif file_license:
        origin, lic = "metadata", file_license
    else:
        origin, lic = "unknown", None
    return Licence(origin=origin, license=lic, civitai=civitai or None, owner_permission=owner_permission or None)


def check_publishable(lic: Licence, source: str) -> None:
    """Refuse to publish a derivative the source's creator does not allow, unless the owner permitted it."""
    if lic.derivatives_forbidden and not lic.owner_permission:
        who = lic.civitai.get("creator") or "its creator"
        raise InputError(
            f"{source}: {who} does not allow derivatives on Civitai (allowDerivatives: false) and a port is one; "
            "pass --owner-permission 'how the owner allowed it' to publish it anyway (recorded in the card)")


def _yes(v: Optional[bool]) -> str:
    return "unknown" if v is None else ("yes" if v else "no")


def licence_section(lic: Licence) -> str:
    """The card's "Licence and credit" section (markdown)."""
    lines = ["## Licence and credit", ""]
    c = lic.civitai
    if c:
        name = " — ".join(x for x in (c.get("model_name"), c.get("version_name")) if x) or f"civitai:{c.get('version_id')}"
        creator = c.get("creator")
        by = f" by [{creator}]({c['creator_url']})" if creator and c.get("creator_url") else (f" by {creator}" if creator else "")
        lines.append(f"Ported from [{name}]({c.get('page_url')}){by} on Civitai. The source's terms, as Civitai states them:")
        lines.append("")
        commercial = c.get("allow_commercial_use")
        lines += [
            f"- derivatives allowed: **{_yes(c.get('allow_derivatives'))}**",
            f"- commercial use: {', '.join(commercial) if commercial else ('none' if commercial == [] else 'unknown')}",
            f"- use without crediting the creator: {_yes(c.get('allow_no_credit'))}",
            f"- derivatives under a different licence: {_yes(c.get('allow_different_license'))}",
        ]
        if lic.license:
            lines.append(f"- licence named in the file: `{lic.license}`")
    elif lic.origin == "hub":
        lines.append(f"The source LoRA's licence (from its Hub card): `{lic.license}`.")
    elif lic.origin == "metadata":
        lines.append(f"The source LoRA's licence (from its `modelspec.license` metadata): `{lic.license}`.")
    elif lic.origin == "given":
        lines.append(f"Licence given by the publisher: `{lic.license}`.")
    else:
        lines.append("**The source LoRA's licence is unknown**: it came with no Civitai terms, no Hub card licence and "
                     "no `modelspec.license`. Check its terms before using or sharing this port.")
    if lic.owner_permission:
        lines += ["", f"Published with the owner's permission: {lic.owner_permission}"]
    return "\n".join(lines) + "\n"
