"""A real Slurm cluster on this host for the site tests: munged, slurmctld and two slurmd (nodes
n1 and n2, both 127.0.0.1, each on a port of its own), every file in one temporary directory
(the recipe in ../shared/SITES.md). Client commands need SLURM_CONF=<cluster>.conf."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from gwms.cli.demo import free_port
from gwms.testing.polling import wait_until

from sites import ensure_programs, stop_pid_file

PROGRAMS = {"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-wlm", "munged": "munge",
            "mungekey": "munge"}

SLURM_CONF = """\
ClusterName=gwmstest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge-run/munge.socket
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# Four CPUs a node on a two-core host: the tests' glideins mostly wait, and the pools of several
# tests overlap on the cluster.
SlurmdParameters=config_overrides
MailProg=/bin/true
KillWait=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={d}/log/jobcomp.log
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1_port} CPUs=4 RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2_port} CPUs=4 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self) -> None:
        ensure_programs(PROGRAMS)
        # Not under pytest's private temporary directory: jobs of another account (the ssh
        # tests' remote user) must reach the munge socket and the configuration.
        base = self.dir = Path(tempfile.mkdtemp(prefix="gwms-slurm-"))
        base.chmod(0o755)
        for sub in ("munge", "munge-run", "state", "spool", "log"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "munge").chmod(0o700)
        # munged refuses a socket directory others cannot traverse; jobs of other users
        # (the ssh tests' account) need it too.
        (base / "munge-run").chmod(0o755)
        self.conf = base / "slurm.conf"
        self.conf.write_text(SLURM_CONF.format(host=socket.gethostname().split(".")[0], d=base,
                                               ctld_port=free_port(), n1_port=free_port(), n2_port=free_port()))
        self.conf.chmod(0o644)
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        key = base / "munge" / "munge.key"
        self._run("mungekey", "--create", f"--keyfile={key}", "--force")
        self.munge_socket = base / "munge-run" / "munge.socket"
        self._run("munged", f"--key-file={key}", f"--socket={self.munge_socket}",
                  f"--pid-file={base}/munge-run/munged.pid", f"--log-file={base}/log/munged.log",
                  f"--seed-file={base}/munge/munged.seed")
        self._run("slurmctld", "-f", str(self.conf))
        for node in ("n1", "n2"):
            self._run("slurmd", "-f", str(self.conf), "-N", node)
        wait_until(lambda: self.idle_nodes() == 2, 30, "both Slurm nodes to be idle")

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"
        return done

    def command(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """A Slurm client command against this cluster (not checked)."""
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)

    def idle_nodes(self) -> int:
        out = self.command("sinfo", "--noheader", "--format=%T %D").stdout.split()
        return sum(int(n) for state, n in zip(out[::2], out[1::2]) if state == "idle")

    def jobs(self) -> dict[str, tuple[str, str]]:
        """{job id: (name, state)} of every job slurmctld still knows."""
        out = self.command("squeue", "--noheader", "--states=all", "--format=%i|%j|%T").stdout
        return {i: (name, state) for i, name, state in (line.split("|") for line in out.splitlines() if line)}

    def completed(self) -> dict[str, tuple[str, str]]:
        """{job id: (name, state)} from the job completion log (every finished job)."""
        out = self.command("sacct", "-c", "--noheader", "--parsable2", "--format=JobID,JobName,State").stdout
        return {i: (name, state) for i, name, state in (line.split("|") for line in out.splitlines() if line)}

    def stop(self) -> None:
        pid_files = [self.dir / name for name in ("slurmd-n1.pid", "slurmd-n2.pid", "slurmctld.pid")]
        for pid_file in pid_files:  # all at once: each takes a second or two to go
            try:
                os.kill(int(pid_file.read_text().split()[0]), 15)
            except (OSError, ValueError, IndexError):
                pass
        for pid_file in pid_files:
            stop_pid_file(pid_file)
        subprocess.run(["munged", "-s", "-S", str(self.munge_socket)], capture_output=True, timeout=30)
        stop_pid_file(self.dir / "munge-run" / "munged.pid")
        shutil.rmtree(self.dir, ignore_errors=True)
