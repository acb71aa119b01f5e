"""What `mae shard` lists from a local folder: symlinked images and class folders
are followed, loops end, and whatever cannot be used is a named reject."""

import os
import subprocess
import sys

import pytest
from tests.helpers.shards import jpeg_bytes

from pipeline.errors import SourceError
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


def test_a_list_file_names_nothing_that_can_hang_or_fill_memory(tmp_path):
    """A list file is untrusted: a named pipe blocked `mae shard` for good, /dev/zero
    read until the memory ran out, and a sparse 6 GB "image" was read whole."""
    _images(tmp_path / "img", ["ok.jpg"])
    os.mkfifo(tmp_path / "pipe.jpg")
    with open(tmp_path / "huge.jpg", "wb") as f:  # sparse: takes no disk
        f.truncate(6 * 2**30)
    listed = tmp_path / "list.txt"
    listed.write_text(f"{tmp_path / 'img' / 'ok.jpg'}\n{tmp_path / 'pipe.jpg'}\n/dev/zero\n{tmp_path / 'huge.jpg'}\n")
    summary = write_shards(str(listed), str(tmp_path / "out"), ShardWriterConfig())
    assert summary.manifest.total_samples == 1
    assert _rejects(summary) == {"00000002:pipe.jpg": "not_a_file", "00000003:zero": "not_a_file",
                                 "00000004:huge.jpg": "too_large"}


def test_a_source_with_no_usable_image_is_an_error_not_an_empty_dataset(tmp_path):
    """It wrote "0 samples in 0 shards" and exited 0; every reader then refused it."""
    listed = tmp_path / "list.txt"
    listed.write_text("/nonexistent/a.jpg\n")
    with pytest.raises(SourceError, match="no usable images in .*: all 1 were rejected \\(unreadable=1\\); no manifest"):
        write_shards(str(listed), str(tmp_path / "out"), ShardWriterConfig())
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_list_files_may_name_http_urls(tmp_path):
    """http(s) lines in a list file never worked: the HTTP filesystem was handed the
    URL without its scheme, and each line failed after every retry."""
    _images(tmp_path / "www", ["a.jpg", "b.jpg"])
    server = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"],
                              cwd=tmp_path / "www", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = int(server.stdout.readline().split("port ")[1].split()[0])
        listed = tmp_path / "list.txt"
        listed.write_text(f"http://127.0.0.1:{port}/a.jpg\tcat\nhttp://127.0.0.1:{port}/b.jpg\tdog\n")
        summary = write_shards(str(listed), str(tmp_path / "out"), ShardWriterConfig())
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert summary.manifest.total_samples == 2 and summary.manifest.classes == ["cat", "dog"]
    assert not summary.manifest.rejects


def test_one_enormous_integer_label_is_refused_not_a_list_of_that_many_classes(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [jpeg_bytes((40, 32))], "label": [10**12]}), tmp_path / "t.parquet")
    with pytest.raises(SourceError, match="label 1000000000000 would make more than 1,000,000 classes"):
        write_shards(str(tmp_path / "t.parquet"), str(tmp_path / "out"), ShardWriterConfig())


def test_listed_images_named_without_an_image_extension_are_stored_by_their_bytes(tmp_path):
    """A PNG listed as `shot` or `shot.txt` was stored under that extension: counted
    as a sample, then skipped by every reader as not_an_image; a name `a\\b` stopped
    the whole run with an unsafe member name."""
    from pipeline.augment import AugmentConfig
    from pipeline.loader import LoaderConfig, build_loader

    png = jpeg_bytes((40, 32), fmt="PNG")
    for name in ("shot", "shot.txt", "a\\b"):
        (tmp_path / name).write_bytes(png)
    _images(tmp_path / "img", ["ok.jpg"])
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{tmp_path / n}\n" for n in ("img/ok.jpg", "shot", "shot.txt", "a\\b")))
    summary = write_shards(str(listed), str(tmp_path / "out"), ShardWriterConfig())
    assert summary.manifest.total_samples == 4 and not summary.manifest.rejects
    loader = build_loader(LoaderConfig(url=str(tmp_path / "out"), batch_size=4, num_workers=0,
                                       augment=AugmentConfig(img_size=32)), 0, 1)
    assert sum(len(b.keys) for b in loader) == 4 and not loader.stats.skipped


def test_hidden_folders_and_files_are_named_rejects_never_classes(tmp_path):
    """A notebook's `.ipynb_checkpoints` folder became a class of its own, and macOS's
    `._x.jpg` files (not images at all) were read as samples."""
    src = tmp_path / "src"
    _images(src / "cats", ["c1.jpg", "c2.jpg"])
    _images(src / "dogs", ["d1.jpg"], seed=5)
    _images(src / ".ipynb_checkpoints", ["c1-checkpoint.jpg"])
    (src / "cats" / "._c1.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    summary = write_shards(str(src), str(tmp_path / "out"), ShardWriterConfig())
    assert summary.manifest.classes == ["cats", "dogs"]
    assert summary.manifest.total_samples == 3
    assert _rejects(summary) == {".ipynb_checkpoints": "hidden", "cats/._c1.jpg": "hidden"}


def test_list_lines_are_relative_to_the_list_and_a_repeated_path_is_a_duplicate(tmp_path, monkeypatch):
    """Relative lines were read from the current folder, so a list beside its images
    failed from anywhere else; a path listed twice became two samples."""
    _images(tmp_path / "data" / "img", ["a.jpg", "b.jpg"])
    listed = tmp_path / "data" / "list.txt"
    listed.write_text(f"img/a.jpg\tcat\n./img/b.jpg\tdog\n{tmp_path / 'data' / 'img' / 'a.jpg'}\tdog\nimg/a.jpg\tcat\n")
    monkeypatch.chdir(tmp_path)  # not the list's folder
    summary = write_shards("data/list.txt", str(tmp_path / "out"), ShardWriterConfig())
    assert summary.manifest.total_samples == 2 and summary.manifest.classes == ["cat", "dog"]
    assert _rejects(summary) == {"00000003:a.jpg": "duplicate", "00000004:a.jpg": "duplicate"}


def test_a_list_files_folder_is_where_its_relative_lines_are_read():
    """A list at the root (`/l.txt`) took "" as its folder, so its lines were read from
    the current folder again."""
    from pipeline.shards.sources import _folder_of, _resolved

    assert [_folder_of(s) for s in ("/l.txt", "l.txt", "lists/l.txt", "s3://b/d/l.txt")] == ["/", ".", "lists",
                                                                                            "s3://b/d"]
    assert _resolved("img/a.jpg", _folder_of("/l.txt")) == "/img/a.jpg"
    assert _resolved("../x/a.jpg", _folder_of("s3://b/d/l.txt")) == "s3://b/x/a.jpg"


def test_table_columns_named_for_a_folder_are_an_error_not_ignored(tmp_path):
    _images(tmp_path / "src", ["a.jpg"])
    with pytest.raises(SourceError, match="is not a parquet/Arrow source: --image-column"):
        write_shards(str(tmp_path / "src"), str(tmp_path / "out"), ShardWriterConfig(image_column="img"))


def test_a_destination_that_is_a_file_is_a_clear_error(tmp_path):
    from pipeline.errors import ObjectNotAccessible

    _images(tmp_path / "src", ["a.jpg"])
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(ObjectNotAccessible, match="out is a file, not a folder"):
        write_shards(str(tmp_path / "src"), str(tmp_path / "out"), ShardWriterConfig())


def test_a_shard_whose_sources_were_all_rejected_leaves_no_tar_behind(tmp_path):
    """Its empty tar was uploaded and left out of the manifest: an orphan file."""
    src = tmp_path / "src"
    _images(src, ["a.jpg", "b.jpg"])
    for name in ("x.jpg", "y.jpg"):
        (src / name).write_bytes(b"not a jpeg")
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{src / n}\n" for n in ("a.jpg", "b.jpg", "x.jpg", "y.jpg")))
    cfg = ShardWriterConfig(max_samples_per_shard=1, shuffle=False)  # one source per shard
    summary = write_shards(str(listed), str(tmp_path / "out"), cfg)
    assert [s.samples for s in summary.manifest.shards] == [1, 1]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == sorted(s.name for s in summary.manifest.shards)
    again = write_shards(str(listed), str(tmp_path / "out"), cfg)  # the empty shards' records are reused
    assert again.written == 0 and again.manifest.rejects == summary.manifest.rejects
