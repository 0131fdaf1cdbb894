"""ResNet for 32x32 inputs: the CNN reference and default DeiT teacher.

A 7x7/2 stem and max-pool would shrink a CIFAR image to 8x8 before the first stage, so the stem is a single
3x3/1 conv without pooling (as in the CIFAR experiments of He et al. and DeiT's teachers on small images).
Parameter names are timm's ResNet names, so a timm resnet18/50 whose conv1 is swapped for the same 3x3 stem
and whose maxpool is removed shares the state_dict.
"""
from collections.abc import Sequence
from typing import Any

import torch
from timm.models import build_model_with_cfg, register_model
from torch import nn

from .factory import CIFAR10_CFG, make_default_cfgs
from .layers import GlobalPool2d, TimmClassifier, drop_path_or_identity, drop_path_rates, run_block, take_indices


def conv_bn(in_chs: int, *, out_chs: int, kernel_size: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
    return conv, nn.BatchNorm2d(out_chs)


def shortcut(in_chs: int, *, out_chs: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_chs == out_chs:
        return None
    return nn.Sequential(*conv_bn(in_chs, out_chs=out_chs, kernel_size=1, stride=stride))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual (ResNet-18/34).

    Args:
        in_chs: input channels.
        width: channels of both convs (and of the output).
        stride: stride of the first conv (2 where a stage halves the map).
        drop_path: stochastic depth rate of the residual branch.
    """

    expansion = 1
    last_bn = "bn2"

    def __init__(self, in_chs: int, *, width: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_chs, out_chs=width, kernel_size=3, stride=stride)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv_bn(width, out_chs=width, kernel_size=3)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = shortcut(in_chs, out_chs=width, stride=stride)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.drop_path(self.bn2(self.conv2(x))) + residual)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual (ResNet-50 and deeper).

    Args:
        in_chs: input channels.
        width: channels of the inner convs; the output has 4 * width.
        stride: stride of the 3x3 conv.
        drop_path: stochastic depth rate of the residual branch.
    """

    expansion = 4
    last_bn = "bn3"

    def __init__(self, in_chs: int, *, width: int, stride: int = 1, drop_path: float = 0.0):
        super().__init__()
        out_chs = width * self.expansion
        self.conv1, self.bn1 = conv_bn(in_chs, out_chs=width, kernel_size=1)
        self.act1 = nn.ReLU(inplace=True)
        # stride on the 3x3 (torchvision/timm "ResNet v1.5"), not on the first 1x1 which would skip pixels
        self.conv2, self.bn2 = conv_bn(width, out_chs=width, kernel_size=3, stride=stride)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3, self.bn3 = conv_bn(width, out_chs=out_chs, kernel_size=1)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = shortcut(in_chs, out_chs=out_chs, stride=stride)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.act3(self.drop_path(self.bn3(self.conv3(x))) + residual)


class ResNet(TimmClassifier):
    """ResNet with a CIFAR stem (3x3/1 conv, no max-pool): stages at 1, 1/2, 1/4, 1/8 of the input.

    TorchScript is not supported (deprecated in the torch this project pins).

    Args:
        block: BasicBlock or Bottleneck.
        layers: blocks per stage.
        in_chans: input channels.
        num_classes: classifier outputs; 0 leaves forward returning pooled features.
        global_pool: 'avg' (timm's default), 'max', 'avgmax', 'catavgmax' (twice the features), or '' (no
            pooling: only with num_classes=0, for the unpooled map).
        channels: width of each stage (before a Bottleneck's x4 expansion).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of the last block (linear from 0 at the first).
    """

    def __init__(self, *, block: type[BasicBlock | Bottleneck], layers: Sequence[int], in_chans: int = 3,
                 num_classes: int = 10, global_pool: str = "avg", channels: Sequence[int] = (64, 128, 256, 512),
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        if len(channels) != len(layers):
            raise ValueError(f"channels {tuple(channels)} needs one width per stage of layers {tuple(layers)}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.grad_checkpointing = False
        self.conv1, self.bn1 = conv_bn(in_chans, out_chs=channels[0], kernel_size=3)
        self.act1 = nn.ReLU(inplace=True)
        # timm's feature_info: per feature, its channels, stride and module name
        self.feature_info: list[dict[str, Any]] = [dict(num_chs=channels[0], reduction=1, module="act1")]
        in_chs = channels[0]
        block_drop_paths = iter(drop_path_rates(drop_path_rate, sum(layers)))
        for i, (num_blocks, width) in enumerate(zip(layers, channels, strict=True)):
            stage = []
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(block(in_chs, width=width, stride=stride, drop_path=next(block_drop_paths)))
                in_chs = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            self.feature_info.append(dict(num_chs=in_chs, reduction=2 ** i, module=f"layer{i + 1}"))
        self.num_features = in_chs
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes, global_pool)
        self.init_weights()

    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if isinstance(module, (BasicBlock, Bottleneck)):
                # each residual branch starts as identity, which makes deep nets train from step one
                nn.init.zeros_(getattr(module, module.last_bn).weight)

    # --- timm model API ------------------------------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        return set()

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise LR decay: the stem, then per stage (coarse) or per block."""
        return dict(stem=r"^conv1|^bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for num_classes (0: none), optionally with another pooling type."""
        pool_type = self.global_pool.pool_type if global_pool is None else global_pool
        if not pool_type and num_classes > 0:
            raise ValueError("global_pool='' leaves a feature map that a linear classifier cannot take; "
                             "use num_classes=0 for the unpooled features")
        self.num_classes = num_classes
        self.global_pool: GlobalPool2d = GlobalPool2d(pool_type, input_fmt="NCHW")
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self.fc.train(self.training)

    def stages(self) -> list[nn.Module]:
        return [module for name, module in self.named_children() if name.startswith("layer")]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] images -> [B, num_features, H / 8, W / 8] (four stages)."""
        x = self.act1(self.bn1(self.conv1(x)))
        for stage in self.stages():
            x = run_block(stage, x, self.grad_checkpointing)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """forward_features' map -> logits, or with pre_logits the pooled [B, head_hidden_size] features."""
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | Sequence[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The stem's output (feature 0) and each stage's ([B, C, H, W]); `indices` None = all, n = the last n, a
        list = those. There is no final norm, so `norm` changes nothing (accepted for timm's interface)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r}: a ResNet's features are 'NCHW'")
        stages = self.stages()
        taken, last = take_indices(len(stages) + 1, indices)
        x = self.act1(self.bn1(self.conv1(x)))
        intermediates = [x] if 0 in taken else []
        for i, stage in enumerate(stages[:last] if stop_early else stages, start=1):
            x = run_block(stage, x, self.grad_checkpointing)
            if i in taken:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Empty the stages after the last of `indices` (the attribute names stay); the head goes with them or on
        request. Returns the absolute indices."""
        stages = self.stages()
        taken, last = take_indices(len(stages) + 1, indices)
        for i in range(last + 1, len(stages) + 1):
            setattr(self, f"layer{i}", nn.Sequential())
        if last < len(stages):
            self.num_features = self.feature_info[last]["num_chs"]
        if prune_head or last < len(stages):
            self.reset_classifier(0, "")
        return taken


def _create(variant: str, pretrained: bool, **kwargs) -> ResNet:
    # features_only hooks 'act1' and the stages in place (timm's FeatureListNet), NCHW, all five by default
    return build_model_with_cfg(ResNet, variant, pretrained, **kwargs)


default_cfgs = make_default_cfgs(
    # pool_size: the last stage's map at 32 px (stride 8); a CNN takes any size, but we test at the train size
    {name: dict(CIFAR10_CFG, pool_size=(4, 4), test_input_size=CIFAR10_CFG["input_size"], test_crop_pct=1.0)
     for name in ("resnet18_cifar", "resnet50_cifar")},
    classifier="fc", first_conv="conv1", fixed_input_size=False, paper="resnet",
)


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 with the CIFAR stem."""
    return _create("resnet18_cifar", pretrained, **{**dict(block=BasicBlock, layers=(2, 2, 2, 2)), **kwargs})


@register_model
def resnet50_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-50 with the CIFAR stem."""
    return _create("resnet50_cifar", pretrained, **{**dict(block=Bottleneck, layers=(3, 4, 6, 3)), **kwargs})

