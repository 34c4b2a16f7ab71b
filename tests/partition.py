"""A silent network for one loopback address: iptables DROP rules both ways, always undone.

Each pg-watchdog instance connects to its own server address (127.0.0.2, 127.0.0.3); the
kernel picks 127.0.0.1 as the client side of every loopback connection, so the rules
match the server address: ``-d`` drops what the instance sends, ``-s`` what the server
answers. That silences the instance's every connection, including the new ones it opens
from fresh ports. Used by tests/test_failover.py and bench/failover.py.
"""

from __future__ import annotations

import subprocess
from types import TracebackType

from watchdog.commands.demo.tempcluster import TempCluster

LEADER_ADDR = "127.0.0.2"
FOLLOWER_ADDR = "127.0.0.3"
# start_cluster(settings=...) for a server that listens on all three.
LISTEN = {"listen_addresses": "'127.0.0.1,127.0.0.2,127.0.0.3'"}


def allow_loopback(cluster: TempCluster) -> None:
    """Password logins from every 127/8 address (initdb's pg_hba.conf covers 127.0.0.1 only);
    clients find the password for the addresses in LISTEN (tempcluster.listen_hosts)."""
    with (cluster.datadir / "pg_hba.conf").open("a") as f:
        f.write("host all all 127.0.0.0/8 scram-sha-256\n")
    cluster.psql("SELECT pg_reload_conf()")


def dsn_via(cluster: TempCluster, addr: str, user: str = "watchdog") -> str:
    """A DSN for ``cluster`` through the loopback address ``addr``."""
    return f"postgresql://{user}@{addr}:{cluster.port}/postgres"


class Partition:
    """``with Partition(addr) as p: p.cut()``: DROP everything from and to ``addr`` on lo."""

    def __init__(self, addr: str) -> None:
        self.rules = [
            ["INPUT", "-i", "lo", "-s", addr, "-j", "DROP"],
            ["INPUT", "-i", "lo", "-d", addr, "-j", "DROP"],
        ]

    def cut(self) -> None:
        for rule in self.rules:
            subprocess.run(["iptables", "-w", "-I", *rule], check=True, timeout=30)

    def heal(self) -> None:
        """Remove every copy of the rules (idempotent, safe to call twice)."""
        for rule in self.rules:
            while (
                subprocess.run(
                    ["iptables", "-w", "-D", *rule], capture_output=True, timeout=30
                ).returncode
                == 0
            ):
                pass

    def __enter__(self) -> Partition:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.heal()
