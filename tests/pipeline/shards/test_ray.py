"""`mae shard --ray` and `mae index --ray` on a real local Ray cluster (2 CPUs, one per
module): the same output as the single-machine run, and resume after a lost worker
or driver."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.shards.index import IndexConfig, index_tars
from pipeline.shards.tasks import RayTarget
from pipeline.shards.writer import ShardWriterConfig, write_shards
from tests.pipeline.shards.test_index import webdataset_tars

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster started in this process; its address for other drivers."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "_index" not in p.parts}


def test_shard_on_ray_writes_the_same_bytes_as_one_machine(cluster, photos, tmp_path):
    cfg = ShardWriterConfig(shard_bytes=300_000, workers=2)
    local = write_shards(str(photos), str(tmp_path / "local"), cfg)
    distributed = write_shards(str(photos), str(tmp_path / "ray"), cfg, RayTarget(cluster))
    assert distributed.written == len(local.manifest.shards) > 3 and distributed.workers == 2
    assert files(tmp_path / "ray") == files(tmp_path / "local")  # manifest, shards and records, byte for byte


def test_index_on_ray_gives_the_same_manifest(cluster, tmp_path):
    webdataset_tars(tmp_path / "tars", count=5)
    cfg = IndexConfig(batch_objects=2)
    index_tars(str(tmp_path / "tars"), str(tmp_path / "a"), cfg)
    summary = index_tars(str(tmp_path / "tars"), str(tmp_path / "b"), cfg, RayTarget(cluster))
    assert summary.indexed == 5
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()


def _kill_running_worker(name: str, stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first Ray worker seen running a ``name`` task (Ray titles it ``ray::<name>``)."""
    import psutil

    while not stop.is_set() and not killed:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any(f"ray::{name}" == part for part in (proc.info["cmdline"] or [])):
                os.kill(proc.info["pid"], signal.SIGKILL)
                killed.append(proc.info["pid"])
                return
        time.sleep(0.005)


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_a_killed_driver_resumes(cluster, photos, tmp_path):
    cfg = ShardWriterConfig(shard_bytes=60_000, workers=2, reencode=True)
    local = write_shards(str(photos), str(tmp_path / "local"), cfg)
    # a worker killed mid-task: Ray runs the task again, the output is unchanged
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_running_worker, args=("write_shard", stop, killed))
    watcher.start()
    write_shards(str(photos), str(tmp_path / "ray"), cfg, RayTarget(cluster))
    stop.set()
    watcher.join()
    assert killed and files(tmp_path / "ray") == files(tmp_path / "local")
    # the driver killed mid-run: a rerun writes only what is missing
    out = tmp_path / "ray2"
    driver = subprocess.Popen([sys.executable, "-m", "train.cli", "shard", str(photos), str(out), "--shard-size",
                               "60kB", "--reencode", "--workers", "2", "--ray", cluster], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.record.json"))) < 3 and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.05)
    driver.kill()
    driver.wait()
    done = len(list(out.glob("*.record.json")))
    again = write_shards(str(photos), str(out), cfg, RayTarget(cluster))
    assert 3 <= again.skipped_existing and again.written + again.skipped_existing == len(local.manifest.shards)
    assert done < len(local.manifest.shards) and files(out) == files(tmp_path / "local")


def test_a_cluster_address_nobody_answers_is_one_line_at_once(tmp_path):
    # `--ray 127.0.0.1:1` left Ray retrying the connection for minutes
    from infra.net import free_port
    from pipeline.errors import DistributedError
    from pipeline.shards.tasks import check_reachable

    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(DistributedError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 10
    check_reachable("auto")  # Ray's own to resolve
