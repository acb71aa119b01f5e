"""`mae index`: existing webdataset tars indexed in place, read by every backend like our shards."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import xxhash

from pipeline.augment import AugmentConfig
from pipeline.errors import ShardFetchError, ShardFormatError, SourceError
from pipeline.loader import LoaderConfig, build_loader
from pipeline.plan import PlanConfig
from pipeline.shards.index import IndexConfig, expand_braces, index_tars
from pipeline.shards.manifest import ShardManifest
from pipeline.shards.tar_format import BLOCK, walk_tar
from tests.helpers.cli import run_mae
from tests.helpers.shards import jpeg_bytes, numbered_shards


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type = len(data), kind
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def webdataset_tars(root: Path, count: int = 3, per: int = 4, hostile: bool = True,
                    fmt: int = tarfile.GNU_FORMAT, long: int = 30) -> dict[str, list[tuple[str, bytes, int]]]:
    """Tars as img2dataset/LAION write them (folder entry, .jpg/.txt/.cls, one long
    key), plus hostile members; returns tar -> [(key, jpeg, label)] of the usable samples."""
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for t in range(count):
        name, samples = f"{t:05d}.tar", []
        with tarfile.open(root / name, "w", format=tarfile.PAX_FORMAT if t == 1 else fmt) as tar:
            add(tar, "images", kind=tarfile.DIRTYPE)
            for i in range(per):
                key = f"images/{t}{i:03d}" + ("_" + "long" * long if i == 1 else "")
                jpeg = jpeg_bytes((64, 48), seed=t * 100 + i)
                add(tar, f"{key}.jpg", jpeg)
                add(tar, f"{key}.txt", b"a caption")
                add(tar, f"{key}.cls", str(i % 3).encode())
                samples.append((key, jpeg, i % 3))
            if hostile:
                add(tar, "only.txt", b"no image")
                add(tar, "pic.heic", b"not read")
                add(tar, "link.jpg", kind=tarfile.SYMTYPE)
                add(tar, "../evil.jpg", b"x")
                add(tar, f"images/._{t}000.jpg", b"\x00\x05\x16\x07 AppleDouble")  # macOS's tar, beside images/t000
                add(tar, ".DS_Store", b"junk")
        expected[name] = samples
    return expected


def read_all(url: str, backend: str = "cpu", **storage) -> list[tuple[str, int]]:
    from pipeline.storage.config import StorageConfig

    cfg = LoaderConfig(url=url, batch_size=4, backend=backend, num_workers=0 if backend == "cpu" else 1,
                       augment=AugmentConfig(img_size=32), plan=PlanConfig(shuffle=False),
                       storage=StorageConfig(**storage))
    out = []
    for b in build_loader(cfg, device="cpu"):
        out += list(zip(b.keys, b.labels.tolist()))
    return out


def test_index_in_place_names_every_reject_and_every_backend_reads_the_samples(tmp_path):
    expected = webdataset_tars(tmp_path / "tars")
    summary = index_tars(str(tmp_path / "tars/{00000..00003}.tar"), str(tmp_path / "idx"), IndexConfig())
    m = ShardManifest.from_json((tmp_path / "idx/manifest.json").read_text())
    assert m.data_url == str(tmp_path / "tars") and m.classes == ["0", "1", "2"]
    assert [(s.name, s.samples, s.sha256) for s in m.shards] == [(n, 4, None) for n in expected]
    assert all(s.bytes == (tmp_path / "tars" / s.name).stat().st_size and s.headers_sha256 for s in m.shards)
    reasons = {(r.source, r.reason) for r in m.rejects}
    assert ("00003.tar", "missing") in reasons
    for n in expected:
        assert {(f"{n}/link.jpg", "not_a_file"), (f"{n}/../evil.jpg", "malformed_member"), (f"{n}/only", "no_image"),
                (f"{n}/pic", "unsupported_extension"), (f"{n}/images/._{n[4]}000.jpg", "hidden"),
                (f"{n}/.DS_Store", "hidden")} <= reasons
    assert len(m.rejects) == 1 + 6 * 3
    want = [(f"{n}/{k}", label) for n, samples in expected.items() for k, _, label in samples]
    assert read_all(str(tmp_path / "idx"), "cpu") == want
    assert read_all(str(tmp_path / "idx"), "dali") == want
    assert "12 samples in 3 of 3 tars" in summary.format() and "rejected 19" in summary.format()


def test_macos_hidden_files_are_named_rejects_and_the_samples_stay_as_indexed_before(tmp_path):
    """bsdtar on macOS writes an AppleDouble ``._name`` before each file. Each was an
    unsupported_extension named by its folder ("a.tar/d", "a.tar/d#2"); it is a
    ``hidden`` reject under its own name. The samples stay what the walk gave before
    (each ``._`` member still ends the sample before it: k.jpg and k.png are two),
    so manifests indexed earlier keep matching their tars."""
    (tmp_path / "tars").mkdir()
    with tarfile.open(tmp_path / "tars" / "a.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("d/k.jpg", "d/k.png"):
            add(tar, f"d/._{name[2:]}", b"\x00\x05\x16\x07 AppleDouble")
            add(tar, name, jpeg_bytes((40, 30), seed=len(name) + name.count("p")))
        add(tar, ".DS_Store", b"junk")
    index_tars(str(tmp_path / "tars"), str(tmp_path / "idx"), IndexConfig())
    m = ShardManifest.from_json((tmp_path / "idx/manifest.json").read_text())
    assert m.shards[0].samples == 2
    assert sorted((r.source, r.reason) for r in m.rejects) == [
        ("a.tar/.DS_Store", "hidden"), ("a.tar/d/._k.jpg", "hidden"), ("a.tar/d/._k.png", "hidden")]
    assert [k for k, _ in read_all(str(tmp_path / "idx"))] == ["a.tar/d/k", "a.tar/d/k#2"]


def test_only_headers_are_read(tmp_path):
    """Bytes read = one 512-byte block per header (end marker included) + each .cls's bytes."""
    expected = webdataset_tars(tmp_path / "tars", count=1, per=6, hostile=False, fmt=tarfile.USTAR_FORMAT, long=15)
    summary = index_tars(str(tmp_path / "tars"), None, IndexConfig())
    path = tmp_path / "tars/00000.tar"
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert summary.bytes_read == BLOCK * (len(members) + 1) + sum(len(str(label)) for *_, label in expected["00000.tar"])
    assert summary.requests == len(members) + 1 + 6  # a header each, the end marker, each .cls
    assert summary.bytes_indexed == path.stat().st_size
    assert (tmp_path / "tars/manifest.json").exists()  # default: beside the data, no data_url
    assert ShardManifest.from_json((tmp_path / "tars/manifest.json").read_text()).data_url is None


def test_hash_records_sha256_and_xxh3_and_reads_like_our_own_shards(tmp_path):
    webdataset_tars(tmp_path / "tars", count=2, hostile=False)
    summary = index_tars(str(tmp_path / "tars"), str(tmp_path / "idx"), IndexConfig(hash=True))
    import hashlib

    for s in summary.manifest.shards:
        assert s.sha256 == hashlib.sha256((tmp_path / "tars" / s.name).read_bytes()).hexdigest()
        assert s.xxh3_128 == xxhash.xxh3_128_hexdigest((tmp_path / "tars" / s.name).read_bytes())
    assert len(read_all(str(tmp_path / "idx"))) == 8


def test_a_tar_changed_after_indexing_is_refused(tmp_path, capsys):
    webdataset_tars(tmp_path / "tars", count=1, hostile=False)
    index_tars(str(tmp_path / "tars"), str(tmp_path / "idx"), IndexConfig())
    path = tmp_path / "tars/00000.tar"
    with tarfile.open(path) as tar:
        jpg = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    data = bytearray(path.read_bytes())
    data[jpg.offset_data + 100] ^= 1  # inside an image: size and headers unchanged
    path.write_bytes(bytes(data))
    assert len(read_all(str(tmp_path / "idx"))) == 4  # data bytes are decode-time validated, not hashed
    data[jpg.offset + 1] ^= 1  # a member's name: the header fingerprint changes (its checksum too: corrupt)
    path.write_bytes(bytes(data))
    with pytest.raises(ShardFormatError, match="headers changed since it was indexed"):
        read_all(str(tmp_path / "idx"))
    path.write_bytes(bytes(data) + bytes(BLOCK))
    with pytest.raises(ShardFetchError, match="changed since it was indexed"):
        read_all(str(tmp_path / "idx"))
    res = run_mae(capsys, "inspect", tmp_path / "idx", "--verify")
    assert res.code == 1 and "changed since it was indexed" in res.out  # a FAIL line: verify lists every shard


def test_a_corrupt_header_keeps_the_samples_before_it(tmp_path):
    webdataset_tars(tmp_path / "tars", count=1, per=4, hostile=False, fmt=tarfile.USTAR_FORMAT, long=15)
    path = tmp_path / "tars/00000.tar"
    with tarfile.open(path) as tar:
        third = [m for m in tar.getmembers() if m.name.endswith(".jpg")][2]
    data = bytearray(path.read_bytes())
    data[third.offset + 148:third.offset + 156] = b"9999999\x00"  # its header checksum
    path.write_bytes(bytes(data))
    m = index_tars(str(tmp_path / "tars"), None, IndexConfig()).manifest
    assert m.shards[0].samples == 2 and [(r.source, r.reason) for r in m.rejects] == [
        (f"00000.tar@{third.offset}", "corrupt_tar")]
    assert [k for k, _ in read_all(str(tmp_path / "tars"))] == ["00000.tar/images/0000",
                                                                 f"00000.tar/images/0001_{'long' * 15}"]
    with pytest.raises(ShardFormatError, match="not a regular file"):  # our own shards stay strict
        walk_tar(lambda o, n: bytes(data[o:o + n]), len(data), "s.tar", strict=True)


@pytest.mark.parametrize("cut", ["at a header", "inside the end padding"])
def test_a_tar_cut_short_between_members_is_a_named_reject(tmp_path, cut):
    """Cut at a member's header (or inside the padding after one), the members that
    followed were lost with no reject at all."""
    webdataset_tars(tmp_path / "tars", count=1, per=4, hostile=False, fmt=tarfile.USTAR_FORMAT, long=15)
    path = tmp_path / "tars/00000.tar"
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    third, last = [m for m in members if m.name.endswith(".jpg")][2], members[-1]
    end = third.offset if cut == "at a header" else last.offset_data + 512 + 100  # inside the end marker
    path.write_bytes(path.read_bytes()[:end])
    m = index_tars(str(tmp_path / "tars"), None, IndexConfig()).manifest
    assert [r.reason for r in m.rejects] == ["corrupt_tar"] and m.rejects[0].source.startswith("00000.tar@")
    assert m.shards[0].samples == (2 if cut == "at a header" else 4)


def test_a_local_tar_changed_in_place_at_the_same_size_is_indexed_again(tmp_path):
    """A local file has no ETag, so a tar rewritten at the same size (an appended
    member fits in tar's end padding) kept its stale batch record: `mae index` said
    "0 indexed now" and the dataset stayed unreadable. Its mtime now counts."""
    webdataset_tars(tmp_path / "tars", count=1, per=3, hostile=False)
    path = tmp_path / "tars" / "00000.tar"
    first = index_tars(str(tmp_path / "tars"), None, IndexConfig()).manifest
    size = path.stat().st_size
    with tarfile.open(path, "a") as tar:
        add(tar, "images/zzzz.cls", b"1")
    assert path.stat().st_size == size
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    summary = index_tars(str(tmp_path / "tars"), None, IndexConfig())
    assert summary.indexed == 1  # walked again, not taken from the stale record
    assert summary.manifest.shards[0].headers_sha256 != first.shards[0].headers_sha256
    assert len(read_all(str(tmp_path / "tars"))) == 3


def test_tars_a_manifest_cannot_name_are_rejects_and_a_tar_named_twice_is_read_once(tmp_path):
    """`mae index` exited 0 with a manifest its own readers refused: a pattern that
    named a tar twice, a tar name with a backslash; one not in UTF-8 was a traceback."""
    webdataset_tars(tmp_path / "tars", count=2, per=3, hostile=False)
    (tmp_path / "tars" / "00001.tar").rename(tmp_path / "tars" / "back\\slash.tar")
    os.link(tmp_path / "tars" / "00000.tar", os.path.join(os.fsencode(tmp_path / "tars"), b"\xff.tar"))
    m = index_tars(str(tmp_path / "tars"), str(tmp_path / "out"), IndexConfig()).manifest
    assert [s.name for s in m.shards] == ["00000.tar"] and m.total_samples == 3
    assert sorted((r.source, r.reason) for r in m.rejects) == [("\\udcff.tar", "unsafe_name"),
                                                               ("back\\slash.tar", "unsafe_name")]
    twice = index_tars(str(tmp_path / "tars" / "{00000,00000}.tar"), str(tmp_path / "out2"), IndexConfig()).manifest
    assert [s.name for s in twice.shards] == ["00000.tar"]
    assert len(read_all(str(tmp_path / "out2"))) == 3  # its readers take it


@pytest.mark.parametrize("rule, classes, labels", [
    ("dir", ["a", "b"], [0, 0, 1]), ("prefix:_", ["n01", "n02"], [0, 1, 1]), ("none", [], [-1, -1, -1])])
def test_label_rules(tmp_path, rule, classes, labels):
    (tmp_path / "tars").mkdir()
    with tarfile.open(tmp_path / "tars/x.tar", "w") as tar:
        for i, key in enumerate(["a/n01_1", "a/n02_2", "b/n02_3"]):
            add(tar, f"{key}.jpg", jpeg_bytes((48, 40), seed=i))
            add(tar, f"{key}.cls", b"7")
    m = index_tars(str(tmp_path / "tars"), None, IndexConfig(label_from=rule)).manifest
    assert m.classes == classes and m.options["label_from"] == rule
    assert [label for _, label in read_all(str(tmp_path / "tars"))] == labels


def test_resume_redoes_only_missing_batches_and_gives_the_same_manifest(tmp_path):
    webdataset_tars(tmp_path / "tars", count=5, hostile=False)
    cfg = IndexConfig(batch_objects=2)
    first = index_tars(str(tmp_path / "tars"), str(tmp_path / "idx"), cfg)
    text = (tmp_path / "idx/manifest.json").read_text()
    (tmp_path / "idx/_index/batch-000001.json").unlink()
    (tmp_path / "idx/manifest.json").unlink()
    again = index_tars(str(tmp_path / "tars"), str(tmp_path / "idx"), cfg)
    assert (first.indexed, again.indexed) == (5, 2) and (tmp_path / "idx/manifest.json").read_text() == text


def test_expand_braces():
    assert expand_braces("s3://b/{000..002}.tar") == ["s3://b/000.tar", "s3://b/001.tar", "s3://b/002.tar"]
    with pytest.raises(SourceError, match="expands to more than"):  # refused at once, not after a billion names
        expand_braces("s3://b/{000000..999999999}.tar")
    with pytest.raises(SourceError, match="more than 1,000,000 names: give the folder or prefix"):
        expand_braces("s3://b/{0..999}/{0..1000}.tar")  # each group alone is small; together they are not
    assert len(expand_braces("s3://b/{0..999}/{0..999}.tar")) == 1_000_000
    assert expand_braces("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]


def test_cli_index_errors_are_one_line(tmp_path, capsys):
    res = run_mae(capsys, "index", str(tmp_path / "nothing/{0..3}.tar"))
    assert res.code == 2 and "none of the 4 names of the pattern exist" in res.error_line
    res = run_mae(capsys, "index", str(tmp_path), "--label-from", "regex:(.*)")
    assert res.code == 2 and "label_from must be one of" in res.error_line


def test_a_manifest_it_did_not_write_is_never_replaced(tmp_path, capsys):
    """`mae index` on a dataset `mae shard` wrote, or on its manifest file, must not
    replace that manifest (its checksums of every byte) with a headers-only one."""
    ds = tmp_path / "ds"
    numbered_shards(ds, [3, 2])
    before = (ds / "manifest.json").read_bytes()
    res = run_mae(capsys, "index", str(ds / "manifest.json"))
    assert res.code == 2 and "manifest.json is not a .tar: mae index reads webdataset tars" in res.error_line
    res = run_mae(capsys, "index", str(ds))
    assert res.code == 2 and "is the manifest of a dataset `mae shard` wrote" in res.error_line
    assert "give --out another folder" in res.error_line
    (tmp_path / "junk").mkdir()
    webdataset_tars(tmp_path / "junk", count=1, hostile=False)
    (tmp_path / "junk" / "manifest.json").write_text("not json")
    res = run_mae(capsys, "index", str(tmp_path / "junk"))
    assert res.code == 2 and "exists and is not a readable manifest" in res.error_line
    assert (ds / "manifest.json").read_bytes() == before and not (ds / "_index").exists()
    assert (tmp_path / "junk" / "manifest.json").read_text() == "not json"
    res = run_mae(capsys, "index", str(ds), "--out", str(tmp_path / "idx"))  # elsewhere: fine
    idx = ShardManifest.from_json((tmp_path / "idx" / "manifest.json").read_bytes())
    assert res.code == 0 and idx.total_samples == 5
    webdataset_tars(tmp_path / "tars", count=2, hostile=False)
    for _ in range(2):  # its own manifest beside the tars is replaced on a rerun
        assert run_mae(capsys, "index", str(tmp_path / "tars")).code == 0


def test_s3_index_reads_headers_only_and_loads_through_the_cache(s3_env, tmp_path, capsys):
    """A read-only data bucket, the manifest in another; the loader fetches through the cache."""
    expected = webdataset_tars(tmp_path / "tars", count=3, hostile=False)
    s3_env.create_bucket("wds-data")
    s3_env.create_bucket("wds-index")
    client = s3_env.client()
    for name in expected:
        client.upload_file(str(tmp_path / "tars" / name), "wds-data", f"laion/{name}")
    res = run_mae(capsys, "index", "s3://wds-data/laion/{00000..00002}.tar", "--out", "s3://wds-index/laion",
                  "--parallel", "2")
    assert res.code == 0, res.err
    doc = json.loads(client.get_object(Bucket="wds-index", Key="laion/manifest.json")["Body"].read())
    assert doc["data_url"] == "s3://wds-data/laion" and doc["total_samples"] == 12
    heads = {n: client.head_object(Bucket="wds-data", Key=f"laion/{n}")["ETag"] for n in expected}
    assert {s["name"]: s["etag"] for s in doc["shards"]} == heads
    local = index_tars(str(tmp_path / "tars"), str(tmp_path / "local-idx"), IndexConfig())
    assert f"read {local.bytes_read / 2**20:.2f} MiB in {local.requests} requests" in res.out  # the same header walk
    want = [(f"{n}/{k}", label) for n, samples in expected.items() for k, _, label in samples]
    assert read_all("s3://wds-index/laion", cache_dir=str(tmp_path / "cache")) == want
    client.put_object(Bucket="wds-data", Key="laion/00001.tar", Body=(tmp_path / "tars/00000.tar").read_bytes())
    with pytest.raises(ShardFetchError, match="ETag .* changed since it was indexed"):
        read_all("s3://wds-index/laion", cache_dir=str(tmp_path / "cache2"))


def test_an_oversized_batch_record_is_not_read_and_the_batch_is_indexed_again(tmp_path, monkeypatch):
    import pipeline.shards.manifest as manifest

    webdataset_tars(tmp_path / "tars", count=4, hostile=False)
    cfg = IndexConfig(batch_objects=2)
    first = index_tars(str(tmp_path / "tars"), str(tmp_path / "idx"), cfg)
    text = (tmp_path / "idx/manifest.json").read_text()
    record = tmp_path / "idx/_index/batch-000001.json"
    monkeypatch.setattr(manifest, "MAX_RECORD_BYTES", record.stat().st_size + 10)
    record.write_bytes(record.read_bytes() + b" " * 11)  # still valid JSON, one byte over the limit
    (tmp_path / "idx/manifest.json").unlink()
    again = index_tars(str(tmp_path / "tars"), str(tmp_path / "idx"), cfg)
    assert (first.indexed, again.indexed) == (4, 2) and (tmp_path / "idx/manifest.json").read_text() == text
