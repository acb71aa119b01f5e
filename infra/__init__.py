"""What surrounds the pipeline and the trainer, knowing nothing of either: the metrics
sink and its Prometheus exporter, dashboards and scrape configs, the GPU check and
its wheel bundle, the test servers and data (``infra.testing``), and small shared
building blocks (atomic files, free ports, documented config fields)."""
