"""A real single-node Slurm for the tests (and for trying the Slurm backend on one machine).

Debian's slurmctld, slurmd, slurm-client and munge (22.05), started by hand (no systemd):
munged as user munge, a generated slurm.conf (this host, all its CPUs; proctrack/linuxproc,
task/none, select/cons_tres with CR_CPU; SlurmUser=root; spool, state and logs under a temp dir),
the daemons in the foreground (`-D`) so they are stopped by their own pids.

Job states: there is no slurmdbd (it needs a MySQL server), so `sacct` fails here; the project's
`slurm.cluster` reads job states from `scontrol show job` instead (MinJobAge is raised so the
controller remembers finished jobs for the whole test session).

    python tests/slurm/local_cluster.py        # start one, print `export SLURM_CONF=...`, Ctrl-C stops it
    python tests/slurm/local_cluster.py 2      # two nodes, each in its own network namespace (see start)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "munged")


class ClusterUnavailable(RuntimeError):
    """Why no Slurm could be started here (the slurm tests are skipped with this reason)."""


def installed() -> bool:
    return all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES)


def install() -> None:
    """apt-get the Debian packages when they are missing (needs root and apt)."""
    if installed():
        return
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable("Slurm is not installed and apt-get is not available to install it "
                                 f"(packages: {' '.join(PACKAGES)})")
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"Slurm is not installed and installing it needs root: apt-get install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if r.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[-500:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    """One slurmd of a multi-node cluster: its own network namespace `netns`, address and hostname."""

    name: str
    addr: str
    cpus: int
    netns: str
    veth: str  # the host end of the veth pair into the namespace (on the bridge)


@dataclass
class Cluster:
    base: Path
    conf: Path
    host: str
    cpus: int
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)  # empty: one slurmd on this host, no namespaces
    bridge: str = ""

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def stop(self) -> None:
        """Cancel what is still queued or running, then stop the daemons and remove the cluster's files."""
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            # a test that failed mid-job leaves it running: cancel it while the controller is up, so its
            # tasks (and slurmstepd) end instead of outliving the cluster
            env = {**os.environ, **self.env}
            subprocess.run(["scancel", "--quiet", "--user=root"], env=env, capture_output=True, timeout=20)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                r = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=10)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.5)
        for name in [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            p = self.procs.pop(name, None)
            if p is None:
                continue
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        _remove_network(self.nodes, self.bridge)
        shutil.rmtree(self.base, ignore_errors=True)

    def stderr_of(self, name: str) -> str:
        """What daemon `name` wrote to stderr (a file: a pipe nobody reads blocks the daemon once full)."""
        path = self.base / "log" / f"{name}.stderr"
        return path.read_text(errors="replace")[-800:] if path.is_file() else ""

    def log(self, name: str) -> str:
        path = self.base / "log" / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.is_file() else ""


def slurm_conf(base: Path, host: str, cpus: int, munge_socket: Path, nodes: list[Node] | None = None,
               ctld_addr: str = "") -> str:
    """slurm.conf for one node (this host) or, with `nodes`, for those nodes behind a controller at `ctld_addr`
    (per-node spool, pid and log files: %n is the node name)."""
    if nodes:
        node_lines = "\n".join(f"NodeName={n.name} NodeAddr={n.addr} CPUs={n.cpus} State=UNKNOWN" for n in nodes)
        names = ",".join(n.name for n in nodes)
    else:
        node_lines, names = f"NodeName={host} CPUs={cpus} State=UNKNOWN", host
    return f"""# generated by tests/slurm/local_cluster.py
ClusterName=dlmtest
SlurmctldHost={host}{f"({ctld_addr})" if ctld_addr else ""}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool/%n
SlurmctldPidFile={base}/run/slurmctld.pid
SlurmdPidFile={base}/run/slurmd-%n.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
{node_lines}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""


class NamespacesUnavailable(ClusterUnavailable):
    """Slurm is there, but the network namespaces for a multi-node cluster could not be made."""


def start(timeout_s: float = 60.0, nodes: int = 1) -> Cluster:
    """Install if needed, start munged + slurmctld + slurmd, wait until the node takes jobs.

    nodes > 1: that many slurmd (`dlmnode1`, `dlmnode2`, ...), each in its own network namespace with its own
    address and hostname (a UTS namespace), on a bridge with this host, where slurmctld runs; one munged (its
    socket is a file, reachable from every namespace) and one filesystem (the run and shard directories are
    shared, as on a cluster's shared filesystem). The node names resolve inside the namespaces through a hosts
    file bind-mounted on /etc/hosts in each slurmd's mount namespace (this host's /etc/hosts is not touched).
    One CPU per node, so jobs of one task per node spread over the nodes."""
    install()
    if os.geteuid() != 0:
        raise ClusterUnavailable("starting slurmd/munged as configured here needs root")
    base = Path(tempfile.mkdtemp(prefix="dlm-slurm-"))
    base.chmod(0o755)  # munged (user munge) must reach its socket directory below
    for d in ("state", "spool", "run", "log", "munge"):
        (base / d).mkdir()
    munge_dir = base / "munge"
    shutil.chown(munge_dir, "munge", "munge")
    munge_dir.chmod(0o755)  # world-executable, as munged wants for its socket directory
    munge_socket = munge_dir / "munge.socket.2"
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    conf = base / "slurm.conf"
    cluster = Cluster(base=base, conf=conf, host=host, cpus=cpus)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        ctld_addr = ""
        if nodes > 1:
            ctld_addr = _make_network(cluster, nodes)
        names = [n.name for n in cluster.nodes] or [host]  # %n in the spool and log paths
        for name in names:
            (base / "spool" / name).mkdir()
        conf.write_text(slurm_conf(base, host, cpus, munge_socket, cluster.nodes, ctld_addr))
        munged = shutil.which("munged") or "/usr/sbin/munged"
        cluster.procs["munged"] = subprocess.Popen(
            ["runuser", "-u", "munge", "--", munged, "--foreground", f"--socket={munge_socket}",
             f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
             f"--seed-file={munge_dir}/munged.seed", "--force"],
            stdout=subprocess.DEVNULL, stderr=_stderr_file(base, "munged"))
        _wait(lambda: munge_socket.exists(), 15, "munged", cluster, lambda: (munge_dir / "munged.log").read_text()
              if (munge_dir / "munged.log").exists() else "")
        cluster.procs["slurmctld"] = subprocess.Popen(
            [shutil.which("slurmctld") or "/usr/sbin/slurmctld", "-D", "-f", str(conf)], env=env,
            stdout=subprocess.DEVNULL, stderr=_stderr_file(base, "slurmctld"))
        slurmd = shutil.which("slurmd") or "/usr/sbin/slurmd"
        for node in cluster.nodes:
            # nsenter (the node's network) -> unshare (its own hostname and mounts) -> sh -> slurmd: each execs
            # the next, so the pid is slurmd's. Not `ip netns exec`: it remounts /sys, and slurmd then finds no
            # cgroup filesystem and refuses to start.
            hosts = base / f"hosts-{node.name}"
            cmd = ["nsenter", f"--net=/run/netns/{node.netns}", "--", "unshare", "--uts", "--mount", "sh", "-c",
                   f'hostname {node.name} && mount --bind {hosts} /etc/hosts && exec "$0" "$@"',
                   slurmd, "-D", "-N", node.name, "-f", str(conf)]
            cluster.procs[f"slurmd-{node.name}"] = subprocess.Popen(
                cmd, env=env, stdout=subprocess.DEVNULL, stderr=_stderr_file(base, f"slurmd-{node.name}"))
        if not cluster.nodes:
            cluster.procs["slurmd"] = subprocess.Popen([slurmd, "-D", "-f", str(conf)], env=env,
                                                       stdout=subprocess.DEVNULL, stderr=_stderr_file(base, "slurmd"))

        def idle() -> bool:
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True,
                               timeout=10)
            states = r.stdout.split()
            return (r.returncode == 0 and len(states) == max(nodes, 1)
                    and all(s in ("idle", "mixed", "allocated") for s in states))

        _wait(idle, timeout_s, "slurmd/slurmctld", cluster,
              lambda: cluster.log("slurmctld") + "".join(cluster.log(f"slurmd-{n}") for n in names))
    except BaseException:
        cluster.stop()
        raise
    _stop_on_termination(cluster)
    return cluster


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise NamespacesUnavailable(f"`ip {' '.join(args)}` failed: {(r.stderr or r.stdout).strip()}")


def _make_network(cluster: Cluster, n: int) -> str:
    """A bridge on this host (the controller's address) and one namespace per node joined to it by a veth pair.
    Names and subnet carry this process's pid, so two test sessions on one machine do not collide.
    Returns the controller's address."""
    if shutil.which("ip") is None and shutil.which("apt-get") is not None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "iproute2"]):
            subprocess.run(cmd, capture_output=True, env=env, timeout=600)
    if shutil.which("ip") is None:
        raise NamespacesUnavailable("`ip` (iproute2) is not installed and apt-get could not install it")
    tag = os.getpid() % 10000
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, timeout=30).stdout
    subnet = next(f"10.{200 + (tag + i) % 50}.{(tag + i) % 250}" for i in range(1000)  # one no route here uses
                  if f"10.{200 + (tag + i) % 50}.{(tag + i) % 250}." not in routes)
    cluster.bridge = f"dlmbr{tag}"
    hosts = ["127.0.0.1 localhost", f"{subnet}.1 {cluster.host}"]
    for i in range(1, n + 1):
        cluster.nodes.append(Node(f"dlmnode{i}", f"{subnet}.{i + 1}", 1, f"dlm{tag}n{i}", f"dlmh{tag}n{i}"))
        hosts.append(f"{subnet}.{i + 1} dlmnode{i}")
    _ip("link", "add", cluster.bridge, "type", "bridge")
    _ip("addr", "add", f"{subnet}.1/24", "dev", cluster.bridge)
    _ip("link", "set", cluster.bridge, "up")
    for node in cluster.nodes:
        peer = f"dlmp{tag}n{node.name[-1]}"
        _ip("netns", "add", node.netns)
        _ip("link", "add", node.veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", node.netns)
        _ip("link", "set", node.veth, "master", cluster.bridge)
        _ip("link", "set", node.veth, "up")
        _ip("-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", peer)
        _ip("-n", node.netns, "link", "set", peer, "up")
        _ip("-n", node.netns, "link", "set", "lo", "up")
    for node in cluster.nodes:  # bind-mounted on /etc/hosts in the node's own mount namespace
        (cluster.base / f"hosts-{node.name}").write_text("\n".join(hosts) + "\n")
    return f"{subnet}.1"


def _remove_network(nodes: list[Node], bridge: str) -> None:
    for node in nodes:
        for cmd in (["netns", "del", node.netns], ["link", "del", node.veth]):
            subprocess.run(["ip", *cmd], capture_output=True, timeout=30)
    if bridge:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)


def _stderr_file(base: Path, name: str):
    return open(base / "log" / f"{name}.stderr", "wb")  # noqa: SIM115 (the daemon holds it; closed at exit)


def _stop_on_termination(cluster: Cluster) -> None:
    """SIGTERM/SIGHUP to this process (a CI timeout, a closed terminal) would skip the fixture's teardown and
    leave munged, slurmctld and slurmd running: stop the cluster first, then die of the signal as before."""

    def handler(signum, frame):
        cluster.stop()
        before = previous[signum]
        if callable(before):
            before(signum, frame)
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.getsignal(sig)
        signal.signal(sig, handler)


def _wait(ok, timeout_s: float, what: str, cluster: Cluster, logs) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ok():
            return
        for name, p in cluster.procs.items():
            if p.poll() is not None:
                err = cluster.stderr_of(name)
                raise ClusterUnavailable(f"{name} exited with code {p.returncode}: {err.strip()[-800:]}\n{logs()}")
        time.sleep(0.3)
    raise ClusterUnavailable(f"{what} did not come up within {timeout_s:.0f} s\n{logs()}")


if __name__ == "__main__":
    import sys

    c = start(nodes=int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    print(f"export SLURM_CONF={c.conf}   # Ctrl-C stops the cluster", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
