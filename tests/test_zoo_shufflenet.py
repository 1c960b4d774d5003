"""The ShuffleNets of the model zoo (shufflenet_nets.py) against the reference code: RepDistiller
(github.com/HobbitLong/RepDistiller, commit b84f547c5db6a35318d4671d7d5c4de74c822403,
models/ShuffleNetv1.py ShuffleV1, models/ShuffleNetv2.py ShuffleV2) for parameter names and
counts, mdistiller (github.com/megvii-research/mdistiller, commit
a08d46f10d6102bd6e3f258ca5ac880b020ea259, mdistiller/models/cifar/ShuffleNetv1.py,
ShuffleNetv2.py) for the feature points. The numbers below were read by running that code."""
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kd.models.features import WithPoints
from kd.models import build_model, count_parameters, feature_points
from kd.run.teacher_form import fold_batchnorm

NAMES = ['shufflev1', 'shufflev2']

PARAMS = {  # name: (10 classes, 100 classes), sum of p.numel() over the reference's parameters
    'shufflev1': (862_768, 949_258),
    'shufflev2': (1_263_278, 1_355_528),
}

# the reference's feats[0..3], preact_feats[1..3] (the same shapes) and pooled_feat, batch of 2
FEATS = {
    'shufflev1': ([(2, 24, 32, 32), (2, 240, 16, 16), (2, 480, 8, 8), (2, 960, 4, 4)], (2, 960)),
    'shufflev2': ([(2, 24, 32, 32), (2, 116, 16, 16), (2, 232, 8, 8), (2, 464, 4, 4)], (2, 1024)),
}

KEYS_FILE = os.path.join(os.path.dirname(__file__), 'data', 'reference_keys_shufflenet.json')


def reference_keys(name, num_classes):
    """{state_dict key: shape} of the reference model (recorded at 100 classes)."""
    with open(KEYS_FILE) as f:
        keys = json.load(f)['models'][name]
    keys['linear.weight'][0] = keys['linear.bias'][0] = num_classes
    return keys


def randomize_batchnorm(model):
    """Non-trivial BN statistics and affine parameters, so a misplaced BN shows in the values."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model


@pytest.mark.parametrize('name', NAMES)
def test_parameter_counts_are_the_reference_counts(name):
    assert (count_parameters(build_model(name, 10)),
            count_parameters(build_model(name, 100))) == PARAMS[name]


@pytest.mark.parametrize('name', NAMES)
def test_forward_gives_a_batch_of_logits(name):
    torch.manual_seed(0)
    for num_classes in (10, 100):
        model = build_model(name, num_classes).eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize('name', NAMES)
def test_feature_points_have_the_reference_shapes(name):
    torch.manual_seed(0)
    model = build_model(name, 100).eval()
    with torch.no_grad():
        _, got = WithPoints(model, feature_points(name, model))(torch.randn(2, 3, 32, 32))
    feats, pooled = FEATS[name]
    assert {k: tuple(v.shape) for k, v in got.items()} == {
        'stem': feats[0], 'stage1': feats[1], 'stage2': feats[2], 'stage3': feats[3],
        'stage1_pre': feats[1], 'stage2_pre': feats[2], 'stage3_pre': feats[3], 'pooled': pooled}


@pytest.mark.parametrize('num_classes', [10, 100])
@pytest.mark.parametrize('name', NAMES)
def test_a_reference_state_dict_loads_strictly(name, num_classes):
    keys = reference_keys(name, num_classes)
    torch.manual_seed(0)
    saved = {k: torch.tensor(7) if k.endswith('num_batches_tracked') else torch.randn(shape)
             for k, shape in keys.items()}
    model = build_model(name, num_classes)
    model.load_state_dict(saved, strict=True)  # raises on a missing, unexpected or misshaped key
    state = model.state_dict()
    assert list(state) == list(keys)  # the reference's modules, in its order
    assert all(torch.equal(state[k], saved[k]) for k in keys)


def shuffle_as_reference(x, groups):
    n, c, h, w = x.size()
    return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


def reference_shufflev1_feats(model, x):
    """mdistiller's ShuffleNetv1.py forward, over our modules."""
    x = F.relu(model.bn1(model.conv1(x)))
    feats, pre = [x], [x]
    for layer in (model.layer1, model.layer2, model.layer3):
        for i, unit in enumerate(layer):
            g = 1 if unit.conv1.in_channels == 24 else 3
            out = F.relu(unit.bn1(unit.conv1(x)))
            out = shuffle_as_reference(out, g)
            out = F.relu(unit.bn2(unit.conv2(out)))
            out = unit.bn3(unit.conv3(out))
            if i == 0:  # stride 2: concatenated average-pool shortcut
                preact = torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
            else:
                preact = out + x
            x = F.relu(preact)
        feats.append(x)
        pre.append(preact)
    return feats, pre, F.avg_pool2d(x, 4).view(x.size(0), -1)


def reference_shufflev2_feats(model, x):
    """mdistiller's ShuffleNetv2.py forward, over our modules."""
    x = F.relu(model.bn1(model.conv1(x)))
    feats, pre = [x], [x]
    for layer in (model.layer1, model.layer2, model.layer3):
        down, *units = layer
        out1 = F.relu(down.bn2(down.conv2(down.bn1(down.conv1(x)))))
        out2 = F.relu(down.bn3(down.conv3(x)))
        out2 = F.relu(down.bn5(down.conv5(down.bn4(down.conv4(out2)))))
        x = shuffle_as_reference(torch.cat([out1, out2], 1), 2)
        for unit in units:
            c = int(x.size(1) * 0.5)
            x1, x2 = x[:, :c, :, :], x[:, c:, :, :]
            out = F.relu(unit.bn1(unit.conv1(x2)))
            out = unit.bn2(unit.conv2(out))
            branch = unit.bn3(unit.conv3(out))
            preact = torch.cat([x1, branch], 1)
            x = shuffle_as_reference(torch.cat([x1, F.relu(branch)], 1), 2)
        feats.append(x)
        pre.append(preact)
    out = F.relu(model.bn2(model.conv2(x)))
    return feats, pre, F.avg_pool2d(out, 4).view(out.size(0), -1)


@pytest.mark.parametrize('name,reference', [('shufflev1', reference_shufflev1_feats),
                                            ('shufflev2', reference_shufflev2_feats)])
def test_points_are_the_reference_feats(name, reference):
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(name, 100).double()).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        logits, got = WithPoints(model, feature_points(name, model))(x)
        feats, pre, pooled = reference(model, x)
    assert torch.equal(got['stem'], feats[0])
    for i in (1, 2, 3):
        assert torch.equal(got[f'stage{i}'], feats[i])
        assert torch.equal(got[f'stage{i}_pre'], pre[i])
    # the model pools adaptively, the reference with a 4x4 window: the same mean, summed apart
    assert torch.allclose(got['pooled'], pooled, rtol=0, atol=1e-12)
    assert torch.allclose(logits, model.linear(pooled), rtol=0, atol=1e-12)


@pytest.mark.parametrize('name', NAMES)
def test_the_folded_teacher_gives_the_eager_features(name):
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(name, 10)).eval()
    points = feature_points(name, model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, eager = WithPoints(model, points)(x)
        folded_logits, folded = fold_batchnorm(model, points)(x)
    assert set(folded) == set(points)
    assert torch.allclose(folded_logits, logits, atol=1e-4)
    for k in points:
        assert torch.allclose(folded[k], eager[k], atol=1e-4, rtol=1e-4), k
