"""The CIFAR ResNets, Wide ResNets and ResNet-50 of RepDistiller / mdistiller (cifar_resnets.py):
parameter counts, logits, feature points and key names equal to the reference code's.

Counts and shapes below were taken by running the reference code: RepDistiller commit
b84f547c5db6a35318d4671d7d5c4de74c822403 (models/resnet.py, wrn.py, resnetv2.py) for the
parameters and key names, mdistiller commit a08d46f10d6102bd6e3f258ca5ac880b020ea259
(models/cifar/resnet.py, wrn.py, resnetv2.py) for feats / preact_feats / pooled_feat.
"""
import json
import os
import re

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
    'resnet8': (78_042, 83_892),
    'resnet14': (175_258, 181_108),
    'resnet20': (272_474, 278_324),
    'resnet32': (466_906, 472_756),
    'resnet44': (661_338, 667_188),
    'resnet56': (855_770, 861_620),
    'resnet110': (1_730_714, 1_736_564),
    'resnet8x4': (1_210_410, 1_233_540),
    'resnet32x4': (7_410_730, 7_433_860),
    'wrn_16_1': (175_066, 180_916),
    'wrn_16_2': (691_674, 703_284),
    'wrn_40_1': (563_930, 569_780),
    'wrn_40_2': (2_243_546, 2_255_156),
    'resnet50': (23_520_842, 23_705_252),
}

# the reference's feats[0..N] shapes (C, H, W) for one image; preact_feats[i] has feats[i]'s
# shape and pooled_feat is (last stage's channels,)
NARROW = [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]
X4 = [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)]
WIDE2 = [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)]
FEATS = {
    'resnet8': NARROW, 'resnet14': NARROW, 'resnet20': NARROW, 'resnet32': NARROW,
    'resnet44': NARROW, 'resnet56': NARROW, 'resnet110': NARROW,
    'resnet8x4': X4, 'resnet32x4': X4,
    'wrn_16_1': NARROW, 'wrn_40_1': NARROW, 'wrn_16_2': WIDE2, 'wrn_40_2': WIDE2,
    'resnet50': [(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)],
}

with open(os.path.join(os.path.dirname(__file__), 'data', 'reference_keys_resnets.json')) as f:
    REFERENCE = json.load(f)  # built with num_classes=100


def reference_state_dict(name):
    """A state_dict with the reference's key names and shapes (see the JSON file's 'source')."""
    state = {}
    for key, shape in REFERENCE['models'][name].items():
        run = re.search(r'\{(\d+)\.\.(\d+)\}', key)
        blocks = range(int(run[1]), int(run[2]) + 1) if run else [None]
        for i in blocks:
            k = key if i is None else key[:run.start()] + str(i) + key[run.end():]
            state[k] = torch.tensor(3) if k.endswith('num_batches_tracked') else torch.randn(shape)
    return state


def test_the_fixture_covers_every_model():
    assert REFERENCE['num_classes'] == 100
    assert set(REFERENCE['models']) == set(PARAMS) == set(FEATS)
    assert set(PARAMS) <= set(model_names())


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_parameter_counts_are_the_reference_counts(name):
    assert (count_parameters(build_model(name, 10)),
            count_parameters(build_model(name, 100))) == PARAMS[name]


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_logits_points_and_a_strict_load_of_reference_names(name):
    torch.manual_seed(0)
    model = build_model(name, 100).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)

    feats = FEATS[name]
    want = {'stem': (1, *feats[0]), 'pooled': (1, feats[-1][0])}
    for i, shape in enumerate(feats[1:], 1):
        want[f'stage{i}'] = want[f'stage{i}_pre'] = (1, *shape)
    assert point_shapes(model, feature_points(name, model), 'cpu') == want

    state = reference_state_dict(name)
    assert sorted(model.state_dict()) == sorted(state)
    model.load_state_dict(state, strict=True)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k].to(loaded[k].dtype)) for k in state)


# Transcriptions of mdistiller's forwards (models/cifar/resnet.py, wrn.py, resnetv2.py), over our
# modules: (feats, preact_feats, pooled_feat).

def reference_resnet(model, x):
    x = F.relu(model.bn1(model.conv1(x)))
    feats, pre = [x], [x]
    for layer in (model.layer1, model.layer2, model.layer3):
        for block in layer:
            residual = x if block.downsample is None else block.downsample(x)
            out = F.relu(block.bn1(block.conv1(x)))
            preact = block.bn2(block.conv2(out)) + residual
            x = F.relu(preact)
        feats.append(x)
        pre.append(preact)
    return feats, pre, F.avg_pool2d(x, 8).reshape(x.size(0), -1)


def reference_wrn(model, x):
    def block_forward(block, x):
        if block.bn1.num_features == block.conv1.out_channels:  # the reference's equalInOut
            out = F.relu(block.bn1(x))
            return x + block.conv2(F.relu(block.bn2(block.conv1(out))))
        x = F.relu(block.bn1(x))
        return block.convShortcut(x) + block.conv2(F.relu(block.bn2(block.conv1(x))))

    feats = [model.conv1(x)]
    for stage in (model.block1, model.block2, model.block3):
        out = feats[-1]
        for block in stage.layer:
            out = block_forward(block, out)
        feats.append(out)
    f0, f1, f2, f3 = feats  # f3: the last stage before the final BN-ReLU
    out = F.relu(model.bn1(f3))
    pooled = F.avg_pool2d(out, 8).reshape(-1, out.shape[1])
    pre = [f0, model.block2.layer[0].bn1(f1), model.block3.layer[0].bn1(f2), model.bn1(f3)]
    return feats, pre, pooled


def reference_resnet50(model, x):
    out = F.relu(model.bn1(model.conv1(x)))
    feats, pre = [out], [out]
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            y = F.relu(block.bn1(block.conv1(out)))
            y = F.relu(block.bn2(block.conv2(y)))
            preact = block.bn3(block.conv3(y)) + block.shortcut(out)
            out = F.relu(preact)
        feats.append(out)
        pre.append(preact)
    return feats, pre, F.adaptive_avg_pool2d(out, (1, 1)).reshape(out.size(0), -1)


def random_bn_statistics(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


# ResNet-50 pools adaptively, so 16x16 images check it at a quarter of the cost
@pytest.mark.parametrize('name,reference,size', [('resnet20', reference_resnet, 32),
                                                 ('wrn_16_1', reference_wrn, 32),
                                                 ('resnet50', reference_resnet50, 16)])
def test_points_are_the_reference_feats_in_float64(name, reference, size):
    torch.manual_seed(0)
    model = build_model(name, 100).double().eval()
    random_bn_statistics(model)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        _, got = WithPoints(model, feature_points(name, model))(x)
        feats, pre, pooled = reference(model, x)
    assert torch.equal(got['stem'], feats[0])
    # the reference pools with AvgPool2d(8) (ResNet-50: adaptive), which sums in another order
    assert torch.allclose(got['pooled'], pooled, rtol=0, atol=1e-12)
    for i in range(1, len(feats)):
        assert torch.equal(got[f'stage{i}'], feats[i])
        assert torch.allclose(got[f'stage{i}_pre'], pre[i], rtol=0, atol=1e-12)
    assert f'stage{len(feats)}' not in got


@pytest.mark.parametrize('name,size', [('resnet20', 32), ('wrn_16_1', 32), ('resnet50', 16)])
def test_the_folded_teacher_gives_the_eager_points(name, size):
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    random_bn_statistics(model)
    points = feature_points(name, model)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits, eager = WithPoints(model, points)(x)
        folded_logits, folded = fold_batchnorm(model, points)(x)
    # float32 rounding, relative to each tensor's scale (ResNet-50's activations reach ~1e2)
    assert torch.allclose(folded_logits, logits, rtol=1e-4, atol=1e-4 * logits.abs().max())
    for k in points:
        assert torch.allclose(folded[k], eager[k], rtol=1e-4, atol=1e-4 * eager[k].abs().max()), k
