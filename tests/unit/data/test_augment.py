from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tasks.config import AugmentConfig
from tasks.data.augment import BatchAugmenter
from tasks.data.crops import EvalResize
from tasks.data.mixup import BatchMixer
from tasks.data.random_erasing import BatchEraser
from tests.support.augmentation import (
    IMAGENET_MEAN,
    POLICIES,
    RECIPE,
    one_thread,  # noqa: F401  (autouse: one torch thread)
)

RRC = AugmentConfig(random_resized_crop=True, crop_padding=0, hflip=True)


@pytest.mark.parametrize("count", [1, 3, 255])
@pytest.mark.parametrize("policy", ["none", *POLICIES])
def test_any_batch_size_keeps_shape_and_dtype(count, policy):
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8)
    out = BatchAugmenter(AugmentConfig(auto_augment=policy), torch.Generator().manual_seed(0))(images)
    assert out.shape == images.shape and out.dtype == torch.uint8 and out.is_contiguous()


def test_channels_last_input_from_the_loader_is_accepted():
    # The loader hands over N x H x W x C memory permuted to N x C x H x W.
    images = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    augmenter = BatchAugmenter(RECIPE, torch.Generator().manual_seed(0))
    again = BatchAugmenter(RECIPE, torch.Generator().manual_seed(0))
    assert torch.equal(augmenter(images), again(images.contiguous()))


def test_same_seed_same_batches_other_seed_other_batches():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    first, second, other = (BatchAugmenter(RECIPE, torch.Generator().manual_seed(seed)) for seed in (7, 7, 8))
    runs = [[augmenter(images) for _ in range(3)] for augmenter in (first, second, other)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not torch.equal(runs[0][0], runs[2][0])
    assert not torch.equal(runs[0][0], runs[0][1])  # the generator moves on from batch to batch


@pytest.mark.parametrize("crop", ["pad-crop", "random-resized-crop"])
def test_training_batches_come_out_at_the_training_size_seeded(crop):
    config = RECIPE if crop == "pad-crop" else RECIPE.model_copy(update={"random_resized_crop": True,
                                                                        "crop_padding": 0})
    images = torch.randint(0, 256, (9, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    first, again, other = (BatchAugmenter(config, torch.Generator().manual_seed(seed), image_size=48)(images)
                           for seed in (0, 0, 1))
    assert first.shape == (9, 3, 48, 48) and first.dtype == torch.uint8 and first.is_contiguous()
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_random_resized_crop_needs_its_output_size():
    with pytest.raises(ValueError, match="pass image_size"):
        BatchAugmenter(RRC, torch.Generator())
    with pytest.raises(ValueError, match="pass size"):
        BatchAugmenter(RRC, torch.Generator(), image_size=8).draw(2)


def test_bad_inputs_are_named():
    augmenter = BatchAugmenter(RECIPE, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="uint8 N x C x H x W images, got torch.float32"):
        augmenter(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="needs 1 or 3 channels, got 4"):
        augmenter(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        BatchAugmenter(RECIPE, SimpleNamespace(device=torch.device("cuda")))


class _HostSyncDetector(TorchDispatchMode):
    """Fails on what would make the host wait for a device: reading a value back (item, nonzero, a
    boolean mask) or a blocking host-to-device copy. Run on the meta device, where values do not exist."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func is torch.ops.aten._to_copy.default and tensors[0].device.type == "cpu" and "device" in kwargs:
            assert kwargs["device"].type == "cpu" or kwargs.get("non_blocking"), f"blocking copy to {kwargs['device']}"
        if func is torch.ops.aten.copy_.default:
            assert tensors[1].device == tensors[0].device, "copy_ across devices"
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            assert tensors[0].device.type == "cpu", f"{func} reads a {tensors[0].device} tensor back to the host"
        return func(*args, **kwargs)


@pytest.mark.parametrize(("policy", "interpolation"), [(POLICIES[0], "bicubic"), (POLICIES[1], "bilinear")])
@pytest.mark.parametrize("geometry", ["pad-crop", "resize", "random-resized-crop"])
def test_augment_erase_and_mix_on_a_device_without_reading_it_back(policy, interpolation, geometry):
    config = RECIPE.model_copy(update={"auto_augment": policy})
    if geometry == "random-resized-crop":
        config = config.model_copy(update={"random_resized_crop": True, "crop_padding": 0})
    size = 32 if geometry == "pad-crop" else 48
    augmenter = BatchAugmenter(config, torch.Generator().manual_seed(0), image_size=size,
                               interpolation=interpolation, mean=IMAGENET_MEAN)
    eraser = BatchEraser(0.5, "pixel", torch.Generator().manual_seed(0))
    mixer = BatchMixer(RECIPE, num_classes=10, rng=np.random.default_rng(0))
    with _HostSyncDetector():
        for count in (1, 7, 64):
            images = augmenter(torch.empty(count, 3, 32, 32, dtype=torch.uint8, device="meta"))
            assert images.device.type == "meta" and images.shape == (count, 3, size, size)
            assert EvalResize(size)(torch.empty(count, 3, 32, 32, dtype=torch.uint8, device="meta")).shape == \
                images.shape
            erased = eraser(images.float())
            assert erased.shape == images.shape
            for _ in range(4):  # mixup, cutmix or neither, as drawn
                mixed, targets = mixer(erased, torch.empty(count, dtype=torch.int64, device="meta"))
                assert mixed.shape == images.shape and targets.shape == (count, 10)


def test_the_detector_catches_reads_and_blocking_copies():
    with _HostSyncDetector(), pytest.raises(AssertionError):
        torch.ones(2).to("meta")
    with _HostSyncDetector(), pytest.raises(AssertionError):
        torch.zeros(1, device="meta").item()
