"""The shard step against an S3-compatible server (moto) started by the test on loopback."""


from tasks.data.loader import ShardStream
from tasks.data.manifest import check_shard_sizes, read_manifest, shard_listing, verify_shards
from tasks.data.shard import ShardOptions, shard_dataset
from tests.conftest import SUBSET_TEST


def test_shard_verify_and_stream_on_s3(s3_bucket, data_root):
    result = shard_dataset("cifar10", data_root, s3_bucket, ShardOptions(shard_size=3000, workers=1),
                           progress=False)
    assert not result.skipped
    manifest = read_manifest(s3_bucket)
    assert manifest.splits["test"].num_samples == SUBSET_TEST
    assert verify_shards(s3_bucket).ok
    assert check_shard_sizes(s3_bucket).shards_checked == 3 and check_shard_sizes(s3_bucket).ok
    assert all({"size", "ETag"} <= set(identity) for identity in shard_listing(s3_bucket).values())
    again = shard_dataset("cifar10", data_root, s3_bucket, ShardOptions(shard_size=3000, workers=1), progress=False)
    assert again.skipped
    stream = ShardStream(s3_bucket, "test", 256, train=False)
    keys = [key for _, _, batch_keys in stream for key in batch_keys]
    assert len(keys) == len(set(keys)) == SUBSET_TEST
