"""The VGGs with BatchNorm (vgg_nets.py) and the half-width MobileNetV2 (mobilenet_nets.py) of
RepDistiller / mdistiller: parameter counts, logits, feature points and key names equal to the
reference code's, and the points equal to the reference forward's feats.

Counts and shapes below were taken by running the reference code: RepDistiller commit
b84f547c5db6a35318d4671d7d5c4de74c822403 (models/vgg.py vggN_bn, models/mobilenetv2.py
mobile_half) for the parameters and key names, mdistiller commit
a08d46f10d6102bd6e3f258ca5ac880b020ea259 (models/cifar/vgg.py, mobilenetv2.py) for feats /
preact_feats / pooled_feat.
"""
import functools
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kd.methods.plan import point_shapes
from kd.models.features import WithPoints
from kd.models import build_model, count_parameters, feature_points, model_names
from kd.run.teacher_form import fold_batchnorm

# name: (parameters at 10 classes, at 100 classes)
PARAMS = {
    'vgg8': (3_918_858, 3_965_028),
    'vgg11': (9_231_114, 9_277_284),
    'vgg13': (9_416_010, 9_462_180),
    'vgg16': (14_728_266, 14_774_436),
    'vgg19': (20_040_522, 20_086_692),
    'mobilenetv2': (697_546, 812_836),
}

# the reference's feats[0..4] shapes (C, H, W) for one image, and pooled_feat's (C,); where the
# reference returns preact_feats (the VGGs), preact_feats[i] has feats[i]'s shape
VGG_FEATS = ([(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)], 512)
FEATS = {
    'vgg8': VGG_FEATS, 'vgg11': VGG_FEATS, 'vgg13': VGG_FEATS, 'vgg16': VGG_FEATS,
    'vgg19': VGG_FEATS,
    'mobilenetv2': ([(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)], 1280),
}

with open(os.path.join(os.path.dirname(__file__), 'data',
                       'reference_keys_vgg_mobilenet.json')) as f:
    REFERENCE = json.load(f)  # {'models': {name: {key: shape}}}, built with num_classes=100


def reference_state_dict(name):
    """A state_dict with the reference's key names and shapes (see the JSON file's 'about')."""
    def value(key, shape):
        if key.endswith('num_batches_tracked'):
            return torch.tensor(3)
        return torch.rand(shape) + 0.5 if key.endswith('running_var') else torch.randn(shape)
    return {key: value(key, shape) for key, shape in REFERENCE['models'][name].items()}


@functools.lru_cache(maxsize=None)
def built(name, num_classes):
    """build_model(name, num_classes), built once for the tests below (the VGGs take a while)."""
    return build_model(name, num_classes)


def test_the_fixture_covers_every_model():
    assert set(REFERENCE['models']) == set(PARAMS) == set(FEATS)
    assert set(PARAMS) <= set(model_names())


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_parameter_counts_are_the_reference_counts(name):
    assert (count_parameters(built(name, 10)),
            count_parameters(built(name, 100))) == PARAMS[name]


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_logits_points_and_a_strict_load_of_reference_names(name):
    torch.manual_seed(0)
    model = built(name, 100).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)

    feats, pooled = FEATS[name]
    want = {'stem': (1, *feats[0]), 'pooled': (1, pooled)}
    for i, shape in enumerate(feats[1:], 1):
        want[f'stage{i}'] = want[f'stage{i}_pre'] = (1, *shape)
    assert point_shapes(model, feature_points(name, model), 'cpu') == want

    state = reference_state_dict(name)
    assert sorted(model.state_dict()) == sorted(state)
    model.load_state_dict(state, strict=True)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k].to(loaded[k].dtype)) for k in state)
    with torch.no_grad():  # the loaded weights are the ones that compute
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


# Transcriptions of mdistiller's forwards (models/cifar/vgg.py, mobilenetv2.py) over our modules'
# weights, with the ReLUs, pools and residuals written out: (logits, feats, preact_feats,
# pooled_feat).

def reference_vgg(model, x):
    def block(seq, x):  # the reference's _make_layers: conv-BN-ReLU ..., without the last ReLU
        convs = [m for m in seq if isinstance(m, nn.Conv2d)]
        bns = [m for m in seq if isinstance(m, nn.BatchNorm2d)]
        for i, (conv, bn) in enumerate(zip(convs, bns)):
            x = bn(conv(x))
            if i < len(convs) - 1:
                x = F.relu(x)
        return x

    f0 = F.relu(block(model.block0, x))
    feats, pre, x = [f0], [f0], F.max_pool2d(f0, 2, 2)
    for i in range(1, 5):
        preact = block(getattr(model, f'block{i}'), x)
        x = F.relu(preact)
        feats.append(x)
        pre.append(preact)
        if i < 3:  # pool3 only for 64x64 inputs
            x = F.max_pool2d(x, 2, 2)
    pooled = F.adaptive_avg_pool2d(x, (1, 1)).reshape(x.size(0), -1)
    return model.classifier(pooled), feats, pre, pooled


def reference_mobilenetv2(model, x):
    def inverted_residual(block, x):
        c = block.conv
        out = F.relu(c[1](c[0](x)))
        out = F.relu(c[4](c[3](out)))
        out = c[7](c[6](out))
        use_res_connect = c[3].stride == (1, 1) and c[0].in_channels == c[6].out_channels
        return x + out if use_res_connect else out

    out = F.relu(model.conv1[1](model.conv1[0](x)))
    feats = [out]
    for i, group in enumerate(model.blocks):
        for block in group:
            out = inverted_residual(block, out)
        if i in (1, 2, 4, 6):
            feats.append(out)
    out = F.relu(model.conv2[1](model.conv2[0](out)))
    pooled = F.avg_pool2d(out, 2, ceil_mode=True).reshape(out.size(0), -1)
    return model.classifier(pooled), feats, None, pooled


def randomized(name, dtype):
    """Model `name` (100 classes) in eval mode with non-trivial BatchNorm statistics and affine."""
    torch.manual_seed(0)
    model = build_model(name, 100).to(dtype).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model


@pytest.mark.parametrize('name,reference', [('vgg8', reference_vgg), ('vgg13', reference_vgg),
                                            ('mobilenetv2', reference_mobilenetv2)])
def test_points_are_the_reference_feats(name, reference):
    model = randomized(name, torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        logits, got = WithPoints(model, feature_points(name, model))(x)
        want_logits, feats, pre, pooled = reference(model, x)
    assert torch.allclose(logits, want_logits, rtol=0, atol=1e-12)
    assert torch.equal(got['stem'], feats[0]) and torch.equal(got['pooled'], pooled)
    for i in (1, 2, 3, 4):
        assert torch.equal(got[f'stage{i}'], feats[i])
        # mobilenetv2's reference has no pre-activations (its blocks end without a ReLU)
        assert torch.equal(got[f'stage{i}_pre'], feats[i] if pre is None else pre[i])
    if pre is not None:  # a VGG stage's ReLU changes something: the points differ
        assert not torch.equal(got['stage1_pre'], got['stage1'])


@pytest.mark.parametrize('name', ['vgg8', 'mobilenetv2'])
def test_the_folded_teacher_gives_the_eager_features(name):
    model = randomized(name, torch.float32)
    points = feature_points(name, model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, eager = WithPoints(model, points)(x)
        form = fold_batchnorm(model, points)
        folded_logits, folded = form(x)
    # every BatchNorm follows a convolution and goes into it
    assert not any(isinstance(m, nn.BatchNorm2d) for m in form.modules())
    assert set(folded) == set(points)
    assert torch.allclose(folded_logits, logits, atol=1e-4)
    for k in points:
        assert torch.allclose(folded[k], eager[k], atol=1e-4, rtol=1e-4), k
