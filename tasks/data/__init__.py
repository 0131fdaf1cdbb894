"""Data: image sources, samples, verified WebDataset shards, the shard loader and batched augmentation."""
