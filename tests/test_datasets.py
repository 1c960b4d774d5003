"""datasets.py: the dataset descriptions, the restricted batch reader and the loaders."""
import dataclasses
import os
import pickle
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from conftest import write_cifar, write_cifar100
from kd.data import datasets
from kd.data.datasets import (CIFAR10, CIFAR100, DATASETS, DataError, DatasetSpec, dataset_names,
                      ensure_dataset, find_folder, get_dataset, load_dataset, read_batch)


@pytest.fixture(scope='module')
def c10_dir(tmp_path_factory):
    """A CIFAR-10 data root: 200 training, 100 test images (read-only: copy to change)."""
    return write_cifar(str(tmp_path_factory.mktemp('c10')))


@pytest.fixture(scope='module')
def c100_dir(tmp_path_factory):
    """A CIFAR-100 data root: 200 training, 100 test images (read-only: copy to change)."""
    return write_cifar100(str(tmp_path_factory.mktemp('c100')))


def copy_root(src, tmp_path, spec):
    dst = tmp_path / 'data'
    shutil.copytree(src, dst)
    return dst, dst / spec.folder


def unpickle(path):
    with open(path, 'rb') as f:
        return pickle.load(f)


def write_pickle(path, obj, protocol=2):
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=protocol)


def written(root, spec):
    """What the fixture wrote: (train images, train labels, test images, test labels) in numpy."""
    folder = os.path.join(root, spec.folder)
    out = []
    for files in (spec.train_files, spec.test_files):
        raw = [unpickle(os.path.join(folder, f)) for f in files]
        out += [np.concatenate([r['data'] for r in raw]).reshape(-1, 3, 32, 32),
                np.concatenate([r[spec.label_key] for r in raw]).astype(np.int64)]
    return out


# ---------------------------------------------------------------------------------------------
# The descriptions

def test_registry_and_spec_values():
    assert dataset_names() == ['cifar10', 'cifar100', 'tinyimagenet', 'imagefolder']
    assert DATASETS['cifar10'] is CIFAR10 and DATASETS['cifar100'] is CIFAR100
    assert get_dataset('cifar100') is CIFAR100 and get_dataset('CIFAR-10') is CIFAR10
    assert get_dataset(CIFAR100) is CIFAR100
    assert (CIFAR10.num_classes, CIFAR100.num_classes) == (10, 100)
    assert (CIFAR10.label_key, CIFAR100.label_key) == ('labels', 'fine_labels')
    assert (CIFAR10.folder, CIFAR100.folder) == ('cifar-10-batches-py', 'cifar-100-python')
    assert CIFAR10.files == tuple(f'data_batch_{i}' for i in range(1, 6)) + ('test_batch',)
    assert CIFAR100.files == ('train', 'test')
    assert (CIFAR10.archive, CIFAR100.archive) == ('cifar-10-python.tar.gz',
                                                   'cifar-100-python.tar.gz')
    assert CIFAR10.classes[0] == 'airplane' and CIFAR10.classes[-1] == 'truck'
    c = CIFAR100.classes
    assert len(c) == 100 and len(set(c)) == 100 and c[0] == 'apple' and c[-1] == 'worm'
    assert list(c) == sorted(c)  # the release's order is alphabetical
    for spec in (s for s in DATASETS.values() if s.scan is None):  # folders: once scanned
        assert len(spec.classes) == spec.num_classes
        assert len(spec.mean) == len(spec.std) == 3
        assert all(0 < m < 1 for m in spec.mean) and all(0 < s < 1 for s in spec.std)
    assert CIFAR10.mean == (0.4914, 0.4822, 0.4465) and CIFAR10.std == (0.2470, 0.2435, 0.2616)
    assert CIFAR100.mean == (0.5071, 0.4865, 0.4409) and CIFAR100.std == (0.2673, 0.2564, 0.2762)
    with pytest.raises(dataclasses.FrozenInstanceError):
        CIFAR10.num_classes = 11
    hash(CIFAR100)  # frozen and made of tuples: usable as a dict key


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(KeyError) as info:
        get_dataset('mnist')
    assert 'mnist' in str(info.value)
    assert 'cifar10' in str(info.value) and 'cifar100' in str(info.value)
    with pytest.raises(KeyError):
        load_dataset('.', 'imagenet', download=False)


def test_constants_match_utils():
    import utils
    assert CIFAR10.mean == utils.CIFAR10_MEAN and CIFAR10.std == utils.CIFAR10_STD
    assert CIFAR10.classes == tuple(utils.CIFAR10_CLASSES)
    assert CIFAR10.folder == utils.FOLDER
    assert list(CIFAR10.train_files) == list(utils.TRAIN_FILES)
    assert list(CIFAR10.test_files) == list(utils.TEST_FILES)


# ---------------------------------------------------------------------------------------------
# Loading what was written

@pytest.mark.parametrize('spec', [CIFAR10, CIFAR100], ids=lambda s: s.name)
def test_load_dataset_returns_what_was_written(c10_dir, c100_dir, spec):
    root = c10_dir if spec is CIFAR10 else c100_dir
    for how in (spec.name, spec):
        out = load_dataset(root, how, download=False)
        train_x, train_y, test_x, test_y = out
        assert train_x.shape == (200, 3, 32, 32) and test_x.shape == (100, 3, 32, 32)
        assert train_x.dtype == test_x.dtype == torch.uint8
        assert train_y.shape == (200,) and test_y.shape == (100,)
        assert train_y.dtype == test_y.dtype == torch.int64
        assert all(t.device.type == 'cpu' for t in out)
        for got, want in zip(out, written(root, spec)):
            assert np.array_equal(got.numpy(), want)
        assert int(train_y.max()) < spec.num_classes and int(train_y.min()) >= 0
    if spec is CIFAR100:  # the fixture really uses labels beyond CIFAR-10's range
        assert int(train_y.max()) > 9


def test_load_dataset_is_byte_identical_to_utils_load_cifar10(c10_dir):
    import utils
    ours = load_dataset(c10_dir, 'cifar10', download=False)
    theirs = utils.load_cifar10(c10_dir, download=False)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.numpy().tobytes() == b.numpy().tobytes()
    assert load_dataset(c10_dir, download=False)[0].shape == (200, 3, 32, 32)  # default: cifar10


def test_each_dataset_is_found_only_in_its_own_folder(c10_dir, c100_dir):
    assert find_folder(c10_dir, CIFAR10) == os.path.join(c10_dir, CIFAR10.folder)
    assert find_folder(c100_dir, 'cifar100') == os.path.join(c100_dir, CIFAR100.folder)
    assert find_folder(c10_dir, CIFAR100) is None and find_folder(c100_dir, CIFAR10) is None


@pytest.mark.parametrize('spec', [CIFAR10, CIFAR100], ids=lambda s: s.name)
def test_folder_itself_may_be_given(c10_dir, c100_dir, spec):
    folder = os.path.join(c10_dir if spec is CIFAR10 else c100_dir, spec.folder)
    assert find_folder(folder, spec) == folder
    assert ensure_dataset(folder, spec, download=False) == folder
    assert load_dataset(folder, spec, download=False)[0].shape == (200, 3, 32, 32)


def test_official_layout_with_bytes_keys_is_read(tmp_path):
    """The release was pickled by Python 2: under encoding='bytes' every key is bytes."""
    data = np.arange(3 * 3072, dtype=np.int64).astype(np.uint8).reshape(3, 3072)
    path = tmp_path / 'train'
    write_pickle(path, {b'filenames': [b'a.png', b'b.png', b'c.png'], b'batch_label': b'x',
                        b'fine_labels': [0, 57, 99], b'coarse_labels': [4, 1, 19], b'data': data})
    x, y = read_batch(str(path), CIFAR100)
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    assert y.tolist() == [0, 57, 99] and np.array_equal(x.reshape(3, 3072), data)


@pytest.mark.parametrize('protocol', [0, 2, 4, 5])
def test_any_pickle_protocol_is_read(tmp_path, protocol):
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    path = tmp_path / 'batch'
    write_pickle(path, {'data': data, 'labels': np.array([3, 9])}, protocol=protocol)
    x, y = read_batch(path, 'cifar10')
    assert y.tolist() == [3, 9] and np.array_equal(x.reshape(2, 3072), data)


# ---------------------------------------------------------------------------------------------
# Refusing what is not the dataset

GOOD = np.zeros((4, 3072), np.uint8)


def test_cifar100_labels_up_to_99_are_accepted_and_100_refused(tmp_path):
    path = tmp_path / 'test'
    write_pickle(path, {'data': GOOD, 'fine_labels': [0, 1, 98, 99]})
    assert read_batch(path, CIFAR100)[1].tolist() == [0, 1, 98, 99]
    write_pickle(path, {'data': GOOD, 'fine_labels': [0, 1, 99, 100]})
    with pytest.raises(DataError) as info:
        read_batch(path, CIFAR100)
    message = str(info.value)
    assert str(path) in message and 'not a CIFAR-100 batch' in message
    assert 'labels outside 0..99' in message


def test_cifar100_file_with_label_100_in_folder_is_named(c100_dir, tmp_path):
    root, folder = copy_root(c100_dir, tmp_path, CIFAR100)
    raw = unpickle(folder / 'test')
    raw['fine_labels'][7] = 100
    write_pickle(folder / 'test', raw)
    with pytest.raises(DataError) as info:
        load_dataset(str(root), 'cifar100', download=False)
    assert str(folder / 'test') in str(info.value) and 'CIFAR-100' in str(info.value)


def test_cifar10_label_10_is_refused(c10_dir, tmp_path):
    root, folder = copy_root(c10_dir, tmp_path, CIFAR10)
    raw = unpickle(folder / 'data_batch_4')
    raw['labels'][0] = 10
    write_pickle(folder / 'data_batch_4', raw)
    with pytest.raises(DataError) as info:
        load_dataset(str(root), 'cifar10', download=False)
    message = str(info.value)
    assert 'data_batch_4' in message and 'not a CIFAR-10 batch' in message
    assert 'labels outside 0..9' in message


def test_negative_label_is_refused(tmp_path):
    path = tmp_path / 'train'
    write_pickle(path, {'data': GOOD, 'fine_labels': [0, -1, 2, 3]})
    with pytest.raises(DataError, match='labels outside'):
        read_batch(path, CIFAR100)


def test_batch_of_the_other_dataset_is_named_as_such(tmp_path):
    path = tmp_path / 'train'
    write_pickle(path, {'data': GOOD, 'labels': [0, 1, 2, 3]})
    with pytest.raises(DataError) as info:
        read_batch(path, CIFAR100)
    assert "'fine_labels'" in str(info.value) and 'CIFAR-10 file' in str(info.value)
    write_pickle(path, {'data': GOOD, 'fine_labels': [0, 1, 2, 3], 'coarse_labels': [0] * 4})
    with pytest.raises(DataError) as info:
        read_batch(path, CIFAR10)
    assert "'labels'" in str(info.value) and 'CIFAR-100 file' in str(info.value)


@pytest.mark.parametrize('payload, words', [
    ({'data': GOOD.astype(np.float32), 'fine_labels': [0, 1, 2, 3]}, 'uint8 N x 3072'),
    ({'data': GOOD.reshape(4, 3, 32, 32), 'fine_labels': [0, 1, 2, 3]}, 'uint8 N x 3072'),
    ({'data': np.zeros((4, 1024), np.uint8), 'fine_labels': [0, 1, 2, 3]}, '3072'),
    ({'data': GOOD, 'fine_labels': [0, 1, 2]}, '4 images but 3 labels'),
    ({'data': GOOD, 'fine_labels': ['a', 'b', 'c', 'd']}, 'integers'),
    ({'data': GOOD, 'fine_labels': [0.5, 1.5, 2.0, 3.0]}, 'integers'),
    ({'data': GOOD, 'fine_labels': [[0, 1], [2, 3]]}, '4 images but'),
    ({'data': GOOD, 'fine_labels': 5}, '4 images but'),
    ({'data': GOOD, 'fine_labels': [[0, 1], [2]]}, "unreadable 'fine_labels'"),
    ({'fine_labels': [0, 1, 2, 3]}, "'data'"),
    ({'data': GOOD}, "no 'fine_labels'"),
    ([GOOD], 'not a dict'),
])
def test_pickle_that_is_not_cifar100_raises_data_error(tmp_path, payload, words):
    path = tmp_path / 'train'
    write_pickle(path, payload)
    with pytest.raises(DataError) as info:
        read_batch(str(path), CIFAR100)
    assert str(path) in str(info.value) and words in str(info.value)
    assert 'CIFAR-100 batch' in str(info.value)


@pytest.mark.parametrize('spec', [CIFAR10, CIFAR100], ids=lambda s: s.name)
def test_truncated_batch_is_named(c10_dir, c100_dir, tmp_path, spec):
    root, folder = copy_root(c10_dir if spec is CIFAR10 else c100_dir, tmp_path, spec)
    path = folder / spec.train_files[-1]
    with open(path, 'r+b') as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(DataError) as info:
        load_dataset(str(root), spec, download=False)
    message = str(info.value)
    assert str(path) in message and f'not a readable {spec.title} batch' in message
    assert spec.archive in message


class _RunsShell:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f'touch {self.target}',)


class _OpensFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return open, (self.target, 'w')


@pytest.mark.parametrize('evil', [_RunsShell, _OpensFile])
@pytest.mark.parametrize('nested', [False, True])
def test_pickle_that_would_run_code_is_refused_without_running_it(c100_dir, tmp_path, evil,
                                                                   nested):
    root, folder = copy_root(c100_dir, tmp_path, CIFAR100)
    marker = tmp_path / 'pwned'
    payload = evil(str(marker))
    if nested:
        payload = {'data': GOOD, 'fine_labels': [0, 1, 2, 3], 'filenames': [payload]}
    write_pickle(folder / 'train', payload)
    with pytest.raises(DataError) as info:
        load_dataset(str(root), 'cifar100', download=False)
    assert str(folder / 'train') in str(info.value) and 'refusing to load' in str(info.value)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Missing data and downloading

@pytest.mark.parametrize('spec', [CIFAR10, CIFAR100], ids=lambda s: s.name)
def test_missing_folder_without_download_says_what_to_do(tmp_path, spec):
    missing = tmp_path / 'nowhere'
    for call in (lambda: load_dataset(str(missing), spec.name, download=False),
                 lambda: ensure_dataset(str(missing), spec, download=False)):
        with pytest.raises(DataError) as info:
            call()
        message = str(info.value)
        assert spec.folder in message and spec.archive in message and spec.title in message
        assert str(missing) in message and '--data-dir' in message
        assert 'not allowed' in message
    assert not missing.exists()


def test_incomplete_folder_counts_as_missing(c10_dir, tmp_path):
    root, folder = copy_root(c10_dir, tmp_path, CIFAR10)
    os.remove(folder / 'data_batch_5')
    assert find_folder(str(root), CIFAR10) is None
    with pytest.raises(DataError, match='cifar-10-python.tar.gz'):
        load_dataset(str(root), CIFAR10, download=False)


def test_unextracted_archive_is_pointed_out(tmp_path):
    (tmp_path / CIFAR100.archive).write_bytes(b'not really')
    with pytest.raises(DataError) as info:
        ensure_dataset(str(tmp_path), CIFAR100, download=False)
    assert 'not extracted' in str(info.value)


def fake_torchvision(monkeypatch, behaviour):
    """Put a stand-in torchvision in sys.modules; records the calls it gets."""
    calls = []

    def make(cls_name):
        def constructor(root, train, download):
            calls.append((cls_name, str(root), train, download))
            behaviour(cls_name, root)
        return constructor

    module = types.ModuleType('torchvision')
    module.datasets = types.SimpleNamespace(CIFAR10=make('CIFAR10'), CIFAR100=make('CIFAR100'))
    monkeypatch.setitem(sys.modules, 'torchvision', module)
    return calls


def test_download_uses_the_specs_torchvision_class(c100_dir, tmp_path, monkeypatch):
    def extract(cls_name, root):  # what a successful download leaves behind
        shutil.copytree(os.path.join(c100_dir, CIFAR100.folder),
                        os.path.join(root, CIFAR100.folder))

    calls = fake_torchvision(monkeypatch, extract)
    root = tmp_path / 'data'
    out = load_dataset(str(root), 'cifar100', download=True)
    assert calls == [('CIFAR100', str(root), True, True)]
    assert out[0].shape == (200, 3, 32, 32)
    assert ensure_dataset(str(root), CIFAR100) == os.path.join(str(root), CIFAR100.folder)
    assert len(calls) == 1  # present now: no second download


def test_failed_download_is_reported(tmp_path, monkeypatch):
    def fail(cls_name, root):
        raise RuntimeError('no network here')

    calls = fake_torchvision(monkeypatch, fail)
    with pytest.raises(DataError) as info:
        ensure_dataset(str(tmp_path / 'data'), CIFAR10, download=True)
    message = str(info.value)
    assert calls and calls[0][0] == 'CIFAR10'
    assert 'the download failed: RuntimeError: no network here' in message
    assert CIFAR10.archive in message and CIFAR10.folder in message


def test_torchvision_is_not_imported_by_the_module():
    assert 'torchvision' not in vars(datasets)
    assert isinstance(DatasetSpec.download, types.FunctionType)
