"""`mae bench pipeline`: shard read bandwidth vs raw `cat`, decode img/s and CPU per image
vs the per-file PIL loader, streaming memory, the wait at epoch boundaries — side by
side in one run."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from pathlib import Path

from train.cli.common import add_storage_arguments, parts_of, storage_config, torch_device

MiB = 2**20
PARTS = ("read", "decode", "rss", "stream", "epochs")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=2000, help="ImageNet-like JPEGs to generate from bundled photos")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for both decode paths")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of the decode comparison")
    p.add_argument("--shard-size", type=int, default=16 * MiB)
    p.add_argument("--workdir", default=None, help="keep generated data here (default: a temp dir)")
    p.add_argument("--backend", default="cpu", choices=["cpu", "dali", "ffcv", "all"],
                   help="decode backends to compare with the baseline (all: cpu, dali, ffcv)")
    p.add_argument("--device", type=torch_device, default="cpu",
                   help="where batches go (cuda: DALI decodes with nvJPEG, device='mixed')")
    p.add_argument("--parts", type=parts_of(PARTS), default=PARTS,
                   help="comma list: read (S3 bandwidth), decode (backends vs baseline), rss (streaming memory), "
                        "stream (samples from S3 through the Loader, bytes only and end to end), epochs (the wait "
                        "at each epoch's start, the next epoch started early and late)")
    p.add_argument("--epochs", type=int, default=4, help="epochs: epochs per run")
    p.add_argument("--step-ms", type=float, default=150.0,
                   help="epochs: the consumer's time per batch, asleep (a GPU step leaves the host's CPUs idle)")
    p.add_argument("--against", type=_peers, default=(),
                   help="stream: peers read side by side, comma list of litdata, webdataset, streaming "
                        "(pip install 'maescale[bench]')")
    p.add_argument("--bucket-url", default=None,
                   help="read/rss: an s3:// prefix of yours to write the shards to (credentials from the AWS "
                        "chain); default: a SeaweedFS server started on loopback for the run")
    add_storage_arguments(p)
    p.add_argument("--json", action="store_true")


def _peers(text: str) -> tuple[str, ...]:
    from train.bench.streaming import PEERS, peer_available

    peers = tuple(p for p in text.split(",") if p)
    unknown = sorted(set(peers) - set(PEERS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peers {unknown}; valid: {', '.join(PEERS)}")
    missing = [p for p in peers if not peer_available(p)]
    if missing:
        raise argparse.ArgumentTypeError(f"not installed: {', '.join(missing)}; make bench-peers installs them "
                                         "(pip install 'maescale[bench]' also pulls torchvision and its torch)")
    return peers


@contextlib.contextmanager
def _bucket(args: argparse.Namespace, parts: tuple[str, ...]):
    """(bucket prefix, StorageConfig): the user's, or a loopback SeaweedFS for the run."""
    from pipeline.storage.config import StorageConfig

    if args.bucket_url or not {"read", "rss", "stream"} & set(parts):
        yield args.bucket_url, storage_config(args)
        return
    from infra.testing.s3_server import SeaweedS3

    with SeaweedS3() as s3:
        s3.create_bucket("bench")
        saved = {k: os.environ.get(k) for k in s3.env()}
        os.environ.update(s3.env())  # the streaming child reads the same credentials
        try:
            yield "s3://bench/shards", StorageConfig(endpoint_url=s3.endpoint_url)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def run(args: argparse.Namespace) -> int:
    from train.bench.pipeline import PipelineBench, format_report, run_pipeline_bench

    parts = args.parts
    cfg = PipelineBench(images=args.images, batch=args.batch, workers=args.workers, rounds=args.rounds,
                        shard_bytes=args.shard_size, device=args.device, parts=parts, against=args.against,
                        epochs=args.epochs, step_ms=args.step_ms,
                        backends=("cpu", "dali", "ffcv") if args.backend == "all" else (args.backend,))
    with tempfile.TemporaryDirectory(prefix="mae-bench-") as tmp, _bucket(args, parts) as (bucket, storage):
        report = run_pipeline_bench(cfg, Path(args.workdir or tmp), bucket, storage)
    if args.bucket_url and "read" in report:
        from infra.redact import redact

        report["read"]["where"] = redact(args.bucket_url)
    print(json.dumps(report) if args.json else format_report(report))
    return 0
