"""Against a real S3 server (SeaweedFS on loopback): write with `mae shard`, read
back through s3fs, credentials from the standard environment chain."""

import os
import subprocess
import sys
import tarfile

import pytest

from pipeline.loader import LoaderConfig, build_loader
from pipeline.plan import PlanConfig
from pipeline.errors import ManifestError, ShardFetchError
from pipeline.storage.config import StorageConfig
from pipeline.storage.store import ShardStore
from pipeline.shards.writer import ShardWriterConfig, write_shards

pytestmark = pytest.mark.integration


def _mae(*args, env=None):
    return subprocess.run([sys.executable, "-m", "train.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_shard_to_s3_with_the_cli_then_inspect_and_verify(photos, seaweed):
    seaweed.create_bucket("cli")
    res = _mae("shard", str(photos), "s3://cli/photos", "--shard-size", "300kB", "--workers", "2", env=seaweed.env())
    assert res.returncode == 0, res.stderr
    assert "45 samples in" in res.stdout
    res = _mae("inspect", "s3://cli/photos", "--verify", env=seaweed.env())
    assert res.returncode == 0, res.stderr
    assert "verified" in res.stdout and "classes 9" in res.stdout
    listing = seaweed.client().list_objects_v2(Bucket="cli", Prefix="photos/")["Contents"]
    assert not [o["Key"] for o in listing if ".tmp" in o["Key"]]


def test_loader_streams_every_sample_from_s3_bit_identical(photos, s3_env, tmp_path):
    s3_env.create_bucket("stream")
    summary = write_shards(str(photos), "s3://stream/ds", ShardWriterConfig(shard_bytes=250_000))
    manifest = summary.manifest
    storage = StorageConfig(cache_dir=str(tmp_path / "cache"), cache_limit_gb=600_000 / 2**30)
    cfg = LoaderConfig(url="s3://stream/ds", batch_size=8, num_workers=2, storage=storage,
                       plan=PlanConfig(window_shards=1))
    loader = build_loader(cfg, 0, 1)
    keys = [k for b in loader for k in b.keys]
    assert len(keys) == len(set(keys)) == manifest.total_samples == 45
    assert sum(p.stat().st_size for p in (tmp_path / "cache").glob("*.tar")) <= 600_000 + max(
        s.bytes for s in manifest.shards) * 4  # the limit, plus what open readers pinned
    # the cached bytes are the originals
    store = ShardStore("s3://stream/ds", storage)
    originals = {p.name: p.read_bytes() for p in photos.rglob("*.jpg")}
    with store.open_shard(manifest.shards[0]) as f, tarfile.open(fileobj=f) as tar:
        for m in tar:
            if m.name.endswith(".jpg"):
                original = m.name.split("_", 1)[1].rsplit(".", 1)[0] + ".jpg"
                assert tar.extractfile(m).read() == originals[original]


def test_wrong_credentials_are_a_clear_error_without_the_secret(photos, seaweed, tmp_path):
    seaweed.create_bucket("creds")
    env = {**seaweed.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret-do-not-print"}
    res = _mae("inspect", "s3://creds/x", env=env)
    assert res.returncode == 2
    assert "access denied (check credentials)" in res.stderr
    assert "wrong-secret-do-not-print" not in res.stderr + res.stdout
    assert "Traceback" not in res.stderr


def test_missing_dataset_is_not_found(s3_env, tmp_path):
    with pytest.raises(ShardFetchError, match=r"manifest.json at s3://creds/nothing-here \(endpoint http://127.0.0.1:\d+\): not found"):
        ShardStore("s3://creds/nothing-here", StorageConfig(cache_dir=str(tmp_path))).read_manifest()


def test_shard_from_a_bucket_prefix_to_local(photos, s3_env, tmp_path):
    client = s3_env.client()
    s3_env.create_bucket("raw-images")
    for p in photos.rglob("*.jpg"):
        client.upload_file(str(p), "raw-images", f"photos/{p.relative_to(photos).as_posix()}")
    m = write_shards("s3://raw-images/photos", str(tmp_path / "out"), ShardWriterConfig()).manifest
    assert m.total_samples == 45 and m.classes == sorted(p.name for p in photos.iterdir())


def test_an_empty_manifest_object_is_read_as_empty_not_as_a_refused_request(photos, s3_env, tmp_path, caplog):
    """S3 answers a ranged GET of an empty object with 416, which was reported as "the
    server rejected the request as invalid": an empty manifest.index must fall back to
    manifest.json (as it does on disk), an empty manifest.json is not JSON."""
    s3_env.create_bucket("empties")
    write_shards(str(photos), "s3://empties/ds", ShardWriterConfig(shard_bytes=250_000))
    client = s3_env.client()
    client.put_object(Bucket="empties", Key="ds/manifest.index", Body=b"")
    storage = StorageConfig(cache_dir=str(tmp_path / "cache"))
    assert ShardStore("s3://empties/ds", storage).read_table().total_samples == 45
    assert "reading manifest.json instead" in caplog.text
    client.put_object(Bucket="empties", Key="ds/manifest.json", Body=b"")
    client.delete_object(Bucket="empties", Key="ds/manifest.index")
    with pytest.raises(ManifestError, match=r"s3://empties/ds/manifest.json \(endpoint .*\) is not valid JSON"):
        ShardStore("s3://empties/ds", storage).read_manifest()


def test_an_upload_to_a_stalled_server_fails_within_its_deadline(tmp_path):
    """botocore waits for "100 Continue" outside the read timeout: with the server
    stopped, `mae shard` waited forever. Each upload attempt now has a deadline."""
    import signal
    import time

    from infra.testing.s3_server import SeaweedS3
    from pipeline.storage.config import RetryPolicy
    from pipeline.storage.objects import ObjectFolder

    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(200_000))
    with SeaweedS3() as s3:
        s3.create_bucket("stall")
        storage = StorageConfig(options={"endpoint_url": s3.endpoint_url, "key": s3.access_key,
                                         "secret": s3.secret_key},
                                connect_timeout_s=1, read_timeout_s=1, retry=RetryPolicy(deadline_s=3))
        folder = ObjectFolder("s3://stall/x", storage)
        folder.put_file(str(blob), "a.bin")
        os.kill(s3.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(ShardFetchError, match=r"upload b.bin at s3://stall/x .*: failed after \d+ attempts .*"
                                                      r"FSTimeoutError"):
                folder.put_file(str(blob), "b.bin")
            assert time.monotonic() - t0 < 15
        finally:
            os.kill(s3.proc.pid, signal.SIGCONT)


def test_an_interrupt_while_the_test_server_starts_stops_it(monkeypatch):
    """Ctrl-C while `weed mini` started (mae bench pipeline, mae demo --s3) left it
    running in its own session, with its data folder: __exit__ never ran."""
    from infra.testing.s3_server import SeaweedS3

    server = SeaweedS3()
    started = []

    def interrupted() -> None:
        started.append(server.proc.pid)
        raise KeyboardInterrupt

    monkeypatch.setattr(server, "_wait_ready", interrupted)
    folder = server.data_dir
    with pytest.raises(KeyboardInterrupt):
        with server:
            pass
    assert started and not os.path.exists(folder)
    with pytest.raises(ProcessLookupError):
        os.kill(started[0], 0)
