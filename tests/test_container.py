"""The container image, built here with no registry: deploy/container/debian-base (debootstrap)
and deploy/container/build, once per suite run; then real containers (podman, --network host)
against the real servers the tests start: check, the service, failover, the reload sidecar.

All of it lives in this one file: with `--dist loadfile` one worker builds the image once.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon import audit_records, backend_alive
from helpers import free_port, sweeps_ran, wait_for
from prometheus_client.parser import text_string_to_metric_families
from scenario import APP_ROLE, idle_app_session, setup_roles
from test_health import status

from watchdog.commands.demo.tempcluster import TempCluster

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "container"
UID = 10001  # the image's user (Containerfile APP_UID)
RUN = uuid.uuid4().hex[:10]  # names every image and container of this run
SERIAL = itertools.count()
ENV = {**os.environ, "CONTAINERS_CONF": str(REPO / "tests" / "containers.conf")}
# The image build (debootstrap included) runs in the first test's setup.
pytestmark = pytest.mark.timeout(900)


def podman(*args: str, timeout: float = 120, check: bool = True
           ) -> subprocess.CompletedProcess[str]:
    if shutil.which("podman") is None:
        pytest.fail("podman not found: run .ci/system-deps", pytrace=False)
    res = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                         env=ENV, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {res.returncode}\n{res.stderr}")
    return res


def script(*args: str, timeout: float = 600) -> str:
    env = {**ENV, "PYTHON": sys.executable}
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                         env=env, check=False)
    assert res.returncode == 0, f"{args[0]}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


@pytest.fixture(scope="session")
def image() -> Iterator[str]:
    """localhost/pg-watchdog-test-RUN, FROM a debootstrap base; both removed at the end."""
    base, tag = f"localhost/pg-watchdog-test-base-{RUN}", f"localhost/pg-watchdog-test-{RUN}"
    try:
        # Each prints what it made and how long it took (shown with -rA or on failure).
        sys.stderr.write(script(DEPLOY / "debian-base", "--tag", base))
        sys.stderr.write(script(DEPLOY / "build", "--base", base, "--tag", tag))
        yield tag
    finally:
        for name in (tag, base):
            podman("rmi", "--force", name, check=False)


class Containers:
    """The containers one test starts, removed in its teardown whatever happened."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.names: list[str] = []

    def run(self, *args: str, mounts: dict[Path, str], entrypoint: str | None = None,
            options: tuple[str, ...] | list[str] = ()) -> str:
        name = f"pg-watchdog-test-{RUN}-{next(SERIAL)}"
        self.names.append(name)
        opts = ["--network", "host", "--read-only", "--cap-drop", "ALL",
                "--security-opt", "no-new-privileges", "--name", name]
        for src, dest in mounts.items():
            opts += ["--volume", f"{src}:{dest}"]
        if entrypoint:
            opts += ["--entrypoint", entrypoint]
        opts += options
        podman("run", "--detach", *opts, self.image, *args)
        return name

    def logs(self, name: str) -> str:
        res = podman("logs", name, check=False)
        return res.stdout + res.stderr

    def stop(self, name: str) -> int:
        podman("stop", "--time", "60", name, timeout=90)
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip())

    def remove_all(self) -> None:
        # Newest first: a sidecar in another's PID namespace must go before it.
        failed = [
            name
            for name in reversed(self.names)
            if podman("rm", "--force", "--time", "0", name, check=False).returncode != 0
        ]
        assert not failed, f"containers left behind: {failed}"


@pytest.fixture
def containers(image: str) -> Iterator[Containers]:
    c = Containers(image)
    try:
        yield c
    finally:
        c.remove_all()


@pytest.fixture(scope="module")
def cluster(pg: TempCluster) -> TempCluster:
    setup_roles(pg)
    return pg


def volumes(root: Path, cluster: TempCluster, *, idle: str = "2s", port: int) -> dict[Path, str]:
    """A policy directory (read-only, as a ConfigMap), the server's password (as the Secret
    deploy/kubernetes mounts) and an audit directory of UID's."""
    config, audit, secret = root / "config", root / "audit", root / "credentials"
    config.mkdir(parents=True)
    audit.mkdir()
    secret.mkdir(mode=0o700)
    (secret / "password").write_text(cluster.password + "\n")
    for path in (audit, secret, secret / "password"):
        os.chown(path, UID, UID)
    (secret / "password").chmod(0o400)
    audit.chmod(0o750)
    config.chmod(0o755)
    policies(config / "policies.yaml", cluster, idle=idle, port=port)
    return {config: "/etc/pg-watchdog:ro", audit: "/var/log/pg-watchdog",
            secret: "/run/secrets/pg-watchdog:ro"}


def policies(path: Path, cluster: TempCluster, *, idle: str, port: int) -> None:
    path.write_text(
        f"""targets:
  - name: main
    dsn: {cluster.dsn("watchdog")}
    password_file: /run/secrets/pg-watchdog/password
    interval: 1s
policies:
  - name: idle
    state: idle
    longer_than: {idle}
    users: [{APP_ROLE}]
audit:
  path: /var/log/pg-watchdog/audit.jsonl
metrics:
  listen: 127.0.0.1:{port}
"""
    )
    path.chmod(0o644)


async def ready(port: int, c: Containers, name: str) -> None:
    def up() -> bool:
        return status(port, "/readyz") == 200

    try:
        await wait_for(up, timeout=60, interval=0.2, what=f"{name} /readyz 200")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{c.logs(name)}") from None


async def terminated(cluster: TempCluster, pid: int) -> None:
    async def gone() -> bool:
        return not await backend_alive(cluster, pid)

    await wait_for(gone, timeout=30, interval=0.1, what=f"backend {pid} terminated")


def leader(port: int) -> bool:
    """pg_watchdog_leader{target="main"} as the instance on ``port`` exports it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return any(
        s.value == 1
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "pg_watchdog_leader" and s.labels == {"target": "main"}
    )


async def test_image_checks_then_heals_and_stops_cleanly(
    cluster: TempCluster, containers: Containers, tmp_path: Path
) -> None:
    port = free_port()
    mounts = volumes(tmp_path, cluster, port=port)
    check = podman("run", "--rm", "--network", "host", "--read-only", "--volume",
                   f"{tmp_path / 'config'}:/etc/pg-watchdog:ro", "--volume",
                   f"{tmp_path / 'credentials'}:/run/secrets/pg-watchdog:ro", containers.image,
                   "check", "-c", "/etc/pg-watchdog/policies.yaml", "--connect")
    assert "ok" in check.stdout + check.stderr

    name = containers.run(mounts=mounts)  # the image's own CMD: run -c /etc/pg-watchdog/...
    await ready(port, containers, name)
    victim = await idle_app_session(cluster, "leaky-app")
    pid = victim.get_server_pid()
    await terminated(cluster, pid)
    log = tmp_path / "audit" / "audit.jsonl"
    await wait_for(lambda: any(r["pid"] == pid for r in audit_records(log)), timeout=10,
                   what="the audit record on the volume")
    (record,) = [r for r in audit_records(log) if r["pid"] == pid]
    assert (record["outcome"], record["policy"], record["usename"]) == ("terminated", "idle", "app")
    assert log.stat().st_uid == UID  # written by the image's non-root user

    assert containers.stop(name) == 0
    assert "stopped" in containers.logs(name)
    await victim.close(timeout=1)


async def test_two_containers_one_acts_and_the_other_takes_over(
    cluster: TempCluster, containers: Containers, tmp_path: Path
) -> None:
    ports = [free_port(), free_port()]
    mounts = [volumes(tmp_path / f"w{i}", cluster, port=ports[i]) for i in range(2)]
    names = [containers.run(mounts=m) for m in mounts]
    for port, name in zip(ports, names, strict=True):
        await ready(port, containers, name)
    await wait_for(lambda: leader(ports[0]) != leader(ports[1]), timeout=30, what="one leader")
    first = 0 if leader(ports[0]) else 1
    second = 1 - first
    logs = [tmp_path / f"w{i}" / "audit" / "audit.jsonl" for i in range(2)]

    victim = await idle_app_session(cluster, "leaky-app")
    pid = victim.get_server_pid()
    await terminated(cluster, pid)
    await wait_for(lambda: any(r["pid"] == pid for r in audit_records(logs[first])), timeout=10,
                   what="the leader's record")
    await sweeps_ran(cluster, 4)
    assert audit_records(logs[second]) == []  # the observer never acted
    assert not leader(ports[second])

    assert containers.stop(names[first]) == 0
    await wait_for(lambda: leader(ports[second]), timeout=30, what="the other to take over")
    victim2 = await idle_app_session(cluster, "leaky-app")
    pid2 = victim2.get_server_pid()
    await terminated(cluster, pid2)
    await wait_for(lambda: any(r["pid"] == pid2 for r in audit_records(logs[second])),
                   timeout=10, what="the new leader's record")
    assert containers.stop(names[second]) == 0
    await victim.close(timeout=1)
    await victim2.close(timeout=1)


def kubelet_update(config: Path, text: str) -> None:
    """Replace the policy file the way the kubelet updates a ConfigMap volume: a new
    timestamped directory, then an atomic swap of the ..data symlink."""
    stamp = config / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{uuid.uuid4().hex[:6]}"
    stamp.mkdir(mode=0o755)
    (stamp / "policies.yaml").write_text(text)
    (stamp / "policies.yaml").chmod(0o644)
    (config / "..data_tmp").symlink_to(stamp.name)
    os.replace(config / "..data_tmp", config / "..data")
    if not (config / "policies.yaml").is_symlink():
        (config / "policies.yaml").symlink_to("..data/policies.yaml")


async def test_reloader_sidecar_sighups_the_watchdog_on_a_configmap_change(
    cluster: TempCluster, containers: Containers, tmp_path: Path
) -> None:
    port = free_port()
    mounts = volumes(tmp_path, cluster, idle="1h", port=port)
    config = tmp_path / "config"
    old = (config / "policies.yaml").read_text()
    (config / "policies.yaml").unlink()
    kubelet_update(config, old)
    name = containers.run(mounts=mounts)
    await ready(port, containers, name)
    # The sidecar: the same image, in the watchdog's PID namespace (shareProcessNamespace).
    sidecar = containers.run("--interval", "0.5", "/etc/pg-watchdog/policies.yaml",
                             mounts=mounts, entrypoint="pg-watchdog-reloader",
                             options=["--pid", f"container:{name}"])
    victim = await idle_app_session(cluster, "leaky-app")
    pid = victim.get_server_pid()
    await sweeps_ran(cluster, 3)
    assert await backend_alive(cluster, pid)

    kubelet_update(config, old.replace("longer_than: 1h", "longer_than: 1s"))
    await terminated(cluster, pid)
    assert "sent SIGHUP" in containers.logs(sidecar)
    assert "reloaded" in containers.logs(name)
    assert containers.stop(name) == 0
    await victim.close(timeout=1)
