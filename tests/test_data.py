"""The data stream (data.BucketSampler, data.micro_batches, train.training_batches): resumed at any micro-batch it
yields exactly what the uninterrupted stream yields, across epochs, on 1 and 2 ranks; and 2 ranks × batch B are one
process × batch 2B. Ranks are simulated: the sampler and the stream take (rank, world), no process group is needed."""
import itertools
from types import SimpleNamespace

import pytest
import torch

import data
import train

BUCKETS = ["1.0"] * 10 + ["0.5"] * 9 + ["2.0"] * 5  # 24 images, 3 buckets; every bucket leaves a tail at batch 2 × 2


class Indices(torch.utils.data.Dataset):
    """Item i is i: the stream's content is its order."""
    buckets = BUCKETS

    def __len__(self):
        return len(self.buckets)

    def __getitem__(self, i):
        return i


class Features(Indices):
    """Item i as the feature cache gives it: a latent, and caption features of i % 5 + 1 valid tokens."""

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(index=i, latent=torch.randn(4, 2, 2, generator=g), y=[torch.randn(i % 5 + 1, 6, generator=g)])


def stream(batch_size, rank, world, start, n):
    """n micro-batches of rank `rank` from global micro-batch `start` on -> [(epoch, [indices])]."""
    sampler = data.BucketSampler(BUCKETS, batch_size, rank, world, seed=3)
    return list(itertools.islice(data.micro_batches(Indices(), sampler, start, 0), n))


@pytest.mark.parametrize("world", [1, 2])
def test_a_resumed_stream_continues_the_uninterrupted_one(world):
    """Resumed at micro-batch s, for every s of the first two epochs, the stream yields what the uninterrupted one
    yields from s on, through the next epoch boundary: no batch repeated, none skipped, in the same epoch."""
    per_epoch = len(data.BucketSampler(BUCKETS, 2, 0, world))
    n = 3 * per_epoch
    for rank in range(world):
        straight = stream(2, rank, world, 0, n)
        assert [e for e, _ in straight] == [k // per_epoch for k in range(n)]
        for s in range(2 * per_epoch):
            assert stream(2, rank, world, s, n - s) == straight[s:], (rank, s)


def test_two_ranks_slice_the_global_batches_of_one_process():
    """Rank 0's and rank 1's micro-batch k at batch 2 are the two halves of one process's micro-batch k at batch 4: the
    same bucket, disjoint; an epoch never shows an image twice."""
    n = 2 * len(data.BucketSampler(BUCKETS, 4))
    one = stream(4, 0, 1, 0, n)
    ranks = [stream(2, r, 2, 0, n) for r in (0, 1)]
    assert [(e, a + b) for (e, a), (_, b) in zip(*ranks)] == one
    for epoch in (0, 1):
        seen = [i for e, items in one if e == epoch for i in items]
        assert len(seen) == len(set(seen))
    assert all(len({BUCKETS[i] for i in items}) == 1 for _, items in one)


def batches(start, rank, world, batch_size, n):
    """n of training_batches' micro-batches on cached features, caption dropout 0.25."""
    args = SimpleNamespace(batch_size=batch_size, seed=3, workers=0, caption_dropout=0.25, controlnet=0)
    null = train.Caption(torch.full((8, 6), 7.0), torch.ones(8, dtype=torch.long))
    stream = train.training_batches(args, Features(), start, None, null, torch.tensor([1.0]), 8, rank, world,
                                    torch.device("cpu"))
    return list(itertools.islice(stream, n))


def same(a, b):
    return a.epoch == b.epoch and all(torch.equal(x, y) for x, y in zip(a[:5], b[:5]))


def test_training_batches_resume_and_split_over_ranks_exactly():
    """The randomness of micro-batch k (timesteps, noise, caption dropout) is drawn from (seed, k): resumed at any k it
    is what the uninterrupted run drew, and 2 ranks × batch 2 draw, row for row, what one process × batch 4 draws."""
    per_epoch, fields = len(data.BucketSampler(BUCKETS, 4)), train.MicroBatch._fields[:5]
    n = 2 * per_epoch + 1
    one = batches(0, 0, 1, 4, n)
    dropped = torch.cat([(b.y == 7).all(2).all(1) for b in one]).float()  # rows given the null caption
    assert 0.1 < dropped.mean() < 0.4  # 44 rows at p = 0.25: ±2.3σ (a rate of 1 - p, 0.75, is far outside)
    for s in range(n):
        assert all(same(a, b) for a, b in zip(batches(s, 0, 1, 4, n - s), one[s:])), s
    ranks = [batches(0, r, 2, 2, n) for r in (0, 1)]
    for k, (a, b) in enumerate(zip(*ranks)):
        for name, x, y, z in zip(fields, a, b, one[k]):
            assert torch.equal(torch.cat([x, y]), z), (k, name)
    for s in (per_epoch - 1, per_epoch + 2):  # resumed on 2 ranks, on either side of an epoch boundary
        for r in (0, 1):
            assert all(same(a, b) for a, b in zip(batches(s, r, 2, 2, n - s), ranks[r][s:])), (s, r)
