import pytest
import torch

from tasks.data.random_erasing import ERASING_AREA, BatchEraser
from tests.support.augmentation import one_thread  # noqa: F401  (autouse: one torch thread)


def _erased_boxes(before: torch.Tensor, after: torch.Tensor) -> list[tuple[int, int, int, int] | None]:
    """The bounding box of what changed in each image, None where nothing did."""
    boxes = []
    for changed in (before != after).any(dim=1):
        rows, columns = changed.any(dim=1).nonzero().flatten(), changed.any(dim=0).nonzero().flatten()
        boxes.append(None if rows.numel() == 0 else
                     (int(rows[0]), int(columns[0]), int(rows[-1] - rows[0] + 1), int(columns[-1] - columns[0] + 1)))
    return boxes


@pytest.mark.parametrize("mode", ["const", "rand", "pixel"])
def test_random_erasing_replaces_one_box_per_erased_image(mode):
    images = torch.full((400, 3, 32, 48), 7.0)
    eraser = BatchEraser(0.25, mode, torch.Generator().manual_seed(0))
    boxes = eraser.draw(400, 32, 48)
    erased = eraser.apply(images, boxes)
    assert erased.shape == images.shape and torch.equal(images, torch.full_like(images, 7.0))  # input untouched
    found = _erased_boxes(images, erased)
    assert 0.18 < sum(box is not None for box in found) / 400 < 0.32  # the probability
    for n, box in enumerate(found):
        top, left, height, width = boxes[n].tolist()
        assert box == ((top, left, height, width) if height else None)
        if box is None:
            continue
        assert height < 32 and width < 48 and ERASING_AREA[0] * 0.5 < height * width / (32 * 48) < ERASING_AREA[1] * 1.5
        patch = erased[n, :, top : top + height, left : left + width]
        if mode == "const":
            assert (patch == 0).all()
        elif mode == "rand":  # one value per channel
            assert (patch == patch[:, :1, :1]).all() and patch[:, 0, 0].unique().numel() == 3
        else:
            assert patch.unique().numel() > 0.9 * patch.numel()


def test_random_erasing_is_seeded_and_off_at_probability_zero():
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first, again, other = (BatchEraser(1.0, "pixel", torch.Generator().manual_seed(seed))(images) for seed in (3, 3, 4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(BatchEraser(0.0, "pixel", torch.Generator().manual_seed(0))(images), images)
    with pytest.raises(ValueError, match="float N x C x H x W images"):
        BatchEraser(0.5, "pixel", torch.Generator())(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="erasing mode"):
        BatchEraser(0.5, "noise", torch.Generator())
