"""`ray start ...` with every address kept on 127.0.0.1 (run as ``python tests/ray_node.py start ...``).

Ray 2.60 on Linux turns 127.0.0.1 (in ``--address`` and ``--node-ip-address``) into the machine's network
address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with that setting `ray start --address` refuses to
add a node ("Multi-node Ray clusters are not supported on Windows and OSX"). Here the variable is 0 for
this process and every process it starts (so all of them resolve 127.0.0.1 as given) and only the CLI's
refusal is lifted: the CLI reads the flag from its own reference to ray_constants, which is replaced by a
copy saying True; the address resolution (ray._private.services) keeps the real value.
"""

import os
import sys
import types

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import ray._private.ray_constants as ray_constants  # noqa: E402
from ray.scripts import scripts  # noqa: E402

if __name__ == "__main__":
    cli_constants = types.ModuleType("ray_constants_for_cli")
    cli_constants.__dict__.update(ray_constants.__dict__)
    cli_constants.ENABLE_RAY_CLUSTER = True
    scripts.ray_constants = cli_constants
    sys.argv = ["ray", *sys.argv[1:]]
    scripts.main()
