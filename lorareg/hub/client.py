"""The Hub client's shared pieces: endpoint, offline mode, one-line errors that never hold a token."""


from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator, Optional

from ..core.errors import InputError, LoraregError

AUTH_FAILED = "authentication failed (check HF_TOKEN / huggingface-cli login)"
_TOKENISH = re.compile(r"hf_[A-Za-z0-9]{8,}")


class HubError(LoraregError):
    """The Hub refused or failed a request (network, authentication, server error)."""

    exit_code = 6


def hub_endpoint(explicit: Optional[str] = None) -> Optional[str]:
    """``endpoint`` if given, else ``HF_ENDPOINT`` as set now (huggingface_hub reads it only at import)."""
    return explicit or os.environ.get("HF_ENDPOINT") or None


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub saw it at import, or as set now."""
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def scrub(message: str, token: Optional[str] = None) -> str:
    """One line, with anything token-like masked."""
    line = (str(message).strip().splitlines() or [""])[0]
    if token:
        line = line.replace(token, "***")
    return _TOKENISH.sub("hf_***", line)


def _status(exc: BaseException) -> Optional[int]:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _server_message(exc: BaseException) -> str:
    msg = getattr(exc, "server_message", None) or ""
    msg = (msg.strip().splitlines() or [""])[0]
    return msg


@contextlib.contextmanager
def translate_errors(action: str, what: str, *, token: Optional[str] = None, endpoint: Optional[str] = None,
                     offline: bool = False) -> Iterator[None]:
    """Turn huggingface_hub / HTTP exceptions raised while ``action``-ing ``what`` into one-line errors."""
    from huggingface_hub import errors as hf_errors

    token = token or _current_token()  # only to mask it, should a server ever echo it
    try:
        yield
    except LoraregError:
        raise
    except (hf_errors.CachedRepoTreeNotFoundError, hf_errors.LocalEntryNotFoundError) as e:
        if offline:
            raise InputError(f"{what}: not in the Hugging Face cache and HF_HUB_OFFLINE=1 is set "
                             "(run once online to cache it)") from None
        raise HubError(f"{what}: the Hub could not be reached ({scrub(str(e), token)[:160]}) and it is not cached") from None
    except hf_errors.RevisionNotFoundError:
        raise InputError(f"{what}: no such revision on the Hub") from None
    except hf_errors.RemoteEntryNotFoundError:
        raise InputError(f"{what}: no such file on the Hub") from None
    except hf_errors.GatedRepoError:
        raise HubError(f"{what}: the repo is gated; accept its terms on the Hub and log in") from None
    except hf_errors.RepositoryNotFoundError as e:
        if _status(e) == 401 and _has_token(token):
            raise HubError(AUTH_FAILED) from None
        raise InputError(f"{what}: no such Hub repo (or it is private and no valid token was given)") from None
    except hf_errors.HfHubHTTPError as e:
        status = _status(e)
        if status == 401:
            raise HubError(AUTH_FAILED) from None
        if status == 403:
            raise HubError(f"{action} {what}: permission denied (403): {scrub(_server_message(e), token)}".rstrip(": ")) from None
        if status == 412:
            raise HubError(f"{action} {what}: the branch moved while pushing (412); nothing was changed, run again") from None
        detail = scrub(_server_message(e) or str(e), token)
        raise HubError(f"{action} {what} failed: Hub answered {status}: {detail}") from None
    except hf_errors.OfflineModeIsEnabled:
        raise InputError(f"{what}: HF_HUB_OFFLINE=1 is set and this needs the network") from None
    except Exception as e:  # httpx transport errors, without importing httpx here
        if type(e).__module__.split(".")[0] in ("httpx", "httpcore", "httpx2") or isinstance(e, ConnectionError):
            where = endpoint or "the Hub"
            raise HubError(f"{action} {what}: cannot reach {where} ({type(e).__name__})") from None
        raise


def _current_token() -> Optional[str]:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # pragma: no cover
        return None


def _has_token(token: Optional[str]) -> bool:
    return bool(token or _current_token())
