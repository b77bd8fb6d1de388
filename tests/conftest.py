import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from hub_fixtures import hf_offline_env, hub_api, hub_server  # noqa: E402,F401
