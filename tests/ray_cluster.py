"""A real Ray cluster on 127.0.0.1 for the tests: a head and worker nodes (one raylet each, own ports), started
with tests/ray_node.py and stopped by the PIDs this module started and their descendants, never `ray stop`
(which ends every Ray process on the machine)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

LOOPBACK = "127.0.0.1"
NODE_SCRIPT = Path(__file__).resolve().with_name("ray_node.py")
#: no usage stats, no token auth (a ~/.ray/auth_token left by another Ray run would switch it on for one node only)
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           # a lost node is declared dead after ~1.5 s rather than Ray's default ~15 s (tests lose one on purpose)
           "RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500", "RAY_health_check_failure_threshold": "3"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _parent(pid: int) -> Optional[int]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state


def _start_time(pid: int) -> Optional[str]:
    """The process's start time (its identity with the PID), None once it is gone (or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def descendants(roots: set[int]) -> dict[int, Optional[str]]:
    """PID -> start time of the roots and every process below them (to signal only those very processes later)."""
    parents = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            ppid = _parent(int(p.name))
            if ppid is not None:
                parents[int(p.name)] = ppid
    out = {}
    for pid in parents:
        q: Optional[int] = pid
        while q is not None and q > 1:
            if q in roots:
                out[pid] = _start_time(pid)
                break
            q = parents.get(q)
    return out


def signal_all(pids: dict[int, Optional[str]], sig: int) -> None:
    for pid, started in pids.items():
        if started is not None and _start_time(pid) == started:  # the same process, not a reused PID
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


@dataclass
class Node:
    proc: subprocess.Popen
    log: Path
    node_id: str = ""
    tracked: dict[int, Optional[str]] = field(default_factory=dict)

    def refresh(self) -> None:
        self.tracked.update(descendants({self.proc.pid}))

    def raylet_pids(self) -> list[int]:
        self.refresh()
        return [p for p in self.tracked if b"/raylet/raylet\0" in _cmdline(p) or _cmdline(p).endswith(b"/raylet")]

    def task_pids(self, title: bytes = b"_remote_run") -> list[int]:
        """Ray worker processes of this node now running a task whose name holds ``title``."""
        self.refresh()
        return [p for p in self.tracked if _cmdline(p).startswith(b"ray::") and title in _cmdline(p)]


class LocalRayCluster:
    """Head + worker nodes on 127.0.0.1; every process started here (and its children) is stopped here."""

    def __init__(self, logs: Path, python: str = sys.executable, base_env: Optional[dict] = None) -> None:
        self.python = python
        self.base_env = dict(os.environ) if base_env is None else base_env  # what the nodes start with
        self.logs = logs
        self.temp = Path("/tmp") / f"lorareg-ray-{os.getpid()}-{free_port()}"  # Ray's socket paths must stay short
        self.port = free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.nodes: list[Node] = []

    def _start(self, args: list[str], name: str, env: Optional[dict] = None, hide: Optional[Path] = None) -> Node:
        log = self.logs / f"{name}.log"
        cmd = [self.python, str(NODE_SCRIPT), "start", "--block", "--node-ip-address", LOOPBACK, "--disable-usage-stats", *args]
        if hide is not None:  # a node that does not see this folder: an empty tmpfs over it, in a mount namespace of its own
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"', str(hide), *cmd]
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, env={**self.base_env, **RAY_ENV, **(env or {})}, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        node = Node(proc, log)
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: int = 1, env: Optional[dict] = None, timeout: float = 90) -> str:
        node = self._start(["--head", "--port", str(self.port), "--num-cpus", str(num_cpus), "--object-store-memory",
                            str(100 * 2**20), "--include-dashboard", "false", "--temp-dir", str(self.temp)], "head", env)
        deadline = time.time() + timeout
        while True:
            if node.proc.poll() is not None:
                raise RuntimeError(f"the Ray head exited at start: {node.log.read_text()[-2000:]}")
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("the Ray head did not start in time")
                time.sleep(0.3)
        return self.address

    def add_node(self, num_cpus: int = 1, resources: str = "{}", env: Optional[dict] = None, hide: Optional[Path] = None,
                 name: str = "worker") -> Node:
        """A worker node joining the head (its own raylet, object store and ports)."""
        return self._start(["--address", self.address, "--num-cpus", str(num_cpus), "--object-store-memory", str(100 * 2**20),
                            "--resources", resources], name, env, hide)

    def alive_nodes(self, ray, count: int, timeout: float = 60) -> list[dict]:
        """Wait (connected driver) until ``count`` nodes are alive; their ray.nodes() entries."""
        deadline = time.time() + timeout
        while True:
            alive = [n for n in ray.nodes() if n["Alive"]]
            if len(alive) >= count:
                return alive
            for node in self.nodes:
                if node.proc.poll() is not None:
                    raise RuntimeError(f"a Ray node exited at start: {node.log.read_text()[-2000:]}")
            if time.time() > deadline:
                raise RuntimeError(f"{len(alive)} of {count} Ray nodes alive after {timeout} s")
            time.sleep(0.3)

    def kill_node(self, node: Node) -> list[int]:
        """SIGKILL the node's raylet (the node is lost), then what is left of the node; the raylet PIDs."""
        raylets = node.raylet_pids()
        signal_all({p: node.tracked[p] for p in raylets}, signal.SIGKILL)
        time.sleep(0.5)
        node.refresh()
        signal_all(node.tracked, signal.SIGKILL)
        return raylets

    def stop(self) -> None:
        for node in self.nodes:
            node.refresh()
        tracked = {pid: t for node in self.nodes for pid, t in node.tracked.items()}
        signal_all(tracked, signal.SIGTERM)
        deadline = time.time() + 2
        while time.time() < deadline and any(_start_time(p) == t for p, t in tracked.items() if t is not None):
            time.sleep(0.2)
        signal_all(tracked, signal.SIGKILL)
        for node in self.nodes:
            try:
                node.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)
