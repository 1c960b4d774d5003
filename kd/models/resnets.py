"""The CIFAR ResNets, Wide ResNets and ResNet-50 of RepDistiller (Tian et al., 2020) and mdistiller,
registered by their names there (their `ResNet50` is `resnet50` here). Module and parameter names
follow their code (`downsample`, `convShortcut`, `block1.layer`, `fc`; `shortcut` and `linear` in
ResNet-50) so their published teacher checkpoints load with load_state_dict as they are.
"""
from collections import OrderedDict

import torch.nn as nn
import torch.nn.functional as F

from kd.models.registry import Classifier, init_like_reference, register_model, stage_points

class ResNetBlock(nn.Module):
    """BasicBlock of the CIFAR ResNets: as models.BasicBlock, with the projection named `downsample`
    (None for an identity shortcut) and no zero-initialized BN scale."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu_out = nn.ReLU()  # a module (no parameters): its input is the pre-activation point
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu_out(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet: 3x3 stem, three stages of n = (depth - 2) / 6 blocks at 32x32, 16x16, 8x8.

    `widths` = (stem, stage1, stage2, stage3) channels.
    """

    def __init__(self, depth, widths, num_classes=10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f'a CIFAR ResNet has depth 6n+2, not {depth}')
        n = (depth - 2) // 6
        stem, *stage_widths = widths
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        in_channels = stem
        for i, (out_channels, stride) in enumerate(zip(stage_widths, (1, 2, 2)), 1):
            blocks = [ResNetBlock(in_channels, out_channels, stride)]
            blocks += [ResNetBlock(out_channels, out_channels) for _ in range(n - 1)]
            self.add_module(f'layer{i}', nn.Sequential(*blocks))
            in_channels = out_channels
        self.fc = Classifier(in_channels, num_classes)
        init_like_reference(self)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)

    def feature_points(self):
        # as mdistiller's resnet.py: feats = stem, layer1..3; preact = each stage's last block
        # before its final ReLU; pooled_feat = the average-pooled embedding
        stages = ['layer1', 'layer2', 'layer3']
        last = [f'{s}.{len(getattr(self, s)) - 1}.relu_out:in' for s in stages]
        return stage_points(stages, last, 'layer1:in', 'fc:in')

    def bn_before_relu(self):
        # as mdistiller's resnet.py get_bn_before_relu: each stage's last block's bn2
        return {f'stage{i}_pre': f'{s}.{len(getattr(self, s)) - 1}.bn2'
                for i, s in enumerate(['layer1', 'layer2', 'layer3'], 1)}


class WideBlock(nn.Module):
    """Pre-activation block of Wide ResNets: BN-ReLU-conv3x3 twice, plus the shortcut."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.convShortcut = None
        if stride != 1 or in_channels != out_channels:
            self.convShortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        # an identity shortcut carries the raw input; a projection takes the pre-activated one
        # (as in Zagoruyko & Komodakis' code, which the published WRN teachers were trained with)
        return out + (x if self.convShortcut is None else self.convShortcut(pre))


class WideResNet(nn.Module):
    """Wide ResNet WRN-depth-k for CIFAR (no dropout): stages of 16k-32k-64k channels, n = (depth - 4) / 6
    blocks each, and a final BN-ReLU since the blocks are pre-activation."""

    def __init__(self, depth, widen_factor, num_classes=10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f'a Wide ResNet has depth 6n+4, not {depth}')
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        in_channels = 16
        for i, (width, stride) in enumerate(zip((16, 32, 64), (1, 2, 2)), 1):
            out_channels = width * widen_factor
            blocks = [WideBlock(in_channels, out_channels, stride)]
            blocks += [WideBlock(out_channels, out_channels) for _ in range(n - 1)]
            # the extra `layer` level only reproduces the reference key names (block1.layer.0...)
            self.add_module(f'block{i}', nn.Sequential(OrderedDict(layer=nn.Sequential(*blocks))))
            in_channels = out_channels
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.fc = Classifier(in_channels, num_classes)
        init_like_reference(self)
        nn.init.zeros_(self.fc.bias)  # as the reference WRN does

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)

    def feature_points(self):
        # as RepDistiller's and mdistiller's wrn.py: feats = conv1, block1, block2, block3 (the
        # last stage before the final BN-ReLU); preact = the next BN applied to each stage's
        # output (block2/block3's first bn1, then bn1). The reference calls those BNs a second
        # time to get them, updating their running statistics twice per step; a hook reads the
        # same values from the one call.
        return stage_points(['block1', 'block2', 'block3'],
                            ['block2.layer.0.bn1', 'block3.layer.0.bn1', 'bn1'], 'conv1',
                            'fc:in')

    def bn_before_relu(self):
        # as mdistiller's wrn.py get_bn_before_relu: the pre-activation points are these BNs
        return {'stage1_pre': 'block2.layer.0.bn1', 'stage2_pre': 'block3.layer.0.bn1',
                'stage3_pre': 'bn1'}


class Bottleneck(nn.Module):
    """Bottleneck block of ResNet-50: conv1x1-conv3x3 (stride here)-conv1x1 to 4x `planes` channels,
    with the projection named `shortcut` (an empty Sequential for an identity shortcut)."""

    expansion = 4

    def __init__(self, in_channels, planes, stride=1):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu_out = nn.ReLU()  # a module (no parameters): its input is the pre-activation point
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu_out(out + self.shortcut(x))


class BottleneckResNet(nn.Module):
    """ResNet of Bottleneck blocks with a CIFAR stem (one 3x3 convolution, no max-pool): four stages
    of 64-128-256-512 planes (x4 channels out) at 32x32, 16x16, 8x8, 4x4, `num_blocks` blocks each.
    Input (N, 3, 32, 32), output (N, num_classes) logits.
    """

    def __init__(self, num_blocks, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_channels = 64
        for i, (planes, blocks, stride) in enumerate(zip((64, 128, 256, 512), num_blocks,
                                                         (1, 2, 2, 2)), 1):
            layer = [Bottleneck(in_channels, planes, stride)]
            in_channels = planes * Bottleneck.expansion
            layer += [Bottleneck(in_channels, planes) for _ in range(blocks - 1)]
            self.add_module(f'layer{i}', nn.Sequential(*layer))
        self.linear = Classifier(in_channels, num_classes)
        init_like_reference(self)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)

    def feature_points(self):
        # as mdistiller's resnetv2.py: feats = stem, layer1..4; preact = each stage's last block
        # before its final ReLU; pooled_feat = the average-pooled embedding
        stages = ['layer1', 'layer2', 'layer3', 'layer4']
        last = [f'{s}.{len(getattr(self, s)) - 1}.relu_out:in' for s in stages]
        return stage_points(stages, last, 'layer1:in', 'linear:in')

    def bn_before_relu(self):
        # as mdistiller's resnetv2.py get_bn_before_relu: each stage's last block's bn3
        return {f'stage{i}_pre': f'{s}.{len(getattr(self, s)) - 1}.bn3'
                for i, s in enumerate(['layer1', 'layer2', 'layer3', 'layer4'], 1)}


@register_model('resnet8', min_size=4)
def resnet8(num_classes=10):
    """ResNet-8 (16-16-32-64 channels, one block per stage): 0.08M parameters at 100 classes."""
    return CifarResNet(8, (16, 16, 32, 64), num_classes)


@register_model('resnet14', min_size=4)
def resnet14(num_classes=10):
    """ResNet-14 (16-16-32-64 channels): 0.18M parameters at 100 classes."""
    return CifarResNet(14, (16, 16, 32, 64), num_classes)


@register_model('resnet20', min_size=4)
def resnet20(num_classes=10):
    """ResNet-20 (16-16-32-64 channels), resnet56's and resnet110's student: 0.28M parameters at
    100 classes."""
    return CifarResNet(20, (16, 16, 32, 64), num_classes)


@register_model('resnet32', min_size=4)
def resnet32(num_classes=10):
    """ResNet-32 (16-16-32-64 channels), resnet110's student: 0.47M parameters at 100 classes."""
    return CifarResNet(32, (16, 16, 32, 64), num_classes)


@register_model('resnet44', min_size=4)
def resnet44(num_classes=10):
    """ResNet-44 (16-16-32-64 channels): 0.67M parameters at 100 classes."""
    return CifarResNet(44, (16, 16, 32, 64), num_classes)


@register_model('resnet56', min_size=4)
def resnet56(num_classes=10):
    """ResNet-56 (16-16-32-64 channels), a teacher: 0.86M parameters at 100 classes."""
    return CifarResNet(56, (16, 16, 32, 64), num_classes)


@register_model('resnet110', min_size=4)
def resnet110(num_classes=10):
    """ResNet-110 (16-16-32-64 channels), a teacher: 1.74M parameters at 100 classes."""
    return CifarResNet(110, (16, 16, 32, 64), num_classes)


@register_model('resnet32x4', min_size=4)
def resnet32x4(num_classes=10):
    """ResNet-32x4, the usual CIFAR-100 teacher: 7.43M parameters at 100 classes."""
    return CifarResNet(32, (32, 64, 128, 256), num_classes)


@register_model('resnet8x4', min_size=4)
def resnet8x4(num_classes=10):
    """ResNet-8x4, resnet32x4's student: one block per stage, 1.23M parameters at 100 classes."""
    return CifarResNet(8, (32, 64, 128, 256), num_classes)


@register_model('wrn_40_2', min_size=4)
def wrn_40_2(num_classes=10):
    """WRN-40-2, a teacher: 2.26M parameters at 100 classes."""
    return WideResNet(40, 2, num_classes)


@register_model('wrn_16_2', min_size=4)
def wrn_16_2(num_classes=10):
    """WRN-16-2, wrn_40_2's student: 0.70M parameters at 100 classes."""
    return WideResNet(16, 2, num_classes)


@register_model('wrn_40_1', min_size=4)
def wrn_40_1(num_classes=10):
    """WRN-40-1, wrn_40_2's student: 0.57M parameters at 100 classes."""
    return WideResNet(40, 1, num_classes)


@register_model('wrn_16_1', min_size=4)
def wrn_16_1(num_classes=10):
    """WRN-16-1: 0.18M parameters at 100 classes."""
    return WideResNet(16, 1, num_classes)


@register_model('resnet50', min_size=8)
def resnet50(num_classes=10):
    """ResNet-50 for CIFAR (RepDistiller's `ResNet50`: Bottleneck blocks 3-4-6-3), a teacher:
    23.71M parameters at 100 classes."""
    return BottleneckResNet((3, 4, 6, 3), num_classes)

