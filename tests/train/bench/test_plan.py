import json

import numpy as np
from tests.helpers.cli import run_mae

from pipeline.shards.manifest import ShardManifest
from train.bench.plan import PlanBench, bench_index, bench_size, plot_scaling, synthetic_manifest_json


def test_a_row_measures_the_plan_and_its_reference_on_the_same_ids():
    row = bench_size(1_000_000, 100, 64, PlanBench(rounds=1))
    assert row["rank_samples"] == 15_625
    # the reference holds the whole epoch (8 MB of ids, and copies); the plan a rank's part
    assert row["reference_peak_mib"] > 8 and row["memory_ratio"] > 10
    assert row["time_ratio"] == row["reference_s"] / row["first_ids_s"]
    assert "reference_s" not in bench_size(20_000, 4, 8, PlanBench(rounds=1, reference_max=10_000))


def test_the_index_comparison_loads_the_same_shards_both_ways():
    r = bench_index(500, rounds=1)
    assert r["shards"] == 500 and r["index_mib"] < r["json_mib"] and r["speedup"] == r["json_s"] / r["index_s"]
    manifest, text = synthetic_manifest_json(3)
    assert ShardManifest.from_json(text).shards == manifest.shards


def test_the_command_reports_targets_and_draws_the_plot(tmp_path, capsys):
    plot = tmp_path / "plan.png"
    out = run_mae(capsys, "bench", "plan", "--sizes", "1281167:1024:1024,1e5:10:4096", "--index-shards", "200",
                  "--rounds", "1", "--plot", plot, "--json")
    r = json.loads(out.out)
    imagenet, small = r["rows"]
    assert imagenet["target"]["seconds"] == 0.1 and imagenet["rank_samples"] == 1252
    assert small["world"] == 4096 and "target" not in small
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_scaling({"rows": [{**small, "samples": s} for s in (10**5, 10**6)]}, str(tmp_path / "again.png"))
    assert (tmp_path / "again.png").stat().st_size > 1000 and np.isfinite(imagenet["peak_mib"])
