"""Tiny-ImageNet in its official layout: classes, val labels from the annotations, the split,
the augmentation's shapes, the refusals, and a teacher and students trained on it in-process."""
import json
import os
import shutil

import pytest
import torch

import main
from folder_data import write_tinyimagenet
from kd.data.datasets import LayoutError, get_dataset, load_dataset, open_dataset
from kd.data.loader import make_loaders
from kd.data.streaming import FolderImages, decide_in_memory


@pytest.fixture
def tiny(tmp_path):
    return write_tinyimagenet(str(tmp_path / 'data'))


def test_classes_from_wnids_and_names_from_words(tiny):
    spec = open_dataset('tinyimagenet', tiny)
    assert spec.layout.classes == ('n01', 'n02', 'n03', 'n04')
    assert spec.classes == tuple(f'thing {w}, a {w}' for w in spec.layout.classes)
    assert spec.num_classes == 4 and spec.image_shape == (3, 64, 64)
    assert spec.batch_shape(2) == (2, 3, 64, 64)
    assert get_dataset('tiny-imagenet').name == 'tinyimagenet'


def test_val_is_the_test_set_labelled_by_the_annotations(tiny):
    arrays = load_dataset(tiny, 'tinyimagenet')
    train_x, train_y, test_x, test_y = arrays
    assert train_x.shape == (24, 3, 64, 64) and train_x.dtype == torch.uint8
    assert train_y.tolist() == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 6  # wnids.txt's order
    # val_<i>.JPEG is class (3 i) mod 4, files in name order: val_0, val_1, val_10, val_11, ...
    names = sorted(f'val_{i}.JPEG' for i in range(12))
    assert test_y.tolist() == [(3 * int(n[4:-5])) % 4 for n in names]
    assert test_x.shape == (12, 3, 64, 64)  # test/ (unlabelled) is left out
    # the normalisation is the training images' own, per channel
    mean, std = arrays.normalization
    expected = train_x.double().div(255).mean((0, 2, 3))
    assert mean == pytest.approx(expected.tolist(), abs=1e-4)
    assert all(0 < s < 0.5 for s in std)
    # the data's identity is its content, wherever it lies
    moved = os.path.join(os.path.dirname(tiny), 'moved')
    shutil.copytree(tiny, moved)
    again = load_dataset(moved, 'tinyimagenet')
    assert (again.train_sha256, again.test_sha256) == (arrays.train_sha256, arrays.test_sha256)


def test_the_split_and_the_augmentation_at_64(tiny):
    data = make_loaders(tiny, 8, val_fraction=0.25, eval_batch_size=5, dataset='tinyimagenet',
                        seed=3)
    assert (data.num_train, data.num_val, data.num_test) == (18, 6, 12)
    assert data.train.padding == 8  # CIFAR's 4 px per 32 px, at 64 px
    assert data.train.mean.flatten().tolist() == pytest.approx(
        [255 * m for m in data.arrays.normalization[0]])
    batch = next(iter(data.train.batches()))
    assert batch.images.shape == (8, 3, 64, 64) and batch.labels.shape == (8,)
    x, y = next(iter(data.test))
    assert x.shape == (5, 3, 64, 64)
    # the held-out images come from train/, the same for a given split seed
    again = make_loaders(tiny, 8, val_fraction=0.25, dataset='tinyimagenet', seed=9)
    assert torch.equal(again.val_indices, data.val_indices)


def test_image_size_resizes_at_load(tiny):
    spec = open_dataset('tinyimagenet', tiny, image_size=32)
    assert spec.image_shape == (3, 32, 32)
    arrays = load_dataset(tiny, spec)
    assert arrays.train_images.shape == (24, 3, 32, 32)


@pytest.mark.parametrize('breaks, message', [
    (lambda base: os.remove(os.path.join(base, 'val', 'val_annotations.txt')),
     'val_annotations.txt is missing'),
    (lambda base: [os.remove(os.path.join(base, 'train', 'n03', 'images', f))
                   for f in os.listdir(os.path.join(base, 'train', 'n03', 'images'))],
     'an empty class folder'),
    (lambda base: shutil.rmtree(os.path.join(base, 'train', 'n02')), 'train/<wnid>/images'),
    (lambda base: shutil.rmtree(base), 'tiny-imagenet-200'),
])
def test_a_broken_layout_is_refused_in_one_line_with_nothing_written(tiny, tmp_path, capsys,
                                                                       breaks, message):
    breaks(os.path.join(tiny, 'tiny-imagenet-200'))
    with pytest.raises(LayoutError, match=message.replace('<', '.').replace('>', '.')):
        open_dataset('tinyimagenet', tiny)
    out = tmp_path / 'out'
    code = main.main(['--train-teacher', '--dataset', 'tinyimagenet', '--data-dir', tiny,
                      '--out-dir', str(out), '--device', 'cpu', '--epochs', '1'])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith('error: ') and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_image_size_is_refused_for_cifar(tmp_path, capsys):
    code = main.main(['--dataset', 'cifar10', '--image-size', '64', '--data-dir',
                      str(tmp_path), '--out-dir', str(tmp_path / 'out')])
    assert code == 2
    assert '--image-size is for the folder datasets' in capsys.readouterr().err


def test_teacher_then_students_then_evaluate(tiny, tmp_path, capsys):
    out = str(tmp_path / 'out')
    common = ['--dataset', 'tinyimagenet', '--data-dir', tiny, '--out-dir', out,
              '--device', 'cpu', '--epochs', '1', '--batch-size', '8', '--no-amp']
    assert main.main(['--train-teacher', '--teacher-arch', 'resnet8'] + common) == 0
    printed = capsys.readouterr().out
    assert 'Tiny-ImageNet in ' in printed and 'of 4 classes at 64x64' in printed
    with open(os.path.join(out, 'results.json')) as f:
        config = json.load(f)['phases']['teacher']['config']
    arrays = load_dataset(tiny, 'tinyimagenet')
    assert config['dataset'] == 'tinyimagenet' and config['num_classes'] == 4
    assert config['train_images_sha256'] == arrays.train_sha256
    assert config['normalization'] == {'mean': list(arrays.normalization[0]),
                                       'std': list(arrays.normalization[1])}
    assert main.main(['--student-arch', 'resnet8', '--loss', 'kd', 'fitnet'] + common) == 0
    assert os.path.exists(os.path.join(out, 'best_student_kd.pth'))
    assert main.main(['--evaluate'] + common) == 0
    assert 'Student (KD)' in capsys.readouterr().out


def test_streamed_and_in_memory_loaders_give_the_same_batches(tiny):
    held = load_dataset(tiny, 'tinyimagenet')
    streamed = load_dataset(tiny, 'tinyimagenet', in_memory=False)
    assert isinstance(streamed.train_images, FolderImages)
    assert streamed.train_images.shape == held.train_images.shape
    # the same identity and normalisation, read from the files chunk by chunk
    assert (streamed.train_sha256, streamed.test_sha256) == (held.train_sha256, held.test_sha256)
    assert streamed.normalization == held.normalization
    for subset in (None, 10):
        loaders = [make_loaders(tiny, 8, val_fraction=0.25, eval_batch_size=5, seed=5,
                                subset=subset, dataset='tinyimagenet', arrays=arrays)
                   for arrays in (held, streamed)]
        for name in ('train', 'val', 'test'):
            a, b = (getattr(data, name) for data in loaders)
            for _ in range(2):  # two epochs: fresh crops and flips, the same on both
                pairs = list(zip(a.batches(), b.batches(), strict=True))
                assert pairs
                for x, y in pairs:
                    assert torch.equal(x.indices, y.indices) and torch.equal(x.labels, y.labels)
                    assert torch.equal(x.images, y.images)
        assert torch.equal(loaders[0].train.dataset[2][0], loaders[1].train.dataset[2][0])


def test_the_streamed_share_of_each_rank_is_its_slice_of_the_batch(tiny):
    streamed = load_dataset(tiny, 'tinyimagenet', in_memory=False)
    whole = make_loaders(tiny, 8, val_fraction=0.25, seed=1, dataset='tinyimagenet',
                         arrays=streamed)
    parts = [make_loaders(tiny, 8, val_fraction=0.25, seed=1, dataset='tinyimagenet',
                          arrays=streamed, rank=r, world_size=2) for r in (0, 1)]
    for one, *halves in zip(whole.train.batches(), *(p.train.batches() for p in parts)):
        assert torch.equal(torch.cat([h.images for h in halves]), one.images)
        assert torch.equal(torch.cat([h.indices for h in halves]), one.indices)


def test_the_run_says_which_loader_it_chose(tiny, tmp_path, capsys):
    assert decide_in_memory('auto', 100, 1000)[0] and not decide_in_memory('auto', 600, 1000)[0]
    assert decide_in_memory('on', 10**12, 1)[0] and not decide_in_memory('off', 1, 10**12)[0]
    common = ['--train-teacher', '--dataset', 'tinyimagenet', '--data-dir', tiny,
              '--teacher-arch', 'cnn', '--device', 'cpu', '--epochs', '1', '--batch-size', '8',
              '--no-amp']
    results = {}
    for mode in ('off', 'auto'):
        out = str(tmp_path / mode)
        assert main.main(common + ['--out-dir', out, '--data-in-memory', mode]) == 0
        printed = capsys.readouterr().out
        assert ('data: streamed from the files' in printed) == (mode == 'off')
        assert ('data: decoded once into memory' in printed) == (mode == 'auto')
        with open(os.path.join(out, 'results.json')) as f:
            results[mode] = json.load(f)
    # the same run either way: the same data digests and the same numbers
    config = [results[m]['phases']['teacher']['config'] for m in ('off', 'auto')]
    assert config[0]['train_images_sha256'] == config[1]['train_images_sha256']
    assert results['off']['models'] == results['auto']['models']
    code = main.main(['--dataset', 'cifar10', '--data-in-memory', 'off', '--data-dir',
                      str(tmp_path), '--out-dir', str(tmp_path / 'c')])
    assert code == 2 and 'always held in memory' in capsys.readouterr().err


def test_resume_continues_a_streamed_run(tiny, tmp_path, capsys):
    out = str(tmp_path / 'out')
    args = ['--train-teacher', '--dataset', 'tinyimagenet', '--data-dir', tiny, '--out-dir', out,
            '--teacher-arch', 'cnn', '--device', 'cpu', '--batch-size', '8', '--no-amp',
            '--data-in-memory', 'off']
    assert main.main(args + ['--epochs', '1']) == 0
    path = os.path.join(out, 'last_teacher.pt')
    state = torch.load(path, weights_only=True)  # as if stopped after epoch 1 of 2
    state['finished'], state['config']['epochs'] = False, 2
    torch.save(state, path)
    capsys.readouterr()
    assert main.main(args + ['--epochs', '2', '--resume']) == 0
    printed = capsys.readouterr().out
    assert 'teacher  2/2' in printed and 'teacher  1/2' not in printed
