import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

from hub_fixtures import hf_offline_env, hub_api, hub_server  # noqa: E402,F401
from lora_factory import TEST_DATA  # noqa: E402


@pytest.fixture()
def tiny_families(monkeypatch, tmp_path_factory):
    """The test families of tests/data on the registry path, and a basis cache of the test session."""
    monkeypatch.setenv("LORAREG_DATA_PATH", str(TEST_DATA))
    monkeypatch.setenv("LORAREG_CACHE", str(tmp_path_factory.getbasetemp() / "bases"))


@pytest.fixture(scope="module")
def tiny_data():
    """The test families on the registry path for a module's own fixtures (tiny_families is per test)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAREG_DATA_PATH", str(TEST_DATA))
        yield
