"""Reading and writing webdataset-layout tar shards safely.

A sample is the group of consecutive members sharing a key: ``<key>.jpg``,
``<key>.cls``, ``<key>.json``. Member names are untrusted: absolute paths, ``..``
components, control characters, links and device files are refused, so nothing a
shard holds can escape its directory if extracted or rewrite a terminal it is
logged to. A truncated tar is reported, never hung on.
A key that appears again later in the tar (or a member repeated within a
sample) starts a new sample under a new key, ``<key>#2``: nothing is lost or
overwritten, and the renaming is reported (``SampleIndex.renamed_from``).
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO

from pipeline.errors import ShardFormatError
from pipeline.images import IMAGE_EXTENSIONS, BadImage
from pipeline.shards.manifest import printable

@dataclass(frozen=True)
class SampleIndex:
    """Where one sample's members lie inside a tar: ext -> (offset, size)."""

    key: str
    members: Mapping[str, tuple[int, int]]
    renamed_from: str | None = None  # the key as in the tar, when it repeated an earlier sample's


def split_member_name(name: str, shard: str) -> tuple[str, str]:
    """'a/b/000_x.jpg' -> ('a/b/000_x', 'jpg'); refuses unsafe names."""
    path = PurePosixPath(name)
    if name.startswith("/") or path.is_absolute() or ".." in path.parts or "\\" in name or not name:
        raise ShardFormatError(f"{shard}: unsafe member name {name!r} (absolute or escapes the shard)")
    if not printable(name):  # keys reach logs and terminals
        raise ShardFormatError(f"{shard}: unsafe member name {name!r} (control characters)")
    base = path.name
    if "." not in base:
        raise ShardFormatError(f"{shard}: member {name!r} has no extension; expected <key>.<ext>")
    stem, ext = base.split(".", 1)
    return str(path.parent / stem) if path.parent != PurePosixPath(".") else stem, ext.lower()


def index_tar(fileobj: BinaryIO, shard: str) -> list[SampleIndex]:
    """Index the samples of a tar in order, checking every member header."""
    samples: list[SampleIndex] = []
    uses: Counter[str] = Counter()
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for member in tar:
                if not member.isreg():
                    raise ShardFormatError(f"{shard}: member {member.name!r} is not a regular file")
                key, ext = split_member_name(member.name, shard)
                last = samples[-1] if samples else None
                if last is None or (last.renamed_from or last.key) != key or ext in last.members:
                    uses[key] += 1
                    name = key if uses[key] == 1 else f"{key}#{uses[key]}"
                    last = SampleIndex(name, {}, key if uses[key] > 1 else None)
                    samples.append(last)
                last.members[ext] = (member.offset_data, member.size)
    except tarfile.TarError as e:
        raise ShardFormatError(f"{shard}: truncated or corrupt tar ({e})") from e
    fileobj.seek(0, os.SEEK_END)
    end = fileobj.tell()
    for s in samples:  # tarfile stops quietly at a cut-off member; the sizes tell
        for ext, (offset, size) in s.members.items():
            if offset + size > end:
                raise ShardFormatError(f"{shard}: truncated tar: member {s.key}.{ext} runs past the end of the file")
    return samples


def read_members(fileobj: BinaryIO, sample: SampleIndex) -> dict[str, bytes]:
    out = {}
    for ext, (offset, size) in sample.members.items():
        fileobj.seek(offset)
        out[ext] = fileobj.read(size)
    return out


class TarShardWriter:
    """Writes samples as a deterministic tar (fixed mtime/owner/mode) to a file object."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, members: Mapping[str, bytes]) -> None:
        for ext, data in members.items():
            split_member_name(f"{key}.{ext}", "writer")  # never write what the reader refuses
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()


def image_member(members: dict[str, bytes]) -> bytes:
    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if ext is None:
        raise BadImage("not_an_image", "no image member")
    return members[ext]


def label_of(members: dict[str, bytes], classes: int) -> int:
    """The sample's label (-1 without a ``.cls`` member). A label that is not an
    integer in ``[0, classes)`` (any non-negative one for a dataset without class
    names) raises ``BadImage('bad_label')``."""
    if "cls" not in members:
        return -1
    text = members["cls"].strip()
    if not (text.isdigit() and text.isascii() and len(text) <= 9) or (classes and int(text) >= classes):
        raise BadImage("bad_label", f"label {text[:20]!r} is not a class index below {classes or 'infinity'}")
    return int(text)
