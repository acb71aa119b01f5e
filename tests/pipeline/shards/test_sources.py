"""What `mae shard` lists from a local folder: symlinked images and class folders
are followed, loops end, and whatever cannot be used is a named reject."""

import os

import pytest
from tests.helpers.shards import jpeg_bytes

from pipeline.shards.sources import list_sources
from pipeline.shards.writer import ShardWriterConfig, write_shards
from pipeline.storage.config import StorageConfig


def _images(folder, names, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(jpeg_bytes((40, 32), seed=seed + i))


def _rejects(summary) -> dict[str, str]:
    return {r.source: r.reason for r in summary.manifest.rejects}


def test_symlinked_images_and_class_folders_are_followed(tmp_path):
    """The issue's case: 5 of 9 images and a whole class were dropped silently."""
    elsewhere = tmp_path / "elsewhere"
    _images(elsewhere / "dogs", ["d1.jpg", "d2.jpg", "d3.jpg"], seed=10)
    _images(elsewhere / "loose", ["c3.jpg", "c4.jpg"], seed=20)
    src = tmp_path / "src"
    _images(src / "cats", ["c1.jpg", "c2.jpg"])
    for name in ("c3.jpg", "c4.jpg"):
        (src / "cats" / name).symlink_to(elsewhere / "loose" / name)
    (src / "dogs").symlink_to(elsewhere / "dogs", target_is_directory=True)
    _images(src / "owls", ["o1.jpg", "o2.jpg"], seed=30)
    summary = write_shards(str(src), str(tmp_path / "out"), ShardWriterConfig())
    assert summary.manifest.classes == ["cats", "dogs", "owls"]
    assert summary.manifest.total_samples == 9 and not summary.manifest.rejects


def test_a_link_loop_ends_and_is_reported(tmp_path):
    src = tmp_path / "src"
    _images(src / "a", ["1.jpg", "2.jpg"])
    _images(src / "b", ["3.jpg"])
    (src / "a" / "back").symlink_to(src, target_is_directory=True)  # a/back/a/back/... forever
    items, classes = list_sources(str(src), StorageConfig())
    assert classes == ["a", "b"]
    assert [(it.rel, it.problem) for it in items] == [("a/1.jpg", None), ("a/2.jpg", None), ("a/back", "link_loop"),
                                                      ("b/3.jpg", None)]


def test_two_links_to_one_folder_are_both_classes(tmp_path):
    shared = tmp_path / "shared"
    _images(shared, ["x.jpg"])
    src = tmp_path / "src"
    src.mkdir()
    (src / "left").symlink_to(shared, target_is_directory=True)
    (src / "right").symlink_to(shared, target_is_directory=True)
    items, classes = list_sources(str(src), StorageConfig())
    assert classes == ["left", "right"] and [it.rel for it in items] == ["left/x.jpg", "right/x.jpg"]


def test_what_cannot_be_used_is_a_named_reject_not_a_hang(tmp_path):
    src = tmp_path / "src"
    _images(src, ["ok.jpg"])
    (src / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (src / "gone").symlink_to(tmp_path / "no-folder", target_is_directory=True)
    os.mkfifo(src / "pipe.jpg")  # reading it would block forever
    (src / "bad\x1b[31mname.jpg").write_bytes(jpeg_bytes((40, 32)))
    summary = write_shards(str(src), str(tmp_path / "out"), ShardWriterConfig())
    assert summary.manifest.total_samples == 1
    assert _rejects(summary) == {"broken.jpg": "broken_link", "gone": "broken_link", "pipe.jpg": "not_a_file",
                                 "bad\\x1b[31mname.jpg": "unsafe_name"}
    assert "rejected 4: broken_link=2, not_a_file=1, unsafe_name=1" in summary.format()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode")
def test_an_unreadable_folder_is_a_named_reject(tmp_path):
    src = tmp_path / "src"
    _images(src / "a", ["1.jpg"])
    _images(src / "b", ["2.jpg"])
    (src / "b").chmod(0)
    try:
        items, _ = list_sources(str(src), StorageConfig())
    finally:
        (src / "b").chmod(0o755)
    assert [(it.rel, it.problem) for it in items] == [("a/1.jpg", None), ("b", "unreadable")]
