import io
import json
import subprocess
import sys
import tarfile

import pytest
from tests.helpers.shards import flip_a_byte, jpeg_bytes, numbered_shards, read_json

from pipeline.errors import SourceError
from pipeline.images import ImagePolicy
from pipeline.shards.manifest import ShardManifest
from pipeline.storage.objects import file_digests, sha256_file
from pipeline.shards.sources import list_sources
from pipeline.shards.writer import ShardWriterConfig, write_shards


def _tar_members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_round_trip_keeps_original_bytes_and_labels(photos, tmp_path):
    out = tmp_path / "shards"
    summary = write_shards(str(photos), str(out), ShardWriterConfig(shard_bytes=400_000))
    m = summary.manifest
    assert m.total_samples == 45 and len(m.shards) > 2 and not m.rejects
    assert m.classes == sorted(p.name for p in photos.iterdir())
    originals = {p.relative_to(photos).as_posix(): p.read_bytes() for p in photos.rglob("*.jpg")}
    seen = {}
    for shard in m.shards:
        assert sha256_file(out / shard.name) == shard.sha256 and (out / shard.name).stat().st_size == shard.bytes
        assert file_digests(out / shard.name, algorithms=("xxh3_128",))["xxh3_128"] == shard.xxh3_128
        members = _tar_members(out / shard.name)
        assert len([n for n in members if n.endswith(".jpg")]) == shard.samples
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                key = name[: -len(".json")]
                assert members[f"{key}.jpg"] == originals[meta["source"]]  # bit-identical
                assert m.classes[int(members[f"{key}.cls"])] == meta["class"] == meta["source"].split("/")[0]
                seen[meta["source"]] = key
    assert set(seen) == set(originals)


def test_flat_folder_is_unlabelled_and_mixed_layout_is_an_error(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        (flat / f"{i}.jpg").write_bytes(jpeg_bytes(seed=i))
    m = write_shards(str(flat), str(tmp_path / "o1"), ShardWriterConfig()).manifest
    assert m.classes == [] and m.total_samples == 3
    assert not any(n.endswith(".cls") for n in _tar_members(tmp_path / "o1" / m.shards[0].name))
    (flat / "sub").mkdir()
    (flat / "sub" / "x.jpg").write_bytes(jpeg_bytes())
    with pytest.raises(SourceError, match="mixes layouts"):
        list_sources(str(flat), ShardWriterConfig().storage)


def test_list_file_source_with_labels(photos, tmp_path):
    files = sorted(photos.rglob("*.jpg"))[:6]
    listing = tmp_path / "list.txt"
    listing.write_text("# path<TAB>class\n" + "".join(f"{p}\t{p.parent.name}\n" for p in files))
    m = write_shards(str(listing), str(tmp_path / "out"), ShardWriterConfig()).manifest
    assert m.total_samples == 6 and m.classes == sorted({p.parent.name for p in files})


def test_corrupt_images_are_rejected_named_and_never_fatal(photos, tmp_path):
    cls = photos / "coffee"
    good = (cls / next(p.name for p in cls.iterdir())).read_bytes()
    (cls / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (cls / "empty.jpg").write_bytes(b"")
    (cls / "text.jpg").write_bytes(b"hello, not an image")
    (cls / "tiny.png").write_bytes(jpeg_bytes((4, 4), fmt="PNG"))
    summary = write_shards(str(photos), str(tmp_path / "out"), ShardWriterConfig())
    reasons = {r.source: r.reason for r in summary.manifest.rejects}
    assert reasons == {"coffee/truncated.jpg": "truncated", "coffee/empty.jpg": "empty",
                       "coffee/text.jpg": "not_an_image", "coffee/tiny.png": "too_small"}
    assert summary.manifest.total_samples == 45
    assert "rejected 4" in summary.format() and "coffee/truncated.jpg: truncated" in summary.format()


def test_mode_policy_skip_rejects_grayscale_and_cmyk(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "gray.jpg").write_bytes(jpeg_bytes(mode="L"))
    (src / "cmyk.jpg").write_bytes(jpeg_bytes(mode="CMYK"))
    (src / "rgb.jpg").write_bytes(jpeg_bytes())
    skip = write_shards(str(src), str(tmp_path / "a"), ShardWriterConfig(images=ImagePolicy(mode_policy="skip")))
    assert {r.reason for r in skip.manifest.rejects} == {"grayscale", "cmyk"} and skip.manifest.total_samples == 1
    keep = write_shards(str(src), str(tmp_path / "b"), ShardWriterConfig())
    assert keep.manifest.total_samples == 3 and keep.converted == {"grayscale": 1, "cmyk": 1}


def test_reencode_shrinks_to_max_side(photos, tmp_path):
    m = write_shards(str(photos), str(tmp_path / "out"),
                     ShardWriterConfig(reencode=True, max_side=128, jpeg_quality=80)).manifest
    from PIL import Image

    for name, data in _tar_members(tmp_path / "out" / m.shards[0].name).items():
        if name.endswith(".jpg"):
            assert max(Image.open(io.BytesIO(data)).size) == 128


def test_resumed_writer_skips_complete_shards_and_gives_the_same_manifest(photos, tmp_path):
    out = tmp_path / "out"
    cfg = ShardWriterConfig(shard_bytes=300_000, workers=2)
    first = write_shards(str(photos), str(out), cfg)
    manifest_text = (out / "manifest.json").read_text()
    # a crash: one shard half-written, another's record lost, manifest gone
    (out / first.manifest.shards[1].name).write_bytes(b"partial")
    (out / (first.manifest.shards[2].name + ".record.json")).unlink()
    (out / "manifest.json").unlink()
    again = write_shards(str(photos), str(out), cfg)
    assert again.written == 2 and again.skipped_existing == len(first.manifest.shards) - 2
    assert (out / "manifest.json").read_text() == manifest_text
    assert ShardManifest.from_json(manifest_text).shards == again.manifest.shards
    third = write_shards(str(photos), str(out), cfg)
    assert third.written == 0


def test_a_record_written_before_xxh3_gains_it_on_resume_and_a_wrong_one_rewrites(photos, tmp_path):
    out = tmp_path / "out"
    cfg = ShardWriterConfig(shard_bytes=300_000)
    first = write_shards(str(photos), str(out), cfg).manifest
    old, wrong = (out / (s.name + ".record.json") for s in first.shards[:2])
    old.write_text(json.dumps({k: v for k, v in json.loads(old.read_text()).items() if k != "xxh3_128"}))
    wrong.write_text(json.dumps({**json.loads(wrong.read_text()), "xxh3_128": "0" * 32}))
    again = write_shards(str(photos), str(out), cfg)
    assert again.written == 1 and again.skipped_existing == len(first.shards) - 1  # the wrong record's shard
    assert again.manifest.shards == first.shards and all(s.xxh3_128 for s in again.manifest.shards)


def test_changed_options_rewrite_instead_of_reusing(photos, tmp_path):
    out = tmp_path / "out"
    write_shards(str(photos), str(out), ShardWriterConfig(seed=0))
    again = write_shards(str(photos), str(out), ShardWriterConfig(seed=1))
    assert again.written == len(again.manifest.shards) and again.skipped_existing == 0


def test_no_partial_files_left_and_manifest_written_last(photos, tmp_path):
    out = tmp_path / "out"
    write_shards(str(photos), str(out), ShardWriterConfig(shard_bytes=300_000))
    names = {p.name for p in out.iterdir()}
    assert not [n for n in names if ".tmp" in n]
    manifest_mtime = (out / "manifest.json").stat().st_mtime_ns
    assert all((out / n).stat().st_mtime_ns <= manifest_mtime for n in names)
    assert read_json(out / "manifest.json")["version"] == 1


def test_cli_shard_and_inspect(photos, tmp_path):
    out = tmp_path / "cli"
    run = lambda *a: subprocess.run([sys.executable, "-m", "train.cli", *a], capture_output=True, text=True)  # noqa: E731
    res = run("shard", str(photos), str(out), "--shard-size", "300kB", "--workers", "2")
    assert res.returncode == 0, res.stderr
    assert "45 samples in" in res.stdout and "classes: 9" in res.stdout
    res = run("inspect", str(out), "--verify")
    assert res.returncode == 0 and "verified" in res.stdout and "samples 45" in res.stdout
    bad = run("shard", str(tmp_path / "missing"), str(out))
    assert bad.returncode == 2 and "neither a folder nor a list file" in bad.stderr and "Traceback" not in bad.stderr


def test_inspect_verify_lists_every_bad_shard_and_stops_at_none(tmp_path):
    # it stopped at the first: a dataset with three bad shards needed three passes to find them
    ds = tmp_path / "ds"
    numbered_shards(ds, [3, 3, 3, 3, 3], image_size=(32, 24))
    flip_a_byte(ds / "shard-000000.tar")  # the first shard, which inspect also opens for its keys
    (ds / "shard-000002.tar").unlink()
    flip_a_byte(ds / "shard-000004.tar")
    res = subprocess.run([sys.executable, "-m", "train.cli", "inspect", str(ds), "--verify"], capture_output=True,
                         text=True, timeout=300)
    fails = [line for line in res.stdout.splitlines() if line.startswith("FAIL")]
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(fails) == 3, res.stdout
    assert "shard-000000.tar" in fails[0] and "checksum mismatch" in fails[0]
    assert "shard-000002.tar" in fails[1] and "not found" in fails[1]
    assert "shard-000004.tar" in fails[2] and "checksum mismatch" in fails[2]
    assert "verified" not in res.stdout


def test_an_oversized_record_is_not_read_and_its_shard_is_written_again(photos, tmp_path, monkeypatch):
    """A record beside a shard is kilobytes: one larger than MAX_RECORD_BYTES (planted,
    or not ours) is not read into memory; its shard is written again."""
    import pipeline.shards.manifest as manifest

    out = tmp_path / "out"
    cfg = ShardWriterConfig(shard_bytes=300_000)
    first = write_shards(str(photos), str(out), cfg).manifest
    record = out / (first.shards[0].name + ".record.json")
    monkeypatch.setattr(manifest, "MAX_RECORD_BYTES", record.stat().st_size + 10)
    record.write_bytes(record.read_bytes() + b" " * 11)  # still valid JSON, one byte over the limit
    again = write_shards(str(photos), str(out), cfg)
    assert again.written == 1 and again.skipped_existing == len(first.shards) - 1
    assert again.manifest.shards == first.shards


def test_a_record_nested_past_the_parsers_depth_is_not_ours_and_its_shard_is_written_again(photos, tmp_path):
    """A planted record of 100,000 nested arrays raised RecursionError out of the
    writer; it is now a record we could not have written."""
    out = tmp_path / "out"
    cfg = ShardWriterConfig(shard_bytes=300_000)
    first = write_shards(str(photos), str(out), cfg).manifest
    (out / (first.shards[0].name + ".record.json")).write_text("[" * 100_000)
    again = write_shards(str(photos), str(out), cfg)
    assert again.written == 1 and again.skipped_existing == len(first.shards) - 1
    assert again.manifest.shards == first.shards
