"""A one-machine SLURM cluster on loopback from Debian's packages (munge, slurmctld, slurmd), for trying and testing
the `launcher: slurm` training (`make slurm-up` / `make slurm-down`, the SLURM tests).

    python scripts/slurm_cluster.py up [--dir .slurm]      # idempotent: a running cluster is left as it is
    python scripts/slurm_cluster.py down [--dir .slurm]
    python scripts/slurm_cluster.py status [--dir .slurm]

Everything lives under --dir: the configuration (etc/slurm.conf: point SLURM_CONF at it), a private munge key
and socket, the controller's state, the logs, the daemons' pid files. The daemons run as root (slurmd starts the
jobs' processes); the node has this machine's CPUs and memory; ports are free ones picked at the first start.
Plugins that need no cgroups or systemd: proctrack/linuxproc, task/none. Jobs can be requeued (JobRequeue=1,
after 11 s: cred_expire=10) and partition `urgent` preempts partition `debug` (PreemptMode=REQUEUE).
Exit status: 0 up (or down), 3 not root, 4 packages missing, 1 a daemon did not start (its log is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
DAEMONS = ("munged", "slurmctld", "slurmd")
NEEDS = {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client"}
# Debian installs the daemons in /usr/sbin, which a non-login root shell may not have on PATH
SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


class ClusterError(RuntimeError):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def missing_packages() -> list[str]:
    return sorted({pkg for cmd, pkg in NEEDS.items() if shutil.which(cmd, path=SEARCH) is None})


def why_not() -> str | None:
    """Why no cluster can start here (None: it can)."""
    if os.geteuid() != 0:
        return "a SLURM cluster on loopback needs root (munged, slurmctld and slurmd run as root)"
    missing = missing_packages()
    if missing:
        return f"Debian packages missing: {' '.join(missing)} (apt-get install {' '.join(missing)})"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mib() -> int:
    with open("/proc/meminfo") as f:
        total_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return max(512, total_kib // 1024 - 512)


def slurm_conf(d: Path, node: str, ctld_port: int, slurmd_port: int) -> str:
    return f"""# written by scripts/slurm_cluster.py: one machine on loopback
ClusterName=llava
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket,cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
KillWait=30
# sbatch --wait polls every 2, then 8 s while MinJobAge/2 allows no longer sleeps; jobs are kept 16 s after they end
MinJobAge=16
SchedulerType=sched/backfill
NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory_mib()} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE
PartitionName=urgent Nodes={node} MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
"""


class Cluster:
    def __init__(self, folder: Path) -> None:
        self.dir = folder.resolve()
        self.conf = self.dir / "etc" / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def pid(self, daemon: str) -> int | None:
        path = self.dir / "run" / f"{daemon}.pid"
        try:
            pid = int(path.read_text().split()[0])
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError, IndexError):
            return None

    def run(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
        env = {**os.environ, **self.env, "PATH": SEARCH}
        return subprocess.run(list(cmd), env=env, capture_output=True, text=True, check=check, timeout=120)

    def node_state(self) -> str | None:
        if not self.conf.is_file() or any(self.pid(d) is None for d in DAEMONS):
            return None
        out = self.run("sinfo", "-h", "-n", self.node, "-o", "%t")
        return out.stdout.strip().split("\n")[0] if out.returncode == 0 and out.stdout.strip() else None

    def up(self, timeout: float = 90) -> None:
        if self.node_state() in ("idle", "mix", "alloc"):
            return  # already running: idempotent
        self.down()
        for sub in ("etc", "munge", "state", "spool", "log", "run"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir / "munge", 0o755)  # munged wants its socket folder readable by all, writable by it only
        key = self.dir / "munge" / "munge.key"
        if not key.is_file():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        if not self.conf.is_file():  # keeps its ports across restarts
            self.conf.write_text(slurm_conf(self.dir, self.node, free_port(), free_port()))
        m = self.dir / "munge"
        self._start("munged", "--force", f"--socket={m}/munge.socket", f"--key-file={key}",
                    f"--pid-file={self.dir}/run/munged.pid", f"--log-file={self.dir}/log/munged.log",
                    f"--seed-file={m}/munged.seed")  # fmt: skip
        self._start("slurmctld", "-c", "-f", str(self.conf))  # -c: a clean start, no jobs of an earlier cluster
        self._start("slurmd", "-f", str(self.conf), "-N", self.node)
        deadline = time.monotonic() + timeout
        while self.node_state() not in ("idle", "mix", "alloc"):
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text()[-2000:] for p in sorted((self.dir / "log").glob("*.log")))
                raise ClusterError(f"the node did not come up within {timeout:.0f} s (state {self.node_state()})\n"
                                   f"{logs}", 1)  # fmt: skip
            time.sleep(0.5)

    def _start(self, daemon: str, *args: str) -> None:
        exe = shutil.which(daemon, path=SEARCH)
        out = subprocess.run([exe, *args], env={**os.environ, **self.env}, capture_output=True, text=True, timeout=60)
        deadline = time.monotonic() + 30
        while self.pid(daemon) is None:
            if out.returncode != 0 or time.monotonic() > deadline:
                log = self.dir / "log" / f"{daemon}.log"
                tail = log.read_text()[-2000:] if log.is_file() else ""
                raise ClusterError(f"{daemon} did not start (exit {out.returncode}): {out.stderr.strip()}\n{tail}", 1)
            time.sleep(0.1)

    def down(self) -> None:
        for daemon in reversed(DAEMONS):
            pid = self.pid(daemon)
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while self.pid(daemon) is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.pid(daemon) is not None:
                os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("up", "down", "status"))
    ap.add_argument("--dir", type=Path, default=PROJECT / ".slurm", help="where everything lives (default .slurm)")
    ap.add_argument("--json", action="store_true", help="up/status: print the environment as JSON")
    args = ap.parse_args(argv)
    cluster = Cluster(args.dir)
    try:
        if args.command == "down":
            cluster.down()
            print(f"SLURM cluster in {cluster.dir} stopped")
            return 0
        if args.command == "up":
            reason = why_not()
            if reason:
                raise ClusterError(reason, 3 if os.geteuid() != 0 else 4)
            cluster.up()
        state = cluster.node_state()
        if args.json:
            print(json.dumps({**cluster.env, "node": cluster.node, "state": state}))
        elif state is None:
            print(f"no SLURM cluster running in {cluster.dir}")
            return 1
        else:
            print(f"SLURM cluster up (node {cluster.node}: {state}); to use it:\n  export SLURM_CONF={cluster.conf}")
        return 0
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
