"""The model registry and the CIFAR distillation benchmark architectures."""
import pytest
import torch
import torch.nn as nn

from kd.models import registry as model_base  # the registry itself; models re-exports it
import kd.models as models
from kd.models import (MODELS, StudentNet, TeacherNet, build_model, count_macs, count_parameters,
                    model_names, register_model)

NEW = ['resnet32x4', 'resnet8x4', 'wrn_16_2', 'wrn_40_2']

# Exact counts of the RepDistiller/mdistiller architectures (checked against their code). The papers
# round them (CIFAR-100): resnet32x4 7.43M, resnet8x4 1.23M, wrn_40_2 2.26M, wrn_16_2 0.70M.
PARAMS = {  # name: (10 classes, 100 classes)
    'resnet32x4': (7_410_730, 7_433_860),
    'resnet8x4': (1_210_410, 1_233_540),
    'wrn_40_2': (2_243_546, 2_255_156),
    'wrn_16_2': (691_674, 703_284),
    'resnet18': (11_173_962, 11_220_132),
    'cnn': (1_166_506, 1_189_636),
}
# per 32x32 image, convolutions + linear
# (published: resnet32x4 1.08G, resnet8x4 0.18G, wrn_40_2 0.33G, wrn_16_2 0.10G)
MACS_100 = {
    'resnet32x4': 1_083_040_768,
    'resnet8x4': 177_071_104,
    'wrn_40_2': 327_610_880,
    'wrn_16_2': 101_118_464,
}


def test_registered_names():
    assert set(PARAMS) <= set(model_names())
    assert model_names() == sorted(model_names())
    assert MODELS['resnet18'] is TeacherNet and MODELS['cnn'] is StudentNet


@pytest.mark.parametrize('name', sorted(PARAMS))
def test_parameter_counts(name):
    assert (count_parameters(build_model(name)),
            count_parameters(build_model(name, num_classes=100))) == PARAMS[name]


@pytest.mark.parametrize('name', NEW)
def test_macs(name):
    assert count_macs(build_model(name, 100)) == MACS_100[name]


@pytest.mark.parametrize('name', model_names())
def test_logits_shape_and_channels_last(name):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for num_classes in (10, 100):
        model = build_model(name, num_classes).eval()
        with torch.no_grad():
            out = model(x)
        assert isinstance(out, torch.Tensor) and out.shape == (2, num_classes)
        assert torch.isfinite(out).all()
    # channels_last model and input give the same logits (last model: num_classes=100)
    model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out_cl = model(x.to(memory_format=torch.channels_last))
    assert out_cl.shape == (2, 100)
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-4)


def test_unknown_name_lists_known_models():
    with pytest.raises(KeyError) as info:
        build_model('nope')
    message = str(info.value)
    assert 'nope' in message
    for name in model_names():
        assert name in message


def test_register_and_duplicate(monkeypatch):
    registry = dict(MODELS)
    monkeypatch.setattr(model_base, 'MODELS', registry)
    monkeypatch.setattr(models, 'MODELS', registry)
    monkeypatch.setitem(model_base.MIN_SIZE, 'tiny', None)  # the entry is removed after the test

    @register_model('tiny', min_size=5)
    def tiny(num_classes=10):
        return nn.Linear(3, num_classes)

    assert model_base.MIN_SIZE['tiny'] == 5  # the size check reads it (tests/test_image_size.py)
    with pytest.raises(ValueError, match="'tiny' cannot run on 4x6 images"):
        models.check_image_size('tiny', (3, 4, 6))

    assert tiny(4).out_features == 4  # the decorator hands the function back unchanged
    assert build_model('tiny', num_classes=5).out_features == 5
    assert 'tiny' in models.model_names()
    with pytest.raises(ValueError, match='tiny'):
        register_model('tiny')(lambda num_classes=10: None)
    with pytest.raises(ValueError, match='cnn'):
        register_model('cnn')(TeacherNet)
    assert models.MODELS['tiny'] is tiny and models.MODELS['cnn'] is StudentNet


def test_default_pair_matches_the_classes():
    for name, cls, head in [('resnet18', TeacherNet, 'linear'), ('cnn', StudentNet, 'classifier')]:
        want = {k: v.shape for k, v in cls().state_dict().items()}
        assert {k: v.shape for k, v in build_model(name).state_dict().items()} == want
        # num_classes only changes the last layer
        got = {k: v.shape for k, v in build_model(name, num_classes=100).state_dict().items()}
        changed = {k for k in want if got[k] != want[k]}
        assert changed == {f'{head}.weight', f'{head}.bias'}
        assert got[f'{head}.weight'][0] == 100 and got[f'{head}.bias'] == (100,)


def test_same_seed_same_weights():
    torch.manual_seed(0)
    a = build_model('resnet18').state_dict()
    torch.manual_seed(0)
    b = TeacherNet().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('name,stage,blocks', [
    ('resnet32x4', 'layer1', 5), ('resnet8x4', 'layer1', 1),
    ('wrn_40_2', 'block1.layer', 6), ('wrn_16_2', 'block1.layer', 2)])
def test_depth_and_reference_key_names(name, stage, blocks):
    model = build_model(name, 100)
    assert len(model.get_submodule(stage)) == blocks
    keys = set(model.state_dict())
    # RepDistiller/mdistiller key names, so their published teacher checkpoints load as they are
    if name.startswith('resnet'):
        expected = {'conv1.weight', 'bn1.weight', 'layer2.0.downsample.0.weight',
                    'layer3.0.downsample.1.running_var', f'layer3.{blocks - 1}.bn2.weight', 'fc.weight'}
        assert model.fc.in_features == 256
    else:
        expected = {'conv1.weight', 'block1.layer.0.convShortcut.weight',
                    'block3.layer.0.convShortcut.weight', f'block3.layer.{blocks - 1}.conv2.weight',
                    'bn1.running_mean', 'fc.bias'}
        assert model.fc.in_features == 128
    assert expected <= keys


@pytest.mark.parametrize('name', ['resnet8x4', 'wrn_16_2'])
def test_reference_init(name):
    torch.manual_seed(0)
    model = build_model(name, 100)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        elif isinstance(m, nn.Conv2d) and m.weight.numel() >= 4096:
            # kaiming normal, fan_out mode: std = sqrt(2 / (out_channels * kh * kw))
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            assert m.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)
    if name.startswith('wrn'):
        assert torch.all(model.fc.bias == 0)


def test_the_model_table_lists_each_model_with_its_counts():
    table = models.model_table(['resnet8', 'cnn']).splitlines()
    assert table[0].startswith('| model (`--teacher-arch` / `--student-arch`) |')
    assert table[2].startswith('| `cnn` | 1,166,506 | 1,189,636 | 85.8 M | A plain CNN')
    assert table[3].startswith('| `resnet8` | 78,042 | 83,892 | 12.5 M | ResNet-8')
    assert len(table) == 4
