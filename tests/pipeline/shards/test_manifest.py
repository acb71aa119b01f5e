"""A manifest from elsewhere is untrusted: every field is checked on load, with one
error naming the field, and nothing it says can reach outside the dataset or the
shard cache."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from tests.helpers.cli import run_mae
from tests.helpers.shards import numbered_shards

from pipeline.errors import ManifestError
from pipeline.shards.manifest import ShardManifest
from pipeline.shards.verify import verify_shards
from pipeline.storage.cache import ShardCache
from pipeline.storage.config import StorageConfig
from pipeline.storage.store import ShardStore

GOOD_SHA = "ab" * 32


def _doc(**changes) -> dict:
    shard = {"name": "shard-000000.tar", "samples": 2, "bytes": 10240, "sha256": GOOD_SHA}
    doc = {"format": "maescale-shards", "version": 1, "total_samples": 2, "total_bytes": 10240,
           "classes": ["cat", "dog"], "shards": [shard], "rejects": [], "options": {}}
    for key, value in changes.items():
        if key.startswith("shard_"):
            shard[key[len("shard_"):]] = value
        else:
            doc[key] = value
    return doc


def test_a_valid_manifest_round_trips():
    m = ShardManifest.from_json(json.dumps(_doc()))
    assert m.classes == ["cat", "dog"] and m.total_samples == 2 and m.shards[0].sha256 == GOOD_SHA
    assert ShardManifest.from_json(m.to_json()) == m


@pytest.mark.parametrize("changes, message", [
    ({"classes": "abc"}, "classes must be a list, got 'abc'"),
    ({"classes": ["a", 3]}, r"classes\[1\] must be a non-empty string"),
    ({"classes": ["a", "a"]}, "classes must not repeat a name"),
    ({"classes": ["\x1b]0;pwned\x07"]}, r"classes\[0\] must be a non-empty string without control characters"),
    ({"shard_name": "../outside/x.tar"}, r"shards\[0\].name must be a relative name inside the dataset"),
    ({"shard_name": "/etc/passwd"}, r"shards\[0\].name must be a relative name"),
    ({"shard_name": "a/./b.tar"}, r"shards\[0\].name must be a relative name"),
    ({"shard_name": "a\\..\\b.tar"}, r"shards\[0\].name must be a relative name"),
    ({"shard_name": 7}, r"shards\[0\].name must be a relative name"),
    ({"shard_sha256": "../../../tmp/evil"}, r"shards\[0\].sha256 must be 64 lowercase hex digits"),
    ({"shard_sha256": "AB" * 32}, r"shards\[0\].sha256 must be 64 lowercase hex digits"),
    ({"shard_sha256": GOOD_SHA + "00"}, r"shards\[0\].sha256 must be 64 lowercase hex digits"),
    ({"shard_samples": "2"}, r"shards\[0\].samples must be an integer"),
    ({"shard_samples": True}, r"shards\[0\].samples must be an integer"),
    ({"shard_samples": -1, "total_samples": -1}, r"shards\[0\].samples must be an integer in \[1, 134217728\]"),
    # a shard no writer lists: it was skipped without a word, its real samples never read
    ({"shard_samples": 0, "total_samples": 0}, r"shards\[0\].samples must be an integer in \[1, 134217728\]"),
    # fits its forged 2**40 bytes, but every reader permuted 2**31 positions: 16 GiB
    ({"shard_samples": 2**31, "total_samples": 2**31, "shard_bytes": 2**40, "total_bytes": 2**40},
     r"shards\[0\].samples must be an integer in \[1, 134217728\], got 2147483648"),
    ({"shard_samples": 1000, "total_samples": 1000}, r"shards\[0\].samples \(1000\) cannot fit in 10240 bytes"),
    ({"shard_bytes": 2**50, "total_bytes": 2**50}, r"shards\[0\].bytes must be an integer in \[0, 1099511627776\]"),
    ({"shard_extra": 1}, r"shards\[0\] has an unknown field 'extra'"),
    ({"total_samples": 3}, r"total_samples must equal the sum over shards \(2\), got 3"),
    ({"total_bytes": None}, r"total_bytes must equal the sum over shards \(10240\), got None"),
    ({"shards": {"name": "x"}}, r"shards must be a list"),
    ({"rejects": [{"source": "a.jpg"}]}, r"rejects\[0\] must be an object with source and reason"),
    ({"options": {"format": "parquet"}}, r"options.format must be one of tar, beton, got 'parquet'"),
    ({"options": {"format": "beton", "keys": "../../etc/passwd"}}, r"options.keys must be a relative name"),
    ({"version": 2}, "has version 2; this maescale reads version 1"),
    ({"format": "webdataset"}, "is not a maescale shard manifest"),
])
def test_each_wrong_field_is_one_error_naming_it(changes, message):
    with pytest.raises(ManifestError, match=message):
        ShardManifest.from_json(json.dumps(_doc(**changes)), "m.json")


def test_duplicate_shard_names_and_missing_fields_are_named():
    doc = _doc()
    doc["shards"].append(dict(doc["shards"][0]))
    doc["total_samples"], doc["total_bytes"] = 4, 20480
    with pytest.raises(ManifestError, match=r"shards\[1\].name repeats an earlier shard"):
        ShardManifest.from_json(json.dumps(doc))
    doc = _doc()  # the same bytes under a second name: each of its samples read twice an epoch
    doc["shards"].append({**doc["shards"][0], "name": "shard-copy.tar"})
    doc["total_samples"], doc["total_bytes"] = 4, 20480
    with pytest.raises(ManifestError, match=r"shards\[1\].sha256 equals that of 'shard-000000.tar': the same bytes"):
        ShardManifest.from_json(json.dumps(doc))
    doc = _doc()
    del doc["shards"][0]["sha256"]
    with pytest.raises(ManifestError, match=r"shards\[0\].sha256 is missing"):
        ShardManifest.from_json(json.dumps(doc))


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    (b"\xff\xfe\x00garbage", "is not valid JSON"),
    ("[1, 2]", "is not a JSON object"),
])
def test_what_is_not_a_manifest_is_named(text, message):
    with pytest.raises(ManifestError, match=message):
        ShardManifest.from_json(text)


def test_a_shard_name_cannot_lead_out_of_the_dataset(tmp_path):
    """The issue's case: ``../outside/x.tar`` used to be followed and pass --verify."""
    manifest = numbered_shards(tmp_path / "outside", [3])
    (tmp_path / "ds").mkdir()
    doc = json.loads(manifest.to_json())
    doc["shards"][0]["name"] = "../outside/" + manifest.shards[0].name
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=r"shards\[0\].name must be a relative name inside the dataset"):
        verify_shards(ShardStore(str(tmp_path / "ds")), ShardStore(str(tmp_path / "ds")).read_manifest())


@pytest.mark.parametrize("wrong, checksum", [("sha256", "xxh3"), ("xxh3_128", "sha256")])
def test_verify_checks_every_digest_the_manifest_records(tmp_path, capsys, wrong, checksum):
    """Readers check one digest (xxh3-128 by default); --verify must not pass a
    manifest whose other digest is wrong (the reviewer's case: a forged sha256)."""
    manifest = numbered_shards(tmp_path / "ds", [3, 2])
    doc = json.loads(manifest.to_json())
    doc["shards"][1][wrong] = "0" * len(doc["shards"][1][wrong])
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(doc))
    store = ShardStore(str(tmp_path / "ds"), StorageConfig(checksum=checksum))
    checked = "xxh3_128" if checksum == "xxh3" else "sha256"
    assert verify_shards(store, store.read_manifest()) == [
        f"{manifest.shards[1].name}: its {wrong} does not match the manifest (its {checked} does)"]
    if checksum == "xxh3":  # the command's default
        res = run_mae(capsys, "inspect", str(tmp_path / "ds"), "--verify")
        assert res.code == 1 and f"FAIL {manifest.shards[1].name}: its sha256 does not match" in res.out


def test_verify_checks_the_size_the_manifest_records(tmp_path):
    """A size forged beside true digests passed --verify: a cached copy is found by its
    digest, so nothing read the object's size again."""
    manifest = numbered_shards(tmp_path / "ds", [3, 2])
    doc = json.loads(manifest.to_json())
    doc["shards"][0]["bytes"] = 2**40
    doc["total_bytes"] += 2**40 - manifest.shards[0].bytes
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(doc))
    store = ShardStore(str(tmp_path / "ds"))
    assert verify_shards(store, store.read_manifest()) == [
        f"{manifest.shards[0].name}: {manifest.shards[0].bytes} bytes, manifest says {2**40}"]


def test_a_hash_that_is_not_a_hash_cannot_pick_a_cache_file(tmp_path):
    """The issue's case: a sha256 of ``../..`` would have served any local .tar as a
    verified cache hit of an S3 dataset, and put lock and part files anywhere."""
    cache_dir = tmp_path / "cache"
    evil = tmp_path / "evil.tar"
    numbered_shards(tmp_path / "src", [2])
    shutil.copy(next((tmp_path / "src").glob("*.tar")), evil)
    cache = ShardCache(cache_dir, 2**20)
    hostile = os.path.relpath(tmp_path / "evil", cache_dir)
    for make in (cache.get, cache.temp_path, lambda d: cache.download_lock(d).__enter__()):
        with pytest.raises(ValueError, match="named by sha256 digests"):
            make(hostile)
    digest = hashlib.sha256(b"x").hexdigest()
    committed, pinned = cache.commit(digest, _touch(cache_dir / "tmp"))
    pinned.close()
    for path in (cache.temp_path(digest), committed):
        assert Path(path).resolve().parent == cache_dir.resolve()
    with cache.download_lock(digest):
        assert (cache_dir / f"{digest}.lock").resolve().parent == cache_dir.resolve()
    doc = json.loads(ShardManifest([]).to_json())
    doc["shards"] = [{"name": "shard-000000.tar", "samples": 2, "bytes": evil.stat().st_size, "sha256": hostile}]
    doc["total_samples"], doc["total_bytes"] = 2, evil.stat().st_size
    with pytest.raises(ManifestError, match="sha256 must be 64 lowercase hex digits"):
        ShardManifest.from_json(json.dumps(doc), "s3://bucket/ds/manifest.json")


def _touch(path: Path) -> Path:
    path.write_bytes(b"x")
    return path


def test_an_oversized_manifest_is_refused_without_parsing(tmp_path, monkeypatch):
    import pipeline.shards.manifest as manifest_module

    numbered_shards(tmp_path, [2])
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 100)
    import pipeline.storage.store as store_module

    monkeypatch.setattr(store_module, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(ManifestError, match="larger than"):
        ShardStore(str(tmp_path), StorageConfig()).read_manifest()
