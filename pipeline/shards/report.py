"""The closing summary lines of long ingest jobs (`mae shard`, `mae index`): rejects
by reason with the first few named, and throughput."""

from __future__ import annotations

from collections import Counter

from pipeline.shards.manifest import Reject

SHOWN_REJECTS = 20


def reject_lines(rejects: list[Reject], shown: int = SHOWN_REJECTS) -> list[str]:
    """'rejected N: reason=count, ...' and the first ``shown`` rejects by name."""
    if not rejects:
        return []
    reasons = Counter(r.reason for r in rejects)
    lines = [f"rejected {len(rejects)}: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items()))]
    lines += [f"  {r.source}: {r.reason}" for r in rejects[:shown]]
    if len(rejects) > shown:
        lines.append(f"  ... {len(rejects) - shown} more in the manifest")
    return lines


def throughput_line(samples: int, nbytes: int, seconds: float, workers: int) -> str:
    """'N samples, X MiB in T s: S samples/s (S/workers per worker), B MiB/s'."""
    rate = samples / seconds if seconds > 0 else 0.0
    return (f"throughput: {samples} samples, {nbytes / 2**20:.1f} MiB in {seconds:.1f} s: {rate:.1f} samples/s "
            f"({rate / max(1, workers):.1f} per worker), {nbytes / 2**20 / max(seconds, 1e-9):.1f} MiB/s")


def classes_line(classes: list[str]) -> str:
    shown = f" ({', '.join(classes[:8])}{' ...' if len(classes) > 8 else ''})" if classes else " (unlabelled)"
    return f"classes: {len(classes)}{shown}"
