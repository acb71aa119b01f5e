import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from tests.helpers.shards import log_downloads, numbered_shards
from tests.helpers.training import wait_for

from pipeline.errors import ShardFetchError
from pipeline.loader import LoaderConfig, build_loader
from pipeline.plan import PlanConfig
from pipeline.shards.manifest import ShardInfo
from pipeline.storage.cache import LEDGER_NAME, ShardCache, eviction_target
from pipeline.storage.config import RetryPolicy, StorageConfig
from pipeline.storage.objects import range_past_the_end
from pipeline.storage.ranges import read_range
from pipeline.storage.urls import filesystem
from infra.options import OptionError
from infra.redact import redact
from infra.net import free_port
from infra.testing.s3_faults import SilentEndpoint
from pipeline.storage.retry import is_transient, permanent_cause
from pipeline.storage.store import ShardStore

FAST_RETRY = RetryPolicy(max_attempts=4, base_delay_s=0.01, max_delay_s=0.05)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, faulty_s3):
    """Three shards in a local folder and uploaded to the fault-injecting S3."""
    root = tmp_path_factory.mktemp("ds")
    manifest = numbered_shards(root, [12, 9, 11], image_size=(200, 160))
    client = faulty_s3.client()
    for p in root.iterdir():
        client.upload_file(str(p), "faults", f"ds/{p.name}")
    return root, manifest


def _config(faulty_s3, tmp_path, **kw) -> StorageConfig:
    # s3fs's and botocore's own retries are off by default: the faults reach our retry layer
    options = {"endpoint_url": faulty_s3.endpoint_url, "key": "fake", "secret": "fake-secret"}
    kw.setdefault("read_timeout_s", 1.0)
    return StorageConfig(options=options, retry=kw.pop("retry", FAST_RETRY), cache_dir=str(tmp_path / "cache"), **kw)


def _store(faulty_s3, tmp_path, events=None, **kw) -> ShardStore:
    on_event = (lambda name, n: events.append((name, n))) if events is not None else None
    return ShardStore("s3://faults/ds", _config(faulty_s3, tmp_path, **kw), on_event=on_event)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["slowdown", "error500", "truncate", "stall", "delay"])
def test_transient_faults_are_retried_and_bytes_arrive_intact(kind, dataset, faulty_s3, tmp_path):
    root, manifest = dataset
    shard = manifest.shards[1]
    events = []
    store = _store(faulty_s3, tmp_path, events)
    faulty_s3.faults.clear()
    faulty_s3.faults.add(kind, match=shard.name, times=2, seconds=3.0 if kind == "stall" else 0.3)
    with store.open_shard(shard) as f:
        assert f.read() == (root / shard.name).read_bytes()
    retries = sum(n for name, n in events if name == "fetch_retry")
    assert faulty_s3.faults.injected[:1] == [kind]
    if kind == "delay":
        assert retries == 0  # slow is not failed
    else:
        assert retries >= 1
    assert sum(n for name, n in events if name == "bytes_fetched") >= shard.bytes


@pytest.mark.integration
def test_a_mid_stream_failure_neither_loses_nor_duplicates_samples(dataset, faulty_s3, tmp_path):
    _, manifest = dataset
    faulty_s3.faults.clear()
    for shard in manifest.shards:
        faulty_s3.faults.add("truncate", match=shard.name, times=1)
    cfg = LoaderConfig(url="s3://faults/ds", batch_size=5, num_workers=2, storage=_config(faulty_s3, tmp_path),
                       plan=PlanConfig(window_shards=1))
    ids = [i for b in build_loader(cfg, 0, 1) for i in b.sample_ids.tolist()]
    assert sorted(ids) == list(range(manifest.total_samples))
    assert faulty_s3.faults.injected.count("truncate") == 3


@pytest.mark.integration
def test_missing_object_is_permanent_and_named(dataset, faulty_s3, tmp_path):
    events = []
    store = _store(faulty_s3, tmp_path, events)
    ghost = ShardInfo("shard-999999.tar", 1, 100, "0" * 64)
    with pytest.raises(ShardFetchError, match=r"shard shard-999999.tar at s3://faults/ds \(endpoint http://127.0.0.1:\d+\): not found"):
        store.local_path(ghost)
    assert not [e for e in events if e[0] == "fetch_retry"]  # no pointless retries


@pytest.mark.integration
def test_persistent_faults_end_in_one_clear_error(dataset, faulty_s3, tmp_path):
    _, manifest = dataset
    faulty_s3.faults.clear()
    faulty_s3.faults.add("slowdown", match=manifest.shards[0].name, times=100)
    store = _store(faulty_s3, tmp_path, retry=RetryPolicy(3, 0.01, 0.02))
    t0 = time.monotonic()
    with pytest.raises(ShardFetchError, match=r"shard-000000.tar at s3://faults/ds \(endpoint .*\): failed after 3 attempts in [\d.]+ s \(last: "):
        store.local_path(manifest.shards[0])
    assert time.monotonic() - t0 < 30
    faulty_s3.faults.clear()


@pytest.mark.integration
def test_checksum_mismatch_after_retries(dataset, faulty_s3, tmp_path):
    _, manifest = dataset
    good = manifest.shards[2]
    wrong = ShardInfo(good.name, good.samples, good.bytes, "f" * 64)
    with pytest.raises(ShardFetchError, match=r"checksum mismatch \(ChecksumMismatch: sha256 \w+… != manifest f+… twice\)"):
        _store(faulty_s3, tmp_path, retry=RetryPolicy(2, 0.01, 0.02)).local_path(wrong)
    assert not list((tmp_path / "cache").glob("*.tar"))  # nothing unverified is cached


@pytest.mark.integration
def test_xxh3_verifies_by_default_and_sha256_mode_takes_nothing_only_xxh3_checked(dataset, faulty_s3, tmp_path):
    """Which digest guards a download, shown with a manifest entry whose one digest
    is wrong: the other mode accepts it. A body that only xxh3 vouched for (what a
    crafted collision would be) is cached under another name than its sha256, so a
    ``checksum='sha256'`` reader on the same node fetches and checks it itself."""
    root, manifest = dataset
    faulty_s3.faults.clear()
    good = manifest.shards[0]
    body = (root / good.name).read_bytes()
    assert good.xxh3_128 and good.sha256
    bad_fast = dataclasses.replace(good, xxh3_128="0" * 32)
    with pytest.raises(ShardFetchError, match=r"ChecksumMismatch: xxh3_128 \w+… != manifest 0+… twice"):
        _store(faulty_s3, tmp_path, retry=RetryPolicy(2, 0.01, 0.02)).local_path(bad_fast)
    assert _store(faulty_s3, tmp_path, checksum="sha256").local_path(bad_fast).read_bytes() == body

    bad_sha = dataclasses.replace(good, sha256="e" * 64)  # the body matches only its xxh3
    events = []
    assert _store(faulty_s3, tmp_path, events).local_path(bad_sha).read_bytes() == body
    assert ("cache_miss", 1) in events
    with pytest.raises(ShardFetchError, match=r"ChecksumMismatch: sha256 \w+… != manifest e+…"):
        _store(faulty_s3, tmp_path, retry=RetryPolicy(2, 0.01, 0.02), checksum="sha256").local_path(bad_sha)


@pytest.mark.integration
def test_the_first_batchs_shards_are_warmed_by_the_parent_and_each_shard_is_fetched_once(dataset, faulty_s3, tmp_path,
                                                                                        monkeypatch):
    from pipeline.decode.reader import warm_first_batch

    _, manifest = dataset
    faulty_s3.faults.clear()
    cfg = LoaderConfig(url="s3://faults/ds", batch_size=5, storage=_config(faulty_s3, tmp_path / "warm"),
                       plan=PlanConfig(window_shards=1))
    loader = build_loader(cfg, 0, 1)
    ids, _ = loader._rank_ids()
    first = {manifest.shards[s].name for s in loader.plan.locate(ids[:5])[0].tolist()}
    warm_first_batch(loader.data, ids)
    store = loader.manifest.store_of(0)
    keys = {store.cache_key(s): s.name for s in manifest.shards}
    wait_for(lambda: {keys.get(p.stem) for p in store.cache.dir.glob("*.tar")} == first, timeout=30)
    time.sleep(0.2)
    assert {keys.get(p.stem) for p in store.cache.dir.glob("*.tar")} == first  # those, and nothing else

    log = tmp_path / "downloads.log"
    log_downloads(monkeypatch, log, lambda store, shard: f"{os.getpid()} {shard.name}")
    cfg = LoaderConfig(url="s3://faults/ds", batch_size=5, num_workers=2, storage=_config(faulty_s3, tmp_path / "run"),
                       plan=PlanConfig(window_shards=1))
    ids = [i for b in build_loader(cfg, 0, 1) for i in b.sample_ids.tolist()]
    assert sorted(ids) == list(range(manifest.total_samples))
    fetched = [line.split()[1] for line in log.read_text().splitlines()]
    assert sorted(fetched) == sorted(s.name for s in manifest.shards)  # parent and workers: once each


@pytest.mark.integration
def test_memory_mode_reads_the_same_samples_and_writes_nothing_to_disk(dataset, faulty_s3, tmp_path):
    root, manifest = dataset
    faulty_s3.faults.clear()
    for shard in manifest.shards:  # a retried, half-arrived download too
        faulty_s3.faults.add("truncate", match=shard.name, times=1)

    def epoch(mode):
        cfg = LoaderConfig(url="s3://faults/ds", batch_size=5, num_workers=1, normalize=False,
                           plan=PlanConfig(window_shards=2),
                           storage=_config(faulty_s3, tmp_path / mode, cache_mode=mode))
        batches = list(build_loader(cfg, 0, 1))
        return [i for b in batches for i in b.sample_ids.tolist()], torch.cat([b.images for b in batches])

    ids, images = epoch("memory")
    assert faulty_s3.faults.injected.count("truncate") == len(manifest.shards)
    assert not (tmp_path / "memory").exists()  # no cache, no part file
    disk_ids, disk_images = epoch("disk")
    assert ids == disk_ids and sorted(ids) == list(range(manifest.total_samples)) and torch.equal(images, disk_images)

    store = _store(faulty_s3, tmp_path, retry=RetryPolicy(2, 0.01, 0.02), cache_mode="memory")
    with store.open_shard(manifest.shards[1]) as f:
        assert f.read() == (root / manifest.shards[1].name).read_bytes()
        f.seek(100)
        assert f.read(7) == (root / manifest.shards[1].name).read_bytes()[100:107]
    bad = dataclasses.replace(manifest.shards[0], xxh3_128="0" * 32)
    with pytest.raises(ShardFetchError, match=r"xxh3_128 \w+… != manifest 0+… twice"):
        store.open_shard(bad)
    with pytest.raises(ShardFetchError, match="needs the shard as a local file.*cache_mode='disk'"):
        store.local_path(manifest.shards[0])
    huge = dataclasses.replace(manifest.shards[0], bytes=2**40)  # what a hostile manifest may claim
    with pytest.raises(ShardFetchError, match=r"1024.0 GiB, more than cache_limit_gb \(20\)"):
        store.open_shard(huge)


def test_a_damaged_local_shard_is_named_by_the_checksum_that_caught_it(tmp_path):
    manifest = numbered_shards(tmp_path, [3, 3])
    shard = manifest.shards[1]
    data = bytearray((tmp_path / shard.name).read_bytes())
    data[len(data) // 2] ^= 1  # one bit flipped, same size
    (tmp_path / shard.name).write_bytes(bytes(data))
    for mode, algorithm in (("xxh3", "xxh3_128"), ("sha256", "sha256")):
        with pytest.raises(ShardFetchError, match=rf"{shard.name}.*ChecksumMismatch: {algorithm} \w+… != manifest"):
            ShardStore(str(tmp_path), StorageConfig(checksum=mode)).open_shard(shard)
    ShardStore(str(tmp_path)).open_shard(manifest.shards[0]).close()  # the undamaged one reads


def _entry(cache: ShardCache, name: str, size: int, age: float) -> None:
    path = cache.dir / f"{name * 64}.tar"  # entries are named by sha256 digests: 'aaa...a'
    path.write_bytes(b"x" * size)
    os.utime(path, (time.time() - age, time.time() - age))


def _entries(cache: ShardCache) -> list[str]:
    return sorted(p.stem[0] for p in cache.dir.glob("*.tar"))


def test_cache_evicts_least_recently_used_and_spares_pinned(tmp_path):
    cache = ShardCache(tmp_path, limit_bytes=250)
    for name, age in (("a", 30), ("b", 20), ("c", 10)):
        _entry(cache, name, 100, age)
    assert cache.get("a" * 64) is not None  # touch: a is now the most recent
    with cache.open_pinned(cache.dir / f"{'b' * 64}.tar"):
        cache.evict()
        assert _entries(cache) == ["a", "b"]  # c was LRU and unpinned
        _entry(cache, "d", 100, 0)
        _entry(cache, "e", 100, 0)
        cache.evict()
        # b is the oldest but pinned: the next-oldest unpinned go, b stays
        assert _entries(cache) in (["b", "e"], ["b", "d"])
    _entry(cache, "f", 100, 0)
    cache.evict()  # unpinned now: b is the least recent and goes
    assert not (cache.dir / f"{'b' * 64}.tar").exists()
    assert sum(p.stat().st_size for p in cache.dir.glob("*.tar")) <= 250


def test_a_committed_download_is_pinned_before_eviction_runs(tmp_path):
    """A download is opened and pinned before it enters the cache: neither its own
    commit nor another thread's eviction can delete it before its reader opens it."""
    cache = ShardCache(tmp_path, limit_bytes=150)
    _entry(cache, "a", 100, 10)
    tmp = cache.temp_path("b" * 64)
    tmp.write_bytes(b"y" * 100)
    path, pinned = cache.commit("b" * 64, tmp)
    with pinned:
        assert _entries(cache) == ["b"]  # a went to make room; b, pinned, stayed
        _entry(cache, "c", 100, -10)
        cache.evict()  # another thread's download: b is the oldest but pinned, so c goes
        assert _entries(cache) == ["b"] and pinned.read() == b"y" * 100
    _entry(cache, "d", 100, -10)
    cache.evict()  # closed: b is unpinned and the oldest
    assert _entries(cache) == ["d"] and not path.exists()


def test_a_pin_ends_when_its_reader_closes_even_with_a_forked_process_alive(tmp_path):
    """A process forked while an entry is open (a DataLoader worker starting while
    a thread reads) shares the open file; closing it in the reader still unpins it."""
    cache = ShardCache(tmp_path, limit_bytes=150)
    _entry(cache, "a", 100, 10)
    pinned = cache.open_pinned(cache.dir / f"{'a' * 64}.tar")
    ready, release = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the forked process keeps its copy of the open file and lives on
        os.write(ready[1], b"x")
        os.read(release[0], 1)
        os._exit(0)
    try:
        os.read(ready[0], 1)
        _entry(cache, "b", 100, -10)
        cache.evict()
        assert _entries(cache) == ["a"]  # pinned: b, the newer, went instead
        pinned.close()
        _entry(cache, "c", 100, -10)
        cache.evict()
        assert _entries(cache) == ["c"]  # unpinned while the forked copy is still open
    finally:
        os.write(release[1], b"x")
        os.waitpid(pid, 0)


def _commit(cache: ShardCache, i: int, size: int = 100) -> None:
    digest = hashlib.sha256(str(i).encode()).hexdigest()
    tmp = cache.temp_path(digest)
    tmp.write_bytes(b"z" * size)
    cache.commit(digest, tmp)[1].close()


def _on_disk(cache: ShardCache) -> int:
    return sum(p.stat().st_size for p in cache.dir.glob("*.tar"))


def _ledger(cache: ShardCache) -> int:
    return int((cache.dir / LEDGER_NAME).read_text())


def test_commits_list_the_cache_folder_only_when_its_ledger_runs_over_the_limit(tmp_path, monkeypatch):
    """Every commit listed (and stat'ed) the whole folder: ~0.1-0.3 s of CPU per
    download with 20,000 entries. Now a ledger keeps the total, and a cache of many
    entries evicts a little below its limit, so most commits list nothing."""
    cache = ShardCache(tmp_path, limit_bytes=300 * 100)  # room for 300 entries of 100 bytes
    listings = []
    evict = cache.evict
    monkeypatch.setattr(cache, "evict", lambda: listings.append(1) or evict())
    for i in range(900):
        _commit(cache, i)
        assert _ledger(cache) == _on_disk(cache) <= cache.limit_bytes, i
    # one listing builds the ledger at the first commit; the next at commit 301, over the limit, then one
    # every 11 commits: each makes room for limit/32 bytes (9 entries) and the limit holds one more.
    # Before, each of the 900 commits listed the folder.
    assert len(listings) == 1 + 1 + (900 - 301) // 11
    assert _on_disk(cache) >= eviction_target(cache.limit_bytes, 300) - 100


def test_a_small_cache_evicts_exactly_to_its_limit(tmp_path):
    cache = ShardCache(tmp_path, limit_bytes=4 * 100)
    for i in range(10):
        _commit(cache, i)
        assert _on_disk(cache) == min(i + 1, 4) * 100 == _ledger(cache)


def test_a_torn_or_missing_ledger_is_rebuilt_by_the_next_commit(tmp_path):
    cache = ShardCache(tmp_path, limit_bytes=10_000)
    for i in range(3):
        _commit(cache, i)
    (cache.dir / LEDGER_NAME).write_text("12")  # torn mid-write: 12 of 300 bytes
    (cache.dir / LEDGER_NAME).write_text("garbage")
    _commit(cache, 3)
    assert _ledger(cache) == _on_disk(cache) == 400
    (cache.dir / LEDGER_NAME).unlink()
    _commit(cache, 4)
    assert _ledger(cache) == _on_disk(cache) == 500
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.write_text("keep")
    (cache.dir / LEDGER_NAME).unlink()
    (cache.dir / LEDGER_NAME).symlink_to(elsewhere)  # a link is never written through: the cache lists instead
    _commit(cache, 5)
    assert elsewhere.read_text() == "keep" and _on_disk(cache) == 600


def test_processes_committing_at_once_keep_the_ledger_exact(tmp_path):
    cache = ShardCache(tmp_path, limit_bytes=400 * 100)
    pids = []
    for worker in range(3):
        pid = os.fork()
        if pid == 0:  # each process commits its own 250 entries, racing the others
            try:
                for i in range(250):
                    _commit(ShardCache(tmp_path, limit_bytes=400 * 100), worker * 1000 + i)
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    # a listing that lands between another process's rename and its ledger update counts that entry twice:
    # the ledger may run ahead of the disk (a listing comes sooner), never behind it (the cache past its limit)
    assert _ledger(cache) >= _on_disk(cache) and _on_disk(cache) <= cache.limit_bytes
    assert _on_disk(cache) >= eviction_target(cache.limit_bytes, 400) - 3 * 100
    cache.evict()
    assert _ledger(cache) == _on_disk(cache)


def test_a_local_shard_removed_after_verification_is_a_named_error(tmp_path):
    manifest = numbered_shards(tmp_path, [3, 3])
    store = ShardStore(str(tmp_path))
    shard = manifest.shards[0]
    store.open_shard(shard).close()  # verified once per process
    (tmp_path / shard.name).unlink()
    with pytest.raises(ShardFetchError, match=rf"shard {shard.name}: .* was removed after it was verified"):
        store.open_shard(shard)


@pytest.mark.parametrize("backend", ["cpu", "dali"])
def test_a_local_shard_rewritten_in_place_is_verified_again(tmp_path, backend):
    """`mae shard` run again into the folder of a running job: same names, same
    counts, other images. The dali backend (and cpu without workers) kept reading
    with the first epoch's verification, so every planned id named another image."""
    numbered_shards(tmp_path / "live", [5, 5])
    cfg = LoaderConfig(url=str(tmp_path / "live"), batch_size=5, num_workers=0, backend=backend,
                       plan=PlanConfig(window_shards=1), overlap_epochs=False)  # epoch 1 opens after the rewrite
    loader = build_loader(cfg, rank=0, world_size=1)
    assert sum(len(b.keys) for b in loader) == 10
    other = numbered_shards(tmp_path / "other", [5, 5], image_size=(48, 64))
    for shard in other.shards:  # replaced as a writer does (a new file renamed over); the old manifest stays
        os.replace(tmp_path / "other" / shard.name, tmp_path / "live" / shard.name)
    with pytest.raises(ShardFetchError, match=r"checksum mismatch"):
        sum(len(b.keys) for b in loader)


@pytest.mark.integration
def test_concurrent_readers_download_a_shard_once(dataset, faulty_s3, tmp_path):
    _, manifest = dataset
    faulty_s3.faults.clear()
    events = []
    store = _store(faulty_s3, tmp_path, events)
    fetch = store._fetch

    def fetch_once_all_missed(*args, **kwargs):  # the download lands only after every reader looked
        deadline = time.monotonic() + 30
        while sum(n for name, n in events if name == "cache_miss") < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        return fetch(*args, **kwargs)

    store._fetch = fetch_once_all_missed
    threads = [threading.Thread(target=store.local_path, args=(manifest.shards[0],)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(n for name, n in events if name == "bytes_fetched") == manifest.shards[0].bytes
    assert sum(n for name, n in events if name == "cache_miss") == 4  # all missed, one fetched


def test_redact_removes_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    msg = ("GET https://b.s3.amazonaws.com/x?X-Amz-Credential=AKIAABCDEFGHIJKLMNOP%2F2026&X-Amz-Signature=deadbeef "
           "secret_access_key='s3cr3t-value-123' https://user:pa55@host/path AKIAABCDEFGHIJKLMNOP")
    out = redact(msg)
    for secret in ("s3cr3t-value-123", "deadbeef", "AKIAABCDEFGHIJKLMNOP", "pa55"):
        assert secret not in out
    assert "https://b.s3.amazonaws.com/x" in out
    # fsspec's HTTP errors print the URL without its scheme
    assert redact("(last: NonHttpUrlClientError: alice:S3cr3tPass@127.0.0.1:9/x.jpg)") == (
        "(last: NonHttpUrlClientError: <redacted>127.0.0.1:9/x.jpg)")
    for text in ("mae: error: x.py:12: user@example.com", "#SBATCH --signal=B:USR1@90"):  # no credential there
        assert redact(text) == text


def test_credentials_under_any_filesystems_names_are_redacted_everywhere():
    """An HTTP filesystem's Authorization header, adlfs's credential and account_key:
    outside the old list of names (key, secret, token...), they went in clear into
    meta.json, TensorBoard, W&B, MLflow and a Slurm script."""
    from infra.redact import redact_tree, register_secrets

    options = {"headers": {"Authorization": "Bearer sk_live_SECRETTOKEN123", "X-Trace": "visible-trace-id"},
               "credential": "AZCREDVALUE444", "account_key": "AZUREKEYVALUE777", "account_name": "myaccount",
               "config_kwargs": {"signature_version": "s3v4"}, "endpoint_url": "https://blob.example.com"}
    register_secrets(options)
    text = redact(json.dumps(options))
    for secret in ("sk_live_SECRETTOKEN123", "AZCREDVALUE444", "AZUREKEYVALUE777", "visible-trace-id"):
        assert secret not in text and secret not in redact(f"error: header {secret} refused")
    tree = redact_tree({"data": {"storage": {"options": options}}})["data"]["storage"]["options"]
    assert tree["headers"] == {"Authorization": "<redacted>", "X-Trace": "<redacted>"}  # any header
    assert tree["credential"] == tree["account_key"] == "<redacted>"
    assert (tree["account_name"], tree["config_kwargs"], tree["endpoint_url"]) == (
        "myaccount", {"signature_version": "s3v4"}, "https://blob.example.com")


@pytest.mark.integration
def test_a_forked_process_makes_one_client_however_many_threads_meet_the_parents(dataset, faulty_s3, tmp_path,
                                                                                monkeypatch):
    """A worker's fetch threads that all reach the inherited client at once make one
    new client between them, and each reads through it."""
    import multiprocessing

    from pipeline.storage import objects

    faulty_s3.faults.clear()
    store = _store(faulty_s3, tmp_path)
    parent = store.fs
    made = []
    real = objects.filesystem

    def slow_filesystem(*args, **kwargs):  # widens the window in which the threads race
        made.append(1)
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(objects, "filesystem", slow_filesystem)

    def child(out):
        seen = []
        threads = [threading.Thread(target=lambda: seen.append(store.fs)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        body = store.fs.cat_file(f"{store.root}/manifest.json")
        out.put((len(made), len({id(fs) for fs in seen}), any(fs is parent for fs in seen), len(body)))

    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=child, args=(out,))
    proc.start()
    made_in_child, distinct, inherited, nbytes = out.get(timeout=60)
    proc.join(30)
    assert (made_in_child, distinct, inherited) == (1, 1, False)
    assert nbytes > 0 and made == []  # the parent kept its own client


@pytest.mark.integration
@pytest.mark.parametrize("claimed", ["half again", "a TiB"])
def test_an_object_shorter_than_the_manifest_says_is_one_error_at_once(claimed, dataset, faulty_s3, tmp_path):
    """A replaced or cut object (or a forged size) was retried as a network error, and a
    1 TiB claim queued 131,072 ranged GETs before failing."""
    _, manifest = dataset
    good = manifest.shards[0]
    size = good.bytes * 3 // 2 if claimed == "half again" else 2**40
    events = []
    store = _store(faulty_s3, tmp_path, events, retry=RetryPolicy(4, 0.01, 0.02))
    faulty_s3.faults.clear()
    t0 = time.monotonic()
    with pytest.raises(ShardFetchError, match=rf"{good.name} at s3://faults/ds \(endpoint .*\): the object changed "
                                              rf"\(ObjectChanged: bytes \d+-\d+ of the manifest's {size} gave \d+: "
                                              "the object is shorter than the manifest says"):
        store.local_path(dataclasses.replace(good, bytes=size))
    assert time.monotonic() - t0 < 10
    assert not [e for e in events if e[0] == "fetch_retry"]
    assert sum(n for name, n in events if name == "bytes_fetched") <= good.bytes  # no GETs past the end repeated
    assert not list((tmp_path / "cache").glob("*.tar"))


@pytest.mark.integration
def test_a_full_cache_disk_is_an_error_and_caches_nothing(dataset, faulty_s3, tmp_path):
    """A full disk took part of a write without an error: the shard was cached with its
    tail missing, as verified, and every later run called the intact S3 object corrupt."""
    _, manifest = dataset
    shard = manifest.shards[0]
    small = tmp_path / "small"
    small.mkdir()
    pages = shard.bytes // 2 // 4096 * 4096
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages}", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("needs to mount a small tmpfs (root)")
    try:
        faulty_s3.faults.clear()
        full = ShardStore("s3://faults/ds", dataclasses.replace(_config(faulty_s3, tmp_path, retry=RetryPolicy(2, 0.01, 0.02)),
                                                                 cache_dir=str(small)))
        with pytest.raises(ShardFetchError, match="no space left on the local disk"):
            full.local_path(shard)
        assert not [p for p in small.rglob("*") if p.is_file() and p.suffix == ".tar"]
        roomy = ShardStore("s3://faults/ds", _config(faulty_s3, tmp_path))
        with roomy.open_shard(shard) as f:
            assert f.read() == (dataset[0] / shard.name).read_bytes()
    finally:
        subprocess.run(["umount", str(small)], check=False)


@pytest.mark.integration
@pytest.mark.parametrize("workers", [0, 2])
def test_a_cache_file_it_cannot_open_is_one_line_from_a_worker_too(dataset, faulty_s3, tmp_path, workers):
    """An OSError from the cache in a DataLoader worker (a read-only folder, here a lock
    path that is a folder) was torch's 2 KB re-raise with the worker's traceback."""
    _, manifest = dataset
    faulty_s3.faults.clear()
    storage = _config(faulty_s3, tmp_path)
    last = manifest.shards[-1]  # not one of the first batch's, which the main process fetches itself
    (tmp_path / "cache" / f"{ShardStore('s3://faults/ds', storage).cache_key(last)}.lock").mkdir(parents=True)
    cfg = LoaderConfig(url="s3://faults/ds", batch_size=4, num_workers=workers, storage=storage,
                       plan=PlanConfig(window_shards=1, shuffle=False))
    with pytest.raises(IsADirectoryError) as caught:
        list(build_loader(cfg, 0, 1))
    message = str(caught.value)
    assert message.endswith(".lock'") and "\n" not in message and "Caught" not in message


def test_a_cache_folder_that_is_a_file_or_an_endpoint_that_is_not_a_url_is_named(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ShardFetchError, match=r"cannot use .*/file/shards as the shard cache \(Not a directory\): "
                                              "point data.storage.cache_dir, or MAESCALE_CACHE, at a folder"):
        ShardCache(tmp_path / "file" / "shards", 2**20)
    for endpoint, problem in [("127.0.0.1:9000", "must be http://host"), ("http://[::1:9000", "is not a URL"),
                              ("http://127.0.0.1:99999", "is not a URL"), ("htp://x:1", "must be http://host"),
                              ("http://admin:pw-s3cret@127.0.0.1:9000", "must not carry a user name or password")]:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # --endpoint-url is checked by its config; this was not
        with pytest.raises(ShardFetchError, match=rf"S3 endpoint .* {problem}.*check AWS_ENDPOINT_URL") as caught:
            ShardStore("s3://bucket/ds", StorageConfig(cache_dir=str(tmp_path / "cache"))).read_manifest()
        assert "s3cret" not in str(caught.value)


def test_an_endpoint_with_a_password_is_refused_by_the_config_without_showing_it():
    # botocore took it as part of the host: every request failed as a network error, retried to the deadline
    for endpoint in ("http://admin:pw-s3cret@minio:9000", "ftp://admin:pw-s3cret@minio:9000"):
        with pytest.raises(OptionError, match="endpoint_url must") as caught:
            StorageConfig(endpoint_url=endpoint)
        assert "s3cret" not in str(caught.value) and "<redacted>" in str(caught.value)
    assert StorageConfig(endpoint_url="https://minio.example:9000").endpoint_url == "https://minio.example:9000"


def test_a_url_of_no_known_scheme_is_one_line_naming_it():
    # fsspec's ValueError('Protocol not known') came out as a traceback from every command
    from pipeline.errors import ObjectNotAccessible
    from pipeline.storage.urls import filesystem

    with pytest.raises(ObjectNotAccessible, match=r"notaurl://x/y: no filesystem for URLs of the form notaurl://"):
        filesystem("notaurl://x/y")


def _big_object(faulty_s3, name: str, size: int) -> ShardInfo:
    """A random object of ``size`` bytes in the faults bucket, as a manifest entry."""
    data = os.urandom(size)
    faulty_s3.client().put_object(Bucket="faults", Key=f"ds/{name}", Body=data)
    import xxhash

    return ShardInfo(name, 1, size, hashlib.sha256(data).hexdigest(), xxh3_128=xxhash.xxh3_128(data).hexdigest())


@pytest.mark.integration
def test_a_range_arrives_as_the_bodys_own_chunks_in_order(seaweed, tmp_path):
    """On S3 a ranged GET's body is handed over chunk by chunk as received (no
    buffer of the whole range, no join): the chunks tile the range exactly."""
    data = os.urandom(3 * 2**20 + 12345)
    client = seaweed.client()
    client.create_bucket(Bucket="chunks")
    client.put_object(Bucket="chunks", Key="obj", Body=data)
    storage = StorageConfig(options={"endpoint_url": seaweed.endpoint_url, "key": seaweed.access_key,
                                     "secret": seaweed.secret_key})
    fs, root = filesystem("s3://chunks", storage)
    got = []
    start, end = 1000, len(data) - 7
    assert read_range(fs, f"{root}/obj", start, end, lambda at, chunk: got.append((at, chunk))) == end - start
    assert len(got) > 1 and max(len(c) for _, c in got) < end - start
    assert [at for at, _ in got] == [start + sum(len(c) for _, c in got[:i]) for i in range(len(got))]
    assert b"".join(c for _, c in got) == data[start:end]
    # past the end: the server says how many bytes there are, none is handed over beyond them
    got.clear()
    assert read_range(fs, f"{root}/obj", len(data) - 10, len(data) + 90, lambda at, c: got.append(c)) == 10
    assert got == []
    local = tmp_path / "obj"
    local.write_bytes(data)
    fs, path = filesystem(str(local))
    got.clear()
    assert read_range(fs, path, 5, 105, lambda at, chunk: got.append((at, chunk))) == 100
    assert got == [(5, data[5:105])]


def _get_object_calls(fs) -> list[str]:
    """The keys of the S3 client's own ``get_object`` calls from now on (its event
    hook: the client itself counts, nothing stands in for it)."""
    calls: list[str] = []
    fs.connect()
    fs.s3.meta.events.register("before-call.s3.GetObject", lambda params, **kw: calls.append(params["url_path"]))
    return calls


def _own_fs(faulty_s3):
    """A filesystem of its own, not fsspec's cached instance: what its client
    learns (a bucket's redirect) stays in this test."""
    storage = _config(faulty_s3, Path("/nonexistent"))
    return filesystem("s3://faults", dataclasses.replace(storage, options={**storage.options,
                                                                            "skip_instance_cache": True}))[0]


def _errors_both_ways(faulty_s3, fs, fault: str, path: str) -> dict[bool, OSError]:
    """The error each path (presigned: True, the client's: False) raises for one
    injected ``fault`` on a range of ``path``."""
    raised = {}
    for direct in (True, False):
        faulty_s3.faults.add(fault, match=path.rsplit("/", 1)[-1], times=1)
        with pytest.raises(OSError) as e:
            read_range(fs, path, 0, 100, lambda at, c: None, 30, direct)
        raised[direct] = e.value
    return raised


def _tiles(got: list[tuple[int, bytes]], start: int) -> bool:
    """Chunks handed over in order, each at the offset where the one before ended."""
    return [at for at, _ in got] == [start + sum(len(c) for _, c in got[:i]) for i in range(len(got))]


@pytest.mark.integration
def test_presigned_ranges_read_what_the_client_reads_without_its_get_object(seaweed):
    """The fast path and the reference path, side by side on a server that checks
    signatures: the same bytes, tiled chunk by chunk, the same errors, and the
    fast path never calls ``get_object``; requester-pays reads always use it."""
    data = os.urandom(2 * 2**20 + 777)
    client = seaweed.client()
    client.create_bucket(Bucket="presigned")
    client.put_object(Bucket="presigned", Key="obj", Body=data)
    opts = {"endpoint_url": seaweed.endpoint_url, "key": seaweed.access_key, "secret": seaweed.secret_key,
            "skip_instance_cache": True}
    fs, root = filesystem("s3://presigned", StorageConfig(options=opts))
    calls = _get_object_calls(fs)
    for direct, expect_calls in ((True, 0), (False, 1)):
        got = []
        assert read_range(fs, f"{root}/obj", 3, len(data) - 5, lambda at, c: got.append((at, c)), 30,
                          direct) == len(data) - 8
        assert b"".join(c for _, c in got) == data[3:-5] and _tiles(got, 3) and len(got) > 1
        assert len(calls) == expect_calls
        calls.clear()
    errors = {}
    for direct in (True, False):
        for case, path, start, end in (("missing", "nothing-here", 0, 10), ("past the end", "obj", len(data) + 1,
                                                                               len(data) + 9)):
            with pytest.raises(OSError) as e:
                read_range(fs, f"{root}/{path}", start, end, lambda at, c: None, 30, direct)
            errors[case, direct] = (type(e.value), e.value.errno, str(e.value))
        wrong, _ = filesystem("s3://presigned", StorageConfig(options={**opts, "secret": "wrong-secret-value"}))
        with pytest.raises(PermissionError, match="signature"):
            read_range(wrong, f"{root}/obj", 0, 10, lambda at, c: None, 30, direct)
    assert errors["missing", True][0] is FileNotFoundError and errors["past the end", True][1] == errno.EINVAL
    assert errors["missing", True] == errors["missing", False]
    assert errors["past the end", True] == errors["past the end", False]
    payer, _ = filesystem("s3://presigned", StorageConfig(options={**opts, "requester_pays": True}))
    calls = _get_object_calls(payer)
    got = []
    assert read_range(payer, f"{root}/obj", 0, 100, lambda at, c: got.append(c), 30, True) == 100
    assert b"".join(got) == data[:100] and len(calls) == 1


def _chain(error: BaseException) -> str:
    """The text of an exception and of every one behind it (cause, context), as a
    reporter that walks the whole chain would log it."""
    parts = []
    while error is not None and len(parts) < 10:
        parts.append(f"{error!r} {error} {vars(error)}")
        error = error.__cause__ or error.__context__
    return " ".join(parts)


@pytest.mark.integration
def test_a_presigned_range_that_cannot_connect_names_the_endpoint_not_the_signed_url():
    """A connection error raised while sending a presigned GET carries the URL
    without its query: the signature and credential never reach a message."""
    with SilentEndpoint() as silent:
        opts = {"endpoint_url": silent.url, "key": "AKIDEXAMPLEKEY", "secret": "example-secret-value",
                "skip_instance_cache": True}
        fs, _ = filesystem("s3://hung", StorageConfig(options=opts, read_timeout_s=0.5, connect_timeout_s=0.5))
        with pytest.raises(Exception) as e:
            read_range(fs, "hung/some/shard.tar", 0, 10, lambda at, c: None, 10, True)
    text = _chain(e.value)
    assert type(e.value).__module__.startswith("botocore") and f"{silent.url}/hung/some/shard.tar" in str(e.value)
    assert "X-Amz" not in text and "AKIDEXAMPLEKEY" not in text and "?" not in str(e.value)


@pytest.mark.integration
def test_a_redirect_answer_is_followed_by_the_client_and_an_empty_416_is_past_the_end(faulty_s3, caplog):
    """What a presigned GET cannot settle itself goes through the client: a bucket
    in another region answers 400; the client's own GET then reads the range, and
    so do the bucket's later ranges (botocore would sign their URLs for the wrong
    region again). A 416 with no body (a proxy's) still means the range starts
    past the end."""
    caplog.set_level(logging.INFO, logger="pipeline.storage.ranges")
    data = os.urandom(300_000)
    faulty_s3.client().put_object(Bucket="faults", Key="redirect/obj.bin", Body=data)
    fs = _own_fs(faulty_s3)
    calls = _get_object_calls(fs)
    faulty_s3.faults.clear()
    faulty_s3.faults.add("empty_416", match="obj.bin", times=1)
    with pytest.raises(OSError) as e:
        read_range(fs, "faults/redirect/obj.bin", 300_001, 300_010, lambda at, c: None, 30)
    assert range_past_the_end(e.value) and calls == []
    faulty_s3.faults.add("wrong_region", match="obj.bin", times=1)
    for start, end in ((10, 200_000), (200_000, 300_000)):
        got = []
        assert read_range(fs, "faults/redirect/obj.bin", start, end, lambda at, c: got.append((at, c)), 30) == end - start
        assert b"".join(c for _, c in got) == data[start:end] and _tiles(got, start)
    assert faulty_s3.faults.injected == ["empty_416", "wrong_region"] and len(calls) == 2
    assert "s3://faults answered a presigned GET with HTTP 400 AuthorizationQueryParametersError" in caplog.text


@pytest.mark.integration
def test_any_other_400_is_the_clients_error_and_the_bucket_keeps_its_presigned_gets(faulty_s3):
    """S3's 400 RequestTimeout is an error of this request, not a redirect: the
    presigned path raises what the client path raises (a transient error, retried),
    and the bucket's next ranges are still presigned GETs."""
    faulty_s3.client().put_object(Bucket="faults", Key="timeout/obj.bin", Body=b"z" * 5000)
    fs = _own_fs(faulty_s3)
    calls = _get_object_calls(fs)
    faulty_s3.faults.clear()
    errors = _errors_both_ways(faulty_s3, fs, "request_timeout", "faults/timeout/obj.bin")
    raised = {direct: (type(e), e.errno, str(e)) for direct, e in errors.items()}
    assert raised[True] == raised[False] and all(permanent_cause(e) is None for e in errors.values())  # retried
    calls.clear()
    got = []
    assert read_range(fs, "faults/timeout/obj.bin", 0, 100, lambda at, c: got.append(c), 30) == 100
    assert b"".join(got) == b"z" * 100 and calls == []


@pytest.mark.parametrize("direct, signature", [(True, "s3v4"), (True, "s3"), (False, "s3v4")])
def test_an_endpoint_that_does_not_speak_http_is_named_without_the_signed_url(direct, signature):
    """An endpoint that answers something else than HTTP (another service on that
    port): the aiohttp error wrapped in botocore's holds the request's URL; on the
    presigned path its query (signature, credential, session token) is cut from
    the message, every field and every exception behind it."""
    with SilentEndpoint(answer=b"HTTP/1.1 2000 OK\r\n\r\n") as other:
        opts = {"endpoint_url": other.url, "key": "ASIAEXAMPLEKEY", "secret": "example-secret-value",
                "token": "EXAMPLESESSIONTOKEN", "skip_instance_cache": True,
                "config_kwargs": {"signature_version": signature}}  # s3: SigV2's AWSAccessKeyId and Signature
        fs, _ = filesystem("s3://other", StorageConfig(options=opts, read_timeout_s=2, connect_timeout_s=2))
        with pytest.raises(Exception) as e:
            read_range(fs, "other/some/shard.tar", 0, 10, lambda at, c: None, 10, direct)
    text = _chain(e.value)
    assert type(e.value).__name__ == "HTTPClientError" and "Bad status line" in str(e.value), text
    assert f"{other.url}/other/some/shard.tar" in str(e.value)
    assert not re.search("X-Amz|Signature=|ASIAEXAMPLEKEY|EXAMPLESESSIONTOKEN|example-secret", text, re.I), text


@pytest.mark.integration
def test_a_proxy_page_refusing_a_range_is_access_denied_on_both_paths(faulty_s3):
    """A 403 whose body is a proxy's HTML page, no S3 error code: both paths read it
    by its status, access denied (permanent), where s3fs alone made it an I/O error
    retried for minutes."""
    faulty_s3.client().put_object(Bucket="faults", Key="proxy/obj.bin", Body=b"p" * 5000)
    fs = _own_fs(faulty_s3)
    faulty_s3.faults.clear()
    raised = {direct: (type(e), permanent_cause(e)) for direct, e in _errors_both_ways(faulty_s3, fs, "html_403",
                                                                                       "faults/proxy/obj.bin").items()}
    assert faulty_s3.faults.injected == ["html_403", "html_403"]
    assert raised[True] == raised[False] == (PermissionError, "access denied (check credentials)")


@pytest.mark.integration
@pytest.mark.parametrize("limit_s", [60.0, None])
def test_a_read_timeout_is_named_as_itself_not_as_the_transfer_limit(faulty_s3, limit_s):
    """A body that stalls past the client's read timeout (1 s) well inside the
    transfer limit raises the client's timeout, retried, on both paths alike: not
    "still arriving after 60 s" a minute early, and not a TypeError when no limit
    is set."""
    faulty_s3.client().put_object(Bucket="faults", Key="stalled/obj.bin", Body=os.urandom(100_000))
    fs = _own_fs(faulty_s3)
    faulty_s3.faults.clear()
    for direct in (True, False):
        faulty_s3.faults.add("stall", match="obj.bin", times=1, seconds=4)
        began = time.monotonic()
        with pytest.raises(Exception) as e:
            read_range(fs, "faults/stalled/obj.bin", 0, 100_000, lambda at, c: None, limit_s, direct)
        assert time.monotonic() - began < 4 and "still arriving" not in str(e.value)
        assert isinstance(e.value, TimeoutError) or "timeout" in type(e.value).__name__.lower(), repr(e.value)
        assert is_transient(e.value), repr(e.value)
    assert faulty_s3.faults.injected == ["stall", "stall"]


@pytest.mark.integration
@pytest.mark.parametrize("start", [1000, 0])
def test_an_answer_for_other_bytes_than_asked_is_not_handed_over(faulty_s3, start):
    """A 206 of the right length whose Content-Range names other bytes (a proxy or
    server bug): not a byte of it reaches ``put``, on either path, and the read
    says the server does not honour the range (the store refuses it for good)."""
    data = os.urandom(5000)
    faulty_s3.client().put_object(Bucket="faults", Key="shifted/obj.bin", Body=data)
    fs = _own_fs(faulty_s3)
    faulty_s3.faults.clear()
    for direct in (True, False):
        faulty_s3.faults.add("other_bytes", match="obj.bin", times=1)
        got = []
        assert read_range(fs, "faults/shifted/obj.bin", start, start + 100, lambda at, c: got.append(c), 30,
                          direct) == 101
        assert got == []
        assert read_range(fs, "faults/shifted/obj.bin", start, start + 100, lambda at, c: got.append(c), 30,
                          direct) == 100
        assert b"".join(got) == data[start:start + 100]
    assert faulty_s3.faults.injected == ["other_bytes", "other_bytes"]


def test_a_presigned_range_to_a_refused_port_names_the_endpoint_not_the_signed_url():
    """Connection errors of every kind (refused here, a read timeout below) carry
    the URL without its query."""
    port = free_port()
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "AKIDEXAMPLEKEY", "secret": "example-secret-value",
            "skip_instance_cache": True}
    fs, _ = filesystem("s3://refused", StorageConfig(options=opts, connect_timeout_s=1, read_timeout_s=1))
    with pytest.raises(Exception) as e:
        read_range(fs, "refused/shard.tar", 0, 10, lambda at, c: None, 10, True)
    text = _chain(e.value)
    assert type(e.value).__name__ == "EndpointConnectionError" and f"127.0.0.1:{port}/refused/shard.tar" in text
    assert "X-Amz" not in text and "AKIDEXAMPLEKEY" not in text and "?" not in str(e.value)


@pytest.mark.integration
@pytest.mark.parametrize("direct", [True, False])
def test_a_shard_store_sends_its_ranges_the_way_its_config_says(direct, dataset, faulty_s3, tmp_path):
    """``storage.direct_ranges`` reaches the store: presigned GETs by default, the
    client's ``get_object`` when off; the same GETs reach the server and the
    shards verify either way, and carry the client's own User-Agent."""
    root, manifest = dataset
    faulty_s3.faults.clear()
    store = _store(faulty_s3, tmp_path, direct_ranges=direct, range_mib=1)
    calls = _get_object_calls(store.fs)
    gets, agents = faulty_s3.faults.object_gets, faulty_s3.faults.user_agents.copy()
    for shard in manifest.shards:
        with store.open_shard(shard) as f:
            assert f.read() == (root / shard.name).read_bytes()
    ranges = sum(-(-shard.bytes // 2**20) for shard in manifest.shards)
    assert ranges >= 3 and faulty_s3.faults.object_gets - gets == ranges
    assert len(calls) == (0 if direct else ranges)
    sent = faulty_s3.faults.user_agents - agents
    assert len(sent) == 1 and sum(sent.values()) == ranges
    agent = next(iter(sent))
    assert agent.startswith("aiobotocore/") and " botocore/" in agent and "aiohttp" not in agent.split()[0]


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["ignore_range", "ignore_range_unsized"])
def test_a_server_that_ignores_ranges_is_refused_and_writes_nothing_past_a_range(kind, faulty_s3, tmp_path):
    """A 200 with the whole object to a ranged GET, announced or not: the answer is
    refused at once (a retry gets the same), and no byte of it lands at another
    range's offset or past the shard's end."""
    shard = _big_object(faulty_s3, f"whole-{kind}.tar", 3 * 2**20 + 100)
    events = []
    store = _store(faulty_s3, tmp_path, events, range_mib=1)
    faulty_s3.faults.clear()
    faulty_s3.faults.add(kind, match=shard.name, times=10)
    with pytest.raises(ShardFetchError) as refused:
        store.local_path(shard)
    # whichever range's answer comes back first is the one refused: the first 1 MiB or the 100-byte tail
    said = re.search(rf"{shard.name} at .*: the object changed \(ObjectChanged: bytes (\d+)-(\d+): the server "
                     r"answered with more than the (\d+) bytes asked, or with others "
                     r"\(it does not honour ranged GETs\)\)",
                     str(refused.value))
    assert said, str(refused.value)
    first, last, asked = map(int, said.groups())
    assert asked == last - first and asked in (2**20, 100) and first % 2**20 == 0
    assert not [e for e in events if e[0] == "fetch_retry"]
    assert not list((tmp_path / "cache").glob("*.tar"))
    assert sum(n for name, n in events if name == "bytes_fetched") < shard.bytes
    faulty_s3.faults.clear()
    with store.open_shard(shard) as f:  # the same store, once the server honours ranges again
        data = f.read()
    assert len(data) == shard.bytes and hashlib.sha256(data).hexdigest() == shard.sha256


@pytest.mark.integration
def test_memory_mode_reads_any_span_of_the_chunks_it_arrived_in(seaweed, tmp_path):
    """A shard held in memory is the pieces its ranges' bodies arrived in (many per
    range on a real server): reads across their edges give the object's bytes."""
    import random

    import xxhash

    data = os.urandom(3 * 2**20 + 4321)
    client = seaweed.client()
    client.create_bucket(Bucket="pieces")
    client.put_object(Bucket="pieces", Key="ds/big.tar", Body=data)
    storage = StorageConfig(options={"endpoint_url": seaweed.endpoint_url, "key": seaweed.access_key,
                                     "secret": seaweed.secret_key}, cache_mode="memory", range_mib=1,
                            cache_dir=str(tmp_path / "cache"))
    shard = ShardInfo("big.tar", 1, len(data), hashlib.sha256(data).hexdigest(),
                      xxh3_128=xxhash.xxh3_128(data).hexdigest())
    held = ShardStore("s3://pieces/ds", storage).fetch_bytes(shard)
    assert len(held._starts) > 3  # more pieces than ranges: the bodies' own chunks
    rng = random.Random(0)
    for _ in range(200):
        start = rng.randrange(len(data))
        n = rng.choice([1, 100, 70_000, 300_000, 2**20 + 3])
        assert held.read_at(start, n) == data[start:start + n]
    held.seek(0)
    assert held.read() == data
    assert not (tmp_path / "cache").exists()


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_a_range_cut_in_pieces_then_retried_leaves_nothing_of_the_cut_attempt(mode, faulty_s3, tmp_path):
    """The cut attempt's chunks start at other offsets than the retry's. In memory a
    range's pieces are kept only once it is whole: before, the cut attempt's pieces
    stayed beside the retry's and reads went through them (a verified shard read
    short); on disk the retry rewrites the whole range over them."""
    shard = _big_object(faulty_s3, f"pieces-{mode}.tar", 200_000)
    events = []
    store = _store(faulty_s3, tmp_path, events, cache_mode=mode)
    faulty_s3.faults.clear()
    faulty_s3.faults.add("cut_in_pieces", match=shard.name, times=1)
    with store.open_shard(shard) as f:
        data = f.read()
        f.seek(1500)
        middle = f.read(5000)
    assert faulty_s3.faults.injected == ["cut_in_pieces"]
    # one retry at least: a retry that stalls past the 1 s read timeout on a busy machine is retried again
    assert sum(n for name, n in events if name == "fetch_retry") >= 1
    assert len(data) == shard.bytes and hashlib.sha256(data).hexdigest() == shard.sha256
    assert middle == data[1500:6500]


@pytest.mark.integration
def test_a_body_dribbled_under_the_read_timeout_ends_within_the_transfer_limit(faulty_s3, tmp_path):
    """A byte every 0.3 s never trips a 2 s read timeout: 60 bytes took 18 s an
    attempt, for as long as the server liked. An attempt now ends after the timeouts
    plus its bytes at 1 MiB/s (3 s here), cancelled, and the retries stop at the
    deadline."""
    shard = _big_object(faulty_s3, "drip.tar", 60)
    events = []
    store = _store(faulty_s3, tmp_path, events, connect_timeout_s=1.0, read_timeout_s=2.0,
                   retry=RetryPolicy(2, 0.01, 0.02, deadline_s=30))
    faulty_s3.faults.clear()
    faulty_s3.faults.add("drip", match=shard.name, times=2, seconds=0.3)
    t0 = time.monotonic()
    with pytest.raises(ShardFetchError, match=r"drip.tar at .*: failed after 2 attempts .*bytes 0-60 still arriving "
                                              r"after 3 s \(a stalled transfer"):
        store.local_path(shard)
    assert time.monotonic() - t0 < 12  # two 3 s attempts and a busy machine's slack; one dribbled attempt took 18 s
    assert faulty_s3.faults.injected == ["drip", "drip"]
    assert not list((tmp_path / "cache").glob("*.tar"))
    with store.open_shard(shard) as f:  # the fault spent: the same store reads it whole
        assert hashlib.sha256(f.read()).hexdigest() == shard.sha256



def test_a_keys_file_over_its_limit_is_refused_without_reading_the_rest(tmp_path, monkeypatch):
    """A beton's keys file is one short line per sample; the manifest that names it is
    untrusted, so the file is read at most MAX_KEYS_BYTES + 1 bytes."""
    import pipeline.storage.store as store_module
    from pipeline.errors import ManifestError

    (tmp_path / "keys.txt").write_text("a/000\na/001\n")
    store = ShardStore(str(tmp_path))
    assert store.read_keys("keys.txt") == ["a/000", "a/001"]
    (tmp_path / "keys.txt").write_bytes(b"k" * (2**20 + 5))
    monkeypatch.setattr(store_module, "MAX_KEYS_BYTES", 2**20)
    with pytest.raises(ManifestError, match=r"keys.txt: more than 1 MiB of sample keys"):
        store.read_keys("keys.txt")
