"""infra/prometheus/alerts.yml under `promtool test rules`: every alert fires on
synthetic series that should page and stays silent on ones that should not; and the
cases are sharp — each alert's firing cases fail when its rule can never fire, its
silent cases fail when its rule always fires."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "infra" / "prometheus" / "alerts.yml"
RUN = {"job": "maescale", "run": "vit_l"}
RANK0 = {**RUN, "instance": "gpu1:9400", "rank": "0"}


@dataclass
class Case:
    alert: str
    eval_time: str
    series: dict[str, str]  # series selector -> promtool values
    fires: dict[str, str] | None = None  # the alert's labels (besides alertname and severity), None: silent
    summary: str = ""
    note: str = ""


def sel(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


CASES = [
    # data wait 40% of step time for 25 min; 10% does not page; 40% for 9 min is still pending
    Case("MaeDataStall", "25m", {sel("mae_data_wait_seconds_sum", RANK0): "0+24x30",
                                 sel("mae_step_duration_seconds_sum", RANK0): "0+60x30"},
         RANK0, "vit_l rank 0 waits for data 40% of its step time"),
    Case("MaeDataStall", "25m", {sel("mae_data_wait_seconds_sum", RANK0): "0+6x30",
                                 sel("mae_step_duration_seconds_sum", RANK0): "0+60x30"}),
    Case("MaeDataStall", "9m", {sel("mae_data_wait_seconds_sum", RANK0): "0+24x30",
                                 sel("mae_step_duration_seconds_sum", RANK0): "0+60x30"}, note="for: 10m"),
    # 100 img/s for an hour, then 30 img/s; a dip to 80 img/s is no drop
    Case("MaeThroughputDrop", "85m", {sel("mae_trainer_images_total", RANK0): "0+6000x60 360000+1800x30"},
         RUN, "vit_l: 30 images/s, below 70% of its own median over the last hour"),
    Case("MaeThroughputDrop", "85m", {sel("mae_trainer_images_total", RANK0): "0+6000x60 360000+4800x30"}),
    # one step a minute for 20 minutes, then stuck
    Case("MaeNoStepProgress", "40m", {sel("mae_step", RANK0): "1+1x20 21x30"},
         RANK0, "vit_l rank 0 has not finished a step in 15 minutes"),
    Case("MaeNoStepProgress", "40m", {sel("mae_step", RANK0): "1+1x50"}),
    # 1% of samples corrupt; 0.1% is tolerated
    Case("MaeCorruptSamples", "25m", {
        sel("mae_pipeline_images_decoded_total", {**RANK0, "backend": "dali"}): "0+5940x30",
        sel("mae_pipeline_samples_skipped_total", {**RANK0, "backend": "dali", "reason": "truncated"}): "0+60x30"},
        RUN, "vit_l: 1% of samples are skipped as corrupt"),
    Case("MaeCorruptSamples", "25m", {
        sel("mae_pipeline_images_decoded_total", {**RANK0, "backend": "dali"}): "0+5994x30",
        sel("mae_pipeline_samples_skipped_total", {**RANK0, "backend": "dali", "reason": "truncated"}): "0+6x30"}),
    # a fetch failed for good at minute 11: pages within 10 minutes of it, then clears
    Case("MaeShardFetchFailures", "15m", {sel("mae_shard_fetch_errors_total", RANK0): "0x10 1x20"},
         RUN, "vit_l: shard fetches failed for good after every retry"),
    Case("MaeShardFetchFailures", "25m", {sel("mae_shard_fetch_errors_total", RANK0): "0x10 1x20"}),
    # half the fetches need a retry; one in ten does not page
    Case("MaeShardFetchRetries", "25m", {sel("mae_shard_fetch_retries_total", RANK0): "0+10x30",
                                         sel("mae_shard_cache_misses_total", RANK0): "0+20x30"},
         RUN, "vit_l: 0.50 retries per shard fetch"),
    Case("MaeShardFetchRetries", "25m", {sel("mae_shard_fetch_retries_total", RANK0): "0+2x30",
                                         sel("mae_shard_cache_misses_total", RANK0): "0+20x30"}),
    # rank 1's endpoint stops answering at minute 11
    Case("MaeRankDown", "15m", {sel("up", {**RUN, "instance": "gpu1:9401", "node": "gpu1"}): "1x10 0x10"},
         {**RUN, "instance": "gpu1:9401", "node": "gpu1"}, "vit_l: the endpoint gpu1:9401 on gpu1 is down"),
    Case("MaeRankDown", "15m", {sel("up", {**RUN, "instance": "gpu1:9401", "node": "gpu1"}): "1x20"}),
    # a world of 2 where rank 1 stops reporting at minute 10
    Case("MaeRanksMissing", "25m", {
        sel("mae_world_size", RANK0): "2x30", sel("mae_step", RANK0): "1+1x30",
        sel("mae_world_size", {**RUN, "instance": "gpu1:9401", "rank": "1"}): "2x10",
        sel("mae_step", {**RUN, "instance": "gpu1:9401", "rank": "1"}): "1+1x10"},
        RUN, "vit_l: only 1 ranks report"),
    Case("MaeRanksMissing", "25m", {
        sel("mae_world_size", RANK0): "2x30", sel("mae_step", RANK0): "1+1x30",
        sel("mae_world_size", {**RUN, "instance": "gpu1:9401", "rank": "1"}): "2x30",
        sel("mae_step", {**RUN, "instance": "gpu1:9401", "rank": "1"}): "1+1x30"}),
    # 79 of 80 GB reserved for 15 minutes; 60 of 80 is fine
    Case("MaeDeviceMemoryNearLimit", "15m", {sel("mae_device_memory_reserved_bytes", RANK0): "79e9x20",
                                             sel("mae_device_memory_total_bytes", RANK0): "80e9x20"},
         RANK0, "vit_l rank 0 holds 98.75% of its GPU memory"),
    Case("MaeDeviceMemoryNearLimit", "15m", {sel("mae_device_memory_reserved_bytes", RANK0): "60e9x20",
                                             sel("mae_device_memory_total_bytes", RANK0): "80e9x20"}),
    # three non-finite losses skipped at minute 11
    Case("MaeNonFiniteLoss", "15m", {sel("mae_nonfinite_steps_skipped_total", RANK0): "0x10 3x10"},
         RUN, "vit_l: 3 steps skipped for a non-finite loss in 15 minutes"),
    Case("MaeNonFiniteLoss", "15m", {sel("mae_nonfinite_steps_skipped_total", RANK0): "0x20"}),
]


def _rules() -> dict:
    return yaml.safe_load(ALERTS.read_text())


def _alert_rules() -> dict[str, dict]:
    return {r["alert"]: r for g in _rules()["groups"] for r in g["rules"] if "alert" in r}


def _unit_tests(cases: list[Case], rules_file: Path) -> dict:
    rules = _alert_rules()
    tests = []
    for case in cases:
        expected = []
        if case.fires is not None:
            rule = rules[case.alert]
            expected.append({"exp_labels": {**case.fires, "severity": rule["labels"]["severity"]},
                             "exp_annotations": {"summary": case.summary,
                                                 "description": rule["annotations"]["description"]}})
        tests.append({"interval": "1m",
                      "input_series": [{"series": s, "values": v} for s, v in case.series.items()],
                      "alert_rule_test": [{"eval_time": case.eval_time, "alertname": case.alert,
                                           "exp_alerts": expected}]})
    return {"rule_files": [str(rules_file)], "evaluation_interval": "1m", "tests": tests}


def _promtool(cases: list[Case], rules: dict, tmp: Path) -> subprocess.CompletedProcess:
    (tmp / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    (tmp / "tests.yml").write_text(yaml.safe_dump(_unit_tests(cases, tmp / "rules.yml"), sort_keys=False))
    return subprocess.run(["promtool", "test", "rules", str(tmp / "tests.yml")], capture_output=True, text=True)


def _with_expr(alert: str, expr: str) -> dict:
    rules = _rules()
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = expr
    return rules


@pytest.fixture(autouse=True)
def _promtool_installed():
    if shutil.which("promtool") is None:
        raise RuntimeError("promtool is missing: `make test` installs Debian's prometheus package")


def test_rules_file_is_valid():
    out = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 12 rules found" in out.stdout


def test_every_alert_fires_when_it_should_and_stays_silent_when_it_should_not(tmp_path):
    alerts = set(_alert_rules())
    assert {c.alert for c in CASES if c.fires is not None} == alerts  # each alert has a firing case
    assert {c.alert for c in CASES if c.fires is None} == alerts  # and a silent one
    out = _promtool(CASES, _rules(), tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "SUCCESS" in out.stdout


@pytest.mark.parametrize("alert", sorted(_alert_rules()))
def test_the_cases_catch_a_rule_that_never_or_always_fires(alert, tmp_path):
    firing = [c for c in CASES if c.alert == alert and c.fires is not None]
    silent = [c for c in CASES if c.alert == alert and c.fires is None]
    never = _promtool(firing, _with_expr(alert, "vector(1) < 0"), tmp_path)
    assert never.returncode != 0, f"{alert}: its firing cases pass with a rule that never fires"
    always = _promtool(silent, _with_expr(alert, "vector(1)"), tmp_path)
    assert always.returncode != 0, f"{alert}: its silent cases pass with a rule that always fires"
