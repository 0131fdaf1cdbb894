"""ResNet for 32x32 inputs: the CNN reference and default DeiT teacher.

A 7x7/2 stem and max-pool would shrink a CIFAR image to 8x8 before the first stage, so the stem is a single
3x3/1 conv without pooling (as in the CIFAR experiments of He et al. and DeiT's teachers on small images).
Parameter names are timm's ResNet names, so a timm resnet18/50 whose conv1 is swapped for the same 3x3 stem
and whose maxpool is removed shares the state_dict.
"""
import torch
from timm.models import build_model_with_cfg, register_model
from torch import nn

from .factory import CIFAR10_CFG, make_default_cfgs
from .layers import drop_path_or_identity, drop_path_rates


def conv_bn(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
    return conv, nn.BatchNorm2d(out_chs)


def shortcut(in_chs: int, out_chs: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_chs == out_chs:
        return None
    return nn.Sequential(*conv_bn(in_chs, out_chs, 1, stride))


class BasicBlock(nn.Module):
    expansion = 1
    last_bn = "bn2"

    def __init__(self, in_chs: int, width: int, stride: int, drop_path: float = 0.0):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_chs, width, 3, stride)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv_bn(width, width, 3)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = shortcut(in_chs, width, stride)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.drop_path(self.bn2(self.conv2(x))) + residual)


class Bottleneck(nn.Module):
    expansion = 4
    last_bn = "bn3"

    def __init__(self, in_chs: int, width: int, stride: int, drop_path: float = 0.0):
        super().__init__()
        out_chs = width * self.expansion
        self.conv1, self.bn1 = conv_bn(in_chs, width, 1)
        self.act1 = nn.ReLU(inplace=True)
        # stride on the 3x3 (torchvision/timm "ResNet v1.5"), not on the first 1x1 which would skip pixels
        self.conv2, self.bn2 = conv_bn(width, width, 3, stride)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3, self.bn3 = conv_bn(width, out_chs, 1)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = shortcut(in_chs, out_chs, stride)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.act3(self.drop_path(self.bn3(self.conv3(x))) + residual)


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, ...], in_chans: int = 3,
                 num_classes: int = 10, channels: tuple[int, ...] = (64, 128, 256, 512), drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0):
        super().__init__()
        if len(channels) != len(layers):
            raise ValueError(f"channels {tuple(channels)} needs one width per stage of layers {tuple(layers)}")
        self.num_classes = num_classes
        self.grad_checkpointing = False
        self.conv1, self.bn1 = conv_bn(in_chans, channels[0], 3)
        self.act1 = nn.ReLU(inplace=True)
        in_chs = channels[0]
        block_drop_paths = iter(drop_path_rates(drop_path_rate, sum(layers)))
        for i, (num_blocks, width) in enumerate(zip(layers, channels, strict=True)):
            stage = []
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(block(in_chs, width, stride=stride, drop_path=next(block_drop_paths)))
                in_chs = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_features = in_chs
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if isinstance(module, (BasicBlock, Bottleneck)):
                # each residual branch starts as identity, which makes deep nets train from step one
                nn.init.zeros_(getattr(module, module.last_bn).weight)

    def no_weight_decay(self) -> set[str]:
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def stages(self) -> list[nn.Sequential]:
        return [module for name, module in self.named_children() if name.startswith("layer")]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        for stage in self.stages():
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head_drop(self.forward_features(x).mean(dim=(2, 3))))


default_cfgs = make_default_cfgs(
    {"resnet18_cifar": CIFAR10_CFG, "resnet50_cifar": CIFAR10_CFG},
    classifier="fc", first_conv="conv1", fixed_input_size=False,
)


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    return build_model_with_cfg(ResNet, "resnet18_cifar", pretrained, block=BasicBlock, layers=(2, 2, 2, 2),
                                **kwargs)


@register_model
def resnet50_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    return build_model_with_cfg(ResNet, "resnet50_cifar", pretrained, block=Bottleneck, layers=(3, 4, 6, 3),
                                **kwargs)
