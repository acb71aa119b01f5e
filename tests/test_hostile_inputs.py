"""The hostile-input catalogue: every input maescale does not trust, tried the way a
hostile or careless user would, each with the outcome it must get.

Outcomes: ``error`` — the command fails with its exit code and one line that names
the input (``mae: error: ...`` or a ``FAIL`` line), no traceback; ``skip`` — the
command succeeds and the bad item is skipped under a named, counted reason;
``ok`` — input that looks odd but is valid is used as it should be. No outcome
may print a credential. The cases are data (``CASES``); docs/RELIABILITY.md lists
the catalogue's figures and a test keeps them in step.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.helpers.cli import run_mae
from tests.helpers.s3_faults import SilentEndpoint
from tests.helpers.shards import (bomb_png, exif_oriented_jpeg, flip_a_byte, jpeg_bytes, negative_member_size,
                                  numbered_shards, write_raw_shards)

from infra.net import free_port
from pipeline.augment import AugmentConfig
from pipeline.errors import PipelineError
from pipeline.loader import LoaderConfig, build_loader
from pipeline.plan import PlanConfig

ROOT = Path(__file__).resolve().parents[1]
SECRETS = ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wrong-secret-do-not-print")


@dataclass
class Outcome:
    code: int
    text: str  # everything the command printed or logged
    err: str = ""  # its stderr alone (one line when it failed)


class Workspace:
    """Where a case builds its hostile input and runs the command on it."""

    def __init__(self, tmp: Path, capsys, caplog, monkeypatch, request) -> None:
        self.tmp, self.capsys, self.caplog, self.monkeypatch, self.request = tmp, capsys, caplog, monkeypatch, request
        self.ds, self.src = tmp / "ds", tmp / "src"

    def mae(self, *argv: object) -> Outcome:
        with self.caplog.at_level(logging.INFO):
            res = run_mae(self.capsys, *argv)
        return Outcome(res.code, res.out + res.err + self.caplog.text, res.err)

    def mae_process(self, *argv: object) -> Outcome:
        """The command in its own process: for one that starts a process group, which
        in this one would leave its rendezvous port taken and RANK/MASTER_PORT set for
        every later test. ``err``: its error lines alone (the others are logs)."""
        out = subprocess.run([sys.executable, "-m", "train.cli", *map(str, argv)], capture_output=True, text=True,
                             cwd=ROOT, timeout=300)
        errors = [line for line in out.stderr.splitlines() if " ERROR " in line or line.startswith("mae: error")]
        return Outcome(out.returncode, out.stdout + out.stderr, "\n".join(errors))

    def s3(self, wrong_secret: bool = False):
        """The session's SeaweedFS server, its credentials in the environment."""
        from s3fs import S3FileSystem

        server = self.request.getfixturevalue("seaweed")
        for k, v in server.env().items():
            self.monkeypatch.setenv(k, v)
        if wrong_secret:
            self.monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRETS[2])
        S3FileSystem.clear_instance_cache()  # clients are cached per options, not per credentials
        return server

    def fake_aws(self) -> None:
        """Real-looking credentials for an endpoint that never checks them."""
        from s3fs import S3FileSystem

        self.monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRETS[0])
        self.monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRETS[1])
        self.monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
        S3FileSystem.clear_instance_cache()


# ------------------------------------------------------------------ inputs
def dataset(ws: Workspace, samples: int = 3) -> Path:
    numbered_shards(ws.ds, [samples], image_size=(48, 40))
    return ws.ds


def edit_manifest(ws: Workspace, change: Callable[[dict], object]) -> Path:
    dataset(ws)
    path = ws.ds / "manifest.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    return ws.ds


def manifest_text(ws: Workspace, text: str | bytes) -> Path:
    dataset(ws)
    (ws.ds / "manifest.json").write_bytes(text.encode() if isinstance(text, str) else text)
    return ws.ds


def indexed(ws: Workspace, damage: Callable[[bytes], bytes]) -> Path:
    """A dataset with a binary index (manifest.index), changed by ``damage``."""
    from pipeline.shards.manifest_index import INDEX_NAME
    from pipeline.shards.verify import write_index
    from pipeline.storage.store import ShardStore

    write_index(ShardStore(str(dataset(ws))))
    index = ws.ds / INDEX_NAME
    index.write_bytes(damage(index.read_bytes()))
    return ws.ds


def forged_index(data: bytes) -> bytes:
    """The first shard renamed to escape the dataset, the checksum fixed up: what a
    hostile writer of the bucket can do."""
    import hashlib

    forged = data[:-32].replace(b"shard-000000.tar", b"../../etc/passwd")  # same length
    return forged + hashlib.sha256(forged).digest()


def mix(ws: Workspace, sources: list[str], *overrides: str) -> Outcome:
    """`mae simulate` of a data.sources mix: reads the manifests, computes the quotas."""
    return ws.mae("simulate", f"data.sources=[{', '.join(sources)}]", *overrides, "--world", "2", "--epochs", "1")


def shard_field(**values: object) -> Callable[[dict], None]:
    return lambda doc: doc["shards"][0].update(values)


def one_sample(ws: Workspace, members: dict[str, bytes], classes=("a", "b")) -> Path:
    """A dataset of three samples where the middle one has ``members`` (hand-made,
    as a shard from elsewhere would be)."""
    good = lambda n: {"jpg": jpeg_bytes((48, 40), seed=n), "cls": b"0"}  # noqa: E731
    write_raw_shards(ws.ds, [[("000000", good(0)), ("000001", members), ("000002", good(2))]], classes=classes)
    return ws.ds


def raw_tar_dataset(ws: Workspace, members: list[tarfile.TarInfo], cut: int | None = None,
                    edit: Callable[[bytearray], None] = lambda data: None) -> Path:
    """A dataset whose one shard is the tar built from ``members`` (cut to ``cut``
    bytes, then changed in place by ``edit``), with a manifest whose sha256 matches
    those bytes."""
    import hashlib
    import io

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info in members:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    data = bytearray(buf.getvalue()[:cut])
    edit(data)
    data = bytes(data)
    ws.ds.mkdir()
    (ws.ds / "shard-000000.tar").write_bytes(data)
    doc = {"format": "maescale-shards", "version": 1, "total_samples": 1, "total_bytes": len(data), "classes": [],
           "shards": [{"name": "shard-000000.tar", "samples": 1, "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()}], "rejects": [], "options": {}}
    (ws.ds / "manifest.json").write_text(json.dumps(doc))
    return ws.ds


def member(name: str, size: int = 4, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type = (size if kind == tarfile.REGTYPE else 0), kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    return info


def sources(ws: Workspace, files: dict[str, bytes], links: dict[str, Path | str] = {}) -> Path:  # noqa: B006
    """A source folder with ``files`` (relative name -> bytes) and symbolic ``links``
    (relative name -> target; targets under ``elsewhere/`` are made first)."""
    for rel, data in files.items():
        (ws.src / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws.src / rel).write_bytes(data)
    for rel, target in links.items():
        (ws.src / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws.src / rel).symlink_to(ws.tmp / target if str(target).startswith("elsewhere") else target)
    return ws.src


def elsewhere(ws: Workspace, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (ws.tmp / "elsewhere" / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws.tmp / "elsewhere" / rel).write_bytes(data)


def img(seed: int = 0) -> bytes:
    return jpeg_bytes((48, 40), seed=seed)


def dds_unknown_format() -> bytes:
    """A DDS whose pixel-format flags are zeroed: PIL raises NotImplementedError."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(out, format="DDS")
    data = bytearray(out.getvalue())
    data[80:84] = bytes(4)
    return bytes(data)


def png_bytes(size: tuple[int, int]) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, (200, 100, 50)).save(out, format="PNG")
    return out.getvalue()


def rotten_shard(ws: Workspace) -> Path:
    dataset(ws)
    flip_a_byte(ws.ds / "shard-000000.tar")
    return ws.ds


def as_pipe(ws: Workspace, name: str) -> Path:
    """A dataset whose file ``name`` is a named pipe: a read waits for a writer."""
    dataset(ws)
    (ws.ds / name).unlink()
    os.mkfifo(ws.ds / name)
    return ws.ds


# ----------------------------------------------------------------- commands
def inspect(ws: Workspace, build: Callable[[Workspace], Path]) -> Outcome:
    return ws.mae("inspect", build(ws), "--verify")


def shard(ws: Workspace, build: Callable[[Workspace], Path]) -> Outcome:
    return ws.mae("shard", build(ws), ws.tmp / "out", "--workers", "1")


def load(ws: Workspace, build: Callable[[Workspace], Path], tolerance: float = 0.5, backend: str = "cpu") -> Outcome:
    """Read every sample through the training loader (cpu backend by default), as
    `mae pretrain` and `mae probe` do."""
    cfg = LoaderConfig(url=str(build(ws)), batch_size=4, num_workers=0, max_corrupt_fraction=tolerance, backend=backend,
                       augment=AugmentConfig(img_size=32, deterministic=True), plan=PlanConfig(shuffle=False))
    with ws.caplog.at_level(logging.WARNING):
        try:
            loader = build_loader(cfg, 0, 1)
            keys = [k for b in loader for k in b.keys]
        except PipelineError as e:
            return Outcome(e.exit_code, f"{type(e).__name__}: {e}\n{ws.caplog.text}")
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(loader.stats.skipped.items()))
    return Outcome(0, f"read {len(keys)}: {' '.join(keys)}\nskipped: {skipped}\n{ws.caplog.text}")


def pretrain(ws: Workspace, *overrides: str) -> Outcome:
    return ws.mae("pretrain", "--config", "tiny_cpu", f"data.url={ws.ds}", *overrides)


def trained(ws: Workspace, *overrides: str) -> Outcome:
    """`mae pretrain` of two steps on a 3-sample dataset, in its own process: it gets
    as far as the first step."""
    dataset(ws)
    return ws.mae_process("pretrain", "--config", "tiny_cpu", f"data.url={ws.ds}", "data.batch_size=2",
                          "schedule.max_steps=2", *overrides)


def full_disk_log(ws: Workspace) -> Outcome:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    return trained(ws, "log.metrics_file=/dev/full", f"checkpoint.dir={ws.tmp / 'run'}")


def reconstruct(ws: Workspace, files: dict[str, bytes]) -> Outcome:
    return ws.mae("reconstruct", "random:mae_vit_test_patch4", sources(ws, files), "--num", "4",
                  "--out", ws.tmp / "grid.png")


def with_weights(ws: Workspace, name: str, data: bytes) -> Outcome:
    (ws.tmp / name).write_bytes(data)
    return ws.mae("reconstruct", ws.tmp / name, sources(ws, {"a.jpg": img()}), "--out", ws.tmp / "grid.png")


def pickle_that_runs_code() -> bytes:
    import pickle

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch /tmp/maescale-pwned",))

    return pickle.dumps({"model": Exploit()})


def silent_endpoint(ws: Workspace, command: str) -> Outcome:
    ws.fake_aws()
    with SilentEndpoint() as silent:
        target = ["inspect", "s3://hung/ds"] if command == "inspect" else ["shard", sources(ws, {"a.jpg": img()}),
                                                                          "s3://hung/ds", "--workers", "1"]
        return ws.mae(*target, "--endpoint-url", silent.url, "--read-timeout", "1", "--connect-timeout", "1",
                      "--deadline", "2")


def closed_endpoint(ws: Workspace) -> Outcome:
    ws.fake_aws()
    return ws.mae("shard", sources(ws, {"a.jpg": img()}), "s3://data/ds", "--endpoint-url",
                  f"http://127.0.0.1:{free_port()}", "--deadline", "2", "--workers", "1")


def s3_command(ws: Workspace, argv: Callable[[Workspace], list], wrong_secret: bool = False,
               no_credentials: bool = False) -> Outcome:
    server = ws.s3(wrong_secret)
    if "catalogue" not in {b["Name"] for b in server.client().list_buckets()["Buckets"]}:
        server.create_bucket("catalogue")
    if no_credentials:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ws.monkeypatch.delenv(name)
        for name, value in (("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"), ("AWS_CONFIG_FILE", "/nonexistent"),
                            ("AWS_EC2_METADATA_DISABLED", "true")):
            ws.monkeypatch.setenv(name, value)
    return ws.mae(*argv(ws))


def bad_config_file(ws: Workspace, text: str) -> Outcome:
    (ws.tmp / "run.yaml").write_text(text)
    return ws.mae("pretrain", "--config", ws.tmp / "run.yaml")


# ------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Workspace], Outcome]
    outcome: str  # error | skip | ok
    expect: str  # regex over what the command printed and logged
    code: int = 0  # exit code (errors)


def error(name: str, run: Callable[[Workspace], Outcome], expect: str, code: int = 2) -> Case:
    return Case(name, run, "error", expect, code)


def skip(name: str, run: Callable[[Workspace], Outcome], expect: str) -> Case:
    return Case(name, run, "skip", expect)


def ok(name: str, run: Callable[[Workspace], Outcome], expect: str) -> Case:
    return Case(name, run, "ok", expect)


JPEG = img(1)
CASES = [
    # manifests (`mae inspect --verify`)
    error("manifest missing", lambda ws: inspect(ws, lambda ws: ws.tmp / "nothing"), r"manifest.json at .*: not found"),
    error("manifest not JSON", lambda ws: inspect(ws, lambda ws: manifest_text(ws, "{not json")), "is not valid JSON"),
    error("manifest nested 100k deep", lambda ws: inspect(ws, lambda ws: manifest_text(ws, "[" * 100_000)),
          "JSON nested too deeply"),
    error("manifest binary garbage", lambda ws: inspect(ws, lambda ws: manifest_text(ws, os.urandom(64) + b"\xff")),
          "is not valid JSON"),
    error("manifest of another format", lambda ws: inspect(ws, lambda ws: edit_manifest(
        ws, lambda d: d.update(format="webdataset"))), "is not a maescale shard manifest"),
    error("manifest version from the future", lambda ws: inspect(ws, lambda ws: edit_manifest(
        ws, lambda d: d.update(version=99))), "has version 99; this maescale reads version 1"),
    error("classes a string", lambda ws: inspect(ws, lambda ws: edit_manifest(ws, lambda d: d.update(classes="abc"))),
          "classes must be a list, got 'abc'"),
    error("class name with terminal escapes", lambda ws: inspect(ws, lambda ws: edit_manifest(
        ws, lambda d: d.update(classes=["\x1b]0;owned\x07"]))), r"classes\[0\] must be .* without control characters"),
    error("shard name ../outside", lambda ws: inspect(ws, lambda ws: edit_manifest(
        ws, shard_field(name="../outside/x.tar"))), r"shards\[0\].name must be a relative name inside the dataset"),
    error("shard name absolute", lambda ws: inspect(ws, lambda ws: edit_manifest(ws, shard_field(name="/etc/passwd"))),
          r"shards\[0\].name must be a relative name"),
    error("sha256 a path", lambda ws: inspect(ws, lambda ws: edit_manifest(ws, shard_field(sha256="../../tmp/x"))),
          r"shards\[0\].sha256 must be 64 lowercase hex digits"),
    error("samples a string", lambda ws: inspect(ws, lambda ws: edit_manifest(ws, shard_field(samples="3"))),
          r"shards\[0\].samples must be an integer"),
    error("samples negative", lambda ws: inspect(ws, lambda ws: edit_manifest(
        ws, lambda d: (d["shards"][0].update(samples=-3), d.update(total_samples=-3)))),
        r"shards\[0\].samples must be an integer in \[1, "),
    error("samples more than the bytes hold", lambda ws: inspect(ws, lambda ws: edit_manifest(
        ws, lambda d: (d["shards"][0].update(samples=10**6), d.update(total_samples=10**6)))),
        r"shards\[0\].samples \(1000000\) cannot fit in \d+ bytes"),
    error("totals that do not add up", lambda ws: inspect(ws, lambda ws: edit_manifest(
        ws, lambda d: d.update(total_samples=4))), r"total_samples must equal the sum over shards \(3\), got 4"),
    error("one shard listed twice", lambda ws: inspect(ws, lambda ws: edit_manifest(
        ws, lambda d: (d["shards"].append(dict(d["shards"][0])), d.update(total_samples=6, total_bytes=2 * d[
            "total_bytes"])))), r"shards\[1\].name repeats an earlier shard"),
    error("keys file outside the dataset", lambda ws: inspect(ws, lambda ws: edit_manifest(
        ws, lambda d: d["options"].update(format="beton", keys="../../etc/passwd"))), "options.keys must be a relative"),
    # the binary manifest index (read by the training loader; the JSON stays the truth)
    ok("index with a flipped byte", lambda ws: load(ws, lambda ws: indexed(
        ws, lambda b: b[:60] + bytes([b[60] ^ 1]) + b[61:])), r"read 3: (.|\n)*is corrupt: its checksum does not match"),
    ok("index of another manifest.json", lambda ws: load(ws, lambda ws: (indexed(ws, lambda b: b), edit_manifest(
        ws, lambda d: d.update(rejects=[{"source": "x.jpg", "reason": "corrupt"}])))[1]),
        r"read 3: (.|\n)*is stale: it was made for another manifest.json"),
    ok("index forged with a shard name ../", lambda ws: load(ws, lambda ws: indexed(ws, forged_index)),
       r"read 3: shard-000000.tar/(.|\n)*shards\[0\].name must be a relative name inside the dataset"),
    # several datasets mixed (data.sources)
    error("a source asked for samples it has none of", lambda ws: mix(ws, [
        f"{{url: {dataset(ws)}}}", f"{{url: {write_raw_shards(ws.tmp / 'empty', []) and ws.tmp / 'empty'}, samples: 5}}"]),
        "source empty .* has no samples but is asked for 5"),
    error("an epoch smaller than the fixed quotas", lambda ws: mix(ws, [
        f"{{url: {dataset(ws)}, samples: 3}}", f"{{url: {ws.ds}, name: again, weight: 1}}"], "data.epoch_samples=2"),
        "data.epoch_samples=2 is less than the 3 samples"),
    # shards (`mae inspect --verify`)
    error("shard with a flipped byte", lambda ws: inspect(ws, rotten_shard),
          r"shard shard-000000.tar at .*: checksum mismatch \(ChecksumMismatch", code=1),
    error("shard file missing", lambda ws: inspect(ws, lambda ws: (dataset(ws), (ws.ds / "shard-000000.tar").unlink(),
                                                                   ws.ds)[-1]), "FAIL shard shard-000000.tar at .*: not found",
          code=1),
    error("shard a named pipe", lambda ws: inspect(ws, lambda ws: as_pipe(ws, "shard-000000.tar")),
          "FAIL shard shard-000000.tar at .*: a named pipe, not a file", code=1),
    error("manifest a named pipe", lambda ws: inspect(ws, lambda ws: as_pipe(ws, "manifest.json")),
          "manifest.json at .*: a named pipe, not a file"),
    error("tar member escaping with ..", lambda ws: inspect(ws, lambda ws: raw_tar_dataset(ws, [member("../evil.jpg")])),
          "unsafe member name '../evil.jpg'", code=1),
    error("tar member a symlink", lambda ws: inspect(ws, lambda ws: raw_tar_dataset(
        ws, [member("x.jpg", kind=tarfile.SYMTYPE)])), "member 'x.jpg' is not a regular file", code=1),
    error("tar member name with terminal escapes", lambda ws: inspect(ws, lambda ws: raw_tar_dataset(
        ws, [member("\x1b]0;owned\x07.jpg")])), r"unsafe member name .* \(control characters\)", code=1),
    error("tar cut short", lambda ws: inspect(ws, lambda ws: raw_tar_dataset(ws, [member("x.jpg", 5000)], cut=2048)),
          "truncated", code=1),
    error("tar member of negative size", lambda ws: inspect(ws, lambda ws: raw_tar_dataset(
        ws, [member("x.jpg", 600), member("y.jpg")], edit=negative_member_size)),
        "corrupt tar: member 'x.jpg' of -1 bytes", code=1),
    error("sample count off", lambda ws: inspect(ws, lambda ws: edit_manifest(
        ws, lambda d: (d["shards"][0].update(samples=2), d.update(total_samples=2)))),
        "FAIL shard-000000.tar: 3 samples, manifest says 2", code=1),
    error("sha256 forged beside a true xxh3-128", lambda ws: inspect(ws, lambda ws: edit_manifest(
        ws, lambda d: d["shards"][0].update(sha256="0" * 64))),
        r"FAIL shard-000000.tar: its sha256 does not match the manifest \(its xxh3_128 does\)", code=1),
    error("duplicate key in a tar (verify)", lambda ws: inspect(ws, lambda ws: write_raw_shards(ws.ds, [[
        ("a", {"jpg": JPEG}), ("b", {"jpg": JPEG}), ("a", {"jpg": JPEG})]]) and ws.ds),
        r"FAIL shard-000000.tar: 1 duplicate keys \(first: 'a'; read as 'a#2'\)", code=1),
    # samples inside shards (the training loader)
    ok("duplicate key in a tar (read)", lambda ws: load(ws, lambda ws: write_raw_shards(ws.ds, [[
        ("a", {"jpg": JPEG}), ("b", {"jpg": JPEG}), ("a", {"jpg": JPEG})]]) and ws.ds),
        r"read 3: shard-000000.tar/a shard-000000.tar/b shard-000000.tar/a#2(.|\n)*repeat an earlier key"),
    skip("truncated JPEG", lambda ws: load(ws, lambda ws: one_sample(ws, {"jpg": JPEG[:-300], "cls": b"1"})),
         "skipped: truncated=1"),
    skip("garbage named .jpg", lambda ws: load(ws, lambda ws: one_sample(ws, {"jpg": b"<html>" * 50, "cls": b"1"})),
         "skipped: not_an_image=1"),
    skip("empty image", lambda ws: load(ws, lambda ws: one_sample(ws, {"jpg": b"", "cls": b"1"})), "skipped: empty=1"),
    skip("decompression bomb", lambda ws: load(ws, lambda ws: one_sample(ws, {"png": bomb_png(), "cls": b"1"})),
         "skipped: decompression_bomb=1"),
    skip("4x4 image", lambda ws: load(ws, lambda ws: one_sample(ws, {"jpg": jpeg_bytes((4, 4)), "cls": b"1"})),
         "skipped: too_small=1"),
    skip("a decoder that raises what no image check expects", lambda ws: load(ws, lambda ws: one_sample(
        ws, {"jpg": dds_unknown_format(), "cls": b"1"})), "skipped: corrupt=1"),  # was a traceback (NotImplementedError)
    skip("the same, on dali", lambda ws: load(ws, lambda ws: one_sample(
        ws, {"jpg": dds_unknown_format(), "cls": b"1"}), backend="dali"), "skipped: corrupt=1"),
    skip("a PNG wider than any JPEG, on dali", lambda ws: load(ws, lambda ws: one_sample(
        ws, {"png": png_bytes((70_000, 16)), "cls": b"1"}), backend="dali"), "skipped: too_long=1"),  # was a bare OSError
    skip("sample without an image", lambda ws: load(ws, lambda ws: one_sample(ws, {"cls": b"1"})),
         "skipped: not_an_image=1"),
    skip("label not a number", lambda ws: load(ws, lambda ws: one_sample(ws, {"jpg": JPEG, "cls": b"abc"})),
         "skipped: bad_label=1"),
    skip("label beyond the classes", lambda ws: load(ws, lambda ws: one_sample(ws, {"jpg": JPEG, "cls": b"7"})),
         "skipped: bad_label=1"),
    ok("EXIF-rotated photo in a shard", lambda ws: load(ws, lambda ws: one_sample(
        ws, {"jpg": exif_oriented_jpeg(6), "cls": b"1"})), "read 3: .*\nskipped: \n"),
    error("more corrupt samples than tolerated", lambda ws: load(ws, lambda ws: one_sample(
        ws, {"jpg": b"", "cls": b"1"}), tolerance=0.0), "CorruptDataError: 1 corrupt samples on rank 0", code=1),
    # image sources (`mae shard`)
    ok("symlinked image", lambda ws: (elsewhere(ws, {"x.jpg": img(2)}), shard(ws, lambda ws: sources(
        ws, {"a.jpg": img()}, {"b.jpg": "elsewhere/x.jpg"})))[1], "2 samples in 1 shards"),
    ok("symlinked class folder", lambda ws: (elsewhere(ws, {"dogs/d.jpg": img(2)}), shard(ws, lambda ws: sources(
        ws, {"cats/c.jpg": img()}, {"dogs": "elsewhere/dogs"})))[1], r"classes: 2 \(cats, dogs\)"),
    skip("symlink loop", lambda ws: shard(ws, lambda ws: sources(ws, {"a/x.jpg": img()}, {"a/loop": ws.src})),
         "rejected 1: link_loop=1"),
    skip("broken symlink", lambda ws: shard(ws, lambda ws: sources(ws, {"a.jpg": img()}, {"b.jpg": "/nonexistent"})),
         "rejected 1: broken_link=1"),
    skip("FIFO named .jpg", lambda ws: shard(ws, lambda ws: (sources(ws, {"a.jpg": img()}),
                                                             os.mkfifo(ws.src / "p.jpg"), ws.src)[-1]),
         "rejected 1: not_a_file=1"),
    skip("file name with terminal escapes", lambda ws: shard(ws, lambda ws: sources(
        ws, {"a.jpg": img(), "\x1b[2Jb.jpg": img(1)})), "rejected 1: unsafe_name=1"),
    skip("truncated JPEG source", lambda ws: shard(ws, lambda ws: sources(ws, {"a.jpg": img(), "b.jpg": JPEG[:-300]})),
         "rejected 1: truncated=1"),
    skip("empty source file", lambda ws: shard(ws, lambda ws: sources(ws, {"a.jpg": img(), "b.jpg": b""})),
         "rejected 1: empty=1"),
    skip("text named .jpg", lambda ws: shard(ws, lambda ws: sources(ws, {"a.jpg": img(), "b.jpg": b"hello"})),
         "rejected 1: not_an_image=1"),
    skip("decompression bomb source", lambda ws: shard(ws, lambda ws: sources(ws, {"a.jpg": img(), "b.png": bomb_png()})),
         "rejected 1: decompression_bomb=1"),
    ok("EXIF-rotated photo source", lambda ws: shard(ws, lambda ws: sources(ws, {"a.jpg": exif_oriented_jpeg(8)})),
       "converted: exif_orientation=1"),
    error("source folder missing", lambda ws: shard(ws, lambda ws: ws.tmp / "nope"), "neither a folder nor a list file"),
    error("source with no images", lambda ws: shard(ws, lambda ws: sources(ws, {"notes.txt": b"x"})), "no images"),
    error("mixed folder layouts", lambda ws: shard(ws, lambda ws: sources(ws, {"a.jpg": img(), "c/b.jpg": img()})),
          "mixes layouts"),
    error("list file half labelled", lambda ws: shard(ws, lambda ws: (sources(ws, {"a.jpg": img()}), (
        ws.tmp / "l.txt").write_text(f"{ws.src}/a.jpg\tcat\n{ws.src}/a.jpg\n"), ws.tmp / "l.txt")[-1]),
        "mixes labelled"),
    error("list file not text", lambda ws: shard(ws, lambda ws: (ws.tmp / "l.txt").write_bytes(b"\xff\xfe\x00\x81")
                                                 and ws.tmp / "l.txt"), "is not UTF-8 text"),
    skip("list file naming a missing image", lambda ws: shard(ws, lambda ws: (sources(ws, {"a.jpg": img()}), (
        ws.tmp / "l.txt").write_text(f"{ws.src}/a.jpg\n{ws.src}/gone.jpg\n"), ws.tmp / "l.txt")[-1]),
        "rejected 1: unreadable=1"),
    # object stores
    error("endpoint that never answers (inspect)", lambda ws: silent_endpoint(ws, "inspect"),
          r"manifest.json at s3://hung/ds \(endpoint http://127.0.0.1:\d+\): failed after \d attempts", code=1),
    error("endpoint that never answers (shard)", lambda ws: silent_endpoint(ws, "shard"),
          r"bucket 'hung' at s3://hung/ds \(endpoint http://127.0.0.1:\d+\): failed after \d attempts", code=1),
    error("endpoint unreachable", closed_endpoint,
          r"bucket 'data' at s3://data/ds \(endpoint http://127.0.0.1:\d+\): failed after \d+ attempts", code=1),
    error("wrong secret key", lambda ws: s3_command(ws, lambda ws: ["inspect", "s3://catalogue/ds"], wrong_secret=True),
          r"manifest.json at s3://catalogue/ds \(endpoint .*\): access denied \(check credentials\)"),
    error("no credentials at all", lambda ws: s3_command(ws, lambda ws: ["inspect", "s3://catalogue/ds"],
                                                         no_credentials=True), "no credentials"),
    error("misspelled bucket", lambda ws: s3_command(ws, lambda ws: ["shard", sources(ws, {"a.jpg": img()}),
                                                                     "s3://catalogeu/ds", "--workers", "1"]),
          r"bucket 'catalogeu' at s3://catalogeu/ds \(endpoint .*\) does not exist; .*--create-bucket"),
    error("dataset prefix missing", lambda ws: s3_command(ws, lambda ws: ["inspect", "s3://catalogue/nothing"]),
          r"manifest.json at s3://catalogue/nothing \(endpoint .*\): not found"),
    # configs (`mae pretrain`, before anything starts)
    error("mask_ratio 0", lambda ws: pretrain(ws, "model.mask_ratio=0"), r"model.mask_ratio must be in \(0, 1\)"),
    error("mask_ratio leaving no patch", lambda ws: pretrain(ws, "model.mask_ratio=0.999"), "keeps 0 of the 64 patches"),
    error("log every 0 steps", lambda ws: pretrain(ws, "log.every_steps=0"), "log.every_steps must be positive"),
    error("max_steps 0", lambda ws: pretrain(ws, "schedule.max_steps=0"), "schedule.max_steps must be positive, got 0"),
    error("max_steps -1", lambda ws: pretrain(ws, "schedule.max_steps=-1"), "schedule.max_steps must be positive"),
    error("lr NaN", lambda ws: pretrain(ws, "optim.blr=.nan"), r"optim.blr = nan is not a finite number"),
    error("batch size 0", lambda ws: pretrain(ws, "data.batch_size=0"), "data.batch_size must be positive, got 0"),
    error("negative seed", lambda ws: pretrain(ws, "seed=-1"), r"seed must be in \[0, 2\*\*32\)"),
    error("misspelled key", lambda ws: pretrain(ws, "optim.lrr=1"), "unknown config key optim.lrr"),
    error("metrics file a folder", lambda ws: trained(ws, f"log.metrics_file={ws.tmp}", f"checkpoint.dir={ws.tmp / 'r'}"),
          r"log.metrics_file .*: cannot open it to append to \(Is a directory\)"),
    error("checkpoint.dir a file", lambda ws: trained(ws, f"checkpoint.dir={ws.ds / 'manifest.json'}"),
          r"cannot use checkpoint.dir .*manifest.json: a file is in the way \(File exists\); the run needs a folder",
          code=1),
    error("tensorboard_dir a file", lambda ws: trained(
        ws, "log.tensorboard=true", f"log.tensorboard_dir={ws.ds / 'manifest.json'}", f"checkpoint.dir={ws.tmp / 'run'}"),
        r"log.tensorboard_dir .*manifest.json: cannot write event files"),
    error("metrics file on a full disk", lambda ws: full_disk_log(ws), "LogFileError: log.metrics_file /dev/full: "
          "cannot write to it \\(No space left on device\\); the run stops with its last checkpoint intact", code=1),
    error("wrong type", lambda ws: pretrain(ws, "data.batch_size=many"), "data.batch_size = 'many' does not fit"),
    error("endpoint without a scheme", lambda ws: pretrain(ws, "data.storage.endpoint_url=minio:9000"),
          "data.storage.endpoint_url must be http://host"),
    error("config file not YAML", lambda ws: bad_config_file(ws, "model: [unclosed\n"), "not valid YAML"),
    error("config file a list", lambda ws: bad_config_file(ws, "- a\n- b\n"), "must be a mapping of settings, got list"),
    # images and weights given to evaluation (`mae reconstruct`)
    skip("decompression bomb among images", lambda ws: reconstruct(ws, {"a.jpg": img(), "b.png": bomb_png()}),
         r"(?s)(?=.*skipped \S*b.png: decompression_bomb)(?=.*wrote \S*: 1 images)"),
    skip("unreadable image among images", lambda ws: reconstruct(ws, {"a.jpg": img(), "b.jpg": b"GIF89a" + b"\x00" * 9}),
         r"(?s)(?=.*skipped \S*b.jpg: (corrupt|truncated|not_an_image))(?=.*wrote \S*: 1 images)"),
    error("no usable image at all", lambda ws: reconstruct(ws, {"a.jpg": b"", "b.jpg": b"junk"}), "no usable images"),
    error("weights: a pickle that runs code", lambda ws: with_weights(ws, "evil.pth", pickle_that_runs_code()),
          "refused to load .*evil.pth: it holds objects other than tensors"),
    error("weights: garbage .safetensors", lambda ws: with_weights(ws, "w.safetensors", os.urandom(256)),
          "cannot read .*w.safetensors"),
]


@pytest.mark.integration
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case: Case, tmp_path, capsys, caplog, monkeypatch, request):
    ws = Workspace(tmp_path, capsys, caplog, monkeypatch, request)
    launcher_env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    result = case.run(ws)
    # a case that started a process group here would hand its port to every later launch
    assert {k: os.environ.get(k) for k in launcher_env} == launcher_env, "run it with ws.mae_process"
    assert re.search(case.expect, result.text), result.text[-3000:]
    assert "Traceback" not in result.text, result.text[-3000:]
    assert not any(secret in result.text for secret in SECRETS)
    if case.outcome == "error":
        assert result.code == case.code, result.text[-3000:]
        assert len(result.err.strip().splitlines()) <= 1  # at most the one `mae: error:` line
    else:
        assert result.code == 0, result.text[-3000:]
    assert not os.path.exists("/tmp/maescale-pwned")


def catalogue_figures() -> dict[str, int]:
    counts = {kind: sum(c.outcome == kind for c in CASES) for kind in ("error", "skip", "ok")}
    return {"tried": len(CASES), "clear error": counts["error"], "named skip": counts["skip"],
            "used as valid": counts["ok"]}


def test_the_reliability_doc_lists_the_catalogues_figures():
    text = (ROOT / "docs" / "RELIABILITY.md").read_text()
    figures = catalogue_figures()
    assert figures["tried"] >= 40
    row = re.search(r"\| tried \| clear error \| named skip \| used as valid \| failures \|\n\|[-| ]+\|\n(\|.*\|)", text)
    assert row, "docs/RELIABILITY.md has no catalogue table"
    cells = [c.strip() for c in row.group(1).strip("|").split("|")]
    assert cells == [str(figures[k]) for k in ("tried", "clear error", "named skip", "used as valid")] + ["0"]
