"""Aspect-ratio buckets: the nearest-ratio rule and crop (sizes.nearest_bucket, data.py), and the DDP bucket sampler
(data.BucketSampler): one bucket per batch, disjoint rank shards, reshuffled."""
import numpy as np
import pytest
import torch
from PIL import Image

import data
import sizes


def test_nearest_bucket_and_crop():
    table = sizes.bucket_table(1024)
    assert len(table) == 40
    for (h, w), key in {(1024, 1024): "1.0", (1080, 1920): "0.57", (1920, 1080): "1.75", (600, 2400): "0.25",
                        (4000, 900): "4.0", (768, 1152): "0.68", (1000, 820): "1.21"}.items():
        assert sizes.nearest_bucket(h, w, table) == key, (h, w)
    # a 100×300 image: red left third, green middle, blue right -> 256×256 keeps only the green middle
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, :100, 0], img[:, 100:200, 1], img[:, 200:, 2] = 255, 255, 255
    x = data.resize_cover_crop(Image.fromarray(img), (256, 256))
    assert x.shape == (3, 256, 256)
    # pixel values in [-1, 1]: 0.02 is 2.5 of 255 levels (bicubic resampling rings at the edges)
    assert torch.allclose(x[:, :, 20:-20].mean((1, 2)), torch.tensor([-1.0, 1.0, -1.0]), atol=0.02)
    x = data.resize_cover_crop(Image.fromarray(img), (176, 352))  # nearly its own ratio: all three colours
    assert x.shape == (3, 176, 352) and x[0, :, :20].mean() > 0.9 and x[2, :, -20:].mean() > 0.9
    with pytest.raises(ValueError, match="--image-size 300: no official bucket table"):
        sizes.bucket_table(300)


def test_sampler_one_bucket_per_batch_disjoint_shards_reshuffled():
    rng = np.random.default_rng(0)
    buckets = [str(b) for b in rng.choice(["0.5", "1.0", "2.0"], size=203, p=[0.2, 0.5, 0.3])]
    B, world = 4, 3
    shards = [data.BucketSampler(buckets, B, rank, world, seed=7) for rank in range(world)]
    for epoch in (0, 1):
        per_rank = [s.epoch(epoch) for s in shards]
        assert len({len(r) for r in per_rank}) == 1 and len(per_rank[0]) == len(shards[0])
        seen = []
        for step in zip(*per_rank):
            glob = [i for part in step for i in part]
            assert all(len(part) == B for part in step)
            assert len({buckets[i] for i in glob}) == 1  # a global batch never mixes buckets
            seen += glob
        assert len(seen) == len(set(seen))  # disjoint across ranks and steps: nothing repeats in an epoch
        expected = sum(buckets.count(b) // (B * world) for b in set(buckets)) * B * world
        assert len(seen) == expected
    assert shards[0].epoch(0) != shards[0].epoch(1)  # reshuffled each epoch
    assert shards[0].epoch(1) == data.BucketSampler(buckets, B, 0, world, seed=7).epoch(1)  # pure of (seed, epoch)
    single = data.BucketSampler(buckets, B * world, 0, 1, seed=7).epoch(0)  # 1 rank × 3B == 3 ranks × B
    assert single == [sum(step, []) for step in zip(*[s.epoch(0) for s in shards])]
