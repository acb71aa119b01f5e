"""Image datasets stored as tables, as `mae shard` sources: parquet files (Hugging
Face's format on the Hub and for downloaded datasets) and folders written by
``datasets.save_to_disk`` (Arrow stream files), on local disk or any fsspec URL
(``s3://``, ``hf://datasets/...`` with ``huggingface_hub`` installed).

One row is one image: the image column holds the encoded bytes, either plainly
or as Hugging Face's ``Image`` struct ``{"bytes", "path"}``; an optional label
column holds a class index (names from the dataset's ``ClassLabel`` feature when
it has one) or a class name. Rows are listed with the label column only; the
image bytes are read per shard, one row group at a time, and the writer judges
each image by the same policy as a file. pyarrow is imported only here
(``pip install 'maescale[parquet]'``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, TypeVar

from infra.redact import redact
from pipeline.errors import ObjectNotAccessible, SourceError
from pipeline.images import is_image_name
from pipeline.shards.manifest import printable, shown
from pipeline.storage.config import StorageConfig
from pipeline.storage.objects import ObjectFolder
from pipeline.storage.urls import join, split_url

T = TypeVar("T")
TABLE_SUFFIXES = (".parquet", ".arrow")
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "image_bytes")
LABEL_COLUMNS = ("label", "labels", "cls", "class")
# magic bytes -> the extension a shard stores the image under
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"), (b"BM", "bmp"),
          (b"II*\x00", "tif"), (b"MM\x00*", "tif"))


def pyarrow_modules() -> tuple[Any, Any, Any]:
    """(pyarrow, pyarrow.parquet, pyarrow.ipc), or an ImportError naming the extra."""
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as e:
        raise ImportError(f"reading parquet/Arrow datasets needs pyarrow: pip install 'maescale[parquet]' ({e})") from e
    return pyarrow, pyarrow.parquet, pyarrow.ipc


@dataclass(frozen=True)
class TableColumns:
    image: str | None = None  # None: detect (image, img, ... or the first binary / {bytes, path} column)
    label: str | None = None  # None: detect (label, labels, cls, class); "" for none


@dataclass(frozen=True)
class RowRef:
    """Where one row's image is in its file: the column, the row group (Arrow: record
    batch) and the row in it."""

    column: str
    group: int
    index: int


def image_extension(data: bytes) -> str | None:
    """The extension an image's bytes call for, from their magic number."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), None)


def is_table_source(src: str, storage: StorageConfig) -> bool:
    """A parquet/Arrow file, or a folder holding some (and ``save_to_disk``'s files)."""
    if src.rstrip("/").endswith(TABLE_SUFFIXES):
        return True
    folder = ObjectFolder(src, storage)
    try:
        entries = folder.call("source", lambda: folder.fs.ls(folder.root, detail=True))
    except ObjectNotAccessible:
        return False
    names = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: e for e in entries if isinstance(e, dict)}
    if "state.json" in names or "dataset_dict.json" in names:
        return True
    tables = sorted(n for n in names if n.endswith(TABLE_SUFFIXES))
    if not tables:
        return False
    other = sorted(n for n, e in names.items() if not n.startswith(".") and not n.endswith(TABLE_SUFFIXES)
                   and (e.get("type") == "directory" or is_image_name(n)))
    if other:  # a photo folder with a stray metadata.parquet: which one is meant?
        raise SourceError(f"{redact(src)} holds both table files ({', '.join(shown(n) for n in tables[:3])}) and "
                          f"images or folders ({', '.join(shown(n) for n in other[:3])}); name the table file "
                          "itself, or move it out of the folder")
    return True


def table_files(src: str, storage: StorageConfig) -> tuple[ObjectFolder, list[str]]:
    """The folder and the table files in it, in order (``save_to_disk``: as its state.json lists)."""
    if src.rstrip("/").endswith(TABLE_SUFFIXES):
        base, name = src.rstrip("/").rsplit("/", 1) if "/" in src else (".", src)
        return ObjectFolder(base, storage), [name]
    folder = ObjectFolder(src, storage)
    if (dd := folder.read_if_exists("dataset_dict.json", MAX_STATE_BYTES)) is not None:
        splits = _json(dd, src, "dataset_dict.json").get("splits", [])
        raise SourceError(f"{redact(src)} holds a DatasetDict; shard one split: "
                          + ", ".join(f"{redact(join(src, str(s)))}" for s in splits))
    if (state := folder.read_if_exists("state.json", MAX_STATE_BYTES)) is not None:
        files = [f.get("filename") for f in _json(state, src, "state.json").get("_data_files", [])]
        if files and all(isinstance(f, str) and "/" not in f and f.endswith(".arrow") for f in files):
            return folder, files
        raise SourceError(f"{redact(src)}/state.json does not list the dataset's .arrow files")
    found = folder.call("listing", lambda: folder.fs.find(folder.root))
    files = sorted(PurePosixPath(p).relative_to(folder.root).as_posix() for p in found if p.endswith(TABLE_SUFFIXES))
    if not files:
        raise SourceError(f"no parquet or Arrow files under {redact(src)}")
    return folder, files


MAX_STATE_BYTES = 16 * 2**20  # a saved dataset's dataset_dict.json or state.json: kilobytes


def _json(data: bytes, src: str, name: str) -> dict:
    if len(data) > MAX_STATE_BYTES:
        raise SourceError(f"{redact(src)}/{name} is larger than {MAX_STATE_BYTES // 2**20} MiB: not the small JSON file "
                          "a saved dataset keeps beside its tables")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise SourceError(f"{redact(src)}/{name} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise SourceError(f"{redact(src)}/{name} is not a JSON object")
    return doc


class TableFile:
    """One parquet or Arrow-stream file, read a column set and a row group at a time."""

    def __init__(self, folder: ObjectFolder, name: str) -> None:
        self.folder, self.name = folder, name
        self.pa, self.pq, self.ipc = pyarrow_modules()
        self.path = folder.path(name)
        self.arrow = name.endswith(".arrow")
        try:
            self.schema = self._schema()
        except (self.pa.ArrowException, OSError, ValueError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise SourceError(f"{redact(join(folder.url, name))} is not a readable "
                              f"{'Arrow' if self.arrow else 'parquet'} file ({str(e)[:200]})") from None

    def _call(self, fn: Callable[[], T]) -> T:
        """``fn()`` under the retry policy; a local file's errors are its contents', which
        a retry cannot change (pyarrow reports a damaged file as a bare OSError)."""
        return fn() if self.folder.local else self.folder.call(self.name, fn)

    def _open(self) -> Any:
        if self.folder.local:
            return self.pa.memory_map(self.path) if self.arrow else self.path
        return self.folder.fs.open(self.path, "rb")

    def _schema(self) -> Any:
        if self.arrow:
            return self._call(lambda: self.ipc.open_stream(self._open()).schema)
        return self._call(lambda: self.pq.ParquetFile(self._open()).schema_arrow)

    def groups(self, columns: list[str]) -> list[Any]:
        """Every row group (Arrow: record batch) as a table of ``columns``."""
        if self.arrow:
            return self._call(lambda: [self.pa.Table.from_batches([b]).select(columns)
                                                        for b in self.ipc.open_stream(self._open())])
        f = self._call(lambda: self.pq.ParquetFile(self._open()))
        return [self._call(lambda g=g: f.read_row_group(g, columns=columns))
                for g in range(f.num_row_groups)]

    def group_sizes(self, image: str) -> list[tuple[int, int]]:
        """(rows, image bytes) per row group, from metadata where there is some."""
        if self.arrow:
            return [(t.num_rows, t.nbytes) for t in self.groups([image])]
        meta = self._call(lambda: self.pq.ParquetFile(self._open()).metadata)
        col = meta.schema.to_arrow_schema().get_field_index(image)
        sizes = []
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            chunk = sum(rg.column(c).total_compressed_size for c in range(rg.num_columns)
                        if rg.column(c).path_in_schema.split(".")[0] == image) if col >= 0 else rg.total_byte_size
            sizes.append((rg.num_rows, chunk))
        return sizes

    def image_bytes(self, group: int, image: str) -> list[bytes | None]:
        table = (self.groups([image])[group] if self.arrow else
                 self._call(lambda: self.pq.ParquetFile(self._open()).read_row_group(
                     group, columns=[image])))
        return [_image_value(v) for v in table.column(image).to_pylist()]


def _image_value(value: Any) -> bytes | None:
    if isinstance(value, dict):  # Hugging Face Image: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None


def class_names(schema: Any, label: str) -> list[str] | None:
    """A ClassLabel's names from Hugging Face's schema metadata, if the dataset has them."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feature = json.loads(meta)["info"]["features"][label]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    if isinstance(names, list) and all(isinstance(n, str) and n and printable(n) for n in names):
        return names
    return None


def pick_columns(schema: Any, wanted: TableColumns, where: str) -> tuple[str, str | None]:
    """The image and label columns: as named, or detected."""
    pa = pyarrow_modules()[0]
    names = list(schema.names)

    def is_image(f: Any) -> bool:
        return pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) or (
            pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0)

    image = wanted.image or next((n for n in IMAGE_COLUMNS if n in names), None) or next(
        (f.name for f in schema if is_image(f)), None)
    if image is None or image not in names:
        raise SourceError(f"{where}: no image column{f' {wanted.image!r}' if wanted.image else ''} "
                          f"(columns: {', '.join(names[:20])}); name it with --image-column")
    if not is_image(schema.field(image)):
        raise SourceError(f"{where}: column {image!r} holds {schema.field(image).type}, not image bytes")
    if wanted.label == "":
        return image, None
    label = wanted.label or next((n for n in LABEL_COLUMNS if n in names), None)
    if label is not None and label not in names:
        raise SourceError(f"{where}: no label column {label!r} (columns: {', '.join(names[:20])})")
    return image, label


def read_rows(rows: list[tuple[int, str, RowRef]], storage: StorageConfig) -> dict[int, bytes | None]:
    """Image bytes of the rows ``(position, file URL, RowRef)`` by position, reading
    each row group they fall in once (None: the row holds no bytes)."""
    groups: dict[tuple[str, str, int], list[tuple[int, int]]] = defaultdict(list)
    for pos, url, ref in rows:
        groups[(url, ref.column, ref.group)].append((pos, ref.index))
    out: dict[int, bytes | None] = {}
    files: dict[str, TableFile] = {}
    for (url, column, group), wanted in groups.items():
        if url not in files:
            base, name = url.rsplit("/", 1)
            files[url] = TableFile(ObjectFolder(base, storage), name)
        values = files[url].image_bytes(group, column)
        for pos, index in wanted:
            out[pos] = values[index] if index < len(values) else None
    return out


def url_of(folder: ObjectFolder, name: str) -> str:
    protocol, _ = split_url(folder.url)
    return folder.path(name) if protocol == "file" else f"{protocol}://{folder.path(name)}"
