"""ViT, DeiT, Swin and CIFAR ResNet models with timm-compatible parameter names.

Importing the package registers the presets with timm, so timm.create_model("vit_tiny_patch4_32") works.
"""
from .capture import capture_attention
from .deit import DistilledVisionTransformer
from .factory import create_model
from .losses import DistillationLoss
from .resnet import ResNet
from .swin import SwinAttentionMap, SwinTransformer
from .vision_transformer import VisionTransformer

__all__ = [
    "DistillationLoss",
    "DistilledVisionTransformer",
    "ResNet",
    "SwinAttentionMap",
    "SwinTransformer",
    "VisionTransformer",
    "capture_attention",
    "create_model",
]
