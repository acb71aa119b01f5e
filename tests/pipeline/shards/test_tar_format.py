import io
import tarfile

import pytest

from pipeline.errors import ShardFormatError
from pipeline.shards.tar_format import TarShardWriter, index_tar, read_members


def _tar_with(names_and_data, kind=tarfile.REGTYPE) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in names_and_data:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.type = kind
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    buf.seek(0)
    return buf


def test_samples_group_members_by_key_in_order():
    buf = io.BytesIO()
    w = TarShardWriter(buf)
    w.add("000_a", {"jpg": b"A" * 10, "cls": b"3"})
    w.add("001_b", {"png": b"B" * 5})
    w.close()
    buf.seek(0)
    samples = [(e.key, read_members(buf, e)) for e in index_tar(buf, "s.tar")]
    assert samples == [("000_a", {"jpg": b"A" * 10, "cls": b"3"}), ("001_b", {"png": b"B" * 5})]


@pytest.mark.parametrize("name", ["../evil.jpg", "/etc/passwd.jpg", "a/../../b.jpg", "x\\..\\y.jpg"])
def test_members_escaping_the_directory_are_rejected(name):
    with pytest.raises(ShardFormatError, match="unsafe member name"):
        index_tar(_tar_with([(name, b"x")]), "evil.tar")


def test_links_and_devices_are_rejected():
    with pytest.raises(ShardFormatError, match="not a regular file"):
        index_tar(_tar_with([("link.jpg", b"")], kind=tarfile.SYMTYPE), "links.tar")


def test_writer_refuses_unsafe_keys():
    w = TarShardWriter(io.BytesIO())
    with pytest.raises(ShardFormatError):
        w.add("../up", {"jpg": b"x"})


@pytest.mark.parametrize("cut", [100, 700, 2000])
def test_truncated_tar_is_reported_not_hung_on(cut):
    full = _tar_with([("000.jpg", b"x" * 1500), ("001.jpg", b"y" * 1500)]).getvalue()
    with pytest.raises(ShardFormatError, match="truncated"):
        index_tar(io.BytesIO(full[:cut]), "cut.tar")


def test_garbage_is_reported():
    with pytest.raises(ShardFormatError, match="truncated or corrupt|no extension"):
        index_tar(io.BytesIO(b"\x01" * 2048), "garbage.tar")


def test_read_members_uses_the_index_offsets():
    buf = _tar_with([("k.jpg", b"abc"), ("k.cls", b"7")])
    (sample,) = index_tar(buf, "s.tar")
    assert read_members(buf, sample) == {"jpg": b"abc", "cls": b"7"}
