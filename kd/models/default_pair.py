"""The project's first pair: TeacherNet ('resnet18'), a ResNet-18 for 32x32 images, and StudentNet
('cnn'), a compact CNN. Registered by name like every other model."""
import torch.nn as nn
import torch.nn.functional as F

from kd.models.registry import Classifier, register_model, stage_points


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # Zero-initialized last BN scale (Goyal et al., 2017): each block starts as its shortcut,
        # which keeps the first steps at lr 0.1 from blowing up the loss.
        nn.init.zeros_(self.bn2.weight)
        self.relu_out = nn.ReLU()  # a module (no parameters): its input is the pre-activation point
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu_out(out + self.shortcut(x))


@register_model('resnet18', min_size=8)
class TeacherNet(nn.Module):
    """ResNet-18 for CIFAR: 3x3 stem without max-pool, stages of 64-128-256-512 channels.

    About 11.17M parameters and 0.56 GMACs per 32x32 image.
    """

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, in_channels = [], 64
        for out_channels, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            stages.append(nn.Sequential(BasicBlock(in_channels, out_channels, stride),
                                        BasicBlock(out_channels, out_channels, 1)))
            in_channels = out_channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = Classifier(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)

    def feature_points(self):
        stages = [f'layer{i}' for i in range(1, 5)]
        return stage_points(stages, [f'{s}.1.relu_out:in' for s in stages], 'layer1:in',
                            'linear:in')

    def bn_before_relu(self):
        # as mdistiller's ResNets: each stage's last block's bn2
        return {f'stage{i}_pre': f'layer{i}.1.bn2' for i in range(1, 5)}


def conv_bn_relu(in_channels, out_channels, pool=False):
    # Pooling sits between the convolution and BatchNorm (as in airbench): the second convolution
    # of each block then runs at a quarter of the pixels, which is where the FLOP budget goes.
    layers = [nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    # not in place: the BatchNorm's output is a feature point (stage_pre) that must survive
    layers += [nn.BatchNorm2d(out_channels), nn.ReLU()]
    return nn.Sequential(*layers)


@register_model('cnn', min_size=8)
class StudentNet(nn.Module):
    """A plain CNN (conv-BN-ReLU blocks with max-pooling, global average pooling, no residuals).

    About 1.16M parameters (10% of TeacherNet) and 0.087 GMACs per image (16% of TeacherNet).
    """

    def __init__(self, num_classes=10, widths=(32, 64, 128, 256)):
        super().__init__()
        stem, w1, w2, w3 = widths
        self.features = nn.Sequential(
            conv_bn_relu(3, stem),
            conv_bn_relu(stem, w1, pool=True), conv_bn_relu(w1, w1),   # 32x32 -> 16x16
            conv_bn_relu(w1, w2, pool=True), conv_bn_relu(w2, w2),     # 16x16 -> 8x8
            conv_bn_relu(w2, w3, pool=True), conv_bn_relu(w3, w3),     # 8x8 -> 4x4
        )
        self.classifier = Classifier(w3, num_classes)

    def forward(self, x):
        # average, not max, pooling: max-pooled features made early logits explode at lr 0.1
        out = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(out)

    def feature_points(self):
        # the stages end at 16x16, 8x8 and 4x4: the second block of each resolution
        return stage_points(['features.2', 'features.4', 'features.6'],
                            ['features.2.1', 'features.4.1', 'features.6.1'], 'features.0',
                            'classifier:in')

    def bn_before_relu(self):
        # the pre-activation points are these BNs
        return {f'stage{i}_pre': f'features.{j}.1' for i, j in enumerate((2, 4, 6), 1)}
