"""A local RabbitMQ cluster on loopback, for development, tests and chaos (``sagactl cluster``).

Each node is a ``rabbitmq-server`` of its own: its own node name, AMQP and distribution ports,
data, log and config files under one temporary folder, and an Erlang cookie of its own (a private
``HOME``), so the machine's own node (``rabbit@localhost`` on 5672) is never touched: this module
never calls ``rabbitmqctl`` without ``-n`` naming one of its own nodes. See FACTS.md, "RabbitMQ
cluster on loopback", for why each variable is set.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# Not the /usr/sbin wrappers: as root they switch to the rabbitmq user and its cookie.
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
# What a node's scripts need (erl, sh); the nodes get no other variable of this process.
NODE_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
START_TIMEOUT_S = 120.0


class ClusterError(RuntimeError):
    """A node would not start, join or answer."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    """One node: its name, ports and files. ``env`` is what every command about it runs with."""

    name: str  # full node name, e.g. rmq1_ab12cd@localhost
    port: int
    dist_port: int
    base: Path
    home: Path

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.base / "pid"

    def env(self) -> dict[str, str]:
        return {
            "PATH": NODE_PATH,
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            # Erlang distribution on loopback only, like the AMQP listener.
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def write_files(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "rabbitmq-env.conf").write_text("# own file: not /etc/rabbitmq's\n")
        (self.base / "rabbitmq.conf").write_text(
            "loopback_users = none\n"
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            # A node paused or killed must not stop the others from accepting publishes.
            "cluster_partition_handling = ignore\n"
        )
        (self.base / "advanced.config").write_text("[].\n")
        (self.base / "enabled_plugins").write_text("[].\n")

    def ctl(self, *args: str, timeout_s: float = 60, check: bool = True) -> str:
        """``rabbitmqctl -n <this node> ...``; never without ``-n``."""
        result = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.name, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if check and result.returncode != 0:
            raise ClusterError(
                f"rabbitmqctl -n {self.name} {' '.join(args)}: "
                f"{(result.stderr or result.stdout).strip()[-800:]}"
            )
        return result.stdout

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def alive(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return process_running(pid)

    def start(self) -> None:
        """Start the node detached (a stale pid file after a SIGKILL is removed first)."""
        if self.alive():
            return
        self.pid_file.unlink(missing_ok=True)
        subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmq-server"), "-detached"],
            env=self.env(),
            capture_output=True,
            timeout=60,
            check=True,
        )

    def wait_started(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                self.ctl("await_startup", timeout_s=max(5.0, deadline - time.monotonic()))
                return
            except (ClusterError, subprocess.TimeoutExpired) as exc:
                last = str(exc)
                time.sleep(0.5)
        raise ClusterError(f"{self.name} did not start within {timeout_s:.0f}s: {last}")

    def signal(self, sig: int) -> None:
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self) -> None:
        """SIGKILL, as a machine losing power would; waits until the process is gone."""
        self.signal(signal.SIGKILL)
        self._wait_gone(30)

    def stop(self) -> None:
        """A clean stop of the whole node (``rabbitmqctl stop``); SIGKILL if that fails."""
        if not self.alive():
            return
        with contextlib.suppress(ClusterError, subprocess.TimeoutExpired):
            self.ctl("stop", timeout_s=60)
        if not self._wait_gone(30):
            self.kill()

    def _wait_gone(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                return True
            time.sleep(0.1)
        return False


def process_running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass
class Cluster:
    """N nodes joined into one cluster under ``root``; ``stop()`` removes every trace."""

    nodes: list[Node]
    root: Path
    say: Callable[[str], None] = field(default=lambda _: None)

    @classmethod
    def create(
        cls, count: int = 3, say: Callable[[str], None] = lambda _: None, parent: str | None = None
    ) -> Cluster:
        if count < 1:
            raise ValueError("a cluster has at least one node")
        if not (RABBITMQ_BIN / "rabbitmq-server").exists():
            raise ClusterError(f"no rabbitmq-server in {RABBITMQ_BIN}")
        root = Path(tempfile.mkdtemp(prefix="rmqcluster-", dir=parent))
        home = root / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        tag = secrets.token_hex(3)
        nodes = [
            Node(f"rmq{i}_{tag}@localhost", _free_port(), _free_port(), root / f"rmq{i}", home)
            for i in range(1, count + 1)
        ]
        cluster = cls(nodes, root, say)
        try:
            cluster._start()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start(self) -> None:
        started = time.monotonic()
        for node in self.nodes:
            node.write_files()
            node.start()
        for node in self.nodes:
            node.wait_started()
        self.say(f"cluster: {len(self.nodes)} node(s) up in {time.monotonic() - started:.1f}s")
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name, timeout_s=120)
            node.ctl("start_app", timeout_s=120)
        if len(self.nodes) > 1:
            self.say(f"cluster: joined in {time.monotonic() - started:.1f}s after start")

    @property
    def broker_url(self) -> str:
        """kombu's failover syntax: every node, ``;``-separated (default vhost)."""
        return ";".join(f"{node.url}//" for node in self.nodes)

    def url_for_vhost(self, vhost: str) -> str:
        return ";".join(f"{node.url}/{vhost}" for node in self.nodes)

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def any_running(self) -> Node:
        for node in self.nodes:
            if node.alive():
                return node
        raise ClusterError("no node of the cluster is running")

    def ctl(self, *args: str, timeout_s: float = 60) -> str:
        """``rabbitmqctl`` against a running node of this cluster (never the machine's node)."""
        return self.any_running().ctl(*args, timeout_s=timeout_s)

    def add_vhost(self, vhost: str) -> None:
        self.ctl("add_vhost", vhost)
        self.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")

    def queue_leaders(self, vhost: str) -> dict[str, str]:
        """queue name -> the node that leads it (quorum queues)."""
        out = self.ctl("-q", "list_queues", "-p", vhost, "name", "type", "leader")
        leaders = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[1] == "quorum":
                leaders[parts[0]] = parts[2]
        return leaders

    def restart(self, node: Node) -> float:
        """Start a stopped or killed node again; returns seconds until it was up."""
        started = time.monotonic()
        node.start()
        node.wait_started()
        return time.monotonic() - started

    def stop(self) -> None:
        """Stop every node (SIGKILL if a clean stop fails) and remove the folder."""
        for node in self.nodes:
            node.signal(signal.SIGCONT)  # a paused node cannot stop
        for node in self.nodes:
            try:
                node.stop()
            except Exception as exc:
                self.say(f"cluster: stopping {node.name} failed ({exc}); killing it")
                node.kill()
        _kill_leftovers(self.root)
        shutil.rmtree(self.root, ignore_errors=True)
        self.say("cluster: stopped and removed")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _kill_leftovers(root: Path) -> None:
    """Erlang helpers (``erl_child_setup``, ``inet_gethost``) a killed node may leave: any
    process whose command line names this cluster's folder."""
    marker = str(root)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)
