import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.integration


def test_bench_pipeline_report_is_consistent(tmp_path):
    out = subprocess.run([sys.executable, "-m", "train.cli", "bench", "pipeline", "--images", "60", "--batch", "16",
                          "--rounds", "1", "--shard-size", "1000000", "--workdir", str(tmp_path), "--json",
                          "--against", "webdataset"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["images"] == 60
    read = r["read"]
    assert read["reader_vs_raw"] == pytest.approx(read["reader_MiB_s"] / read["raw_cat_MiB_s"])
    assert read["bytes"] > 0 and all(read[k] > 0 for k in ("raw_cat_MiB_s", "raw_cat_to_disk_MiB_s", "reader_MiB_s"))
    assert read["reader_cpu_vs_raw"] == pytest.approx(read["reader_client_cpu_ms_per_MiB"]
                                                      / read["raw_cat_client_cpu_ms_per_MiB"])
    assert all(read[f"{lever}_MiB_s"] > 0 for lever in ("reader_sha256", "reader_memory", "reader_16mib_ranges",
                                                        "reader_4mib_ranges"))
    fill = read["filling"]  # the same shards into an empty cache, measured apart from the steady state
    assert fill["reader_vs_raw"] == pytest.approx(fill["reader_MiB_s"] / fill["raw_cat_MiB_s"])
    assert read["cache_limit_MiB"] < read["bytes"] / 2**20  # the steady state's caches really evict
    assert all(v > 0 for v in read["page_cache_write"].values())
    commits = read["cache_commit"]  # 20,000 entries: each listing makes room for 625 commits
    assert commits["entries"] == 20_000 and commits["listings"] == commits["commits"] // 626
    stream = r["stream"]  # every contender delivered every image, once per run
    for name in ("raw_cat/bytes", "maescale/bytes", "webdataset/bytes", "maescale/e2e", "webdataset/e2e"):
        assert [run["samples"] for run in stream[name]["runs"]] == [60], name
        assert stream[name]["first_batch_s"] <= stream[name]["wall_s"]
    assert stream["maescale/bytes"]["cpu_ms_per_mib"] > 0 and stream["maescale/e2e"]["cpu_ms_per_mib"] is None
    raw, ours = stream["raw_cat/bytes"]["runs"][0], stream["maescale/bytes"]["runs"][0]
    assert raw["mib"] > ours["mib"]  # raw cat reads whole tars, headers included: its CPU is per MiB of images too
    assert raw["cpu_ms_per_image"] * raw["samples"] / raw["cpu_ms_per_mib"] == pytest.approx(ours["mib"])
    assert stream["bytes_vs_fastest_peer"]["samples_per_s"] == pytest.approx(
        stream["maescale/bytes"]["samples_per_s"] / stream["webdataset/bytes"]["samples_per_s"])
    assert stream["versions"]["webdataset"] == "1.0.2"
    dec = r["decode"]
    base = dec["per_file_pil_baseline"]
    for name in ("cpu_backend_uint8", "cpu_backend_host_normalize"):
        c = dec[name]
        assert [run["images"] for run in c["runs"]] == [60]
        assert c["cpu_per_image_reduction"] == pytest.approx(base["cpu_ms_per_image"] / c["cpu_ms_per_image"])
    rss = r["rss"]
    assert rss["images"] == 60 and rss["cache_limit_MiB"] < rss["dataset_MiB"]


def test_bench_pipeline_all_backends_side_by_side(tmp_path):
    out = subprocess.run([sys.executable, "-m", "train.cli", "bench", "pipeline", "--backend", "all", "--parts",
                          "decode", "--images", "48", "--batch", "16", "--rounds", "1", "--workdir", str(tmp_path),
                          "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert "read" not in r and "rss" not in r  # --parts decode only
    dec = r["decode"]
    base = dec["per_file_pil_baseline"]
    for name in ("cpu_backend_uint8", "cpu_backend_host_normalize", "dali_backend", "dali_backend_whole",
                 "dali_host_side", "dali_graph_only", "ffcv_backend"):
        assert [run["images"] for run in dec[name]["runs"]] == [48], name
        assert dec[name]["throughput_ratio"] == pytest.approx(dec[name]["images_per_s"] / base["images_per_s"])
        run = dec[name]["runs"][0]  # the pass split at its first batch (16 images): both parts add up to the whole
        assert 0 < run["first_batch_s"] < run["wall_s"]
        assert run["first_batch_s"] + 32 / run["after_first_batch_images_per_s"] == pytest.approx(run["wall_s"])
    assert dec["warmup"]["ffcv_jit_first_batch_s"] > 0  # FFCV's JIT, reported apart
    # DALI's host side alone is part of what the whole DALI CPU-mode run spends
    assert dec["dali_host_side"]["cpu_ms_per_image"] < dec["dali_backend"]["cpu_ms_per_image"]


def test_the_dali_graph_alone_decodes_what_the_loader_hands_out(tmp_path):
    """``dali_graph_only`` (the benchmark's DALI-without-our-feeding figure) runs
    the backend's own graph on the same inputs: the same batches, pixel for pixel."""
    from tests.helpers.shards import jpeg_bytes, write_raw_shards

    from pipeline.augment import AugmentConfig
    from pipeline.loader import LoaderConfig, build_loader
    from pipeline.plan import PlanConfig
    from train.bench.pipeline import dali_graph_only

    samples = [(f"{n:06d}", {"jpg": jpeg_bytes((64, 48), seed=n), "cls": str(n).encode()}) for n in range(18)]
    for n in range(4, 8):  # the second batch's every sample is no image: skipped, the batch comes out empty
        samples[n] = (f"{n:06d}", {"jpg": b"<html>not an image</html>", "cls": str(n).encode()})
    write_raw_shards(tmp_path, [samples[:7], samples[7:13], samples[13:]])
    cfg = LoaderConfig(url=str(tmp_path), backend="dali", batch_size=4, num_workers=1, max_corrupt_fraction=0.5,
                       augment=AugmentConfig(img_size=32), plan=PlanConfig(shuffle=False), overlap_epochs=False)
    loaded = list(build_loader(cfg, 0, 1, "cpu"))
    alone = list(dali_graph_only(build_loader(cfg, 0, 1, "cpu")))
    assert [b.ids.tolist() for b in alone] == [b.sample_ids.tolist() for b in loaded]
    assert [len(b.ids) for b in alone] == [4, 0, 4, 4, 2]
    assert all(torch.equal(a.images, b.images) for a, b in zip(alone, loaded))
