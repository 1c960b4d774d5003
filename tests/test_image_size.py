"""The image size comes from the dataset: a spec at 64x64 (registered here only) flows through the
reader, the loaders, the batch shape of the memory check, the feature plan's shapes and the MAC
counter; CIFAR's specs keep 3 x 32 x 32."""
import pickle
from collections import namedtuple

import numpy as np
import pytest
import torch

from kd.data import datasets
from kd.data.datasets import CIFAR10, CIFAR100, DatasetSpec, get_dataset, load_dataset
from kd.data.loader import make_loaders
from kd.methods.plan import plan_features, point_shapes
from kd.models import build_model, count_macs, feature_points
from kd.run.memory import bytes_per_student, check_memory

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
