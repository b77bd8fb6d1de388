"""pytest fixtures around :mod:`hub_server` (import them from ``tests/conftest.py``)::

    from hub_fixtures import hf_offline_env, hub_server, hub_api  # noqa: F401

``hub_server`` yields a started :class:`hub_server.HubServer` (``.endpoint``, ``.token``,
inspection helpers) and prepares the process so the real ``huggingface_hub`` client
uses it safely:

* ``HF_HUB_DISABLE_XET=1`` in the environment *and* ``huggingface_hub.constants.HF_HUB_DISABLE_XET``
  patched to True (the constant is read at import time, so the env var alone is too late);
* ``HF_HOME`` / ``HF_HUB_CACHE`` point into ``tmp_path`` and the matching constants are patched,
  so nothing reads the developer's token file or cache;
* ``HF_ENDPOINT`` is set to the server (only helps code that imports huggingface_hub later,
  or reads the env itself: always pass ``endpoint=hub.endpoint`` explicitly);
* ``HF_TOKEN`` is removed so a token must be passed explicitly;
* ``NO_PROXY`` covers 127.0.0.1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from hub_server import HubServer  # noqa: E402


@pytest.fixture
def hf_offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Isolate huggingface_hub from the user's config; returns the HF_HOME used."""
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return home
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HUGGINGFACE_HUB_CACHE", str(cache), raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"), raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True, raising=False)
    return home


@pytest.fixture
def hub_server(hf_offline_env: Path, monkeypatch: pytest.MonkeyPatch):
    """A running in-memory Hub; see module docstring."""
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


@pytest.fixture
def hub_api(hub_server: HubServer):
    """``HfApi`` bound to ``hub_server`` with its valid token."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
