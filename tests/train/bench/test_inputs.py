from train.bench.inputs import bench_inputs, synthetic_manifest, trusting_load
from pipeline.shards.manifest import ShardManifest


def test_bench_inputs_compares_the_same_work_checked_and_trusted():
    r = bench_inputs(shards=300, images=4, rounds=1)
    m = r["manifest"]
    assert m["shards"] == 300 and m["ratio"] == m["validated_s"] / m["trusted_s"] and m["trusted_s"] > 0
    for kind in ("plain", "exif"):
        k = r["images"][kind]
        assert k["overhead"] == k["after_ms_per_image"] / k["before_ms_per_image"] - 1
    text = synthetic_manifest(5)
    assert ShardManifest.from_json(text).shards == trusting_load(text)
