"""A throwaway Consul cluster on loopback for fault tests and benchmarks: 3 servers and
2 client agents, each on its own 127.0.0.x address, that can be killed, restarted and
cut off from each other with iptables.

Not used by the backend itself. Partitions add iptables rules and the members bind
addresses of 127.0.0.0/8, so it refuses to run outside a private network namespace
(``unshare -n`` as root, then ``ip link set lo up``): ``netns_problem()`` says why it
cannot run here. Members gossip and elect with Consul's own timings (the agent's, not
``-dev``'s: a node is marked failed after ~6 s); only raft runs at ``-dev`` speed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

__all__ = ["ClusterError", "DevCluster", "Member", "netns_problem"]

log = logging.getLogger("discovery_consul.devcluster")

HTTP_PORT = 8500
SERF_LAN_PORT = 8301
UID_BASE = 64700  # each member runs as UID_BASE + n so rules can match what it sends
SERVER_ADDRESSES = ("127.0.0.11", "127.0.0.12", "127.0.0.13")
AGENT_ADDRESSES = {"agent-a": "127.0.0.21", "agent-b": "127.0.0.22"}
CHAIN = "DISCOVERY"  # chains DISCOVERY-INPUT and DISCOVERY-OUTPUT hold the partitions
_HOOKS = ("INPUT", "OUTPUT")
_ALIVE = 1  # serf's member status: 1 alive, 3 left, 4 failed
_REQUEST_TIMEOUT = 2.0


class ClusterError(RuntimeError):
    """The cluster could not be brought to the state asked (the message has the logs)."""


def netns_problem() -> str | None:
    """Why a DevCluster cannot run in this process (None: it can).

    It needs root, iptables, setpriv, a ``consul`` binary and a network namespace whose only
    interface is an up loopback (``unshare -n`` makes one), so that its rules and
    addresses can reach nothing else.
    """
    if shutil.which("consul") is None:
        return "no `consul` binary on PATH"
    if shutil.which("iptables") is None:
        return "no `iptables` on PATH (Debian: apt-get install iptables)"
    if shutil.which("setpriv") is None:
        return "no `setpriv` on PATH (util-linux)"
    if os.geteuid() != 0:
        return "not root: partitions need iptables in a network namespace of our own"
    others = sorted(name for _, name in socket.if_nameindex() if name != "lo")
    if others:
        return (
            f"not in a private network namespace (this one has {', '.join(others)}): "
            "run under `unshare -n` as root (tests/cluster/run does)"
        )
    try:
        with socket.create_server((SERVER_ADDRESSES[0], 0)) as listener:
            socket.create_connection(listener.getsockname(), timeout=1).close()
    except OSError:
        return "the loopback is down in this network namespace: `ip link set lo up` first"
    return None


def _get(address: str, path: str) -> Any:
    """GET a JSON answer from an agent's HTTP API; None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=_REQUEST_TIMEOUT) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


class Member:
    """One Consul agent of the cluster: its node name is ``name``, every port on ``address``."""

    def __init__(self, name: str, address: str, uid: int, *, server: bool, data: Path, logs: Path, binary: str) -> None:
        self.name = name
        self.address = address
        self.uid = uid
        self.server = server
        self.binary = binary
        self.data_dir = data / name
        self.log_path = logs / f"{name}.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def http_address(self) -> str:
        return f"{self.address}:{HTTP_PORT}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _command(self) -> list[str]:
        command = [
            self.binary,
            "agent",
            f"-node={self.name}",
            f"-bind={self.address}",
            f"-client={self.address}",
            f"-advertise={self.address}",
            f"-data-dir={self.data_dir}",
            "-dns-port=-1",
            "-retry-interval=1s",
            *(f"-retry-join={server}" for server in SERVER_ADDRESSES),
            # -dev's raft timings (Consul 1.8's default multiplier is 5): elections in ~1 s.
            "-hcl=performance { raft_multiplier = 1 }",
        ]
        if self.server:
            command += ["-server", f"-bootstrap-expect={len(SERVER_ADDRESSES)}"]
        return command

    def start(self, *, fresh: bool = False) -> None:
        """Start the agent (``fresh``: with an empty data dir, a new node ID)."""
        if self.running:
            return
        if fresh:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.data_dir, self.uid, self.uid)
        self._log = self.log_path.open("ab")
        self._log.write(f"==== start {'fresh ' if fresh else ''}at {time.strftime('%H:%M:%S')}\n".encode())
        self._log.flush()
        # setpriv, not Popen(user=...): changing users makes subprocess fork() instead of
        # vfork(), and a fork of a process busy with gRPC threads crashed the child now
        # and then (SIGSEGV/SIGABRT before exec, ~1 start in 40 under load).
        setpriv = ["setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups", "--"]
        self._process = subprocess.Popen(
            [*setpriv, *self._command()], stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.info("started %s at %s", self.name, self.address)

    def kill(self) -> None:
        """SIGKILL: no leave, no graceful anything, as a crashed host."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(timeout=10)
            log.info("killed %s", self.name)
        if self._log is not None:
            self._log.close()
            self._log = None

    def exited(self) -> int | None:
        """The exit code if the agent exited by itself; None while running or never started."""
        return None if self._process is None else self._process.poll()

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __repr__(self) -> str:
        return f"<Member {self.name} {self.address} {'running' if self.running else 'down'}>"


class DevCluster:
    """Three servers (``servers``) and two client agents (``a``, ``b``) of one datacenter.

    ``start()`` returns once a leader is elected and every member is alive. Faults:
    ``kill``/``restart`` a member, ``partition``/``heal`` one. ``close()`` kills every
    agent, removes every rule and the data dirs (logs stay when ``directory`` is given).
    """

    def __init__(
        self, *, directory: str | os.PathLike[str] | None = None, binary: str = "consul", timeout: float = 30.0
    ) -> None:
        found = shutil.which(binary)
        if found is None:
            raise ClusterError(f"no {binary!r} on PATH")
        self._data = tempfile.TemporaryDirectory(prefix="consul-cluster-")
        data = Path(self._data.name)
        data.chmod(0o755)  # the members run as users of their own
        logs = Path(directory) if directory else data
        self.timeout = timeout
        specs = [(f"server-{n}", address, True) for n, address in enumerate(SERVER_ADDRESSES, 1)]
        specs += [(name, address, False) for name, address in AGENT_ADDRESSES.items()]
        self.members = tuple(
            Member(name, address, UID_BASE + n, server=server, data=data, logs=logs, binary=found)
            for n, (name, address, server) in enumerate(specs)
        )
        self.servers = self.members[: len(SERVER_ADDRESSES)]
        self.a, self.b = self.members[len(SERVER_ADDRESSES) :]
        self._partitions: dict[str, list[list[str]]] = {}  # member name -> its rules
        self._chain = False

    # -- observing ---------------------------------------------------------------------

    def leader(self, via: Member | None = None) -> Member | None:
        """The leader as ``via`` (default: any running server) sees it; None if none."""
        for member in [via] if via else self.servers:
            if member.running:
                answer = _get(member.http_address, "/v1/status/leader")
                if isinstance(answer, str) and answer:
                    host = answer.rsplit(":", 1)[0]
                    return next((s for s in self.servers if s.address == host), None)
        return None

    def member_status(self, via: Member | None = None) -> dict[str, int]:
        """Serf's member status per node name as ``via`` sees it (default: a running server)."""
        for member in [via] if via else self.servers:
            if member.running:
                answer = _get(member.http_address, "/v1/agent/members")
                if isinstance(answer, list):
                    return {m["Name"]: m["Status"] for m in answer}
        return {}

    def node_health(self, member: Member, via: Member | None = None) -> str | None:
        """The catalog's ``serfHealth`` status of ``member``'s node (passing, critical)."""
        for reader in [via] if via else self.servers:
            if reader.running:
                checks = _get(reader.http_address, f"/v1/health/node/{urllib.parse.quote(member.name)}")
                if isinstance(checks, list):
                    return next((c["Status"] for c in checks if c["CheckID"] == "serfHealth"), None)
        return None

    def services(self, member: Member) -> list[str]:
        """The IDs of the services registered in ``member`` (empty when it does not answer)."""
        answer = _get(member.http_address, "/v1/agent/services") if member.running else None
        return list(answer) if isinstance(answer, dict) else []

    def in_catalog(self, member: Member) -> bool:
        """Whether the catalog holds ``member``'s node under the ID it runs with now (the
        servers refuse a new ID for a name they know, as after a restart with a fresh
        data dir: "Node name ... is reserved", until the leader reconciles it)."""
        me = _get(member.http_address, "/v1/agent/self") if member.running else None
        if not isinstance(me, dict):
            return False
        for reader in self.servers:
            if reader.running:
                node = _get(reader.http_address, f"/v1/catalog/node/{urllib.parse.quote(member.name)}")
                if isinstance(node, dict):
                    return bool(node["Node"]["ID"] == me["Config"]["NodeID"])
        return False

    def healthy(self) -> bool:
        """A leader known to every member, and every member alive in serf and the catalog."""
        if not all(m.running for m in self.members):
            return False
        leaders = {self.leader(via=m) for m in self.members}
        if len(leaders) != 1 or None in leaders:
            return False
        status = self.member_status()
        if any(status.get(m.name) != _ALIVE for m in self.members):
            return False
        return all(self.node_health(m) == "passing" for m in self.members)

    def wait(self, condition: Callable[[], bool], what: str, timeout: float | None = None) -> float:
        """Wait for ``condition``; the seconds it took. ClusterError (with logs) at the deadline
        or when an agent exits by itself."""
        started = time.monotonic()
        deadline = started + (self.timeout if timeout is None else timeout)
        while not condition():
            dead = [m for m in self.members if m.exited() not in (None, -signal.SIGKILL)]
            if dead:
                codes = ", ".join(f"{m.name} (code {m.exited()})" for m in dead)
                raise ClusterError(f"{codes} exited while waiting for {what}{self._logs()}")
            if time.monotonic() > deadline:
                raise ClusterError(f"not within {deadline - started:.0f} s: {what}{self._logs()}")
            time.sleep(0.05)  # polling Consul's HTTP API: it has no event for these
        return time.monotonic() - started

    def wait_healthy(self, timeout: float | None = None) -> float:
        return self.wait(self.healthy, "a leader and all 5 members alive", timeout)

    def _logs(self) -> str:
        return "".join(f"\n--- {m.name} ({m.log_path}):\n{m.log_tail()}" for m in self.members)

    # -- faults ------------------------------------------------------------------------

    def start(self) -> Self:
        """Start every member that is not running and wait until the cluster is healthy."""
        try:
            for member in self.members:
                member.start()
            self.wait_healthy()
        except BaseException:
            self.close()
            raise
        return self

    def kill(self, member: Member) -> None:
        member.kill()

    def restart(self, member: Member, *, fresh: bool = False) -> None:
        """Kill ``member`` if running and start it again (``fresh``: empty data dir);
        returns at once (``wait_healthy`` waits for it to rejoin)."""
        member.kill()
        member.start(fresh=fresh)

    def partition(self, member: Member) -> None:
        """Cut ``member`` off from every other member, both ways (cut off from the servers
        alone, gossip would still reach it through the other client agent). Calls to its
        HTTP API and its checks of local services still pass.

        Packets are dropped where they arrive (INPUT), silently, as a real partition
        loses them: a drop in OUTPUT fails the sender's ``sendto`` with EPERM, which
        memberlist takes for a local error and abandons the probe, so the node is never
        suspected (measured with Consul 1.8.7: never marked failed in 30 s). Gossip over
        TCP is dialled from 127.0.0.1, not the member's address: into the member it is
        dropped by its serf port, out of it by its user (in OUTPUT; only the member
        itself sees those errors).
        """
        self._ensure_chain()
        rules = self._partitions.setdefault(member.name, [])
        for peer in (m for m in self.members if m is not member):
            rules += [
                ["INPUT", "-s", member.address, "-d", peer.address],
                ["INPUT", "-s", peer.address, "-d", member.address],
                ["OUTPUT", "-p", "tcp", "-m", "owner", "--uid-owner", str(member.uid), "-d", peer.address],
            ]
        rules.append(["INPUT", "-d", member.address, "-p", "tcp", "--dport", str(SERF_LAN_PORT)])
        for hook, *match in rules:
            _iptables("-A", f"{CHAIN}-{hook}", *match, "-j", "DROP")
        log.info("partitioned %s", member.name)

    def heal(self, member: Member) -> None:
        """Remove the rules ``partition(member)`` added."""
        for hook, *match in self._partitions.pop(member.name, []):
            _iptables("-D", f"{CHAIN}-{hook}", *match, "-j", "DROP")
        log.info("healed %s", member.name)

    def _ensure_chain(self) -> None:
        if self._chain:
            return
        problem = netns_problem()
        if problem:
            raise ClusterError(f"refusing to add iptables rules: {problem}")
        self._chain = True
        for hook in _HOOKS:
            _iptables("-N", f"{CHAIN}-{hook}")
            _iptables("-I", hook, "-j", f"{CHAIN}-{hook}")

    def _remove_chain(self) -> None:
        if not self._chain:
            return
        self._partitions.clear()
        for hook in _HOOKS:
            _iptables("-D", hook, "-j", f"{CHAIN}-{hook}")
            _iptables("-F", f"{CHAIN}-{hook}")
            _iptables("-X", f"{CHAIN}-{hook}")
        self._chain = False

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        errors: list[str] = []
        for member in self.members:
            try:
                member.kill()
            except (OSError, subprocess.TimeoutExpired) as exc:
                errors.append(f"{member.name}: {exc}")
        try:
            self._remove_chain()
        except ClusterError as exc:
            errors.append(str(exc))
        self._data.cleanup()
        if errors:
            raise ClusterError("; ".join(errors))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        states = " ".join(f"{m.name}:{'up' if m.running else 'down'}" for m in self.members)
        return f"<DevCluster {states}>"


def _iptables(*arguments: str) -> None:
    result = subprocess.run(
        ["iptables", "-w", "5", *arguments], check=False, capture_output=True, text=True, timeout=10
    )
    if result.returncode != 0:
        raise ClusterError(f"iptables {' '.join(arguments)}: {result.stderr.strip()}")
