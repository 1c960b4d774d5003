"""The networks, registered by name: the default pair TeacherNet ('resnet18') and StudentNet ('cnn'),
plus the CIFAR distillation benchmarks of RepDistiller/mdistiller (resnet32x4, resnet8x4, wrn_40_2, wrn_16_2).

`build_model(name, num_classes)` makes any of them; `register_model(name, points=...)` adds one.

Feature points. Feature distillers (FitNets, AT, CRD, ...) read intermediate tensors by name:
'stem' (the stem's output), 'stage1'..'stageN' (each stage's output), 'stage1_pre'..'stageN_pre'
(each stage's pre-activation output) and 'pooled' (the embedding the classifier takes): the
reference code's `feats[0]`, `feats[1:]`, `preact_feats[1:]` and `pooled_feat` (RepDistiller,
mdistiller). Each maps to a module path, 'path' for the module's output or 'path:in' for its
first input, so a model names its points without any change to its `forward`
(`feature_points(name, model)`; features.py takes them with forward hooks or from the traced
graph).
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

MODELS = {}  # name -> constructor called as constructor(num_classes=...)
POINTS = {}  # name -> {point name: 'module.path' or 'module.path:in'} given at registration


def register_model(name, points=None):
    """Decorator: make the class or function buildable as build_model(name, num_classes).

    points: the model's feature points, {name: 'module.path' | 'module.path:in'} (see the
    module docstring), for the feature distillers; a model whose class defines
    `feature_points()` needs none, and a model without points still trains with every logit
    loss.
    """
    def add(constructor):
        # refuse silently replacing a model: a checkpoint saved under a name must keep meaning one network
        if name in MODELS:
            raise ValueError(f'model {name!r} is already registered (as {MODELS[name]!r})')
        MODELS[name] = constructor
        if points is not None:
            POINTS[name] = dict(points)
        return constructor
    return add


def feature_points(name, model):
    """{point name: module path spec} of `model`, built as registered model `name`: the points
    given to register_model, else its class's `feature_points()`, else {} (no points)."""
    if name in POINTS:
        return dict(POINTS[name])
    method = getattr(model, 'feature_points', None)
    return dict(method()) if callable(method) else {}


def stage_points(stages, pre, stem, pooled):
    """The standard points from lists of stage paths and their pre-activation paths."""
    points = {'stem': stem}
    for i, (stage, before) in enumerate(zip(stages, pre), 1):
        points[f'stage{i}'] = stage
        points[f'stage{i}_pre'] = before
    points['pooled'] = pooled
    return points


def model_names():
    return sorted(MODELS)


def build_model(name, num_classes=10):
    """A new, freshly initialized model registered as `name`."""
    if name not in MODELS:
        raise KeyError(f'unknown model {name!r}; known models: {", ".join(model_names())}')
    return MODELS[name](num_classes=num_classes)


class Classifier(nn.Linear):
    """The last layer, computed in float32 even under autocast.

    Soft targets at T=4 divide the logits by 4 before the softmax: logits rounded to bf16 (8
    bits of mantissa) would quantise them visibly. The layer is tiny, so fp32 costs nothing.
    Parameter names are nn.Linear's, so checkpoints are unaffected.
    """

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))


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


# The CIFAR benchmarks of RepDistiller (Tian et al., 2020) and mdistiller. Module and parameter names follow
# their code (`downsample`, `convShortcut`, `block1.layer`, `fc`) so their published teacher checkpoints load
# with load_state_dict as they are.

def init_like_reference(model):
    """Kaiming-normal (fan_out) convolutions, BN scale 1 and shift 0: the init the published teachers used."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNetBlock(nn.Module):
    """BasicBlock of the CIFAR ResNets: as BasicBlock above, with the projection named `downsample`
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
        self.relu = nn.ReLU()  # a module (no parameters): its output is the last stage's point
        self.fc = Classifier(in_channels, num_classes)
        init_like_reference(self)
        nn.init.zeros_(self.fc.bias)  # as the reference WRN does

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)

    def feature_points(self):
        # as mdistiller's wrn.py: feats = conv1, block1, block2, relu(bn1(block3)); preact =
        # the next BN applied to each stage's output (block2/block3's first bn1, then bn1).
        # The reference calls those BNs a second time to get them, updating their running
        # statistics twice per step; a hook reads the same values from the one call.
        return stage_points(['block1', 'block2', 'relu'],
                            ['block2.layer.0.bn1', 'block3.layer.0.bn1', 'bn1'], 'conv1',
                            'fc:in')


@register_model('resnet32x4')
def resnet32x4(num_classes=10):
    """ResNet-32x4, the usual CIFAR-100 teacher: 7.43M parameters at 100 classes."""
    return CifarResNet(32, (32, 64, 128, 256), num_classes)


@register_model('resnet8x4')
def resnet8x4(num_classes=10):
    """ResNet-8x4, resnet32x4's student: one block per stage, 1.23M parameters at 100 classes."""
    return CifarResNet(8, (32, 64, 128, 256), num_classes)


@register_model('wrn_40_2')
def wrn_40_2(num_classes=10):
    """WRN-40-2, a teacher: 2.26M parameters at 100 classes."""
    return WideResNet(40, 2, num_classes)


@register_model('wrn_16_2')
def wrn_16_2(num_classes=10):
    """WRN-16-2, wrn_40_2's student: 0.70M parameters at 100 classes."""
    return WideResNet(16, 2, num_classes)


# airbench94's network (Jordan, arXiv 2404.00498): a patch-whitening 2x2 convolution, then three
# groups of two 3x3 convolutions with max-pooling between the first convolution and its BatchNorm,
# GELU, and a bias-free classifier whose logits are scaled by 1/9. Trained by the `fast` recipe,
# which initialises the whitening layer from data (init_whitening) and freezes the BatchNorm
# scales (freeze_norm_scales); under any other recipe they train as ordinary layers.

def fast_batchnorm(num_features, momentum=0.4, eps=1e-12):
    """A BatchNorm2d with fast running statistics: each batch moves them by 40% (momentum 0.4 in
    PyTorch's convention), so the few hundred steps of a short run end with statistics of the
    final weights. (A plain BatchNorm2d: it folds into its convolution and converts to
    SyncBatchNorm as any.) The fast recipe also freezes its scale (freeze_norm_scales)."""
    return nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)


class AirbenchGroup(nn.Module):
    """conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU; both convolutions start
    as the identity on their first in_channels filters (dirac), the rest as PyTorch's default."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = fast_batchnorm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = fast_batchnorm(out_channels)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                nn.init.dirac_(conv.weight[:conv.in_channels])

    def forward(self, x):
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    """airbench94's network; `widths` are the three groups' channels (64, 256, 256 in the paper).

    32x32 input -> whitening 2x2 conv (24 channels, no padding: 31x31) -> GELU -> groups at
    31x31, 15x15, 7x7 -> max-pool 3 -> linear (no bias) -> logits / 9.
    """

    WHITENING_EPS = 5e-4  # added to the patch covariance's eigenvalues (noise-free directions)

    def __init__(self, num_classes=10, widths=(64, 256, 256)):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, bias=True)  # 2 x (3 channels x 2 x 2 patch values)
        groups, in_channels = [], 24
        for width in widths:
            groups.append(AirbenchGroup(in_channels, width))
            in_channels = width
        self.groups = nn.Sequential(*groups)
        self.classifier = Classifier(in_channels, num_classes, bias=False)
        self.logit_scale = 1 / 9

    def forward(self, x):
        x = self.groups(F.gelu(self.whiten(x)))
        # scaling the features is scaling the logits (no bias), and the classifier's output
        # stays the logits, computed in float32
        return self.classifier(F.max_pool2d(x, 3).flatten(1) * self.logit_scale)

    def feature_points(self):
        groups = [f'groups.{i}' for i in range(len(self.groups))]
        return stage_points(groups, [f'{g}.norm2' for g in groups], 'groups.0:in',
                            'classifier:in')

    def freeze_norm_scales(self):
        """Keep every BatchNorm's scale at its value (1 from the start): only the biases train,
        as in airbench94 (the fast recipe calls this; the parameter groups then give those
        biases their own learning rate)."""
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.requires_grad_(False)

    @torch.no_grad()
    def init_whitening(self, images, chunk=500):
        """Make the first layer whiten 2x2 patches of `images` (N x 3 x 32 x 32, normalized) and
        freeze its filters (its bias stays trainable).

        With Sigma the covariance of the images' 2x2 patches (12 values) and Sigma = V diag(l) V^T,
        the 12 filters V^T / sqrt(l + eps) map the patches to coordinates whose covariance is the
        identity (up to eps); the other 12 filters are their negatives, so the GELU that follows
        passes both signs.
        """
        total = torch.zeros(12, dtype=torch.float64)
        outer = torch.zeros(12, 12, dtype=torch.float64)
        count = 0
        for start in range(0, len(images), chunk):
            patches = F.unfold(images[start:start + chunk].float(), 2)  # N x 12 x 31*31
            flat = patches.transpose(1, 2).reshape(-1, 12).double().cpu()
            total += flat.sum(0)
            outer += flat.T @ flat
            count += len(flat)
        mean = total / count
        covariance = outer / count - torch.outer(mean, mean)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors / torch.sqrt(eigenvalues + self.WHITENING_EPS)).T
        weight = torch.cat([filters, -filters]).reshape(self.whiten.weight.shape)
        self.whiten.weight.copy_(weight.to(self.whiten.weight.dtype))
        self.whiten.weight.requires_grad_(False)


@register_model('airbench94')
def airbench94(num_classes=10):
    """airbench94's network (64/256/256 channels), the fast recipe's teacher: 1.97M parameters."""
    return AirbenchNet(num_classes, (64, 256, 256))


@register_model('airbench94_small')
def airbench94_small(num_classes=10):
    """The same family at 32/64/64 channels, the fast recipe's student."""
    return AirbenchNet(num_classes, (32, 64, 64))


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
