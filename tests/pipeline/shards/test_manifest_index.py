"""The binary manifest index: the same shards as the JSON, read fast; untrusted like
the JSON (every rule checked on arrays); stale or corrupt ones are detected and the
JSON is read instead."""

import dataclasses
import hashlib
import json
import logging
import struct

import pytest
from tests.helpers.cli import run_mae
from tests.helpers.shards import numbered_shards

from pipeline.errors import ManifestError
from pipeline.shards.manifest import MANIFEST_NAME, ShardInfo, ShardManifest
from pipeline.shards.manifest_index import (IN_PLACE_FIELDS, INDEX_NAME, INDEXED_FIELDS, ShardTable, encode_index,
                                            read_index, table_for)
from pipeline.shards.writer import ShardWriterConfig, write_shards
from pipeline.storage.store import ShardStore

SHA = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4)]


def _manifest(shards=None, **kw) -> ShardManifest:
    shards = shards or [ShardInfo(f"part-{i}/shard-{i:06d}.tar", 3 + i, 4096 * (i + 1), SHA[i]) for i in range(4)]
    return ShardManifest(shards, classes=kw.get("classes", ["cat", "dog"]),
                         options=kw.get("options", {"format": "tar", "shard_bytes": 1000}))


def _pair(m: ShardManifest) -> tuple[bytes, bytes]:
    text = m.to_json().encode()
    return text, encode_index(m, text)


def _reseal(index: bytes) -> bytes:
    """What a hostile writer can do: change the bytes and fix the checksum."""
    return index[:-32] + hashlib.sha256(index[:-32]).digest()


def _with_header(index: bytes, change) -> bytes:
    (n,) = struct.unpack("<Q", index[8:16])
    header = json.loads(index[16:16 + n])
    change(header)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return _reseal(index[:8] + struct.pack("<Q", len(head)) + head + index[16 + n:])


def test_the_index_holds_every_field_of_every_shard():
    m = _manifest()
    text, index = _pair(m)
    table = read_index(index, text)
    assert [table[i] for i in range(len(table))] == m.shards
    assert table.classes == m.classes and table.options == m.options
    assert (table.total_samples, table.total_bytes) == (m.total_samples, m.total_bytes)
    assert table.fingerprint() == ShardTable.from_manifest(m).fingerprint()
    # a new field needs a column, or a place among the fields only in-place manifests carry
    assert sorted(INDEXED_FIELDS + IN_PLACE_FIELDS) == sorted(f.name for f in dataclasses.fields(ShardInfo))


def test_the_xxh3_column_round_trips_and_a_version_1_index_is_still_read():
    fast = [hashlib.md5(str(i).encode()).hexdigest() for i in range(4)]  # any 32 hex digits
    m = _manifest([ShardInfo(f"shard-{i}.tar", 3, 4096, SHA[i], xxh3_128=fast[i]) for i in range(4)])
    text, index = _pair(m)
    table = read_index(index, text)
    assert [table[i].xxh3_128 for i in range(4)] == fast and [table[i] for i in range(4)] == m.shards
    # one shard without xxh3: no column, every shard verified by its sha256
    mixed = _manifest([*m.shards[:3], ShardInfo("shard-3.tar", 3, 4096, SHA[3])])
    text2, index2 = _pair(mixed)
    assert [read_index(index2, text2)[i].xxh3_128 for i in range(4)] == [None] * 4
    assert b'"xxh3_128": false' in index2 and b'"xxh3_128": true' in index

    def as_version_1(h):
        h["version"] = 1
        del h["xxh3_128"]
    old = read_index(_with_header(index2, as_version_1), text2)  # as the previous release wrote it
    assert [old[i] for i in range(4)] == [dataclasses.replace(s, xxh3_128=None) for s in mixed.shards]
    with pytest.raises(ManifestError, match="corrupt: .* bytes of arrays"):  # claims a column it lacks
        read_index(_with_header(index2, lambda h: h.update(xxh3_128=True)), text2)
    with pytest.raises(ManifestError, match="xxh3_128 must be true or false"):
        read_index(_with_header(index, lambda h: h.update(xxh3_128=1)), text)


def test_plain_non_ascii_names_and_an_empty_dataset_round_trip():
    m = _manifest([ShardInfo("données/shard-0.tar", 1, 1024, SHA[0]), ShardInfo("x.tar", 1, 512, SHA[1])])
    text, index = _pair(m)
    assert [read_index(index, text)[i] for i in range(2)] == m.shards
    empty = ShardManifest([], options={})
    text, index = _pair(empty)
    assert len(read_index(index, text)) == 0


def test_the_fingerprint_tracks_names_counts_and_hashes():
    base = ShardTable.from_manifest(_manifest()).fingerprint()
    for change in ({"samples": 9}, {"sha256": SHA[3]}, {"name": "other.tar"}):
        shards = _manifest().shards
        shards[0] = dataclasses.replace(shards[0], **change)
        assert ShardTable.from_manifest(_manifest(shards)).fingerprint() != base, change


def test_the_writer_writes_the_index_and_the_loader_reads_it(photos, tmp_path, monkeypatch):
    write_shards(str(photos), str(tmp_path / "ds"), ShardWriterConfig(shard_bytes=200_000))
    assert (tmp_path / "ds" / INDEX_NAME).exists()
    json_table = ShardTable.from_manifest(ShardStore(str(tmp_path / "ds")).read_manifest())

    def no_json_parse(*a, **k):
        raise AssertionError("the JSON was parsed although the index is current")

    monkeypatch.setattr(ShardManifest, "from_json", no_json_parse)
    table = ShardStore(str(tmp_path / "ds")).read_table()
    assert table.fingerprint() == json_table.fingerprint() and len(table) > 3
    assert [table[i] for i in range(len(table))] == [json_table[i] for i in range(len(json_table))]


def test_a_stale_index_is_detected_and_the_json_read_instead(tmp_path, caplog):
    numbered_shards(tmp_path / "ds", [3, 4])  # writes no index
    m = ShardStore(str(tmp_path / "ds")).read_manifest()
    old = _manifest()
    (tmp_path / "ds" / INDEX_NAME).write_bytes(encode_index(old, old.to_json().encode()))
    with caplog.at_level(logging.WARNING):
        table = ShardStore(str(tmp_path / "ds")).read_table()
    assert [table[i] for i in range(2)] == m.shards
    assert "is stale: it was made for another manifest.json" in caplog.text and "--write-index" in caplog.text


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "other_file"])
def test_a_corrupt_index_is_detected_and_the_json_read_instead(damage, caplog):
    m = _manifest()
    text, index = _pair(m)
    bad = {"flip": index[:100] + bytes([index[100] ^ 1]) + index[101:], "truncate": index[:len(index) // 2],
           "empty": b"", "other_file": b"PK\x03\x04" + index[4:]}[damage]
    with pytest.raises(ManifestError, match="corrupt|not a maescale manifest index"):
        read_index(bad, text)
    with caplog.at_level(logging.WARNING):
        assert [table_for(text, bad, "ds")[i] for i in range(4)] == m.shards


def _shard(**change) -> ShardManifest:
    shards = _manifest().shards
    shards[1] = dataclasses.replace(shards[1], **change)
    return _manifest(shards)


@pytest.mark.parametrize("forge, message", [
    (lambda: _shard(name="../outside.tar"), r"shards\[1\].name must be a relative name"),
    (lambda: _shard(name="/etc/passwd"), r"shards\[1\].name must be a relative name"),
    (lambda: _shard(name="a//b.tar"), r"shards\[1\].name must be a relative name"),
    (lambda: _shard(name="a/.hidden"), r"shards\[1\].name must be a relative name"),
    (lambda: _shard(name="dir/"), r"shards\[1\].name must be a relative name"),
    (lambda: _shard(name="a\\..\\b.tar"), r"shards\[1\].name must be a relative name"),
    (lambda: _shard(name="evil\x1b[2J.tar"), r"shards\[1\].name must be a relative name"),
    (lambda: _shard(name="ok\u202e.tar"), r"shards\[1\].name must be a relative name"),
    (lambda: _shard(name="x" * 1025), "longer than 1024 bytes"),
    (lambda: _shard(name="part-0/shard-000000.tar"), "repeats an earlier shard"),
    (lambda: _shard(sha256=_manifest().shards[3].sha256), "two shards have the same sha256"),
    (lambda: _shard(samples=-1), r"shards\[1\] has -1 samples"),
    (lambda: _shard(samples=100), r"shards\[1\] has 100 samples in 8192 bytes"),
    (lambda: _shard(bytes=2**41), r"shards\[1\] has 4 samples in 2199023255552 bytes"),
    (lambda: _manifest(classes=["a", "a"]), "classes must not repeat a name"),
    (lambda: _manifest(classes=["\x07bell"]), r"classes\[0\] must be a non-empty string without control"),
    (lambda: _manifest(options={"format": "zip"}), "options.format must be one of tar, beton"),
    (lambda: _manifest(options={"keys": "../../etc/passwd"}), "options.keys must be a relative name"),
])
def test_a_hostile_index_is_refused_like_a_hostile_manifest(forge, message):
    """Forged with a valid checksum and the real JSON's digest: the index's own
    rules must catch it, exactly like the JSON's would."""
    m = forge()
    text = _manifest().to_json().encode()
    with pytest.raises(ManifestError, match=message):
        read_index(encode_index(m, text), text)


@pytest.mark.parametrize("change, message", [
    (lambda h: h.update(extra=1), "header must have exactly"),
    (lambda h: h.update(version=3), "header must have exactly"),
    (lambda h: h.update(version=1), "header must have exactly"),  # version 1 has no xxh3_128 key
    (lambda h: h.update(shards=5), "bytes of arrays for 5 shards"),
    (lambda h: h.update(names_bytes=-1), "header names_bytes must be a non-negative integer"),
    (lambda h: h.update(total_samples=1), "header totals differ"),
    (lambda h: h.update(shards=True), "header shards must be a non-negative integer"),
])
def test_a_forged_header_is_refused(change, message):
    text, index = _pair(_manifest())
    with pytest.raises(ManifestError, match=message):
        read_index(_with_header(index, change), text)


def test_names_that_do_not_match_the_shard_count_are_refused():
    text, index = _pair(_manifest())
    names_at = len(index) - 32 - len(b"\n".join(f"part-{i}/shard-{i:06d}.tar".encode() for i in range(4)))
    bad = index[:names_at] + index[names_at:-32].replace(b"\n", b"_", 1) + index[-32:]
    with pytest.raises(ManifestError, match="3 names for 4 shards"):
        read_index(_reseal(bad), text)


def test_inspect_reports_the_index_and_writes_it(tmp_path, capsys):
    numbered_shards(tmp_path / "ds", [3, 4])
    out = run_mae(capsys, "inspect", tmp_path / "ds")
    assert out.code == 0 and "index: missing" in out.out
    out = run_mae(capsys, "inspect", tmp_path / "ds", "--write-index")
    assert out.code == 0 and f"wrote {INDEX_NAME}" in out.out
    assert "index: current" in run_mae(capsys, "inspect", tmp_path / "ds").out
    (tmp_path / "ds" / MANIFEST_NAME).write_text((tmp_path / "ds" / MANIFEST_NAME).read_text().replace(": 4,", ": 4 ,"))
    assert "is stale" in run_mae(capsys, "inspect", tmp_path / "ds").out


def test_inspect_verify_fails_an_index_forged_with_the_jsons_real_digest(tmp_path, capsys):
    """An index of 1 of the 3 shards, carrying the real manifest.json's digest: loaders
    read 3 of 12 samples, and `mae inspect --verify` said "index: current",
    "verified 3 shards"."""
    numbered_shards(tmp_path / "ds", [3, 4, 5])
    text = (tmp_path / "ds" / MANIFEST_NAME).read_bytes()
    real = ShardManifest.from_json(text, "m")
    subset = ShardManifest(real.shards[:1], classes=real.classes, options=real.options)
    (tmp_path / "ds" / INDEX_NAME).write_bytes(encode_index(subset, text))
    out = run_mae(capsys, "inspect", tmp_path / "ds", "--verify")
    assert out.code == 1, out.out + out.err
    assert ("FAIL forged: it lists 1 shards of 3 samples, manifest.json 3 of 12, and loaders read the index"
            in out.out), out.out
    assert "verified" not in out.out
