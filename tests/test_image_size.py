"""The image size comes from the dataset: a spec at 64x64 (registered here only) flows through the
reader, the loaders, the batch shape of the memory check, the feature plan's shapes and the MAC
counter; CIFAR's specs keep 3 x 32 x 32."""
import math
import pickle
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kd.data import datasets
from kd.data.datasets import CIFAR10, CIFAR100, DatasetSpec, get_dataset, load_dataset
from kd.data.loader import Batch, make_loaders
from kd.engine.step import train_step
from kd.engine.trainee import Trainee, TraineeOptions
from kd.methods.plan import is_feature_method, plan_features, point_shapes
from kd.methods.registry import LOSSES
from kd.models import (MIN_SIZE, build_model, check_image_size, count_macs, feature_points,
                       image_size_problem, model_names)
from kd.recipes import get_recipe
from kd.run.memory import bytes_per_student, check_memory
from kd.run.teacher_form import fold_batchnorm

FAKE64 = DatasetSpec(
    name='fake64', title='Fake-64', folder='fake-64-batches-py',
    train_files=('train',), test_files=('test',), label_key='labels', num_classes=4,
    mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), classes=('a', 'b', 'c', 'd'),
    channels=3, image_size=(64, 64), archive='fake-64.tar.gz', torchvision_class='None')

Spec = namedtuple('Spec', 'name arch')


@pytest.fixture
def fake64(tmp_path, monkeypatch):
    """FAKE64 registered, and a data root holding its two batch files (uint8 N x 12288 rows)."""
    monkeypatch.setattr(datasets, 'DATASETS', dict(datasets.DATASETS))  # undone after the test
    datasets.register_dataset(FAKE64)
    with pytest.raises(ValueError, match='already registered'):
        datasets.register_dataset(FAKE64)
    folder = tmp_path / FAKE64.folder
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (('train', 24), ('test', 8)):
        batch = {'data': rng.integers(0, 256, (n, 3 * 64 * 64), dtype=np.uint8),
                 'labels': list(rng.integers(0, 4, n))}
        with open(folder / name, 'wb') as f:
            pickle.dump(batch, f, protocol=2)
    return str(tmp_path)


def test_cifar_specs_keep_32x32():
    for spec in (CIFAR10, CIFAR100):
        assert spec.image_shape == (3, 32, 32) and spec.image_values == 3072
        assert spec.batch_shape(128) == (128, 3, 32, 32)


def test_a_64x64_spec_is_read_and_served_at_its_size(fake64):
    spec = get_dataset('fake64')
    assert spec.batch_shape(5) == (5, 3, 64, 64)
    arrays = load_dataset(fake64, 'fake64', download=False)
    assert arrays.train_images.shape == (24, 3, 64, 64)
    assert arrays.test_images.shape == (8, 3, 64, 64)
    data = make_loaders(fake64, 8, val_fraction=0.25, eval_batch_size=4, dataset='fake64',
                        download=False)
    x, y = next(iter(data.train))  # cropped and flipped at 64x64
    assert x.shape == (8, 3, 64, 64) and x.dtype == torch.float32
    assert next(iter(data.test))[0].shape == (4, 3, 64, 64)


def test_a_cifar_sized_file_is_not_a_64x64_batch(fake64, tmp_path):
    path = tmp_path / 'small'
    with open(path, 'wb') as f:
        pickle.dump({'data': np.zeros((2, 3072), np.uint8), 'labels': [0, 1]}, f)
    with pytest.raises(datasets.DataError, match='N x 12288'):
        datasets.read_batch(str(path), FAKE64)


def test_the_memory_check_counts_activations_at_the_batch_shape():
    small = bytes_per_student('resnet8', 10, CIFAR10.batch_shape(16))
    large = bytes_per_student('resnet8', 10, FAKE64.batch_shape(16))
    params = sum(p.numel() for p in build_model('resnet8').parameters())
    # activations (all but the 3 copies of the parameters) grow with the pixels: 4x
    activations = (small - 12 * params, large - 12 * params)
    assert activations[1] == pytest.approx(4 * activations[0], rel=0.01)
    lines = []
    need = check_memory([Spec('a', 'resnet8'), Spec('b', 'resnet8')], torch.device('cpu'), 10,
                        FAKE64.batch_shape(16), lines.append)
    assert need == 2 * large and lines


def test_feature_plan_shapes_follow_the_image_shape():
    model = build_model('resnet8', 4)
    points = feature_points('resnet8', model)
    at32 = point_shapes(model, points, 'cpu')  # CIFAR's shape by default
    at64 = point_shapes(model, points, 'cpu', FAKE64.image_shape)
    assert at32['stage1'][-2:] == (32, 32) and at64['stage1'][-2:] == (64, 64)
    assert at64['pooled'] == at32['pooled']  # global pooling: the embedding does not change
    teacher = build_model('resnet8', 4)
    plan = plan_features([('resnet8', 'fitnet', model)], teacher, feature_points('resnet8', teacher),
                         'cpu', 4, teacher_arch='resnet8', image_shape=FAKE64.image_shape)
    assert plan.student_shapes['resnet8']['stage2'][-2:] == (32, 32)
    assert all(s[-2:] == at64[k][-2:] for k, s in plan.teacher_shapes.items())


def test_count_macs_at_the_dataset_size():
    model = build_model('resnet8', 10)
    at32 = count_macs(model)
    assert count_macs(model, CIFAR10.batch_shape(1)) == at32
    at64 = count_macs(model, FAKE64.batch_shape(1))
    linear = 64 * 10  # the classifier's, which does not grow with the image
    assert at64 - linear == 4 * (at32 - linear)


def test_the_model_table_states_the_size():
    from kd.models import model_table
    assert 'multiply-accumulates per 32x32 image' in model_table(['resnet8']).splitlines()[0]
    assert 'per 64x64 image' in model_table(['resnet8'], FAKE64.image_shape).splitlines()[0]


# ---------------------------------------------------------------------------------------------
# The zoo at any size

@pytest.mark.parametrize('name', model_names())
def test_every_model_runs_at_64x64_and_down_to_its_smallest_size(name):
    model = build_model(name, 10).eval()
    smallest = MIN_SIZE[name]
    with torch.no_grad():
        for h, w in ((64, 64), (smallest, smallest), (smallest, 48), (40, 56)):
            assert model(torch.randn(1, 3, h, w)).shape == (1, 10), (h, w)
    check_image_size(name, (3, 64, 64))
    check_image_size(name, (3, smallest, smallest))
    with pytest.raises(ValueError) as info:
        check_image_size(name, (3, smallest - 1, 64))
    message = str(info.value)
    assert '\n' not in message and f'{smallest - 1}x64' in message and name in message


def test_the_refusal_names_the_size_and_what_the_model_needs():
    with pytest.raises(ValueError, match=r"^model 'mobilenetv2' cannot run on 8x8 images: its "
                                         r"downsampling needs at least 16x16$"):
        check_image_size('mobilenetv2', (3, 8, 8))
    assert image_size_problem('airbench94', (3, 8, 32)).startswith(
        "model 'airbench94' cannot run on 8x32 images")
    assert image_size_problem('resnet8', (3, 4, 4)) is None
    # a model this registry does not know (torchvision:, a user's file) says for itself
    assert image_size_problem('torchvision:resnet18', (3, 1, 1)) is None


def _classifier_input(model, classifier, x):
    seen = {}
    handle = classifier.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen['x']


def _module_output(model, path, x):
    seen = {}
    handle = model.get_submodule(path).register_forward_hook(lambda m, a, out: seen.update(y=out))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen['y']


# name: (the module whose output, after `then`, the classifier's pooling takes; the classifier;
# the references' fixed pooling of that map at 32x32: RepDistiller's / mdistiller's avg_pool2d(x,
# 8) and (4), MobileNetV2's AvgPool2d(2, ceil_mode=True), airbench's max-pool 3 (and its 1/9))
FIXED_POOLING = {
    'resnet8x4': ('layer3', None, 'fc', lambda x: F.avg_pool2d(x, 8)),
    'resnet20': ('layer3', None, 'fc', lambda x: F.avg_pool2d(x, 8)),
    'wrn_16_2': ('bn1', F.relu, 'fc', lambda x: F.avg_pool2d(x, 8)),
    'resnet50': ('layer4', None, 'linear', lambda x: F.avg_pool2d(x, 4)),
    'shufflev1': ('layer3', None, 'linear', lambda x: F.avg_pool2d(x, 4)),
    'shufflev2': ('bn2', F.relu, 'linear', lambda x: F.avg_pool2d(x, 4)),
    'vgg8': ('relu4', None, 'classifier', lambda x: F.avg_pool2d(x, 4)),
    'mobilenetv2': ('conv2', None, 'classifier.0', nn.AvgPool2d(2, ceil_mode=True)),
    'airbench94_small': ('groups', None, 'classifier', lambda x: F.max_pool2d(x, 3) / 9),
}


@pytest.mark.parametrize('name', sorted(FIXED_POOLING))
def test_adaptive_pooling_is_the_fixed_pooling_at_32x32(name):
    """Each family's global pooling gives, on a 32x32 image, what the fixed pooling it replaces
    gave (so the references' checkpoints keep their outputs)."""
    path, then, classifier, fixed = FIXED_POOLING[name]
    torch.manual_seed(0)
    model = build_model(name, 10).train()  # batch statistics: activations of ordinary size
    x = torch.randn(4, 3, 32, 32)
    before = _module_output(model, path, x)
    before = then(before) if then is not None else before
    pooled = _classifier_input(model, model.get_submodule(classifier), x)
    torch.testing.assert_close(pooled, fixed(before).flatten(1), rtol=1e-6, atol=1e-6)


# logits at 32x32 computed by the code before the zoo ran at any size (fixed pooling in
# MobileNetV2 and airbench), with the seeds below: train-mode BatchNorm, the classifier's weights
# drawn N(0, 1) so that the logits are of ordinary size
GOLDEN = {
    'mobilenetv2': [[27.6318, 28.9384, 9.11212, 16.5776], [-2.17692, 14.349, 9.21409, 23.4399],
                    [9.99951, 7.84383, 0.00857067, 13.4885], [23.5158, 11.6445, -21.3217, 18.5826]],
    'airbench94_small': [[-2.31437, 2.20839, 0.351593, 1.67773],
                         [-0.0761349, 0.72068, 1.95075, -1.01146],
                         [-0.204196, 1.06517, 1.70628, 0.686785],
                         [-2.27421, 2.04425, 1.57163, 1.71864]],
    'resnet8x4': [[3.98413, 2.91542, 9.02232, 10.155], [10.3743, 5.65087, 6.66472, 9.97374],
                  [8.53391, 2.11284, 11.029, 9.78862], [7.16325, 6.1341, 8.78757, 8.9247]],
    'shufflev2': [[13.7422, 8.0856, -7.81367, 8.24579], [16.64, 17.1411, -6.77725, 7.39465],
                  [27.2928, 14.0568, -8.33422, 8.51831], [29.2215, 15.1516, -10.2674, 1.28243]],
}


@pytest.mark.parametrize('name', sorted(GOLDEN))
def test_logits_at_32x32_are_those_of_the_fixed_pooling_code(name):
    torch.manual_seed(0)
    model = build_model(name, 4).train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, 1, generator=torch.Generator().manual_seed(2))
        logits = model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(logits, torch.tensor(GOLDEN[name]), rtol=1e-4, atol=1e-4)


def _plan_at_64(teacher_arch, student_arch, methods):
    """The feature plan of one student per method against a teacher, at 64x64."""
    torch.manual_seed(0)
    teacher = build_model(teacher_arch, 4).eval()
    student = build_model(student_arch, 4)  # the plan measures each architecture once
    plan = plan_features([(student_arch, loss, student) for loss in methods], teacher,
                         feature_points(teacher_arch, teacher), 'cpu', 4,
                         teacher_arch=teacher_arch, image_shape=FAKE64.image_shape)
    return teacher, plan


def _one_step_each(teacher, plan, arch, methods):
    """One training step of a fresh `arch` student per method on 64x64 images: the results."""
    labels, recipe, idx = torch.arange(16) % 4, get_recipe('standard'), torch.arange(4)
    trainees = [Trainee(loss, build_model(arch, 4), loss, recipe, torch.device('cpu'),
                        options=TraineeOptions(distiller=plan.build(loss, {}, arch, labels),
                                               points=plan.student_points[arch]))
                for loss in methods]
    return train_step(trainees, fold_batchnorm(teacher, plan.teacher_points),
                      torch.randn(4, 3, 64, 64), labels[idx], recipe,
                      batch=Batch(None, None, idx, 0, 0, 0, idx, 0))


FEATURE_METHODS = [n for n in LOSSES if is_feature_method(n)]


def test_every_feature_method_builds_for_resnet32x4_to_resnet8x4_at_64x64():
    """The plan measures the points at 64x64, and every feature method's connectors are sized
    from those shapes."""
    assert {'fitnet', 'at', 'crd', 'reviewkd', 'ofd'} <= set(FEATURE_METHODS)
    _, plan = _plan_at_64('resnet32x4', 'resnet8x4', FEATURE_METHODS)
    assert plan.student_shapes['resnet8x4']['stage3'][-2:] == (16, 16)
    assert plan.teacher_shapes['stage1'][-2:] == (64, 64)
    assert plan.teacher_shapes['pooled'] == (1, 256)
    for loss in FEATURE_METHODS:
        assert plan.build(loss, {}, 'resnet8x4', torch.arange(16) % 4) is not None, loss


def test_every_feature_method_takes_a_step_at_64x64():
    teacher, plan = _plan_at_64('resnet20', 'resnet8', FEATURE_METHODS)
    for loss, result in zip(FEATURE_METHODS, _one_step_each(teacher, plan, 'resnet8',
                                                            FEATURE_METHODS)):
        assert math.isfinite(result.loss.item()) and set(result.parts) > {'ce'}, loss


@pytest.mark.slow
def test_the_benchmark_pair_distils_at_64x64():
    methods = ['fitnet', 'at', 'crd', 'reviewkd']
    teacher, plan = _plan_at_64('resnet32x4', 'resnet8x4', methods)
    for loss, result in zip(methods, _one_step_each(teacher, plan, 'resnet8x4', methods)):
        assert math.isfinite(result.loss.item()) and set(result.parts) > {'ce'}, loss
