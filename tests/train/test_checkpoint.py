"""Checkpoint layout and integrity records: which tags count, what a record must
hold, and how verification names a missing, truncated or altered file."""

import hashlib
import json

import pytest

from train.checkpoint import (COMPLETE, META, complete_tags, fingerprint_differences, latest_complete, read_meta,
                              read_record, tag_for, verify)
from train.errors import CheckpointIntegrityError


def _tag(root, step, complete=True):
    d = root / tag_for(step)
    d.mkdir(parents=True)
    if complete:
        (d / COMPLETE).write_text("")
    return d.name


def _sealed(root, files: dict[str, bytes]):
    """A checkpoint folder with these files and a record of them."""
    d = root / tag_for(4)
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    record = {"format": 2, "step": 4, "files": {n: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                                                 for n, b in files.items()}}
    (d / COMPLETE).write_text(json.dumps(record))
    return d


META_JSON = json.dumps({"model": "m", "step": 4, "world_size": 2, "fingerprint": {"seed": 0}, "config": {},
                        "trainer": {}}).encode()


def test_the_newest_complete_tag_wins_and_half_written_ones_never_count(tmp_path):
    assert latest_complete(tmp_path) is None
    _tag(tmp_path, 100)
    _tag(tmp_path, 200)
    _tag(tmp_path, 300, complete=False)  # a crash mid-save
    (tmp_path / "latest").write_text(tag_for(100))  # a crash between COMPLETE and latest
    assert latest_complete(tmp_path) == "step000000200"
    assert complete_tags(tmp_path) == ["step000000100", "step000000200"]


def test_verify_accepts_what_the_record_lists(tmp_path):
    d = _sealed(tmp_path, {META: META_JSON, "model.pt": b"x" * 1000})
    assert sorted(verify(d)) == ["meta.json", "model.pt"]
    assert read_meta(d)["world_size"] == 2


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.pt").write_bytes(b"x" * 999), "has 999 bytes, its record says 1000"),
    (lambda d: (d / "model.pt").write_bytes(b"x" * 999 + b"y"), "does not match its recorded sha256"),
    (lambda d: (d / "model.pt").unlink(), "model.pt is missing"),
])
def test_verify_names_the_bad_file(tmp_path, damage, message):
    d = _sealed(tmp_path, {META: META_JSON, "model.pt": b"x" * 1000})
    damage(d)
    with pytest.raises(CheckpointIntegrityError, match=message):
        verify(d)


@pytest.mark.parametrize("record, message", [
    ("", "unreadable"),
    ("{}", "not a format-2 integrity record"),
    (json.dumps({"format": 2, "files": {"../../etc/passwd": {"bytes": 1, "sha256": "0" * 64}}}), "malformed entry"),
    (json.dumps({"format": 2, "files": {"/abs": {"bytes": 1, "sha256": "0" * 64}}}), "malformed entry"),
    (json.dumps({"format": 2, "files": {"a.pt": {"bytes": "1", "sha256": "0" * 64}}}), "malformed entry"),
    (json.dumps({"format": 2, "files": {"a.pt": {"bytes": 1, "sha256": "zz"}}}), "malformed entry"),
    (json.dumps({"format": 2, "files": {"a.pt": {"bytes": 1, "sha256": "0" * 64}}}), "does not list meta.json"),
])
def test_a_malformed_record_is_refused(tmp_path, record, message):
    d = tmp_path / tag_for(1)
    d.mkdir()
    (d / COMPLETE).write_text(record)
    with pytest.raises(CheckpointIntegrityError, match=message):
        read_record(d)


def test_meta_must_be_the_recorded_one_and_well_formed(tmp_path):
    d = _sealed(tmp_path, {META: b'{"model": "m"}'})
    with pytest.raises(CheckpointIntegrityError, match="lacks 'step'"):
        read_meta(d)


def test_fingerprint_differences_name_each_key():
    assert fingerprint_differences({"seed": 0, "dataset": "a"}, {"seed": 1, "dataset": "a"}) == ["seed: 0 -> 1"]
    # inside the architecture: the key that differs, not both whole mappings
    saved, ours = {"arch": {"depth": 2, "norm_pix_loss": False}}, {"arch": {"depth": 2, "norm_pix_loss": True}}
    assert fingerprint_differences(saved, ours) == ["arch.norm_pix_loss: False -> True"]
    assert fingerprint_differences({"arch": {"depth": 2}}, {"arch": 3}) == ["arch: {'depth': 2} -> 3"]
    assert fingerprint_differences({"seed": 0}, {"seed": 0}) == []
