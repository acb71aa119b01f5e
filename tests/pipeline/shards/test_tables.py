"""Parquet and `datasets.save_to_disk` sources for `mae shard` (built locally, no network)."""

from __future__ import annotations

import json
import tarfile

import pytest

from pipeline.errors import SourceError
from pipeline.shards.writer import ShardWriterConfig, write_shards
from pipeline.storage.config import StorageConfig
from tests.helpers.cli import run_mae
from tests.helpers.shards import jpeg_bytes

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
NAMES = ["cat", "dog", "fish"]


def hf_table(images: list[bytes], labels: list[int]):
    """A table as Hugging Face writes it: Image structs and a ClassLabel in the schema metadata."""
    table = pa.table({"image": [{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)], "label": labels})
    meta = {"info": {"features": {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": NAMES}}}}
    return table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})


def shard_contents(out) -> dict[str, tuple[bytes, int]]:
    """source -> (image bytes, label) over every shard written."""
    found = {}
    for path in sorted(out.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[:-5]
                image = next(v for k, v in members.items() if k.startswith(key + ".") and k[len(key) + 1:] in
                             ("jpg", "png"))
                found[json.loads(data)["source"]] = (image, int(members.get(key + ".cls", b"-1")))
    return found


def test_parquet_files_with_hf_image_structs_and_class_names(tmp_path):
    images = [jpeg_bytes(seed=i) for i in range(10)]
    images[3] = b"not an image"
    table = hf_table(images, [i % 3 for i in range(10)])
    (tmp_path / "pq").mkdir()
    pq.write_table(table.slice(0, 6), tmp_path / "pq/train-00000-of-00002.parquet", row_group_size=4)
    pq.write_table(table.slice(6), tmp_path / "pq/train-00001-of-00002.parquet", row_group_size=4)
    summary = write_shards(str(tmp_path / "pq"), str(tmp_path / "out"), ShardWriterConfig(shard_bytes=5000))
    m = summary.manifest
    assert m.classes == NAMES and m.total_samples == 9
    assert [(r.source, r.reason) for r in m.rejects] == [("train-00000-of-00002.parquet#3", "not_an_image")]
    found = shard_contents(tmp_path / "out")
    rows = {f"train-0000{f}-of-00002.parquet#{r}": i for i, (f, r) in
            enumerate([(0, r) for r in range(6)] + [(1, r) for r in range(4)])}
    assert found == {src: (images[i], i % 3) for src, i in rows.items() if i != 3}  # bytes kept bit for bit
    assert "throughput: 9 samples" in summary.format()


def test_save_to_disk_folder_and_string_labels(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [jpeg_bytes(seed=i, fmt="PNG" if i == 2 else "JPEG") for i in range(6)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images],
                                     "label": [2, 1, 0, 2, 1, 0]}, features=features)
    ds.save_to_disk(str(tmp_path / "hf"))
    m = write_shards(str(tmp_path / "hf"), str(tmp_path / "out"), ShardWriterConfig()).manifest
    assert m.classes == NAMES and m.total_samples == 6
    found = shard_contents(tmp_path / "out")
    assert found == {f"data-00000-of-00001.arrow#{i}": (images[i], [2, 1, 0, 2, 1, 0][i]) for i in range(6)}
    # a plain parquet file whose labels are class names; raw bytes column named "jpg"
    pq.write_table(pa.table({"jpg": images[:3], "label": ["b", "a", "b"]}), tmp_path / "named.parquet")
    m = write_shards(str(tmp_path / "named.parquet"), str(tmp_path / "out2"), ShardWriterConfig()).manifest
    assert m.classes == ["a", "b"] and sorted(v[1] for v in shard_contents(tmp_path / "out2").values()) == [0, 1, 1]


def test_labels_outside_the_classes_are_rejects_and_columns_are_checked(tmp_path, capsys):
    images = [jpeg_bytes(seed=i) for i in range(4)]
    pq.write_table(hf_table(images, [0, 7, -1, 2]), tmp_path / "t.parquet")
    m = write_shards(str(tmp_path / "t.parquet"), str(tmp_path / "out"), ShardWriterConfig()).manifest
    assert [(r.source, r.reason) for r in m.rejects] == [("t.parquet#1", "bad_label")] and m.total_samples == 3
    labels = {s: label for s, (_, label) in shard_contents(tmp_path / "out").items()}
    assert labels == {"t.parquet#0": 0, "t.parquet#2": -1, "t.parquet#3": 2}  # -1 (HF: no label): kept, no .cls
    res = run_mae(capsys, "shard", tmp_path / "t.parquet", tmp_path / "o", "--image-column", "photo")
    assert res.code == 2 and "no image column 'photo'" in res.error_line
    res = run_mae(capsys, "shard", tmp_path / "t.parquet", tmp_path / "o", "--label-column", "", "--workers", "1")
    assert res.code == 0 and "classes: 0 (unlabelled)" in res.out
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SourceError, match="not a readable parquet file"):
        write_shards(str(tmp_path / "bad.parquet"), str(tmp_path / "o3"), ShardWriterConfig())
    (tmp_path / "zeros.parquet").write_bytes(b"PAR1" + bytes(4096) + b"PAR1")  # pyarrow: a bare OSError
    res = run_mae(capsys, "shard", tmp_path / "zeros.parquet", tmp_path / "o4")
    assert res.code == 2 and "zeros.parquet is not a readable parquet file" in res.error_line
    assert "attempt" not in res.err  # a local file's damage is not retried as a network error


def test_a_photo_folder_with_a_stray_table_file_is_an_error_not_a_table_source(tmp_path):
    """A class-folder photo set with a `metadata.parquet` beside it was sharded as
    that table, without its photos."""
    src = tmp_path / "photos"
    for cls in ("cat", "dog"):
        (src / cls).mkdir(parents=True)
        (src / cls / "1.jpg").write_bytes(jpeg_bytes((40, 32)))
    pq.write_table(pa.table({"file": ["cat/1.jpg"], "caption": ["a cat"]}), src / "metadata.parquet")
    with pytest.raises(SourceError, match="holds both table files \\(metadata.parquet\\) and images or folders "
                                          "\\(cat, dog\\); name the table file itself"):
        write_shards(str(src), str(tmp_path / "out"), ShardWriterConfig())


def test_an_oversized_state_file_is_refused_unread(tmp_path, monkeypatch):
    """A saved dataset's state.json is kilobytes; a huge one is one line, not read whole."""
    import pipeline.shards.tables as tables

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/state.json").write_text(json.dumps({"_data_files": [{"filename": "data.arrow"}]}) + " " * 100)
    monkeypatch.setattr(tables, "MAX_STATE_BYTES", 64)
    with pytest.raises(SourceError, match=r"hf/state.json is larger than 0 MiB: not the small JSON file"):
        tables.table_files(str(tmp_path / "hf"), StorageConfig())
