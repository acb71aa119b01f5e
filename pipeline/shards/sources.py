"""Image sources for `mae shard`: a folder or a list file, local or on any fsspec URL.

A folder with one subfolder per class gives labels; a flat folder gives none; a
text file lists paths/URLs, optionally ``<path>\\t<class>`` per line; a relative
path is relative to the list file's folder. Items come back sorted by name, so a
rerun lists the same sources in the same order.

Local folders are walked following symbolic links to files and to folders (a
linked class folder is a class). A link that leads back into one of its own
parent folders is a loop: it is listed once, and the link is reported. Nothing
found is dropped silently: a broken link, an image-named entry that is not a
regular file (a FIFO would block a reader forever), a folder that cannot be read
or a name with control characters becomes an item with a ``problem`` — the
writer records it as a named reject. So does a hidden entry (``.ipynb_checkpoints/``,
macOS's ``._photo.jpg``): one reject per hidden file or folder, which is not walked
and is never a class; and a list line naming a path an earlier line named.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import posixpath
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

from infra.files import NotAFileError, require_regular
from infra.redact import redact
from pipeline.errors import ObjectNotAccessible, SourceError
from pipeline.images import IMAGE_EXTENSIONS, is_image_name
from pipeline.shards.labels import integer_classes
from pipeline.shards.manifest import printable, shown
from pipeline.storage.config import StorageConfig
from pipeline.storage.objects import ObjectFolder, call_at
from pipeline.shards.tables import (RowRef, TableColumns, TableFile, class_names, is_table_source, pick_columns,
                                    table_files, url_of)
from pipeline.storage.urls import is_local, join, split_url

# Listing problems, recorded as rejects with these reasons.
LISTING_REASONS = ("broken_link", "link_loop", "not_a_file", "unreadable", "unsafe_name", "hidden", "duplicate")


@dataclass(frozen=True)
class SourceItem:
    url: str  # what fsspec opens
    rel: str  # stable name for keys, logs and rejects
    size: int
    label: int | None
    problem: str | None = None  # a reject reason already known from the listing
    row: RowRef | None = None  # a row of a parquet/Arrow file (``url``), not a file of its own


@dataclass(frozen=True)
class FoundImage:
    """An image-named entry of a local folder (or a folder that could not be read)."""

    rel: str  # relative to the folder walked, '/'-separated
    size: int
    problem: str | None = None  # one of LISTING_REASONS


def list_sources(src: str, storage: StorageConfig,
                 columns: TableColumns | None = None) -> tuple[list[SourceItem], list[str]]:
    """All images under ``src`` (sorted by name; table rows in file order) and the class names."""
    if is_table_source(src, storage):
        return list_table_rows(src, storage, columns or TableColumns())
    if columns is not None and (columns.image or columns.label):
        raise SourceError(f"{redact(src)} is not a parquet/Arrow source: --image-column and --label-column apply "
                          "only to those")
    protocol, path = split_url(src)
    folder = ObjectFolder(src, storage)
    kind = folder.call("source", lambda: "file" if folder.fs.isfile(path) else "dir" if folder.fs.isdir(path) else None)
    if kind == "file":
        data = folder.call("list file", lambda: folder.fs.cat_file(path))
        try:
            return _list_from_text(data.decode("utf-8"), storage, _folder_of(src))
        except UnicodeDecodeError:
            raise SourceError(f"list file {redact(src)} is not UTF-8 text") from None
    if kind is None:
        raise SourceError(f"source {redact(src)} is neither a folder nor a list file")
    found = walk_images(path) if protocol == "file" else _find_remote(folder)
    found = [f if f.problem or printable(f.rel) else FoundImage(shown(f.rel), f.size, "unsafe_name") for f in found]
    files = [f for f in found if not f.problem]
    if not files:
        raise SourceError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {redact(src)}"
                          + (f"; {len(found)} entries could not be used" if found else ""))

    def url(rel: str) -> str:
        return join(path, rel) if protocol == "file" else f"{protocol}://{join(path, rel)}"

    problems = [SourceItem(url(f.rel), f.rel, -1, None, f.problem) for f in found if f.problem]
    depths = {f.rel.count("/") for f in files}
    if depths == {0}:
        items = [SourceItem(url(f.rel), f.rel, f.size, None) for f in files]
        return sorted(items + problems, key=lambda it: it.rel), []
    if depths == {1}:
        classes = sorted({f.rel.split("/", 1)[0] for f in files})
        index = {c: i for i, c in enumerate(classes)}
        items = [SourceItem(url(f.rel), f.rel, f.size, index[f.rel.split("/", 1)[0]]) for f in files]
        return sorted(items + problems, key=lambda it: it.rel), classes
    raise SourceError(f"{redact(src)} mixes layouts (images at depths {sorted(depths)}); use either a flat folder "
                      "or one subfolder per class")


def list_table_rows(src: str, storage: StorageConfig, columns: TableColumns) -> tuple[list[SourceItem], list[str]]:
    """One item per row of the parquet/Arrow files of ``src``: sized by the image
    column's bytes per row of its row group (from metadata), labelled by the label
    column. A label outside the dataset's classes is a ``bad_label`` reject."""
    folder, files = table_files(src, storage)
    first = TableFile(folder, files[0])
    image, label = pick_columns(first.schema, columns, redact(join(folder.url, files[0])))
    rows = []  # (file, RowRef, size, label value)
    for name in files:
        table = first if name == files[0] else TableFile(folder, name)
        pick_columns(table.schema, TableColumns(image, label or ""), redact(join(folder.url, name)))
        sizes = table.group_sizes(image)
        values = [g.column(label).to_pylist() for g in table.groups([label])] if label else [[None] * n for n, _ in sizes]
        for g, (count, nbytes) in enumerate(sizes):
            rows += [(name, RowRef(image, g, i), nbytes // max(count, 1), values[g][i]) for i in range(count)]
    classes, index = _table_classes([v for *_, v in rows], class_names(first.schema, label) if label else None)
    items, seen = [], {}
    for name, ref, size, value in rows:
        n = seen[name] = seen.get(name, -1) + 1
        label_index = index(value)
        items.append(SourceItem(url_of(folder, name), f"{name}#{n}", size, label_index if label_index != -2 else None,
                                "bad_label" if label_index == -2 else None, ref))
    return items, classes


def _table_classes(values: list[object], names: list[str] | None) -> tuple[list[str], Callable[[object], int | None]]:
    """The class names and value -> label (None: unlabelled row, -2: a bad label).
    Integers are class indices (named by the ClassLabel feature when there is one;
    negative means unlabelled, as Hugging Face writes test splits); strings are names."""
    present = [v for v in values if v is not None]
    if not present:
        return [], lambda v: None
    if all(isinstance(v, str) for v in present):
        classes = sorted({v for v in present if v and printable(v)})
        lookup = {c: i for i, c in enumerate(classes)}
        return classes, lambda v: None if v is None else lookup.get(v, -2)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        raise SourceError("the label column holds neither integers nor strings; name another with --label-column, "
                          "or pass --label-column '' for none")
    classes = names if names is not None else integer_classes(max(max(present), -1), "the label column")
    return classes, lambda v: None if v is None or v < 0 else (v if v < len(classes) else -2)


def _find_remote(folder: ObjectFolder) -> list[FoundImage]:
    found = folder.call("listing", lambda: folder.fs.find(folder.root, detail=True))
    images, hidden = [], set()
    for p, info in found.items():
        rel = PurePosixPath(p).relative_to(folder.root).as_posix()
        if not is_image_name(p) or info.get("type", "file") != "file":
            continue
        parts = rel.split("/")
        first = next((i for i, part in enumerate(parts) if part.startswith(".")), None)
        if first is None:
            images.append(FoundImage(rel, info["size"]))
        else:  # one reject for a hidden folder, as the local walk gives
            hidden.add("/".join(parts[:first + 1]))
    return images + [FoundImage(rel, -1, "hidden") for rel in sorted(hidden)]


def walk_images(root: str) -> list[FoundImage]:
    """Image-named entries under a local folder ``root``, following links to files and
    folders; a folder already on the current path (a link loop) is not entered
    again. What cannot be read as an image file carries its ``problem``."""
    found: list[FoundImage] = []
    st = os.stat(root)
    stack = [(root, "", frozenset({(st.st_dev, st.st_ino)}))]
    while stack:
        folder, rel, ancestors = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            found.append(FoundImage(rel or ".", -1, "unreadable"))
            continue
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            if entry.name.startswith("."):
                if is_image_name(entry.name) or entry.is_dir():
                    found.append(FoundImage(name, -1, "hidden"))
                continue
            try:
                st = os.stat(entry.path)  # follows links
            except OSError:
                found.append(FoundImage(name, -1, "broken_link" if entry.is_symlink() else "unreadable"))
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    found.append(FoundImage(name, -1, "link_loop"))
                else:
                    stack.append((entry.path, name, ancestors | {key}))
            elif is_image_name(entry.name) and stat.S_ISREG(st.st_mode):
                found.append(FoundImage(name, st.st_size))
            elif is_image_name(entry.name):
                found.append(FoundImage(name, -1, "not_a_file"))
    return found


def _list_from_text(text: str, storage: StorageConfig, base: str) -> tuple[list[SourceItem], list[str]]:
    """The items of a list file whose folder is ``base``: relative paths are read
    from there, and a path listed again is a ``duplicate`` reject."""
    entries, seen = [], set()
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, _, cls = line.partition("\t")
        path = _resolved(path.strip(), base)
        entries.append((path, cls.strip() or None, n, path in seen))
        seen.add(path)
    labelled = {cls is not None for _, cls, _, _ in entries}
    if labelled == {True, False}:
        raise SourceError("list file mixes labelled (<path>\\t<class>) and unlabelled lines")
    bad_class = next((cls for _, cls, _, _ in entries if cls is not None and not printable(cls)), None)
    if bad_class is not None:
        raise SourceError(f"list file names a class with control characters: {bad_class!r}")
    classes = sorted({cls for _, cls, _, again in entries if cls is not None and not again})
    index = {c: i for i, c in enumerate(classes)}

    def item(entry: tuple[str, str | None, int, bool]) -> SourceItem:
        path, cls, n, again = entry
        rel = f"{n:08d}:{path.rsplit('/', 1)[-1]}"
        if not printable(rel):
            return SourceItem(path, shown(rel), -1, None, "unsafe_name")
        if again:
            return SourceItem(path, rel, -1, None, "duplicate")
        if is_local(path):  # a pipe would block the writer for good, a device never end
            try:
                require_regular(split_url(path)[1])
            except NotAFileError:
                return SourceItem(path, rel, -1, None, "not_a_file")
            except OSError:
                pass  # missing or unreadable: found out below, as for any object
        try:
            size = call_at(path, storage, f"list entry {n}", _size_or_missing)
        except ObjectNotAccessible:
            return SourceItem(path, rel, -1, None, "unreadable")
        return SourceItem(path, rel, size, index[cls] if cls else None)

    with cf.ThreadPoolExecutor(16) as pool:  # one HEAD per object: do them in parallel
        return list(pool.map(item, entries)), classes


def _folder_of(src: str) -> str:
    """The folder (path or URL) of a list file: ``/l.txt`` -> ``/``, ``l.txt`` -> ``.``."""
    return posixpath.dirname(src.rstrip("/")) or "."


def _resolved(path: str, base: str) -> str:
    """A list entry as a path or URL: one without a scheme that is not absolute is
    relative to the list file's folder ``base`` (a path or URL)."""
    if "://" in path or not path:
        return path
    if "://" in base and not path.startswith("/"):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, path))}"
    return os.path.abspath(os.path.join(base, path))


def _size_or_missing(fs, path: str) -> int:
    """The size of an object, or -1 when it is not there (rejected as missing when
    its shard is written)."""
    try:
        return fs.size(path)
    except FileNotFoundError:
        return -1
