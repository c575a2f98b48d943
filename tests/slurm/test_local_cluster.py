"""The test harness's own Slurm: its daemons never block on a full stderr pipe, and a SIGTERM to the process
that started them (a CI timeout) stops them instead of leaving them running."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import local_cluster
import pytest

HERE = Path(__file__).resolve().parent


def _processes_under(base: Path) -> list[int]:
    """PIDs whose command line names a path under `base` (the cluster's daemons all do)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(base) in cmdline and int(proc.name) != os.getpid():
            found.append(int(proc.name))
    return found


def _namespaces() -> set[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return {line.split()[0] for line in r.stdout.splitlines() if line.strip()}


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2])
def test_sigterm_to_the_starter_stops_every_daemon(nodes):
    if not local_cluster.installed() or os.geteuid() != 0:
        if os.environ.get("DLM_REQUIRE_SLURM") == "1":
            pytest.fail("DLM_REQUIRE_SLURM=1 but Slurm/munge are not installed or this is not root")
        pytest.skip("needs Debian's Slurm and munge installed, as root")
    starter = subprocess.Popen([sys.executable, str(HERE / "local_cluster.py"), str(nodes)], stdout=subprocess.PIPE,
                               text=True)
    try:
        line = starter.stdout.readline()
        if nodes > 1 and not line and shutil.which("ip") is None:
            pytest.skip("TWO-NODE SLURM NOT TESTED: `ip` (iproute2) is not installed")
        assert line.startswith("export SLURM_CONF="), line
        base = Path(line.split("=", 1)[1].split()[0]).parent
        daemons = _processes_under(base)
        assert len(daemons) >= 3, daemons  # munged (and its runuser), slurmctld, slurmd
        # stderr goes to files in the cluster's log folder, never to a pipe nobody drains
        slurmd = {"slurmd.stderr"} if nodes == 1 else {"slurmd-dlmnode1.stderr", "slurmd-dlmnode2.stderr"}
        assert {p.name for p in (base / "log").glob("*.stderr")} >= {"munged.stderr", "slurmctld.stderr", *slurmd}
        tag = starter.pid % 10000
        ours = {f"dlm{tag}n{i}" for i in range(1, nodes + 1)} if nodes > 1 else set()
        assert ours <= _namespaces()
        starter.send_signal(signal.SIGTERM)
        starter.wait(timeout=60)
        assert starter.returncode == -signal.SIGTERM  # it still dies of the signal
        deadline = time.monotonic() + 10
        while (left := _processes_under(base)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"daemons still running after SIGTERM: {left}"
        assert not base.exists()
        assert not ours & _namespaces()  # the nodes' network namespaces are removed too, and the bridge
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout if nodes > 1 else ""
        assert f"dlmbr{tag}" not in links and f"dlmh{tag}n" not in links, links
    finally:
        if starter.poll() is None:
            starter.kill()
