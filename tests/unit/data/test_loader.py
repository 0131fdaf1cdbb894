import random
from collections import Counter

import pytest
import torch

from tasks.data.loader import ShardStream, batches_per_rank, make_loader, normalize, plan_worker
from tests.conftest import SUBSET_TEST, SUBSET_TRAIN


def _plan_keys(counts, world_size, workers, batch_size, order):
    """Expand plans into (shard, index) samples per rank, plus per-rank batch counts."""
    per_rank, batch_counts = [], []
    for rank in range(world_size):
        samples, batches = [], 0
        for worker in range(workers):
            plan = plan_worker(counts, rank=rank, world_size=world_size, worker=worker, num_workers=workers,
                               batch_size=batch_size, shard_order=order)
            segment_samples = [(s.shard, i) for s in plan.segments for i in range(s.start, s.stop)]
            assert len(segment_samples) == sum(plan.batch_sizes)
            assert all(0 < size <= batch_size for size in plan.batch_sizes)
            samples += segment_samples
            batches += len(plan.batch_sizes)
        per_rank.append(samples)
        batch_counts.append(batches)
    return per_rank, batch_counts


def test_plan_covers_every_sample_once_for_random_layouts():
    rng = random.Random(0)
    for _ in range(300):
        counts = [rng.randint(1, 50) for _ in range(rng.randint(1, 6))]
        world_size, workers = rng.randint(1, 4), rng.randint(1, 4)
        batch_size = rng.randint(1, 16)
        if sum(counts) // world_size < batches_per_rank(sum(counts), world_size, batch_size):
            continue
        order = list(range(len(counts)))
        rng.shuffle(order)
        per_rank, batch_counts = _plan_keys(counts, world_size, workers, batch_size, order)
        every = [sample for samples in per_rank for sample in samples]
        assert sorted(every) == sorted((s, i) for s, n in enumerate(counts) for i in range(n))
        assert len(set(batch_counts)) == 1


def test_plan_refuses_layouts_that_would_leave_a_rank_without_a_batch():
    with pytest.raises(ValueError, match="rank 0 1 samples for 2 batches"):
        plan_worker([3], rank=0, world_size=2, worker=0, num_workers=1, batch_size=1, shard_order=[0])


def _collect(location, split, train, world_size=2, workers=2, batch_size=64, epoch=0, shuffle_buffer=500):
    keys_per_rank, batches_per_rank_seen = [], []
    for rank in range(world_size):
        stream = ShardStream(location, split, batch_size, train=train, rank=rank, world_size=world_size,
                             seed=3, shuffle_buffer=shuffle_buffer)
        stream.set_epoch(epoch)
        keys, batches = [], 0
        for images, labels, batch_keys in make_loader(stream, workers):
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
            assert labels.shape == (len(batch_keys),) and 0 <= labels.min() and labels.max() < 10
            keys += batch_keys
            batches += 1
        assert batches == len(stream)
        keys_per_rank.append(keys)
        batches_per_rank_seen.append(batches)
    return keys_per_rank, batches_per_rank_seen


def test_two_ranks_two_workers_train_and_eval_exact_coverage(subset_shards):
    for split, train, total in (("train", True, SUBSET_TRAIN), ("test", False, SUBSET_TEST)):
        keys_per_rank, batch_counts = _collect(subset_shards, split, train)
        every = [key for keys in keys_per_rank for key in keys]
        assert len(every) == total and len(set(every)) == total
        assert set(every) == {f"{split}_{i:07d}" for i in range(total)}
        assert batch_counts[0] == batch_counts[1]


def test_fewer_shards_than_ranks_times_workers(tmp_path, data_root):
    from tasks.data.shard import ShardOptions, shard_dataset

    location = str(tmp_path / "two")
    shard_dataset("cifar10", data_root, location, ShardOptions(shard_size=3000), progress=False)
    keys_per_rank, batch_counts = _collect(location, "train", True, world_size=2, workers=3, batch_size=256)
    every = [key for keys in keys_per_rank for key in keys]
    assert len(set(every)) == len(every) == SUBSET_TRAIN
    assert batch_counts[0] == batch_counts[1]


def test_shuffle_is_seeded_and_changes_per_epoch(subset_shards):
    epoch0, _ = _collect(subset_shards, "train", True, world_size=1, workers=0, epoch=0)
    epoch0_again, _ = _collect(subset_shards, "train", True, world_size=1, workers=0, epoch=0)
    epoch1, _ = _collect(subset_shards, "train", True, world_size=1, workers=0, epoch=1)
    assert epoch0 == epoch0_again
    assert epoch0 != epoch1 and sorted(epoch0[0]) == sorted(epoch1[0])
    evaluation, _ = _collect(subset_shards, "test", False, world_size=1, workers=0)
    assert evaluation == _collect(subset_shards, "test", False, world_size=1, workers=0, epoch=5)[0]


@pytest.mark.parametrize(("world_size", "repeats"), [(3, 3), (2, 3), (1, 2)])
def test_repeated_augmentation_shows_every_image_exactly_k_times_per_epoch_across_ranks(subset_shards, world_size,
                                                                                         repeats):
    batch_size, counts, batch_counts, copies_differ = 64, Counter(), [], []
    for rank in range(world_size):
        stream = ShardStream(subset_shards, "train", batch_size, train=True, rank=rank, world_size=world_size,
                             seed=3, shuffle_buffer=500, repeats=repeats, image_size=48)
        stream.set_epoch(1)
        batches = 0
        for images, labels, keys in make_loader(stream, 2):
            distinct = len(keys) // repeats
            assert len(keys) == distinct * repeats <= batch_size and images.shape[1:] == (3, 48, 48)
            # tiled [a, b, ..., a, b, ...]: the copies of an image sit a whole block apart, with their labels
            assert keys == keys[:distinct] * repeats and torch.equal(labels, labels[:distinct].repeat(repeats))
            assert len(set(keys[:distinct])) == distinct
            copies_differ.append(not torch.equal(images[0], images[distinct]))  # each copy augmented on its own
            counts.update(keys)
            batches += 1
        assert batches == len(stream)
        batch_counts.append(batches)
    assert set(counts) == {f"train_{i:07d}" for i in range(SUBSET_TRAIN)}
    assert set(counts.values()) == {repeats}
    assert len(set(batch_counts)) == 1
    assert sum(copies_differ) > 0.8 * len(copies_differ)


def test_repeats_must_fit_the_batch(subset_shards):
    with pytest.raises(ValueError, match="4 repeats of each image do not fit a batch of 3"):
        ShardStream(subset_shards, "train", 3, train=True, repeats=4)


def test_normalize_matches_reference():
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(images, mean, std), expected)


def test_stream_errors_are_clear(subset_shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        ShardStream(str(tmp_path), "train", 8, train=True)
    with pytest.raises(KeyError, match="no split 'val'"):
        ShardStream(subset_shards, "val", 8, train=False)
    with pytest.raises(ValueError, match="pipe:"):
        ShardStream("pipe:cat x", "train", 8, train=True)
