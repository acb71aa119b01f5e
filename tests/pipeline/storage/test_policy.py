"""One policy for every object-store call: timeouts always set, a deadline,
transient errors retried, permanent ones failing at once, one line naming the
endpoint and bucket and never a credential. Against servers that misbehave for
real: a loopback listener that never answers, a closed port, SeaweedFS with wrong
or missing credentials and a misspelled bucket, moto behind a fault layer."""

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.helpers.cli import run_mae
from tests.helpers.s3_faults import SilentEndpoint
from tests.helpers.shards import flip_a_byte, jpeg_bytes, numbered_shards

from infra.net import free_port
from pipeline.errors import ShardFetchError
from pipeline.loader import LoaderConfig, build_loader
from pipeline.shards.manifest import ShardInfo
from pipeline.shards.writer import ShardWriterConfig, write_shards
from pipeline.storage.config import RetryPolicy, StorageConfig
from pipeline.storage.store import ShardStore
from pipeline.storage.urls import filesystem

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[3]
FAST = ("--read-timeout", "1", "--connect-timeout", "1", "--deadline", "3")
KEY_ID, SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.fixture(autouse=True)
def _fresh_clients():
    """s3fs caches one client per set of options; these tests change credentials
    in the environment between calls, as separate processes would."""
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()
    yield
    S3FileSystem.clear_instance_cache()


@pytest.fixture
def aws_env(monkeypatch):
    """Credentials that look real (so redaction is put to the test), no profile, no instance role."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("src")
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes(seed=i))
    return folder


def _no_secret(text: str) -> None:
    assert KEY_ID not in text and SECRET not in text and "wrong-secret" not in text


def test_every_client_has_timeouts_and_no_retries_of_its_own():
    fs, _ = filesystem("s3://bucket/x", StorageConfig(connect_timeout_s=4, read_timeout_s=7,
                                                      options={"skip_instance_cache": True}))
    assert fs.config_kwargs["connect_timeout"] == 4 and fs.config_kwargs["read_timeout"] == 7
    assert fs.config_kwargs["retries"] == {"total_max_attempts": 1} and fs.retries == 1


@pytest.mark.parametrize("region, config, host", [
    ("us-east-1", {}, "bucket.s3.amazonaws.com"),  # botocore would presign SigV2 here
    ("eu-central-1", {}, "bucket.s3.eu-central-1.amazonaws.com"),  # ...and the global host here
    ("us-west-2", {"use_fips_endpoint": True}, "bucket.s3-fips.us-west-2.amazonaws.com"),
])
def test_range_urls_are_sigv4_and_go_where_the_clients_own_calls_go(region, config, host):
    """Presigned range URLs (signed locally, no server needed): SigV4, since buckets
    made since 2020 refuse SigV2, and the client's regional or FIPS host, not the
    global one (which bypasses private endpoints a network may require)."""
    from fsspec.asyn import sync

    from pipeline.storage.ranges import presigned_range_url

    options = {"key": "AKIDEXAMPLEKEY", "secret": "example-secret", "skip_instance_cache": True,
               "client_kwargs": {"region_name": region}, "config_kwargs": config}
    fs, _ = filesystem("s3://bucket/x", StorageConfig(options=options))
    url = sync(fs.loop, presigned_range_url, fs, "bucket", "x")
    assert url.startswith(f"https://{host}/x?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLEKEY%2F")
    assert f"%2F{region}%2Fs3%2Faws4_request" in url
    sigv2, _ = filesystem("s3://bucket/x", StorageConfig(options={**options, "config_kwargs": {
        **config, "signature_version": "s3"}}))
    url = sync(fs.loop, presigned_range_url, sigv2, "bucket", "x")
    assert "AWSAccessKeyId=AKIDEXAMPLEKEY" in url and "X-Amz-Algorithm" not in url  # a version the user set is kept


@pytest.mark.parametrize("command", ["inspect", "shard"])
def test_an_endpoint_that_never_answers_ends_within_the_deadline(command, src, tmp_path, aws_env, capsys):
    """The issue's case: `mae inspect` stayed silent past 280 s."""
    with SilentEndpoint() as silent:
        args = ["inspect", "s3://hung/ds"] if command == "inspect" else ["shard", src, "s3://hung/ds", "--workers", "1"]
        t0 = time.monotonic()
        res = run_mae(capsys, *args, "--endpoint-url", silent.url, *FAST)
        elapsed = time.monotonic() - t0
        assert silent.accepted  # it really connected, then waited
    assert res.code == 1
    line = res.error_line
    assert re.search(rf"at s3://hung/ds \(endpoint {silent.url}\): failed after \d attempts in [\d.]+ s", line)
    assert "ReadTimeoutError" in line and elapsed < 30  # deadline 3 s + one 1 s read; generous for a busy machine


def test_the_training_loader_has_the_same_deadline(aws_env):
    with SilentEndpoint() as silent:
        storage = StorageConfig(endpoint_url=silent.url, connect_timeout_s=1, read_timeout_s=1,
                                retry=RetryPolicy(deadline_s=3))
        with pytest.raises(ShardFetchError, match=rf"manifest.json at s3://hung/ds \(endpoint {silent.url}\): failed"):
            build_loader(LoaderConfig(url="s3://hung/ds", storage=storage), 0, 1)


def test_an_unreachable_endpoint_is_one_line_not_a_traceback(src, aws_env, capsys):
    """The issue's case: `mae shard` to an unreachable endpoint ended in a 136-line traceback."""
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    res = run_mae(capsys, "shard", src, "s3://data/ds", "--endpoint-url", endpoint, *FAST)
    assert res.code == 1
    assert re.fullmatch(rf"mae: error: bucket 'data' at s3://data/ds \(endpoint {endpoint}\): failed after \d attempts "
                        r"in [\d.]+ s(, deadline 3 s)? \(last: EndpointConnectionError: .*\)", res.error_line)


def test_wrong_credentials_fail_at_once_for_every_command(src, seaweed, monkeypatch, capsys, caplog):
    seaweed.create_bucket("guarded")
    for k, v in {**seaweed.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret-do-not-print"}.items():
        monkeypatch.setenv(k, v)
    with caplog.at_level(logging.WARNING):
        shard = run_mae(capsys, "shard", src, "s3://guarded/ds", "--workers", "1")
        inspect = run_mae(capsys, "inspect", "s3://guarded/ds")
    assert (shard.code, inspect.code) == (2, 2)
    assert "bucket 'guarded' at s3://guarded/ds (endpoint http://127.0.0.1:" in shard.error_line
    assert "manifest.json at s3://guarded/ds (endpoint http://127.0.0.1:" in inspect.error_line
    for res in (shard, inspect):
        assert "access denied (check credentials)" in res.error_line
        _no_secret(res.err + res.out)
    assert "retrying" not in caplog.text  # permanent: not retried


def test_missing_credentials_fail_at_once(src, seaweed, aws_env, monkeypatch, capsys, caplog):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed.endpoint_url)
    with caplog.at_level(logging.WARNING):
        res = run_mae(capsys, "shard", src, "s3://anything/ds")
    assert res.code == 2 and "no credentials (set AWS_ACCESS_KEY_ID" in res.error_line
    assert "retrying" not in caplog.text


def test_a_misspelled_bucket_is_an_error_and_never_created(src, s3_env, capsys):
    """The issue's case: `mae shard` silently created a misspelled bucket."""
    s3_env.create_bucket("datasets")
    res = run_mae(capsys, "shard", src, "s3://datasetz/photos", "--workers", "1")
    assert res.code == 2
    assert ("bucket 'datasetz' at s3://datasetz/photos (endpoint http://127.0.0.1:" in res.error_line
            and "does not exist; check its name, or create it (mae shard and mae index create it with "
                "--create-bucket)" in res.error_line)
    buckets = lambda: {b["Name"] for b in s3_env.client().list_buckets()["Buckets"]}  # noqa: E731
    assert "datasetz" not in buckets()
    res = run_mae(capsys, "shard", src, "s3://datasetz/photos", "--workers", "1", "--create-bucket")
    assert res.code == 0 and "datasetz" in buckets() and "3 samples in 1 shards" in res.out


def test_a_local_checksum_mismatch_fails_without_retrying(tmp_path):
    """The issue's case: a corrupt local shard was read 8 times (12-67 s) before failing."""
    manifest = numbered_shards(tmp_path / "ds", [4])
    flip_a_byte(tmp_path / "ds" / manifest.shards[0].name)
    events = []
    store = ShardStore(str(tmp_path / "ds"), StorageConfig(), on_event=lambda name, n: events.append(name))
    with pytest.raises(ShardFetchError, match=r"shard shard-000000.tar at .*/ds: checksum mismatch \(ChecksumMismatch"):
        store.open_shard(manifest.shards[0])
    assert events == ["fetch_error"]


def test_the_same_wrong_bytes_twice_are_permanent(faulty_s3, tmp_path):
    manifest = numbered_shards(tmp_path / "ds", [4])
    client = faulty_s3.client()
    for p in (tmp_path / "ds").iterdir():
        client.upload_file(str(p), "faults", f"policy/{p.name}")
    good = manifest.shards[0]
    events = []
    storage = StorageConfig(options={"endpoint_url": faulty_s3.endpoint_url, "key": "fake", "secret": "fake-secret"},
                            cache_dir=str(tmp_path / "cache"), retry=RetryPolicy(8, 0.01, 0.02))
    store = ShardStore("s3://faults/policy", storage, on_event=lambda name, n: events.append(name))
    with pytest.raises(ShardFetchError, match="checksum mismatch"):
        store.local_path(ShardInfo(good.name, good.samples, good.bytes, "f" * 64))
    assert events.count("fetch_retry") == 1  # one more try in case the body was damaged, then no more


def test_a_source_that_keeps_failing_stops_the_writer_instead_of_being_dropped(faulty_s3, tmp_path):
    client = faulty_s3.client()
    client.put_object(Bucket="faults", Key="sources/a.jpg", Body=jpeg_bytes(seed=1))
    client.put_object(Bucket="faults", Key="sources/flaky.jpg", Body=jpeg_bytes(seed=2))
    storage = StorageConfig(options={"endpoint_url": faulty_s3.endpoint_url, "key": "fake", "secret": "fake-secret"},
                            retry=RetryPolicy(3, 0.01, 0.02))
    faulty_s3.faults.clear()
    faulty_s3.faults.add("error500", match="flaky.jpg", times=100)
    try:
        with pytest.raises(ShardFetchError, match=r"source flaky.jpg at s3://faults/sources/flaky.jpg .*failed after 3"):
            write_shards("s3://faults/sources", str(tmp_path / "out"), ShardWriterConfig(storage=storage))
    finally:
        faulty_s3.faults.clear()
    assert not (tmp_path / "out" / "manifest.json").exists()  # no dataset that silently lacks an image


def test_debug_logs_of_a_real_request_show_no_credentials(seaweed, tmp_path):
    """The issue's case: `mae -v` let botocore print the access key id and request signatures."""
    seaweed.create_bucket("debug")
    env = {**os.environ, **seaweed.env()}
    res = subprocess.run([sys.executable, "-m", "train.cli", "-v", "inspect", "s3://debug/ds"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    log = res.stderr
    assert res.returncode == 2 and "botocore.endpoint: Sending http request" in log  # the request was logged...
    assert "Credential=<redacted>/" in log and "Signature=<redacted>" in log  # ...with its credentials removed
    assert seaweed.access_key not in log and seaweed.secret_key not in log
    assert not re.search(r"Signature[=:]\s*[0-9a-f]{16,}", log)
