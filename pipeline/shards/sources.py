"""Image sources for `mae shard`: a folder or a list file, local or on any fsspec URL.

A folder with one subfolder per class gives labels; a flat folder gives none; a
text file lists paths/URLs, optionally ``<path>\\t<class>`` per line. Items come
back sorted by name, so a rerun lists the same sources in the same order.
"""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass
from pathlib import PurePosixPath

from pipeline.errors import SourceError
from pipeline.images import IMAGE_EXTENSIONS, is_image_name
from pipeline.storage.config import StorageConfig
from pipeline.storage.redact import redact
from pipeline.storage.urls import filesystem, join, split_url


@dataclass(frozen=True)
class SourceItem:
    url: str  # what fsspec opens
    rel: str  # stable name for keys, logs and rejects
    size: int
    label: int | None


def list_sources(src: str, storage: StorageConfig) -> tuple[list[SourceItem], list[str]]:
    """All images under ``src`` (sorted by name) and the class names."""
    fs, path = filesystem(src, storage)
    protocol = split_url(src)[0]

    def url(p: str) -> str:
        return p if protocol == "file" else f"{protocol}://{p}"

    if fs.isfile(path):
        return _list_from_text(fs.cat_file(path).decode("utf-8"), storage)
    if not fs.isdir(path):
        raise SourceError(f"source {redact(src)} is neither a folder nor a list file")
    found = fs.find(path, detail=True)
    files = sorted((PurePosixPath(p).relative_to(path).as_posix(), info["size"]) for p, info in found.items()
                   if is_image_name(p) and info.get("type", "file") == "file")
    if not files:
        raise SourceError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {redact(src)}")
    depths = {rel.count("/") for rel, _ in files}
    if depths == {0}:
        return [SourceItem(url(join(path, rel)), rel, size, None) for rel, size in files], []
    if depths == {1}:
        classes = sorted({rel.split("/", 1)[0] for rel, _ in files})
        index = {c: i for i, c in enumerate(classes)}
        return [SourceItem(url(join(path, rel)), rel, size, index[rel.split("/", 1)[0]]) for rel, size in files], classes
    raise SourceError(f"{redact(src)} mixes layouts (images at depths {sorted(depths)}); use either a flat folder "
                     "or one subfolder per class")


def _list_from_text(text: str, storage: StorageConfig) -> tuple[list[SourceItem], list[str]]:
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, _, cls = line.partition("\t")
        entries.append((path.strip(), cls.strip() or None, n))
    labelled = {cls is not None for _, cls, _ in entries}
    if labelled == {True, False}:
        raise SourceError("list file mixes labelled (<path>\\t<class>) and unlabelled lines")
    classes = sorted({cls for _, cls, _ in entries if cls is not None})
    index = {c: i for i, c in enumerate(classes)}

    def item(entry: tuple[str, str | None, int]) -> SourceItem:
        path, cls, n = entry
        fs, p = filesystem(path, storage)
        try:
            size = fs.size(p)
        except FileNotFoundError:
            size = -1  # rejected as missing when its shard is written
        return SourceItem(path, f"{n:08d}:{path.rsplit('/', 1)[-1]}", size, index[cls] if cls else None)

    with cf.ThreadPoolExecutor(16) as pool:  # one HEAD per object: do them in parallel
        return list(pool.map(item, entries)), classes
