"""Plain HTTP for sources that are not the Hub (Civitai): JSON GETs and resumable, verified downloads.

Standard library only (urllib): ``requests`` is not a core dependency. A token is sent only to the
host it was given for: it goes in an *unredirected* header, so a redirect to a download CDN never
carries it; it never appears in an error message.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from ..core.errors import LoraregError

USER_AGENT = "lorareg"
#: a Retry-After longer than this is reported instead of waited for
MAX_RETRY_WAIT_S = 10.0
_CHUNK = 1 << 20


class SourceError(LoraregError):
    """A remote source refused or failed a request (``status``: the HTTP status, when there was one)."""

    exit_code = 6

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


def _request(url: str, token: Optional[str], headers: Optional[dict[str, str]] = None) -> urllib.request.Request:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
    if token:
        req.add_unredirected_header("Authorization", f"Bearer {token}")
    return req


def _open(req: urllib.request.Request, what: str, describe: Callable[[int, str], str], timeout: float):
    """urlopen with one retry after a short Retry-After; HTTP errors become one-line SourceErrors."""
    for attempt in range(2):
        try:
            return urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            wait = _retry_after(e.headers.get("Retry-After")) if e.code in (429, 503) else None
            e.close()
            if wait is not None and wait <= MAX_RETRY_WAIT_S and attempt == 0:
                time.sleep(wait)
                continue
            raise SourceError(describe(e.code, what) + (f" (retry after {wait:.0f} s)" if wait is not None else ""), e.code) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise SourceError(f"{what}: cannot reach the server ({reason})") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _retry_after(value: Optional[str]) -> Optional[float]:
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
        except (TypeError, ValueError):
            return None


def get_json(url: str, *, token: Optional[str], what: str, describe: Callable[[int, str], str], timeout: float = 30.0):
    with _open(_request(url, token, {"Accept": "application/json"}), what, describe, timeout) as resp:
        body = resp.read()
    try:
        return json.loads(body)
    except ValueError:
        raise SourceError(f"{what}: the server answered something that is not JSON") from None


def download_verified(url: str, dest: Path, sha256: str, *, token: Optional[str], what: str,
                      describe: Callable[[int, str], str], progress: bool = False, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` through ``dest.partial``, resuming a partial download with a Range
    request; keep it only if its SHA-256 is ``sha256`` (else delete it and raise)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".partial")
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = _open(_request(url, token, headers), what, describe, timeout)
    except SourceError as e:
        if have and e.status == 416:  # the partial file is already whole (or longer): check it as is
            return _finish(part, dest, sha256, what)
        raise
    with resp:
        resumed = have and resp.status == 206 and resp.headers.get("Content-Range", "").startswith(f"bytes {have}-")
        total = _total(resp, have if resumed else 0)
        bar = _bar(total, have if resumed else 0, dest.name, progress)
        try:
            with open(part, "ab" if resumed else "wb") as f:
                for chunk in iter(lambda: resp.read(_CHUNK), b""):
                    f.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
        except (http.client.HTTPException, OSError) as e:
            raise _interrupted(what, e.__class__.__name__) from None
        finally:
            if bar is not None:
                bar.close()
    if total is not None and part.stat().st_size < total:  # the server closed the connection early
        raise _interrupted(what, f"{part.stat().st_size} of {total} bytes")
    return _finish(part, dest, sha256, what)


def _interrupted(what: str, detail: str) -> SourceError:
    return SourceError(f"{what}: the download was interrupted ({detail}); run the command again to resume it")


def _total(resp, offset: int) -> Optional[int]:
    length = resp.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


def _bar(total: Optional[int], initial: int, name: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=f"downloading {name}", leave=False)


def _finish(part: Path, dest: Path, sha256: str, what: str) -> Path:
    digest = file_sha256(part)
    if digest != sha256.lower():
        part.unlink(missing_ok=True)
        raise SourceError(f"{what}: the download's SHA-256 {digest[:12]}... differs from the one the API gives "
                          f"({sha256.lower()[:12]}...); nothing was kept")
    os.replace(part, dest)
    return dest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
