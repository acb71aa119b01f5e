import io
import tarfile

import pytest
from tests.helpers.shards import negative_member_size

from pipeline.errors import ShardFormatError
from pipeline.images import BadImage
from pipeline.shards.tar_format import TarShardWriter, group_samples, index_tar, label_of, read_members


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


@pytest.mark.parametrize("name", ["../evil.jpg", "/etc/passwd.jpg", "a/../../b.jpg", "x\\..\\y.jpg", "\x1b[2J.jpg"])
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


def test_a_repeated_key_is_read_under_a_new_key_not_merged_or_lost():
    """The issue's case: a duplicate key inside one tar was accepted silently."""
    buf = _tar_with([("a.jpg", b"A1"), ("a.cls", b"1"), ("b.jpg", b"B"), ("a.jpg", b"A2"), ("a.cls", b"2"),
                     ("c.jpg", b"C1"), ("c.jpg", b"C2")])
    samples = index_tar(buf, "dup.tar")
    assert [(s.key, s.renamed_from) for s in samples] == [("a", None), ("b", None), ("a#2", "a"), ("c", None),
                                                          ("c#2", "c")]
    assert [read_members(buf, s) for s in samples] == [{"jpg": b"A1", "cls": b"1"}, {"jpg": b"B"},
                                                       {"jpg": b"A2", "cls": b"2"}, {"jpg": b"C1"}, {"jpg": b"C2"}]


@pytest.mark.parametrize("cls, classes, label", [(b"1", 2, 1), (b" 0\n", 2, 0), (b"7", 0, 7), (None, 2, -1)])
def test_labels_are_class_indices(cls, classes, label):
    assert label_of({"jpg": b"x", **({"cls": cls} if cls is not None else {})}, classes) == label


@pytest.mark.parametrize("cls", [b"abc", b"2", b"-1", b"1.5", b"", b"\xff", b"99999999999999"])
def test_a_label_that_is_not_a_class_index_is_a_bad_label(cls):
    with pytest.raises(BadImage) as e:
        label_of({"jpg": b"x", "cls": cls}, 2)
    assert e.value.reason == "bad_label"


def _tar_of(entries, fmt) -> bytes:
    """A tar of (name, type, data) entries in tarfile's ``fmt``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("strict", [True, False])
def test_the_fast_header_path_reads_exactly_what_tarfile_reads(fmt, strict, monkeypatch):
    """Plain ustar headers are parsed without tarfile; on every kind of header the
    walk's members, problems and fingerprint are the same as tarfile's alone."""
    from pipeline.shards import tar_format

    long_dir = "d" * 90 + "/" + "e" * 40  # > 100 bytes: ustar splits it into prefix and name
    entries = [("a/000_x.jpg", tarfile.REGTYPE, b"1" * 700), (f"{long_dir}/001.jpg", tarfile.REGTYPE, b"2"),
               ("é/002_ü.jpg", tarfile.REGTYPE, b"3" * 3), ("003.JPG", tarfile.REGTYPE, b"")]
    if not strict:  # what only the lenient walk (tars indexed in place) gets past
        entries += [("folder", tarfile.DIRTYPE, b""), ("link.jpg", tarfile.SYMTYPE, b""),
                    ("noext", tarfile.REGTYPE, b"4")]
    data = _tar_of(entries, fmt)
    # the fast path takes ustar headers (PAX format writes them too), not GNU's
    assert tar_format._plain_header(data[:512]) == (None if fmt == tarfile.GNU_FORMAT else ("a/000_x.jpg", 700))
    fast = tar_format.walk_tar(lambda o, n: data[o:o + n], len(data), "s", strict)
    calls = []
    monkeypatch.setattr(tar_format, "_plain_header", lambda block: calls.append(1))  # tarfile for every header
    slow = tar_format.walk_tar(lambda o, n: data[o:o + n], len(data), "s", strict)
    assert calls and fast == slow
    assert [m.name for m in fast.members] == [e[0] for e in entries[:4]]


_PLAIN = [("a/000_x.jpg", tarfile.REGTYPE, b"1" * 700), ("a/000_x.cls", tarfile.REGTYPE, b"3"),
          ("a/000_x.jpg", tarfile.REGTYPE, b"again"), ("001.JPG", tarfile.REGTYPE, b""),
          ("b/002.tar.gz", tarfile.REGTYPE, b"5" * 513)]


@pytest.mark.parametrize("entries, fmt, plain", [
    (_PLAIN, tarfile.USTAR_FORMAT, True),  # what the shard writer makes: a repeated member, an upper-case
    (_PLAIN, tarfile.PAX_FORMAT, True),  # extension, a two-part one, a member ending on a block
    ([], tarfile.USTAR_FORMAT, True),
    (_PLAIN, tarfile.GNU_FORMAT, False),
    (_PLAIN + [("é/003_ü.jpg", tarfile.REGTYPE, b"3")], tarfile.USTAR_FORMAT, False),
    (_PLAIN + [("d" * 90 + "/" + "e" * 40 + "/004.jpg", tarfile.REGTYPE, b"4")], tarfile.USTAR_FORMAT, False),
])
@pytest.mark.parametrize("together", [4096, 2])  # headers checksummed in one go: all, or in several groups
def test_the_plain_index_is_the_walks_or_leaves_the_tar_to_it(entries, fmt, plain, together, monkeypatch):
    """Our own shards are indexed without the walker; the samples are exactly the
    walker's, and any other tar is left to the walker."""
    from pipeline.shards import tar_format

    monkeypatch.setattr(tar_format, "_CHECKED_TOGETHER", together)
    data = _tar_of(entries, fmt)
    walked = group_samples(tar_format.walk_tar(lambda o, n: data[o:o + n], len(data), "s").members, "s")
    fast = tar_format._plain_index(lambda o, n: data[o:o + n], len(data), "s")
    assert fast == (walked if plain else None)
    assert index_tar(io.BytesIO(data), "s") == walked
    if entries is _PLAIN:
        assert [(s.key, sorted(s.members), s.renamed_from) for s in walked] == [
            ("a/000_x", ["cls", "jpg"], None), ("a/000_x#2", ["jpg"], "a/000_x"), ("001", ["jpg"], None),
            ("b/002", ["tar.gz"], None)]


@pytest.mark.parametrize("damage", ["checksum", "truncated", "stray"])
@pytest.mark.parametrize("together", [4096, 2, 1])
def test_a_damaged_plain_tar_is_left_to_the_walker_and_refused(damage, together, monkeypatch):
    from pipeline.shards import tar_format

    monkeypatch.setattr(tar_format, "_CHECKED_TOGETHER", together)
    data = bytearray(_tar_of(_PLAIN, tarfile.USTAR_FORMAT))
    if damage == "checksum":
        data[512 + 1024 + 100] ^= 1  # the mode field of the second header: only its checksum tells
    if damage == "truncated":
        data = data[:2048]  # the first member's data ends past the end of the file
    if damage == "stray":
        last = tar_format.walk_tar(lambda o, n: bytes(data[o:o + n]), len(data), "s").members[-1]
        data = data[:last.offset + 1024] + b"\0" * 100  # no end marker, and bytes short of a block
    data = bytes(data)
    assert tar_format._plain_index(lambda o, n: data[o:o + n], len(data), "s") is None
    with pytest.raises(ShardFormatError, match="corrupt|truncated"):
        index_tar(io.BytesIO(data), "s")


def test_a_plain_header_with_a_bad_checksum_is_left_to_tarfile_and_refused():
    data = bytearray(_tar_of([("000.jpg", tarfile.REGTYPE, b"x")], tarfile.USTAR_FORMAT))
    data[10] ^= 1  # in the name: the stored checksum no longer matches
    with pytest.raises(ShardFormatError, match="truncated or corrupt tar .*checksum"):
        index_tar(io.BytesIO(bytes(data)), "s")


@pytest.mark.parametrize("strict", [True, False])
def test_a_negative_member_size_with_a_valid_checksum_is_corrupt(strict):
    """'-1' in a size field is an int to Python and to tarfile: read as a size it would
    make the member's read take the rest of the file."""
    from pipeline.shards import tar_format

    data = bytearray(_tar_of([("000.jpg", tarfile.REGTYPE, b"x" * 600), ("001.jpg", tarfile.REGTYPE, b"y")],
                             tarfile.USTAR_FORMAT))
    negative_member_size(data)
    data = bytes(data)
    assert tar_format._plain_header(data[:512]) is None
    assert tar_format._plain_index(lambda o, n: data[o:o + n], len(data), "s") is None
    if strict:
        with pytest.raises(ShardFormatError, match="corrupt tar"):
            index_tar(io.BytesIO(data), "s")
    else:
        walk = tar_format.walk_tar(lambda o, n: data[o:o + n], len(data), "s", strict=False)
        assert walk.members == [] and walk.problems == [("@0", "corrupt_tar")]
