"""A metrics sink that keeps what it is told, for checking what library code counts
(in this process; the Prometheus tests check the exporter end to end)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from infra.metrics import METRICS, NullSink, install


class RecordingSink(NullSink):
    def __init__(self) -> None:
        self.counts: Counter = Counter()  # (name, sorted label items) -> total

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        assert name in METRICS and set(labels) <= set(METRICS[name].labels), (name, labels)
        self.counts[(name, tuple(sorted(labels.items())))] += value

    def by(self, name: str, label: str) -> dict[str, float]:
        """Totals of metric ``name`` per value of ``label``."""
        out: Counter = Counter()
        for (metric, labels), value in self.counts.items():
            if metric == name:
                out[dict(labels)[label]] += value
        return dict(out)


@contextmanager
def recording() -> Iterator[RecordingSink]:
    sink = RecordingSink()
    previous = install(sink)
    try:
        yield sink
    finally:
        install(previous)
