import dataclasses
import math

import numpy as np
import pytest
import timm.data.mixup
import torch

from tasks.data.mixup import BatchMixer, MixDraw, random_cycle
from tests.support.augmentation import (
    RECIPE,
    one_thread,  # noqa: F401  (autouse: one torch thread)
)


class _FixedRng:
    """Stands in for np.random.Generator with chosen values, to test one draw by hand."""

    def __init__(self, uniforms, lam, centre=(0, 0)):
        self.uniforms, self.lam, self.centre = list(uniforms), lam, list(centre)

    def random(self):
        return self.uniforms.pop(0)

    def beta(self, a, b):
        return self.lam

    def integers(self, low, high):
        return self.centre.pop(0)

    def permutation(self, count):
        return np.arange(count)  # the cycle 0 -> 1 -> ... : sample i is mixed with sample i - 1


def _mixer(rng=None, **overrides) -> BatchMixer:
    config = RECIPE.model_copy(update=overrides)
    return BatchMixer(config, num_classes=4, rng=rng or np.random.default_rng(0))


def test_mixup_by_hand_for_a_fixed_lambda():
    images = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 2, 2, 2).contiguous()
    labels = torch.tensor([0, 1, 3])
    mixed, targets = _mixer().apply(images, labels, MixDraw(lam=0.7, partners=(2, 0, 1)))
    # Sample i is mixed with sample partners[i]: here i - 1 (sample 0 with the last).
    assert torch.allclose(mixed[:, 0, 0, 0], torch.tensor([0.7 * 0 + 0.3 * 2, 0.7 * 1 + 0.3 * 0, 0.7 * 2 + 0.3 * 1]))
    on, off = 1 - 0.1 + 0.1 / 4, 0.1 / 4  # 0.925 and 0.025
    smoothed = torch.full((3, 4), off)
    smoothed[[0, 1, 2], [0, 1, 3]] = on
    assert torch.allclose(targets, 0.7 * smoothed + 0.3 * smoothed.roll(1, 0))
    assert torch.allclose(targets[0], torch.tensor([0.7 * on + 0.3 * off, off, off, 0.7 * off + 0.3 * on]))
    assert torch.equal(images, torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 2, 2, 2))  # untouched


def test_cutmix_by_hand_for_a_fixed_box():
    images = torch.stack([torch.full((1, 4, 4), float(i)) for i in range(3)])
    labels = torch.tensor([2, 0, 1])
    # a 2 x 2 box at rows 1-2, columns 0-1; sample i takes it from partners[i]
    draw = MixDraw(lam=1 - 4 / 16, box=(1, 3, 0, 2), partners=(1, 2, 0))
    mixed, targets = _mixer().apply(images, labels, draw)
    for i, partner in enumerate((1, 2, 0)):
        expected = torch.full((4, 4), float(i))
        expected[1:3, 0:2] = partner
        assert torch.equal(mixed[i, 0], expected)
    on, off = 0.925, 0.025
    # Sample 1 (label 0) keeps 3/4 of its area and gets 1/4 from sample 2 (label 1).
    assert torch.allclose(targets[1], torch.tensor([0.75 * on + 0.25 * off, 0.75 * off + 0.25 * on, off, off]))
    assert torch.allclose(targets.sum(1), torch.ones(3))


def test_cutmix_box_and_area_corrected_lambda_are_timms():
    height, width = 32, 32
    for lam, centre in ((0.3, (5, 30)), (0.81, (0, 0)), (0.05, (16, 16)), (0.999, (31, 2))):
        ours = _mixer(_FixedRng([0.0, 0.0], lam, centre), mixup_alpha=0.0).draw(2, height, width)
        with pytest.MonkeyPatch.context() as patch:
            centres = list(centre)
            patch.setattr(timm.data.mixup.np.random, "randint", lambda low, high, size=None, c=centres: c.pop(0))
            box, timm_lam = timm.data.mixup.cutmix_bbox_and_lam((2, 3, height, width), lam, correct_lam=True)
        assert ours.box == tuple(int(v) for v in box) and math.isclose(ours.lam, timm_lam)


@pytest.mark.parametrize("switch", [0.2, 0.7])  # below / above switch_prob 0.5: CutMix / Mixup
def test_a_two_sample_batch_equals_timms_mixup(switch):
    """For N = 2 every cycle is the swap, timm's flip(0) pairing, so with the same draws the results must
    equal timm's Mixup exactly (label smoothing folded into the targets the same way)."""
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 3])
    ours = _mixer(_FixedRng([0.1, switch], 0.6, (3, 5)))(images, labels)
    timm_mixup = timm.data.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, label_smoothing=0.1, num_classes=4)
    with pytest.MonkeyPatch.context() as patch:
        uniforms, centres = [0.1, switch], [3, 5]
        patch.setattr(timm.data.mixup.np.random, "rand", lambda: uniforms.pop(0))
        patch.setattr(timm.data.mixup.np.random, "beta", lambda a, b: 0.6)
        patch.setattr(timm.data.mixup.np.random, "randint", lambda low, high, size=None: centres.pop(0))
        theirs = timm_mixup(images.clone(), labels)
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1])


@pytest.mark.parametrize("count", [2, 3, 5, 255])
def test_odd_batches_pair_every_sample_with_another_exactly_once(count):
    images = torch.arange(count, dtype=torch.float32).view(count, 1, 1, 1)
    for seed in range(5):
        draw = _mixer(np.random.default_rng(seed), cutmix_alpha=0.0).draw(count, 1, 1)
        mixed, _ = _mixer().apply(images, torch.zeros(count, dtype=torch.int64), dataclasses.replace(draw, lam=0.5))
        partners = (2 * mixed.flatten() - images.flatten()).round().long()
        assert partners.tolist() == list(draw.partners)
        assert all(partners[i] != i for i in range(count))
        assert sorted(partners.tolist()) == list(range(count))


def test_random_cycles_are_single_cycles_drawn_per_batch():
    rng = np.random.default_rng(0)
    assert random_cycle(1, rng) == (0,) and random_cycle(0, rng) == ()
    seen: dict[int, set] = {count: set() for count in (2, 3, 7, 64)}
    for count in seen:
        for _ in range(20):
            partners = random_cycle(count, rng)
            sample, visited = 0, set()
            while sample not in visited:  # following the partners from 0 visits every sample: one cycle
                visited.add(sample)
                sample = partners[sample]
            assert len(visited) == count and sample == 0
            seen[count].add(partners)
    # A new pairing per batch, not one fixed order: both cycles of 3, twenty different ones of 64.
    assert len(seen[2]) == 1 and len(seen[3]) == 2 and len(seen[64]) == 20


def test_copies_of_an_image_get_independent_partners():
    """Repeated augmentation's batch layout [a b c ... a b c ...] (tasks/data/loader.py, 3 copies): a fixed
    pairing (a roll by one) gives all copies of an image copies of one partner image, always; a random
    cycle per batch almost never does. Images are one-hot over the channels, so each mixed sample names its
    partner, through the public call alone."""
    distinct, copies = 8, 3
    count = distinct * copies
    images = torch.eye(count).view(count, count, 1, 1)
    source = torch.arange(count) % distinct  # which image each sample is a copy of
    mixer = _mixer(np.random.default_rng(0), cutmix_alpha=0.0)
    all_same = 0
    for _ in range(100):
        mixed, _ = mixer(images, torch.zeros(count, dtype=torch.int64))
        partners = mixed.flatten(1).sub(images.flatten(1) * 2).argmax(dim=1)  # the largest other channel
        assert sorted(partners.tolist()) == list(range(count)) and bool((partners != torch.arange(count)).all())
        partner_sources = source[partners].view(copies, distinct)
        all_same += int((partner_sources == partner_sources[0]).all(dim=0).sum())
    assert all_same / (100 * distinct) < 0.05  # a fixed pairing gives 1.0; a random cycle about 1/23^2


def test_a_mixing_draw_carries_its_pairing():
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    mixer = _mixer(np.random.default_rng(0))
    draw = mixer.draw(4, 8, 8)
    first, again = mixer.apply(images, labels, draw), mixer.apply(images, labels, draw)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])  # apply draws nothing
    with pytest.raises(ValueError, match="a partner for each of the 4 samples, got none"):
        mixer.apply(images, labels, MixDraw(lam=0.5))
    with pytest.raises(ValueError, match="a partner for each of the 4 samples, got 3"):
        mixer.apply(images, labels, MixDraw(lam=0.5, partners=(1, 2, 0)))


@pytest.mark.parametrize("count", [1, 2, 3, 255])
def test_targets_are_distributions_for_any_batch_size(count):
    mixer = _mixer(np.random.default_rng(1))
    labels = torch.randint(0, 4, (count,), generator=torch.Generator().manual_seed(0))
    changed = 0
    for _ in range(10):
        images = torch.rand(count, 3, 8, 8)
        mixed, targets = mixer(images, labels)
        assert mixed.shape == images.shape and mixed.dtype == images.dtype
        assert targets.shape == (count, 4) and targets.dtype == torch.float32
        assert torch.allclose(targets.sum(1), torch.ones(count)) and bool((targets >= 0.1 / 4 - 1e-6).all())
        changed += not torch.equal(mixed, images)
    assert changed == 0 if count == 1 else changed > 0


def test_a_single_sample_has_no_partner_and_comes_back_unmixed():
    images, labels = torch.rand(1, 3, 8, 8), torch.tensor([2])
    for draw in (MixDraw(lam=0.4), MixDraw(lam=0.75, box=(0, 4, 0, 4))):
        mixed, targets = _mixer().apply(images, labels, draw)
        assert torch.equal(mixed, images)
        assert torch.allclose(targets, torch.tensor([[0.025, 0.025, 0.925, 0.025]]))


def test_probability_zero_gives_smoothed_one_hot_targets():
    mixer = _mixer(mixup_prob=0.0, label_smoothing=0.2)
    images, labels = torch.rand(3, 3, 8, 8), torch.tensor([0, 3, 3])
    for _ in range(5):
        assert mixer.draw(3, 8, 8) == MixDraw(lam=1.0)
        mixed, targets = mixer(images, labels)
        assert mixed is images
        expected = torch.tensor([[0.85, 0.05, 0.05, 0.05], [0.05, 0.05, 0.05, 0.85], [0.05, 0.05, 0.05, 0.85]])
        assert torch.allclose(targets, expected)
    assert not _mixer(mixup_alpha=0.0, cutmix_alpha=0.0).mixes and _mixer().mixes


def test_draws_follow_the_config():
    both = [_mixer(np.random.default_rng(seed)).draw(5, 32, 32) for seed in range(200)]
    cutmix = [draw for draw in both if draw.box is not None]
    assert 60 < len(cutmix) < 140  # switch_prob 0.5
    for draw in cutmix:
        top, bottom, left, right = draw.box
        assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32
        assert math.isclose(draw.lam, 1 - (bottom - top) * (right - left) / 1024)
    only_mixup = [_mixer(np.random.default_rng(seed), cutmix_alpha=0.0).draw(5, 32, 32) for seed in range(20)]
    assert all(draw.box is None and 0 <= draw.lam <= 1 for draw in only_mixup)
    only_cutmix = [_mixer(np.random.default_rng(seed), mixup_alpha=0.0).draw(5, 32, 32) for seed in range(20)]
    assert all(draw.box is not None for draw in only_cutmix)
    half = [_mixer(np.random.default_rng(seed), mixup_prob=0.5).draw(5, 32, 32).lam == 1.0 for seed in range(200)]
    assert 60 < sum(half) < 140
    assert _mixer(np.random.default_rng(3)).draw(5, 32, 32) == _mixer(np.random.default_rng(3)).draw(5, 32, 32)


def test_mixer_bad_inputs_are_named():
    mixer = _mixer()
    with pytest.raises(ValueError, match="float N x C x H x W images, got torch.uint8"):
        mixer(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"int64 labels of shape \(2,\), got torch.int32"):
        mixer(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="num_classes"):
        BatchMixer(RECIPE, num_classes=0, rng=np.random.default_rng(0))
