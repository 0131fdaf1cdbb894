"""What the augmentation tests (tests/unit/data/test_augment.py and the tests of its parts) share: the policy
strings and recipe they run, a dataset mean other than the default, and one torch thread per test module."""

import pytest
import torch

from tasks.config import AugmentConfig

DEIT = "rand-m9-mstd0.5-inc1"
# DeiT's string, and one with timm's default (non-increasing) op set, three ops and a higher probability.
POLICIES = (DEIT, "rand-m7-n3-mstd1-p0.8")
RECIPE = AugmentConfig(auto_augment=DEIT, mixup_alpha=0.8, cutmix_alpha=1.0, mixup_prob=1.0, label_smoothing=0.1)
# A mean other than the augmenter's default (CIFAR-10's), so that the fill is seen to come from the argument:
# ImageNet's, as configs/finetune.yaml has it; timm's create_transform rounds it to (124, 116, 104).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_FILL = (124, 116, 104)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Per-image references are small ops: with several threads on a shared 2-core machine they spend their
    time waking threads (up to 100x slower). Autouse in each test module that imports it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
