"""A throwaway ``consul agent -dev`` on free loopback ports, for tests and benchmarks.

Not used by the backend itself: it lets a test suite or ``bench/propagation.py`` run
against a real agent without Docker, given a ``consul`` binary on PATH (HashiCorp's
release zip, its apt/yum repository, or a distribution package). The agent can be
killed and started again on the same ports, which is how a lost agent state looks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = ["DevAgent", "DevAgentError", "connections_to", "free_port", "populate"]

log = logging.getLogger("discovery_consul.devagent")

_PORT_NAMES = ("http", "dns", "serf_lan", "serf_wan", "server", "grpc")


class DevAgentError(RuntimeError):
    """The agent could not be started (no binary, it exited, it never elected itself)."""


def free_port() -> int:
    """A TCP and UDP port free on 127.0.0.1 right now (serf needs both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


def connections_to(address: str) -> int:
    """How many TCP connections this process has open to ``host:port`` (IPv4), from
    /proc: the sockets among its file descriptors whose peer is that address."""
    host, port = address.rsplit(":", 1)
    peer = f"{socket.inet_aton(host)[::-1].hex().upper()}:{int(port):04X}"
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        # fields: sl, local, remote, state (01 = ESTABLISHED), ..., inode at 9
        if fields[2] == peer and fields[3] == "01" and fields[9] in inodes:
            count += 1
    return count


def populate(
    address: str, prefix: str, services: int, instances: int, *, per_node: int = 100, checks: bool = True
) -> None:
    """Put ``services`` x ``instances`` instances into the catalog on nodes of their
    own, each with a passing check (unless ``checks`` is False), through ``/v1/txn`` 64
    operations at a time: a crowded datacenter in seconds, with no agent holding them
    (other nodes' instances, as in production). The services are named
    ``<prefix>-0000`` and on."""
    entries = [(f"{prefix}-{s:04d}", n) for s in range(services) for n in range(instances)]
    operations: list[dict[str, object]] = []
    for k, (service, n) in enumerate(entries):
        node = f"{prefix}-node-{k // per_node}"
        if k % per_node == 0:
            operations.append({"Node": {"Verb": "set", "Node": {"Node": node, "Address": "127.0.0.9"}}})
        instance_id = f"{service}-{n}"
        body = {"ID": instance_id, "Service": service, "Address": "127.0.0.9", "Port": 10000 + n}
        operations.append({"Service": {"Verb": "set", "Node": node, "Service": body}})
        if checks:
            check = {"Node": node, "CheckID": f"service:{instance_id}", "Name": "ttl", "Status": "passing"}
            operations.append({"Check": {"Verb": "set", "Check": {**check, "ServiceID": instance_id}}})
    for start in range(0, len(operations), 64):
        request = urllib.request.Request(
            f"http://{address}/v1/txn", json.dumps(operations[start : start + 64]).encode(), method="PUT"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()


class DevAgent:
    """One ``consul agent -dev`` process; ``address`` is its HTTP (or HTTPS) ``host:port``.

    ``host`` is the loopback address it binds (127.0.0.1; another one, such as
    127.0.0.77, keeps a test's agent apart from clients a former agent left behind).
    ``hcl`` is extra agent configuration (ACLs, TLS); ``config_files`` are loaded too
    (a JSON file of ``services`` preloads thousands of instances in a second).
    ``https=True`` adds an HTTPS
    port and makes ``address`` point at it (the HTTP port stays on for readiness).
    The log goes to ``log_path`` (a temporary file unless given).
    """

    def __init__(
        self,
        *,
        binary: str = "consul",
        hcl: str = "",
        https: bool = False,
        log_path: str | os.PathLike[str] | None = None,
        start_timeout: float = 30.0,
        token: str | None = None,
        config_files: tuple[str | os.PathLike[str], ...] = (),
        host: str = "127.0.0.1",
    ) -> None:
        found = shutil.which(binary)
        if found is None:
            raise DevAgentError(f"no {binary!r} on PATH")
        self.binary = found
        self.ports = {name: free_port() for name in _PORT_NAMES}
        self.https_port = free_port() if https else None
        self.hcl = hcl
        self.config_files = tuple(config_files)
        self.host = host  # another loopback address keeps clients of other agents away
        self.start_timeout = start_timeout
        self._token = token
        self._tmp = tempfile.TemporaryDirectory(prefix="consul-dev-")
        self.log_path = Path(log_path) if log_path else Path(self._tmp.name) / "consul.log"
        self._log: IO[bytes] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        port = self.https_port if self.https_port is not None else self.ports["http"]
        return f"{self.host}:{port}"

    @property
    def http_address(self) -> str:
        return f"{self.host}:{self.ports['http']}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _command(self) -> list[str]:
        ports = self.ports
        command = [
            self.binary,
            "agent",
            "-dev",
            f"-bind={self.host}",
            f"-client={self.host}",
            f"-http-port={ports['http']}",
            f"-dns-port={ports['dns']}",
            f"-serf-lan-port={ports['serf_lan']}",
            f"-serf-wan-port={ports['serf_wan']}",
            f"-server-port={ports['server']}",
            f"-grpc-port={ports['grpc']}",
        ]
        if self.https_port is not None:
            command.append(f"-hcl=ports {{ https = {self.https_port} }}")
        if self.hcl:
            command.append(f"-hcl={self.hcl}")
        command += [f"-config-file={path}" for path in self.config_files]
        return command

    def start(self) -> None:
        """Start the agent and wait until it has elected itself leader."""
        if self.running:
            return
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            self._command(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        url = f"http://{self.http_address}/v1/status/leader"
        request = urllib.request.Request(url, headers={"X-Consul-Token": self._token} if self._token else {})
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise DevAgentError(f"consul exited at start; its log:\n{self.log_tail()}")
            with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(request, timeout=1) as response:
                if json.loads(response.read()):
                    return
            time.sleep(0.05)  # polling a process we started; no event to wait on
        raise DevAgentError(f"consul elected no leader within {self.start_timeout} s; its log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """Kill the agent at once (SIGKILL): a -dev agent loses all its state."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(timeout=10)
        self._close_log()

    def stop(self) -> None:
        """Stop the agent (SIGTERM, then SIGKILL after 10 s)."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._close_log()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The agent stopped (SIGSTOP) and resumed on leaving: the kernel still accepts
        connections for it, but nothing answers, as with a blackholed agent."""
        if self._process is None:
            raise DevAgentError("the agent is not running")
        self._process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self._process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Kill and start again on the same ports, with no state."""
        self.kill()
        self.start()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<DevAgent {self.address} {'running' if self.running else 'stopped'}>"
