import math

import pytest
import torch
from torchvision.transforms import RandomResizedCrop, v2

from tasks.config import AugmentConfig
from tasks.data.augment import BatchAugmenter
from tasks.data.crops import EvalResize, draw_resized_crops, resize_center_crop, resized_crops
from tests.support.augmentation import one_thread  # noqa: F401  (autouse: one torch thread)


def test_crop_stays_within_padding_and_flips_follow_the_plan():
    images = torch.arange(3 * 3 * 8 * 8, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 3, 8, 8)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    augmenter = BatchAugmenter(AugmentConfig(crop_padding=2, hflip=True), torch.Generator().manual_seed(0))
    seen_offsets, seen_flips = set(), set()
    for _ in range(100):
        plan = augmenter.draw(3)
        out = augmenter.apply(images, plan)
        for n in range(3):
            dy, dx = plan.crop_offsets[n].tolist()
            window = padded[n, :, dy : dy + 8, dx : dx + 8]
            expected = window.flip(-1) if plan.flips[n] else window
            assert torch.equal(out[n], expected)
            seen_offsets.add((dy, dx))
            seen_flips.add(bool(plan.flips[n]))
    assert seen_offsets == {(dy, dx) for dy in range(5) for dx in range(5)} and seen_flips == {False, True}


def test_flip_only_and_crop_only():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    flip_only = BatchAugmenter(AugmentConfig(crop_padding=0, hflip=True), torch.Generator().manual_seed(0))
    outs = [flip_only(images) for _ in range(20)]
    assert all(torch.equal(o[0], images[0]) or torch.equal(o[0], images[0].flip(-1)) for o in outs)
    assert {torch.equal(o[0], images[0]) for o in outs} == {False, True}
    crop_only = BatchAugmenter(AugmentConfig(crop_padding=2, hflip=False), torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for out in (crop_only(images) for _ in range(10)):
        for n in range(2):
            assert any(torch.equal(out[n], padded[n, :, dy : dy + 8, dx : dx + 8])
                       for dy in range(5) for dx in range(5))


@pytest.mark.parametrize(("height", "width"), [(32, 32), (24, 40)])
def test_resized_crop_boxes_follow_torchvisions_distribution(height, width):
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = draw_resized_crops(20_000, height, width, scale=scale, ratio=ratio,
                               generator=torch.Generator().manual_seed(0))
    top, left, box_height, box_width = boxes.unbind(1)
    assert boxes.dtype == torch.int64 and (box_height >= 1).all() and (box_width >= 1).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + box_height <= height).all()
    assert (left + box_width <= width).all()
    # Rounded sides: the area share and aspect ratio are within the ranges up to half a pixel per side.
    share = box_height * box_width / (height * width)
    assert share.min() >= 0.08 * 0.5 and share.max() <= 1.0
    aspect = box_width / box_height
    assert aspect.min() > 3 / 4 * 0.6 and aspect.max() < 4 / 3 / 0.6
    # torchvision's draws by reference, compared as distributions
    torch.manual_seed(0)
    reference = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), list(ratio))
                              for _ in range(20_000)])
    for ours, theirs in zip(boxes.float().T, reference.float().T, strict=True):
        assert ours.mean().item() == pytest.approx(theirs.mean().item(), rel=0.03, abs=0.3)
        assert ours.std().item() == pytest.approx(theirs.std().item(), rel=0.05, abs=0.3)


def test_resized_crops_of_fixed_boxes():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = torch.tensor([[0, 0, 32, 32]] * 4)
    for interpolation in ("bilinear", "bicubic"):
        assert torch.equal(resized_crops(images, whole, 32, interpolation=interpolation), images)
    box = torch.tensor([[3, 5, 20, 20]] * 4)  # a box at the output size is a plain crop, flipped where asked
    flips = torch.tensor([False, True, False, True])
    cropped = resized_crops(images, box, 20, flips=flips)
    for n in range(4):
        window = images[n, :, 3:23, 5:25]
        assert torch.equal(cropped[n], window.flip(-1) if flips[n] else window)
    # the whole image resized is a bilinear resize (to rounding)
    enlarged = resized_crops(images, whole, 64, interpolation="bilinear")
    reference = v2.functional.resize(images, [64, 64], interpolation=v2.InterpolationMode.BILINEAR, antialias=False)
    assert (enlarged.int() - reference.int()).abs().max() <= 1


@pytest.mark.parametrize(("size", "crop_pct", "source"), [(48, 1.0, 32), (224, 0.875, 224), (16, 1.0, 32),
                                                          (24, 0.9, (32, 40))])
def test_eval_resize_is_timms_resize_and_centre_crop(size, crop_pct, source):
    height, width = source if isinstance(source, tuple) else (source, source)
    images = torch.randint(0, 256, (3, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ours = resize_center_crop(images, size, crop_pct=crop_pct)
    reference = v2.Compose([v2.Resize(math.floor(size / crop_pct), interpolation=v2.InterpolationMode.BICUBIC,
                                      antialias=True), v2.CenterCrop(size)])(images)
    assert ours.shape == reference.shape == (3, 3, size, size) and ours.dtype == torch.uint8
    assert torch.equal(ours, reference)  # torchvision's own resize (its uint8 kernel on CPU)
    assert EvalResize(size, crop_pct).output_shape((3, height, width)) == (3, size, size)
    assert EvalResize(None)(images) is images  # no training size: the batch as it is
    if height == width:
        assert resize_center_crop(images, height) is images
