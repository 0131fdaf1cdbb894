"""ViT, DeiT, Swin and CIFAR ResNet models with timm-compatible parameter names and timm's model API.

Importing the package registers the presets with timm, so timm.create_model("vit_tiny_patch4_32") works.
Names follow timm's scheme; a vp_ prefix marks our build of an architecture timm registers under the same
name (vp_vit_base_patch16_224 is timm's vit_base_patch16_224), so both can be registered side by side.
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
