"""A real one-node Slurm cluster on localhost, for tests.

Debian's ``slurm-wlm`` (slurmctld + slurmd) and ``munge``, started in a scratch
directory as root without systemd: munged with its own key and socket, then
``slurmctld -D`` and ``slurmd -D`` on free loopback ports. ``env()`` is what a
client (sbatch, scontrol, squeue) needs (``SLURM_CONF``). ``stop()`` cancels every
job and stops the daemons.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from infra.net import free_port
from infra.testing.processes import stop_process

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")


class SlurmUnavailable(RuntimeError):
    pass


class LocalSlurm:
    """``with LocalSlurm(cpus=2) as slurm: slurm.sbatch(script); slurm.job(job_id)``."""

    def __init__(self, cpus: int = 2, root: str | None = None, start_timeout_s: float = 60.0) -> None:
        missing = [b for b in BINARIES if shutil.which(b) is None]
        if missing:
            raise SlurmUnavailable(f"{', '.join(missing)} missing: `make test` installs Debian's slurm-wlm and munge")
        if os.geteuid() != 0:
            raise SlurmUnavailable("a local Slurm (slurmd) runs as root here")
        self._tmp = None if root else tempfile.TemporaryDirectory(prefix="mae-slurm-")
        self.root = Path(root or self._tmp.name)
        self.cpus, self.start_timeout_s = cpus, start_timeout_s
        self.host = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.root / "slurm.conf")}

    def start(self) -> LocalSlurm:
        for d in ("munge", "munge/sock", "state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o711)
        (self.root / "munge" / "sock").chmod(0o711)  # munged refuses a socket folder others cannot enter
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._start("munged", ["munged", "-F", "--force", f"--socket={self._socket}", f"--key-file={key}",
                               f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                               f"--seed-file={self.root / 'munge' / 'seed'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}"])
        self._wait(lambda: Path(self._socket).exists(), "munged")
        (self.root / "slurm.conf").write_text(self._conf())
        conf = str(self.root / "slurm.conf")
        self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", conf])
        self._start("slurmd", ["slurmd", "-D", "-f", conf, "-N", self.host])
        self._wait(self._idle, "slurmctld + slurmd (sinfo idle)")
        return self

    @property
    def _socket(self) -> str:
        return str(self.root / "munge" / "sock" / "munge.socket")

    def _conf(self) -> str:
        r = self.root
        return "\n".join([
            "ClusterName=maetest", f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self._socket}", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "MailProg=/bin/true",
            "ReturnToService=2", "KillWait=30", f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP", ""])

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env={**os.environ, **self.env()}, start_new_session=True)
        log.close()

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                self.stop()
                raise SlurmUnavailable(f"{dead[0]} exited at start; see its log in {self.root / 'log'}")
            if ready():
                return
            time.sleep(0.2)
        self.stop()
        raise SlurmUnavailable(f"{what} not ready within {self.start_timeout_s} s; logs in {self.root / 'log'}")

    def _idle(self) -> bool:
        out = self.run("sinfo", "-h", "-o", "%T", check=False)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check,
                              env={**os.environ, **self.env()})

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait_for(self, job_id: str, states: tuple[str, ...], timeout_s: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} within {timeout_s} s: {info.get('JobState')}")

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--user", "root", check=False)
            time.sleep(1)
        for name in ("slurmd", "slurmctld", "munged"):
            stop_process(self.procs.pop(name, None), 15)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
