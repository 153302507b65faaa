"""Processes and servers a test starts on this machine: what runs (found through /proc), what listens, free
loopback ports, a server's health, and real Ray nodes (`ray start` processes on loopback addresses, each in its
own session, with their own ports, temp dir and cluster token, so that a test stops exactly the processes it
started while other Ray clusters run on the machine, and nothing listens beyond loopback)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlflow import MlflowClient

from orchestrator.tracking import TRIAL_ID_TAG

REPO = Path(__file__).resolve().parents[1]
SAU = [sys.executable, "-m", "orchestrator.cli"]  # the `sau` command on this checkout's code
RAY = str(Path(sys.executable).with_name("ray"))
LOOPBACK = {"127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"}  # the host part of a listening address on loopback


def sau(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`sau ARGS` in a process of its own, with this one's environment and this checkout on its path."""
    return subprocess.run([*SAU, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def sync_runs(storage: str, uri: str, grid: str, created: int, had: int) -> list:
    """`sau sync STORAGE --tracking-uri URI`, which must say it created `created` runs and found `had` rows with
    one; returns the trials' runs in the experiment of `grid` at `uri`."""
    result = sau("sync", storage, "--tracking-uri", uri)
    assert result.returncode == 0, result.stderr
    assert f"{created} runs created, {had} rows already had one" in result.stdout
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(grid)
    return client.search_runs([experiment.experiment_id], f"tags.`{TRIAL_ID_TAG}` != ''")


def _stats() -> dict[int, tuple[int, int, str]]:
    """Every process that is not a zombie: pid -> (ppid, session, name)."""
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, fields = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        state, ppid, _, session = fields.split()[:4]  # fields after "(comm)": state, ppid, pgrp, session
        if state != "Z":
            stats[int(stat.parent.name)] = (int(ppid), int(session), comm.partition("(")[2])
    return stats


def session_pids(sid: int) -> list[int]:
    """The living processes of session `sid` (a process started with start_new_session, and all it started)."""
    return [pid for pid, (_, session, _) in _stats().items() if session == sid]


def process_tree(root: int) -> dict[int, str]:
    """`root` and its living descendants, by pid, with their names."""
    stats = _stats()
    tree, grew = ({root: stats[root][2]} if root in stats else {}), True
    while grew:
        new = {pid: name for pid, (ppid, _, name) in stats.items() if ppid in tree and pid not in tree}
        tree.update(new)
        grew = bool(new)
    return tree


def process_name(pid: int) -> str:
    stats = _stats()
    return stats[pid][2] if pid in stats else ""


def alive(pids) -> list[int]:
    stats = _stats()
    return [pid for pid in pids if pid in stats]


def listening_addresses(pids) -> list[str]:
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if any(f"pid={pid}," in line for pid in pids)]


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (Ray's daemons outlive the process that started them)."""
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(server: subprocess.Popen, uri: str, seconds: float) -> None:
    """Wait until `uri`/health answers 200; fail if the server exits or `seconds` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                return
        except OSError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
        time.sleep(0.5)


class LocalCluster:
    """A head node and worker nodes on loopback addresses, each a `ray start --block` process in its own
    session. `env` is what a client of this cluster needs (token, PATH of this interpreter's environment)."""

    def __init__(self, temp_dir: Path, head_cpus: int, head_ip: str = "127.0.0.1"):
        """`head_ip` 127.0.0.1 makes a single-node cluster: Ray rewrites that address to the machine's network
        address wherever multi-node clusters are enabled, which a worker's `ray start --address` needs, so a
        cluster that will have workers takes another loopback address (127.0.0.11)."""
        self.temp_dir = temp_dir
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"{head_ip}:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # The Jobs API starts entrypoints with the `python` on the PATH `ray start` ran with.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[subprocess.Popen] = []
        self._start(["--head", "--port", str(self.port), "--node-ip-address", head_ip,
                     "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                     "--ray-client-server-port", str(free_port()), "--temp-dir", str(temp_dir),
                     "--num-cpus", str(head_cpus), "--num-gpus", "0"],
                    {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0" if head_ip == "127.0.0.1" else "1"})

    def add_worker(self, ip: str, cpus: int) -> subprocess.Popen:
        """A worker node on the loopback address `ip` (127.0.0.2, ...); returns its `ray start` process."""
        return self._start(["--address", self.address, "--node-ip-address", ip, "--num-cpus", str(cpus),
                            "--num-gpus", "0"], {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})

    def _start(self, args: list[str], env: dict) -> subprocess.Popen:
        agent_ports = ["--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())]
        log = open(self.temp_dir / f"ray-start-{len(self.nodes)}.log", "w")
        node = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args, *agent_ports],
                                env={**self.env, **env}, start_new_session=True, stdout=log, stderr=log)
        self.nodes.append(node)
        # A node counts once the GCS lists it alive; nodes whose `ray start` has ended (killed) do not.
        deadline = time.monotonic() + 180
        while self.alive_nodes() < sum(n.poll() is None for n in self.nodes):
            assert node.poll() is None, f"ray start exited {node.returncode}: see {log.name}"
            assert time.monotonic() < deadline, f"Ray node not alive after 180 s: see {log.name}"
            time.sleep(1)
        return node

    def alive_nodes(self) -> int:
        out = subprocess.run([RAY, "list", "nodes", "--address", self.dashboard, "--filter", "state=ALIVE",
                              "--format", "json"], env=self.env, capture_output=True, text=True)
        try:
            return len(json.loads(out.stdout))
        except ValueError:
            return 0

    def pids(self) -> list[int]:
        return [pid for node in self.nodes for pid in session_pids(node.pid)]

    def stop(self) -> None:
        """Stop this cluster's processes only: SIGTERM to each node's `ray start --block`, then SIGKILL."""
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGTERM)
        for node in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=20)
            kill_session(node.pid)
            node.wait()
