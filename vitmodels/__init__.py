"""ViT, DeiT, Swin and CIFAR ResNet models with timm-compatible parameter names and timm's model API.

Importing the package registers the presets with timm, so timm.create_model("vp_vit_tiny_patch4_32") works.
Every preset is named vp_<timm-style name>; the names from before the prefix still build the same models.
"""
from .capture import capture_attention
from .deit import DistilledVisionTransformer
from .factory import CIFAR10_MEAN, CIFAR10_STD, create_model
from .losses import DistillationLoss
from .pretrained import CheckpointMismatchError, LoadReport, adapt_state_dict, load_pretrained, read_state_dict
from .resnet import ResNet
from .swin import SwinAttentionMap, SwinTransformer
from .vision_transformer import VisionTransformer

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CheckpointMismatchError",
    "DistillationLoss",
    "DistilledVisionTransformer",
    "LoadReport",
    "ResNet",
    "SwinAttentionMap",
    "SwinTransformer",
    "VisionTransformer",
    "adapt_state_dict",
    "capture_attention",
    "create_model",
    "load_pretrained",
    "read_state_dict",
]
