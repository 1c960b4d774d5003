"""The CIFAR VGGs with BatchNorm of RepDistiller (Tian et al., 2020) and mdistiller: `vgg8`,
`vgg11`, `vgg13`, `vgg16`, `vgg19`, registered by their names there (their `vggN_bn`). Module
and parameter names follow their code (`block0`..`block4`, `classifier`; the parameter-free
`pool0`, `pool1`, `pool2`, `pool4`) so their published teacher checkpoints load with
load_state_dict as they are.
"""
import torch.nn as nn

from kd.models.registry import Classifier, init_like_reference, register_model, stage_points

# The convolution widths of the five blocks (max-pools after the first three), per depth: the
# reference's configurations 'S', 'A', 'B', 'D', 'E'. The depth counts as in Simonyan &
# Zisserman's VGG: the convolutions plus three fully connected layers (here one linear layer).
WIDTHS = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512],
         [512, 512, 512, 512]],
}


def vgg_block(in_channels, widths):
    """conv3x3(+bias)-BN-ReLU per width, without the last ReLU: the block ends at its last BN,
    the pre-activation point, and VGG applies that ReLU as a module of its own.

    Indices in the Sequential are the reference's (conv, bn, relu, conv, bn, ...), so the keys
    are `blockK.0.weight`, `blockK.1.running_mean`, ...
    """
    layers = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]  # its input is no point, so in place is safe
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """VGG-depth with BatchNorm for 32x32 images (x: N x 3 x H x W -> logits N x num_classes; any
    side from 8 pixels runs).

    Five blocks at 32, 16, 8, 4 and 4 pixels (on 32x32 images): max-pools after blocks 0-2 only,
    then global average pooling and one linear layer on the 512 channels (no fully connected
    stack).
    """

    def __init__(self, depth, num_classes=10):
        super().__init__()
        if depth not in WIDTHS:
            raise ValueError(f'a CIFAR VGG has depth {", ".join(map(str, WIDTHS))}, not {depth}')
        in_channels = 3
        for i, widths in enumerate(WIDTHS[depth]):
            self.add_module(f'block{i}', vgg_block(in_channels, widths))
            # parameter-free modules: relu{i}'s output is the stage's point, its input the
            # pre-activation
            self.add_module(f'relu{i}', nn.ReLU())
            in_channels = widths[-1]
        self.pool0 = nn.MaxPool2d(2, 2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.pool2 = nn.MaxPool2d(2, 2)
        # The reference also defines pool3 and applies it only to 64x64 inputs (its TinyImageNet
        # setting); on 32x32 images block4 runs at block3's 4x4. pool3 has no parameters, so
        # leaving it out changes no checkpoint key, and the forward needs no branch on the
        # input's size (which torch.fx, used for the teacher's folded form, cannot trace). So on
        # 64x64 images block4 runs at 8x8 here, at 4x4 in the reference: the same parameters,
        # four times block4's multiply-accumulates, and another network than its TinyImageNet one.
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = Classifier(in_channels, num_classes)
        init_like_reference(self)  # the reference's normal(0, sqrt(2 / (k * k * out_channels)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x):
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        x = self.relu4(self.block4(x))
        return self.classifier(self.pool4(x).flatten(1))

    def feature_points(self):
        # as mdistiller's vgg.py: feats = relu(block0), relu(block1..4) (before each max-pool);
        # preact_feats[1:] = block1..4 themselves (they end at a BN); pooled_feat = the
        # average-pooled 512 channels
        return stage_points([f'relu{i}' for i in range(1, 5)],
                            [f'block{i}' for i in range(1, 5)], 'relu0', 'classifier:in')

    def bn_before_relu(self):
        # as mdistiller's vgg.py get_bn_before_relu: block1..4's last layer, a BN
        return {f'stage{i}_pre': f'block{i}.{len(getattr(self, f"block{i}")) - 1}'
                for i in range(1, 5)}


@register_model('vgg8', min_size=8)
def vgg8(num_classes=10):
    """VGG-8 with BatchNorm, a student (vgg13's): 3.97M parameters at 100 classes."""
    return VGG(8, num_classes)


@register_model('vgg11', min_size=8)
def vgg11(num_classes=10):
    """VGG-11 with BatchNorm: 9.28M parameters at 100 classes."""
    return VGG(11, num_classes)


@register_model('vgg13', min_size=8)
def vgg13(num_classes=10):
    """VGG-13 with BatchNorm, a teacher: 9.46M parameters at 100 classes."""
    return VGG(13, num_classes)


@register_model('vgg16', min_size=8)
def vgg16(num_classes=10):
    """VGG-16 with BatchNorm: 14.77M parameters at 100 classes."""
    return VGG(16, num_classes)


@register_model('vgg19', min_size=8)
def vgg19(num_classes=10):
    """VGG-19 with BatchNorm: 20.09M parameters at 100 classes."""
    return VGG(19, num_classes)
