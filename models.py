"""The networks, registered by name: the default pair TeacherNet ('resnet18') and StudentNet ('cnn')
here; the CIFAR distillation benchmarks of RepDistiller/mdistiller in cifar_resnets.py (and the
other family files), airbench94's networks in airbench_nets.py. Importing this module registers
them all, and every public name stays importable from here.

`build_model(name, num_classes)` makes any of them; `register_model(name, points=...)` adds one
(model_base.py holds the registry).

Every model names its feature points (stem, stages, pre-activations, pooled embedding) for the
feature distillers: model_base.py's docstring says how.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# the other families register themselves when imported; their names stay importable from here
from airbench_nets import AirbenchGroup, AirbenchNet, airbench94, airbench94_small  # noqa: F401
from cifar_resnets import (Bottleneck, BottleneckResNet, CifarResNet, ResNetBlock,  # noqa: F401
                           WideBlock, WideResNet, resnet8, resnet8x4, resnet14, resnet20, resnet32,
                           resnet32x4, resnet44, resnet50, resnet56, resnet110, wrn_16_1, wrn_16_2,
                           wrn_40_1, wrn_40_2)
from mobilenet_nets import InvertedResidual, MobileNetV2, mobilenetv2  # noqa: F401
from model_base import (BN_BEFORE_RELU, MODELS, POINTS, Classifier,  # noqa: F401
                        bn_before_relu, build_model, feature_points, init_like_reference,
                        model_names, register_model, stage_points)
from shufflenet_nets import ShuffleNetV1, ShuffleNetV2, shufflev1, shufflev2  # noqa: F401
from vgg_nets import VGG, vgg8, vgg11, vgg13, vgg16, vgg19  # noqa: F401


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


@register_model('resnet18')
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


@register_model('cnn')
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


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def count_macs(model, input_size=(1, 3, 32, 32)):
    """Multiply-accumulates of the convolutions and linear layers for one forward pass."""
    macs = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            k = module.weight[0].numel()  # in_channels/groups * kh * kw
            macs.append(output.numel() * k)
        elif isinstance(module, nn.Linear):
            macs.append(output.numel() * module.in_features)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(input_size))
    model.train(was_training)
    for h in handles:
        h.remove()
    return sum(macs) // input_size[0]


def model_table(names=None):
    """The README's model table, in Markdown: every registered model (or those in `names`) with
    its parameters at 10 and 100 classes, its multiply-accumulates per 32x32 image (10 classes)
    and the first paragraph of its docstring; the default pair first, then by name."""
    lines = ['| model (`--teacher-arch` / `--student-arch`) | parameters, 10 classes | 100 classes '
             '| multiply-accumulates per image | what it is |', '|---|---:|---:|---:|---|']
    for name in sorted(names or MODELS,
                       key=lambda n: (n not in ('resnet18', 'cnn'), n != 'resnet18', n)):
        doc = ' '.join((MODELS[name].__doc__ or '').strip().split('\n\n')[0].split())
        lines.append(f'| `{name}` | {count_parameters(build_model(name, 10)):,} | '
                     f'{count_parameters(build_model(name, 100)):,} | '
                     f'{count_macs(build_model(name, 10)) / 1e6:,.1f} M | {doc} |')
    return '\n'.join(lines)
