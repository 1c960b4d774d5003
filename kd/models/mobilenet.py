"""The half-width MobileNetV2 of the CIFAR distillation benchmarks (RepDistiller's `mobile_half`,
mdistiller's `MobileNetV2`; from Jin et al.'s Route Constrained Optimization code), registered as
`mobilenetv2`. Module and parameter names follow their code (`conv1`, `blocks.K.J.conv.I`,
`conv2`, `classifier.0`) so their published checkpoints load with load_state_dict as they are.
"""
import torch.nn as nn

from kd.models.registry import Classifier, init_like_reference, register_model

# (expansion, channels at width 1, blocks, first block's stride) per group of inverted residual
# blocks; the expansion None stands for T. The second group keeps stride 1 where ImageNet's
# MobileNetV2 has 2, so 32x32 images reach 2x2 before the pooling.
GROUPS = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
          (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1)]


def conv_bn_relu(in_channels, out_channels, kernel_size, stride=1):
    """conv (no bias), BN, ReLU as one Sequential (keys `.0.weight`, `.1.running_mean`, ...)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),  # its input is no point, so in place is safe
    )


class InvertedResidual(nn.Module):
    """1x1 expansion by `expansion` (even when it is 1, as in the reference), 3x3 depthwise
    convolution with `stride`, linear 1x1 projection (BN, no ReLU); plus the input when the
    shapes allow (stride 1, same channels)."""

    def __init__(self, in_channels, out_channels, stride, expansion):
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.residual else out  # fixed at construction, so fx traces it


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 images (x: N x 3 x H x W -> logits N x num_classes; any side from
    16 pixels runs), expansion T, channels scaled by `width` (the last 1x1 convolution keeps 1280
    up to width 1).

    A stride-2 3x3 stem to 16x16, seven groups of inverted residual blocks down to 2x2, a 1x1
    convolution to 1280 channels, global average pooling and one linear layer.
    """

    def __init__(self, expansion=6, width=0.5, num_classes=10):
        super().__init__()
        in_channels = int(32 * width)
        self.conv1 = conv_bn_relu(3, in_channels, 3, stride=2)
        groups = []
        for t, channels, n, stride in GROUPS:
            out_channels = int(channels * width)
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(InvertedResidual(in_channels, out_channels, s,
                                               expansion if t is None else t))
                in_channels = out_channels
            groups.append(nn.Sequential(*blocks))
        self.blocks = nn.ModuleList(groups)
        last_channels = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = conv_bn_relu(in_channels, last_channels, 1)
        # the reference's AvgPool2d(2, ceil_mode=True) averages the whole 2x2 map of a 32x32
        # input; pooling adaptively to 1x1 is the same there and runs at any size (no
        # parameters: the keys are the reference's)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # a Sequential only for the reference's key names (classifier.0.weight)
        self.classifier = nn.Sequential(Classifier(last_channels, num_classes))
        init_like_reference(self)  # the reference's normal(0, sqrt(2 / (k * k * out_channels)))
        nn.init.normal_(self.classifier[0].weight, 0, 0.01)
        nn.init.zeros_(self.classifier[0].bias)

    def forward(self, x):
        out = self.conv1(x)
        for group in self.blocks:
            out = group(out)
        out = self.avgpool(self.conv2(out)).flatten(1)
        return self.classifier(out)

    def feature_points(self):
        # as mdistiller's mobilenetv2.py: feats = conv1, then groups 1, 2, 4 and 6 (at 16, 8,
        # 4 and 2 pixels); pooled_feat = the pooled 1280 channels. The blocks end in a linear
        # projection with no ReLU after it, and the reference returns the same tensors when
        # asked for pre-activations, so each stage's pre-activation point is the stage itself.
        points = {'stem': 'conv1'}
        for i, group in enumerate((1, 2, 4, 6), 1):
            points[f'stage{i}'] = points[f'stage{i}_pre'] = f'blocks.{group}'
        points['pooled'] = 'classifier:in'
        return points

    def bn_before_relu(self):
        # as mdistiller's mobilenetv2.py get_bn_before_relu: the projection BN of the last
        # block of groups 1, 2, 4 and 6 (no ReLU follows in the network: the reference's)
        return {f'stage{i}_pre': f'blocks.{group}.{len(self.blocks[group]) - 1}.conv.7'
                for i, group in enumerate((1, 2, 4, 6), 1)}


@register_model('mobilenetv2', min_size=16)  # five stride-2 layers: 32x32 -> 2x2
def mobilenetv2(num_classes=10):
    """The benchmarks' MobileNetV2 (T=6, width 0.5), a student: 0.81M parameters at 100 classes."""
    return MobileNetV2(6, 0.5, num_classes)
