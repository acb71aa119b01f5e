"""A short training run scraped by a real Prometheus; the dashboard's every query
answered by it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from infra.net import free_port, port_is_free

from infra.metrics import METRICS

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "infra" / "grafana" / "maescale-dashboard.json"
ALERTS = ROOT / "infra" / "prometheus" / "alerts.yml"
# metrics only a GPU run has; on CPU their queries are rightly empty
GPU_ONLY = ("mae_device_memory_allocated_bytes", "mae_device_memory_reserved_bytes")
EPOCHS, STEPS_PER_EPOCH = 16, 13  # 97 samples (one corrupt) in micro-batches of 8


class Prometheus:
    def __init__(self, root: Path, sd_dir: Path) -> None:
        self.port = free_port()
        config = root / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files: ['{ALERTS}']\n"
            "scrape_configs:\n  - job_name: maescale\n    file_sd_configs:\n"
            f"      - files: ['{sd_dir}/*.json']\n        refresh_interval: 1s\n")
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("the prometheus binary is missing: `make test` installs Debian's prometheus package")
        self.proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'tsdb'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=subprocess.DEVNULL, stderr=open(root / "prometheus.log", "wb"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1)
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("prometheus did not become ready")

    def api(self, path: str, **params) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(params, doseq=True)
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert body["status"] == "success", body
        return body["data"]

    def value(self, expr: str, at: float) -> float:
        result = self.api("query", query=expr, time=at)["result"]
        assert result, f"no data for {expr}"
        return float(result[0]["value"][1])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def scraped_run(tmp_path_factory, seaweed):
    """A tiny pretraining run from S3 shards (one corrupt image), 2 DataLoader
    workers, metrics on, discovered through file_sd and scraped every second."""
    from tests.helpers.metrics_data import corrupt_dataset

    root = tmp_path_factory.mktemp("prom")
    sd_dir = root / "sd"
    sd_dir.mkdir()
    prom = Prometheus(root, sd_dir)
    seaweed.create_bucket("metrics")
    corrupt_dataset(root / "data", seaweed, "metrics", "ds")
    env = {**os.environ, **seaweed.env()}  # the S3 secret the run must never expose
    port = free_port()
    cmd = [sys.executable, "-m", "train.cli", "pretrain", "--config", "tiny_cpu", "data.url=s3://metrics/ds",
           "data.batch_size=8", "data.num_workers=2", f"data.storage.cache_dir={root / 'cache'}",
           "data.max_corrupt_fraction=0.2", f"schedule.max_steps={EPOCHS * STEPS_PER_EPOCH}",
           f"checkpoint.dir={root / 'ckpt'}", "checkpoint.every_steps=50", "metrics.enabled=true",
           f"metrics.port_base={port}", f"metrics.file_sd_dir={sd_dir}", "metrics.linger_s=4",
           "metrics.measure_speedup=true", f"metrics.multiproc_dir={root / 'mp'}"]
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    t1 = time.time()
    assert out.returncode == 0, out.stderr[-4000:]
    time.sleep(1.5)
    summary = json.loads((root / "ckpt" / "run_summary.json").read_text())
    yield prom, t0, t1, summary, out
    prom.stop()


def test_images_rate_and_counts_match_the_run(scraped_run):
    prom, t0, t1, summary, _ = scraped_run
    trainer = prom.value("max_over_time(mae_trainer_images_total[10m])", t1)
    assert trainer == summary["images"] == EPOCHS * 96
    # counters of the 2 worker processes, summed by the endpoint: whole epochs -> nothing decoded in vain
    assert prom.value("max_over_time(mae_pipeline_images_decoded_total[10m])", t1) == trainer
    assert prom.value("max_over_time(rate(mae_trainer_images_total[5s])[10m:1s])", t1) > 0
    assert prom.value("max_over_time(mae_step_duration_seconds_count[10m])", t1) == EPOCHS * STEPS_PER_EPOCH
    assert prom.value("max_over_time(mae_data_wait_seconds_count[10m])", t1) == EPOCHS * STEPS_PER_EPOCH
    # one encoder forward a step: the end-of-run loss on the fixed batch (eval mode) is not one
    assert prom.value("max_over_time(mae_encoder_forward_duration_seconds_count[10m])", t1) == EPOCHS * STEPS_PER_EPOCH
    assert prom.value("max_over_time(mae_step[10m])", t1) == EPOCHS * STEPS_PER_EPOCH
    assert prom.value('max_over_time(mae_pipeline_samples_skipped_total{reason="truncated"}[10m])', t1) == EPOCHS
    # one dataset is one source, named after the URL's last part
    assert prom.value('max_over_time(mae_source_samples_total{source="ds"}[10m])', t1) == trainer
    assert prom.value('max_over_time(mae_source_samples_skipped_total{source="ds"}[10m])', t1) == EPOCHS
    assert prom.value('max_over_time(mae_source_bytes_fetched_total{source="ds"}[10m])', t1) == \
        prom.value("max_over_time(mae_shard_bytes_fetched_total[10m])", t1)
    assert prom.value("max_over_time(mae_shard_cache_misses_total[10m])", t1) >= 1
    assert prom.value("max_over_time(mae_shard_cache_hits_total[10m])", t1) >= 1
    assert prom.value("max_over_time(mae_shard_bytes_fetched_total[10m])", t1) > 0
    assert 1 < prom.value("max_over_time(mae_encoder_speedup_flop_ratio[10m])", t1) < 5
    assert prom.value("max_over_time(mae_encoder_speedup_ratio[10m])", t1) > 0


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def _concrete(expr: str) -> str:
    return expr.replace("$__rate_interval", "5s").replace('"$job"', '".*"').replace('"$run"', '".*"')


def test_dashboard_json_is_importable():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["templating"]["list"][0] == {**dash["templating"]["list"][0], "type": "datasource", "query": "prometheus"}
    titles = [p["title"] for p in dash["panels"]]
    assert len(titles) == len(set(titles)) >= 10
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    # one run at a time: every panel blended every run of the job into one line (two runs' losses averaged)
    run = next(v for v in dash["templating"]["list"] if v["name"] == "run")
    assert run["query"]["query"] == 'label_values(mae_step{job=~"$job"}, run)' and not run["includeAll"]
    for expr in _dashboard_exprs():
        selectors = re.findall(r"\{[^}]*\}", expr)
        assert selectors and all('run=~"$run"' in sel for sel in selectors), expr


def test_every_dashboard_query_passes_promtool(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"maescale:panel_query_{i}", "expr": _concrete(e)} for i, e in enumerate(_dashboard_exprs())]}]}
    (tmp_path / "rules.yml").write_text(json.dumps(rules))  # JSON is YAML
    out = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(_dashboard_exprs())} rules found" in out.stdout


def test_every_dashboard_panel_and_query_returns_data(scraped_run):
    import torch

    prom, t0, t1, _, _ = scraped_run
    empty = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        panel_values = 0
        for target in panel["targets"]:
            result = prom.api("query_range", query=_concrete(target["expr"]), start=t0, end=t1 + 5, step=1)["result"]
            values = [v for series in result for _, v in series["values"] if v not in ("NaN", "+Inf", "-Inf")]
            panel_values += len(values)
            gpu_only = any(m in target["expr"] for m in GPU_ONLY) and not torch.cuda.is_available()
            if not values and not gpu_only:
                empty.append(target["expr"])
        assert panel_values, f"panel {panel['title']!r} has no data"
    assert not empty, f"dashboard queries without data: {empty}"


def test_the_alert_rules_load_and_evaluate_on_the_run(scraped_run):
    import yaml

    prom, t0, t1, _, _ = scraped_run
    loaded = {r["name"]: r for g in prom.api("rules")["groups"] for r in g["rules"]}
    declared = [r.get("alert") or r["record"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert sorted(loaded) == sorted(declared) and len(declared) == 12
    for name, rule in loaded.items():
        assert rule["health"] == "ok" and not rule.get("lastError"), (name, rule)
    # the recording rules see the run, labelled by the run name the file-SD targets carry
    series = prom.api("query_range", query="mae:images_per_second:rate5m", start=t0, end=t1 + 5, step=1)["result"]
    assert [s["metric"] for s in series] == [{"__name__": "mae:images_per_second:rate5m", "job": "maescale",
                                               "run": "ckpt"}]
    assert max(float(v) for _, v in series[0]["values"]) > 0
    assert prom.value("max_over_time(mae:data_wait_fraction:rate5m[10m])", t1) > 0
    assert [a["labels"]["alertname"] for a in prom.api("alerts")["alerts"] if a["state"] == "firing"] == []


def test_metric_names_follow_the_conventions(scraped_run):
    prom = scraped_run[0]
    names = [n for n in prom.api("label/__name__/values") if n.startswith("mae_")]
    specs = set(METRICS)
    for spec in METRICS.values():
        assert re.fullmatch(r"mae_[a-z0-9_]+", spec.name)
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        if spec.kind == "histogram":
            assert spec.name.endswith("_seconds")
        assert set(spec.labels) <= {"rank", "backend", "reason", "source"}  # low cardinality only
    for name in names:  # everything scraped is declared (histograms add _bucket/_sum/_count)
        assert re.sub(r"_(bucket|sum|count)$", "", name) in specs or name in specs, name


def test_no_secret_or_url_in_any_label_or_value(scraped_run, seaweed):
    prom, _, t1, _, out = scraped_run
    series = prom.api("series", **{"match[]": '{__name__=~"mae_.*"}'}, start=t1 - 600, end=t1 + 5)
    assert series
    for labels in series:
        for value in labels.values():
            assert seaweed.secret_key not in value and "://" not in value and "@" not in value
    assert seaweed.secret_key not in out.stdout + out.stderr


def test_metrics_doc_lists_every_metric():
    doc = (ROOT / "docs" / "METRICS.md").read_text()
    for name, spec in METRICS.items():
        assert f"| `{name}` | {spec.kind} |" in doc, name


def test_library_code_reports_nothing_by_default():
    from infra.metrics import NullSink, sink

    assert isinstance(sink(), NullSink)


def test_each_rank_serves_its_own_endpoint_and_file_sd_lists_them(tmp_path):
    from infra.testing.photos import write_photo_folder
    from pipeline.shards.writer import ShardWriterConfig, write_shards

    write_photo_folder(tmp_path / "src", 48, size=(64, 48))
    write_shards(str(tmp_path / "src"), str(tmp_path / "shards"), ShardWriterConfig(shard_bytes=60_000))
    base = free_port()
    while not port_is_free(base + 1):  # two consecutive free ports
        base = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "train.pretrain", "--config", "tiny_cpu", f"data.url={tmp_path / 'shards'}", "data.batch_size=8",
           "data.num_workers=1", "schedule.max_steps=30", f"checkpoint.dir={tmp_path / 'ckpt'}",
           "checkpoint.enabled=false", "metrics.enabled=true", f"metrics.port_base={base}", "metrics.linger_s=6",
           f"metrics.file_sd_dir={tmp_path / 'sd'}", f"metrics.multiproc_dir={tmp_path / 'mp'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(seen) < 2:
            for local_rank in (0, 1):
                try:
                    text = urllib.request.urlopen(f"http://127.0.0.1:{base + local_rank}/metrics", timeout=1).read().decode()
                except OSError:
                    continue
                step = re.search(r'^mae_step\{rank="(\d)"\} (\d+)', text, re.M)
                if step and int(step.group(2)) == 30:
                    seen[local_rank] = step.group(1)
            time.sleep(0.3)
        assert seen == {0: "0", 1: "1"}, seen  # port base + local rank serves that rank
        targets = json.loads(next((tmp_path / "sd").glob("maescale-*.json")).read_text())
        assert targets[0]["targets"] == [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
        assert targets[0]["labels"]["run"] == "ckpt"
    finally:
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert list((tmp_path / "sd").glob("*.json")) == []  # a run that ended is no longer a target


def test_file_sd_targets_name_the_run_and_go_when_it_ends(tmp_path):
    """A finished run must not stay a scrape target (it would page as a rank down)."""
    code = f"""
import json, sys
from pathlib import Path
from infra.net import free_port
from infra.prometheus_sink import PrometheusSink
sink = PrometheusSink(0, 0, 2, free_port(), multiproc_dir={str(tmp_path / 'mp')!r})
path = sink.write_file_sd({str(tmp_path / 'sd')!r}, 9400, run="vit l/ü")
print(json.dumps([path.name, json.loads(path.read_text())]))
sink.close()
print(json.dumps(sorted(p.name for p in Path({str(tmp_path / 'sd')!r}).iterdir())))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    written, after = map(json.loads, out.stdout.splitlines())
    name, targets = written
    assert name.startswith("maescale-") and name.endswith("-vit_l__-9400.json")  # the run's name, file-safe, and ports
    assert targets[0]["targets"] == ["127.0.0.1:9400", "127.0.0.1:9401"]
    assert targets[0]["labels"]["run"] == "vit_l__"
    assert after == []


def test_idle_connections_cannot_pile_up_on_the_endpoint(tmp_path):
    """300 connections that send nothing: the endpoint started a thread and kept an
    open file for each, for good, until the trainer's DataLoader failed with "Too
    many open files". Now at most MAX_CONNECTIONS are served at once, an idle one
    is dropped after the timeout, and scrapes work again."""
    code = f"""if True:
        import json, socket, threading, time, urllib.request
        from infra.net import free_port
        import infra.prometheus_sink as ps
        ps._Handler.timeout = 1.0
        port = free_port()
        sink = ps.PrometheusSink(0, 0, 1, port, multiproc_dir={str(tmp_path / 'mp')!r})
        base = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
        time.sleep(0.5)
        peak = threading.active_count()
        time.sleep(2.5)
        after = threading.active_count()
        body = urllib.request.urlopen(f"http://127.0.0.1:{{port}}/metrics", timeout=10).read().decode()
        print(json.dumps([base, peak, after, ps.MAX_CONNECTIONS, "mae_trainer_images_total" in body]))
        sink.close()
    """
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    base, peak, after, cap, scraped = json.loads(out.stdout.splitlines()[-1])
    assert peak - base <= cap + 1, (base, peak)  # it was one thread per connection: ~300
    assert after - base <= 1, (base, after)  # the idle ones were dropped
    assert scraped


def test_a_multiproc_folder_in_use_is_refused_and_a_temporary_one_is_removed(tmp_path):
    """A second run given the same metrics.multiproc_dir wiped the first's files, and
    each endpoint then served the other run's values; a run without one left its
    temporary folder in /tmp, a few files per DataLoader worker per epoch."""
    code = f"""if True:
        import json, subprocess, sys
        from pathlib import Path
        from infra.net import free_port
        from infra.prometheus_sink import FolderInUse, PrometheusSink
        shared = {str(tmp_path / 'mp')!r}
        other = subprocess.Popen([sys.executable, "-c", "import sys; from infra.prometheus_sink import PrometheusSink;"
                                  "from infra.net import free_port; s = PrometheusSink(0, 0, 1, free_port(), "
                                  "multiproc_dir=sys.argv[1]); print('up', flush=True); sys.stdin.read()", shared],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert other.stdout.readline().strip() == "up"
        try:
            PrometheusSink(0, 0, 1, free_port(), multiproc_dir=shared)
            refused = ""
        except FolderInUse as e:
            refused = str(e)
        other.stdin.close()
        other.wait(timeout=60)
        again = PrometheusSink(0, 0, 1, free_port(), multiproc_dir=shared)  # its owner has ended: free
        again.close()
        own = PrometheusSink(0, 0, 1, free_port())
        root = own.directory.parent
        existed = root.is_dir()
        own.close()
        print(json.dumps([refused, existed, root.exists()]))
    """
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    refused, existed, remains = json.loads(out.stdout.splitlines()[-1])
    assert "rank0 is in use by process" in refused and "give each run its own folder" in refused
    assert existed and not remains


def test_an_endpoint_that_cannot_open_names_the_keys(tmp_path):
    """A bind address that does not resolve, or a port in use, was a bare gaierror or
    'Address already in use' naming neither the key nor the port. (In a child: the
    sink sets process-wide prometheus_client state.)"""
    code = """if True:
        import socket, sys
        from train.config import MetricsConfig
        from train.errors import ConfigError
        from train.step_metrics import start_prometheus
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for bind, base in (("not an address", int(sys.argv[1])), ("127.0.0.1", port - 1)):
            try:
                start_prometheus(MetricsConfig(enabled=True, bind=bind, port_base=base, multiproc_dir=sys.argv[2]),
                                 rank=1, local_rank=1, world=2, backend="cpu", run_dir="run")
            except ConfigError as e:
                print(e, base + 1)
    """
    out = subprocess.run([sys.executable, "-c", code, str(free_port()), str(tmp_path / "prom")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout + out.stderr
    for line, (bind, why) in zip(lines, [("not an address", "Name or service not known"),
                                        ("127.0.0.1", "Address already in use")]):
        message, port = line.rsplit(" ", 1)
        assert message == (f"cannot serve metrics on {bind}:{port} ({why}): check metrics.bind and metrics.port_base "
                           "(each rank serves on port_base + its local rank)")


def test_a_file_sd_dir_that_is_a_file_names_the_key(tmp_path):
    """It was a bare "[Errno 17] File exists" naming no key."""
    code = """if True:
        import sys
        from infra.net import free_port
        from train.config import MetricsConfig
        from train.errors import ConfigError
        from train.step_metrics import start_prometheus
        try:
            start_prometheus(MetricsConfig(enabled=True, port_base=free_port(), file_sd_dir=sys.argv[1],
                                           multiproc_dir=sys.argv[2]), rank=0, local_rank=0, world=1, backend="cpu",
                             run_dir="run")
        except ConfigError as e:
            print(e)
    """
    (tmp_path / "a-file").write_text("in the way")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a-file"), str(tmp_path / "prom")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == f"metrics.file_sd_dir {tmp_path / 'a-file'}: cannot write the target file there " \
                                 "(File exists)", out.stdout + out.stderr


def test_every_run_kind_labels_its_targets_sets_its_world_size_and_a_stop_does_not_linger(tmp_path):
    """`mae finetune` wrote its file-SD targets without a run label and never set
    mae_world_size (the rank-down alert compares the two); both kinds of run now start
    their endpoint through one function. A run stopped by SIGTERM lingered
    metrics.linger_s before exiting, eating a preempted job's grace time."""
    code = """if True:
        import json, sys, time, urllib.request
        from infra.net import free_port
        from train.config import MetricsConfig
        from train.step_metrics import start_prometheus, stop_prometheus
        port = free_port()
        prom = start_prometheus(MetricsConfig(enabled=True, port_base=port, file_sd_dir=sys.argv[1],
                                              multiproc_dir=sys.argv[2]), rank=0, local_rank=0, world=4,
                                backend="cpu", run_dir="/runs/ft-vit_b")
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        print(json.dumps([line for line in text.splitlines() if line.startswith("mae_world_size")]))
        print(json.dumps(json.loads(prom.file_sd_path.read_text())[0]["labels"]["run"]))
        start = time.monotonic()
        stop_prometheus(prom, 60.0, "SIGTERM")
        print(json.dumps(time.monotonic() - start))
    """
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "sd"), str(tmp_path / "mp")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    world, run, stop_s = map(json.loads, out.stdout.splitlines())
    assert world == ['mae_world_size{rank="0"} 4.0']
    assert run == "ft-vit_b"
    assert stop_s < 30  # not the 60 s linger


def test_the_ranks_on_a_node_are_read_from_any_launcher(monkeypatch):
    """The DeepSpeed launcher sets LOCAL_SIZE, not LOCAL_WORLD_SIZE: only local rank 0
    was listed for Prometheus, and MaeRanksMissing fired for a healthy run."""
    from train.step_metrics import local_world_size

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "8")
    assert local_world_size() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun, our Slurm environment
    assert local_world_size() == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("LOCAL_SIZE")
    assert local_world_size() == 1
