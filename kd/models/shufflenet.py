"""The CIFAR ShuffleNets of RepDistiller (Tian et al., 2020) and mdistiller, the students of the
heterogeneous benchmark pairs (resnet32x4 -> shufflev1 / shufflev2, wrn_40_2 -> shufflev1):
`shufflev1` (ShuffleNet, Zhang et al., 2018: 3 groups, stages of 240-480-960 channels) and
`shufflev2` (ShuffleNet V2, Ma et al., 2018, width 1: stages of 116-232-464 channels).

Module and parameter names follow their code (`layer1.0.conv1`, `bn3`, `linear`) so their
checkpoints load with load_state_dict as they are. As there, both keep PyTorch's default
initialisation and a 1x1 stem at full resolution (no stride, no max-pool).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from kd.models.registry import Classifier, register_model, stage_points


def channel_shuffle(x, groups):
    """(N, C, H, W) -> (N, C, H, W), channel g * (C / groups) + i moved to i * groups + g.

    Written with unflatten/flatten rather than unpacking x.size(), so torch.fx can trace it.
    """
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class ShuffleBottleneck(nn.Module):
    """ShuffleNet unit: grouped 1x1 conv, channel shuffle, 3x3 depthwise conv, grouped 1x1 conv.

    With stride 2 the shortcut is a 3x3 average pool whose output is concatenated (so the unit
    adds `in_channels` channels to its `out_channels`); with stride 1 it is added.
    """

    def __init__(self, in_channels, out_channels, stride, groups):
        super().__init__()
        mid_channels = out_channels // 4
        # the first unit sees the 24-channel stem, too few channels to split into groups
        self.groups1 = 1 if in_channels == 24 else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, groups=self.groups1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, mid_channels, 3, stride, 1, groups=mid_channels,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(mid_channels, out_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()  # parameter-free either way, as in the reference
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))
        self.relu_out = nn.ReLU()  # a module (no parameters): its input is the pre-activation point

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.groups1)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return self.relu_out(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    """ShuffleNet for 32x32 inputs: 1x1 stem of 24 channels, three stages each opened by a
    stride-2 unit (32 -> 16 -> 8 -> 4), global average pool, linear classifier.

    out_channels: each stage's output channels; num_blocks: units per stage; groups: the
    grouped convolutions' groups (each stage's width divided by 4 must split into them).
    """

    def __init__(self, out_channels, num_blocks, groups, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        for i, (width, n) in enumerate(zip(out_channels, num_blocks), 1):
            # the opening unit's concatenated shortcut supplies in_channels of the stage's width
            units = [ShuffleBottleneck(in_channels, width - in_channels, 2, groups)]
            units += [ShuffleBottleneck(width, width, 1, groups) for _ in range(n - 1)]
            self.add_module(f'layer{i}', nn.Sequential(*units))
            in_channels = width
        self.linear = Classifier(in_channels, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        # the reference's avg_pool2d(out, 4) over the 4x4 map of a 32x32 input
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)

    def feature_points(self):
        # as mdistiller's ShuffleNetv1.py: feats = the stem's ReLU output, layer1..3; preact =
        # each stage's last unit before its final ReLU (its `is_last` output); pooled_feat =
        # the average-pooled embedding
        stages = ['layer1', 'layer2', 'layer3']
        last = [f'{s}.{len(getattr(self, s)) - 1}.relu_out:in' for s in stages]
        return stage_points(stages, last, 'layer1:in', 'linear:in')

    def bn_before_relu(self):
        # mdistiller names none (OFD refuses a ShuffleNet teacher there); the rule of its
        # ResNets: each stage's last unit (stride 1, an added shortcut) has bn3 before relu_out
        return {f'stage{i}_pre': f'{s}.{len(getattr(self, s)) - 1}.bn3'
                for i, s in enumerate(['layer1', 'layer2', 'layer3'], 1)}


class ShuffleV2Block(nn.Module):
    """ShuffleNet V2 basic unit: the channels split in halves; the second goes through 1x1 conv,
    3x3 depthwise conv, 1x1 conv; the halves are concatenated and shuffled (2 groups)."""

    def __init__(self, channels):
        super().__init__()
        self.split_at = channels // 2
        half = channels - self.split_at
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.relu_out = nn.ReLU()  # a module (no parameters): its input is the pre-activation point

    def forward(self, x):
        x1, x2 = x[:, :self.split_at], x[:, self.split_at:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn3(self.conv3(self.bn2(self.conv2(out))))
        # The reference computes cat([x1, relu(out)]) and, as the pre-activation, cat([x1, out])
        # (unshuffled). x1 is a ReLU output (the stem's, a down-sampling unit's or the previous
        # unit's), which ReLU leaves unchanged, value and gradient: so the ReLU of that
        # pre-activation is the reference's output, and relu_out's input is its pre-activation.
        out = self.relu_out(torch.cat([x1, out], 1))
        return channel_shuffle(out, 2)


class ShuffleV2DownBlock(nn.Module):
    """ShuffleNet V2 down-sampling unit: two stride-2 branches over the whole input (3x3
    depthwise conv, 1x1 conv | 1x1 conv, 3x3 depthwise conv, 1x1 conv), each giving half of
    `out_channels`, concatenated and shuffled (2 groups)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = out_channels // 2
        # left branch
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNet V2 for 32x32 inputs: 1x1 stem of 24 channels, three stages each opened by a
    down-sampling unit (32 -> 16 -> 8 -> 4), a 1x1 conv to `out_channels[3]` channels, global
    average pool, linear classifier.

    out_channels: the three stages' widths and the last conv's; num_blocks: basic units per
    stage after its down-sampling unit.
    """

    def __init__(self, out_channels, num_blocks, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_channels = 24
        for i, (width, n) in enumerate(zip(out_channels[:3], num_blocks), 1):
            units = [ShuffleV2DownBlock(in_channels, width)]
            units += [ShuffleV2Block(width) for _ in range(n)]
            self.add_module(f'layer{i}', nn.Sequential(*units))
            in_channels = width
        self.conv2 = nn.Conv2d(in_channels, out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = Classifier(out_channels[3], num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.relu(self.bn2(self.conv2(out)))
        # the reference's avg_pool2d(out, 4) over the 4x4 map of a 32x32 input
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)

    def feature_points(self):
        # as mdistiller's ShuffleNetv2.py: feats = the stem's ReLU output, layer1..3 (before the
        # last 1x1 conv); preact = each stage's last unit's cat([x1, branch]) before the ReLU and
        # the shuffle (so its channels are in another order than the stage's); pooled_feat =
        # the average-pooled embedding after the last conv. No bn_before_relu: half of each
        # pre-activation's channels come from no BatchNorm (x1), so no BN gives its margins
        # (mdistiller names none either)
        stages = ['layer1', 'layer2', 'layer3']
        last = [f'{s}.{len(getattr(self, s)) - 1}.relu_out:in' for s in stages]
        return stage_points(stages, last, 'layer1:in', 'linear:in')


@register_model('shufflev1', min_size=8)
def shufflev1(num_classes=10):
    """ShuffleNet (3 groups; 4, 8, 4 units), a student: 0.95M parameters at 100 classes."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes)


@register_model('shufflev2', min_size=8)
def shufflev2(num_classes=10):
    """ShuffleNet V2 (width 1; 3, 7, 3 basic units), a student: 1.36M parameters at 100 classes."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes)
