"""The device-resident CIFAR-10 loader: augmentation, normalization, order, sharding, data errors.

Fast CPU tests on the tiny `cifar_dir` folders (real pickle format) and on synthetic uint8
tensors built so that each output reveals where it came from:
  * channel 0 of image i is the constant i + 1, so max(channel 0) names the source image even
    after a crop (the zero padding is smaller than any index code);
  * channels 1 and 2 are either noise (an exact crop/flip is then unique) or the row / column
    number + 1 (the crop offsets and the flip can then be read back from one pixel).
"""
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

import utils
from kd.data.loader import (CIFAR10_MEAN, CIFAR10_STD, CifarLoader, DataSource, LoaderOptions,
                            crop_flip, get_cifar10_loaders, load_cifar10, load_loaders,
                            make_loaders, read_cifar_batch, split_train_val)
from kd.data.datasets import DataError

PAD = 4
MEAN = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1) * 255
STD = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1) * 255


# ---------------------------------------------------------------------------------------------
# Helpers

def noise_images(n, seed=0):
    """n x 3 x 32 x 32 uint8: channel 0 = index + 1, channels 1-2 noise in 1..255."""
    assert n <= 255, 'the index code is one uint8'
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    x[:, 0] = (torch.arange(n) + 1).to(torch.uint8)[:, None, None]
    return x


def position_images(n):
    """n x 3 x 32 x 32 uint8: channel 0 = index + 1 (mod 256), channel 1 = row + 1, channel 2 = col + 1."""
    x = torch.empty(n, 3, 32, 32, dtype=torch.uint8)
    x[:, 0] = (torch.arange(n) + 1).to(torch.uint8)[:, None, None]
    x[:, 1] = (torch.arange(32) + 1).to(torch.uint8)[None, :, None]
    x[:, 2] = (torch.arange(32) + 1).to(torch.uint8)[None, None, :]
    return x


def labels_for(n, seed=1):
    return torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed))


def denormalize(x):
    """Normalized float images back to (rounded) uint8 values."""
    return (x.float() * STD + MEAN).round().clamp(0, 255).to(torch.uint8)


def numpy_crop(image, dy, dx, flip):
    """The reference: zero-pad by 4 with numpy, cut 32 x 32 at (dy, dx), mirror the columns."""
    padded = np.pad(np.asarray(image), ((0, 0), (PAD, PAD), (PAD, PAD)))
    out = padded[:, dy:dy + 32, dx:dx + 32]
    return np.ascontiguousarray(out[:, :, ::-1] if flip else out)


def torchvision_candidates(image):
    """All 162 crops / flips of one C x 32 x 32 image via torchvision.transforms.v2.functional."""
    padded = TF.pad(image, [PAD], fill=0)
    out = {}
    for dy in range(2 * PAD + 1):
        for dx in range(2 * PAD + 1):
            crop = TF.crop(padded, dy, dx, 32, 32)
            out[(dy, dx, False)] = crop
            out[(dy, dx, True)] = TF.horizontal_flip(crop)
    return out


def read_position(images):
    """(dy, dx, flip) of each output of position_images: row/col codes at pixel (8, 8)."""
    row = images[:, 1, 8, 8].long() - 1          # = dy + 8 - PAD
    col = images[:, 2, 8, 8].long() - 1          # = dx + 8 - PAD, or dx + 23 - PAD when flipped
    flip = col > 16
    dy = row - 8 + PAD
    dx = torch.where(flip, col - 23 + PAD, col - 8 + PAD)
    return dy, dx, flip


def source_index(images):
    return images[:, 0].flatten(1).max(1).values.long() - 1


def collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def all_combos():
    combos = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)]
    dy, dx, flip = (torch.tensor(c) for c in zip(*combos))
    return combos, dy, dx, flip


# ---------------------------------------------------------------------------------------------
# crop_flip

def test_crop_flip_equals_numpy_crop_for_every_offset_and_flip():
    combos, dy, dx, flip = all_combos()
    image = noise_images(1, seed=3)[0]
    out = crop_flip(image.expand(len(combos), -1, -1, -1).contiguous(), dy, dx, flip)
    assert out.shape == (162, 3, 32, 32) and out.dtype == torch.uint8
    for k, (y, x, f) in enumerate(combos):
        np.testing.assert_array_equal(out[k].numpy(), numpy_crop(image, y, x, f),
                                      err_msg=f'dy={y} dx={x} flip={f}')
    # the padded border is zero: offset 0 puts 4 zero rows / columns on the top / left side,
    # offset 8 on the bottom / right; a flip moves the zero columns to the other side
    k = combos.index((0, 0, False))
    assert (out[k, :, :PAD] == 0).all() and (out[k, :, :, :PAD] == 0).all()
    assert (out[k, :, PAD:, PAD:] > 0).all()
    k = combos.index((8, 8, False))
    assert (out[k, :, -PAD:] == 0).all() and (out[k, :, :, -PAD:] == 0).all()
    k = combos.index((0, 0, True))
    assert (out[k, :, :, -PAD:] == 0).all() and (out[k, :, PAD:, :-PAD] > 0).all()
    k = combos.index((4, 4, False))
    assert torch.equal(out[k], image)


def test_crop_flip_matches_torchvision_for_all_162_candidates():
    combos, dy, dx, flip = all_combos()
    images = noise_images(3, seed=4)
    for image in images:
        out = crop_flip(image.expand(len(combos), -1, -1, -1).contiguous(), dy, dx, flip)
        reference = torchvision_candidates(image)
        for k, c in enumerate(combos):
            assert torch.equal(out[k], reference[c]), c


def test_crop_flip_each_output_is_exactly_its_own_crop_of_its_source():
    n = 64
    images = noise_images(n, seed=5)
    g = torch.Generator().manual_seed(0)
    dy = torch.randint(0, 9, (n,), generator=g)
    dx = torch.randint(0, 9, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    out = crop_flip(images, dy, dx, flip)
    for b in range(n):
        cands = torchvision_candidates(images[b])
        matches = [c for c, ref in cands.items() if torch.equal(out[b], ref)]
        # noise makes the crop unique: the one match is the requested one
        assert matches == [(int(dy[b]), int(dx[b]), bool(flip[b]))]


def test_crop_flip_works_on_float_and_channels_last():
    combos, dy, dx, flip = all_combos()
    images = noise_images(len(combos), seed=6)
    expected = crop_flip(images, dy, dx, flip).float()
    as_float = images.float().contiguous(memory_format=torch.channels_last)
    assert torch.equal(crop_flip(as_float, dy, dx, flip), expected)


def test_loader_augmentation_distribution_is_randomcrop_plus_flip():
    """Offsets uniform over the 9 x 9 positions, flips at rate 1/2, all 162 cases present."""
    n = 2048
    loader = CifarLoader(position_images(n), labels_for(n), 256,
                         train=True, seed=11)
    counts = torch.zeros(9, 9, 2)
    for epoch in range(2):
        loader.set_epoch(epoch)
        for x, _ in loader:
            dy, dx, flip = read_position(denormalize(x))
            assert ((dy >= 0) & (dy <= 8) & (dx >= 0) & (dx <= 8)).all()
            counts.index_put_((dy, dx, flip.long()), torch.ones(len(dy)), accumulate=True)
    total = counts.sum()
    assert total == 2 * n
    assert (counts > 0).all(), 'some (dy, dx, flip) never drawn'
    flip_rate = counts[..., 1].sum() / total
    assert 0.45 < flip_rate < 0.55
    for marginal in (counts.sum((1, 2)), counts.sum((0, 2))):
        assert ((marginal / total - 1 / 9).abs() < 0.035).all(), marginal
    expected = total / 162
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 161 + 6 * (2 * 161) ** 0.5, chi2  # 161 degrees of freedom, mean 161


def test_augmentation_differs_between_epochs_for_the_same_image():
    n = 250
    loader = CifarLoader(position_images(n), labels_for(n), 50, train=True, seed=0)
    seen = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        pos = {}
        for x, _ in loader:
            x = denormalize(x)
            for i, d, e, f in zip(source_index(x).tolist(), *read_position(x)):
                pos[i] = (int(d), int(e), bool(f))
        seen.append(pos)
    assert sorted(seen[0]) == list(range(n))
    same = sum(seen[0][i] == seen[1][i] for i in range(n))
    assert same < n // 10


# ---------------------------------------------------------------------------------------------
# CifarLoader / make_loaders / get_cifar10_loaders

def test_shapes_dtypes_and_len(cifar_dir):
    data = make_loaders(cifar_dir, batch_size=32, val_fraction=0.1, seed=0, eval_batch_size=64,
                        download=False)
    assert (data.num_train, data.num_val, data.num_test) == (180, 20, 100)
    assert len(data.train) == 180 // 32           # the partial last batch is dropped
    assert len(data.val) == 1 and len(data.test) == 2
    for loader, sizes in ((data.train, [32] * 5), (data.val, [20]), (data.test, [64, 36])):
        batches = collect(loader)
        assert [len(y) for _, y in batches] == sizes
        for x, y in batches:
            assert x.shape == (len(y), 3, 32, 32) and x.dtype == torch.float32
            assert y.dtype == torch.int64 and y.device.type == 'cpu'
            assert ((y >= 0) & (y <= 9)).all()


def test_train_loader_smaller_than_one_batch_uses_all_images():
    loader = CifarLoader(noise_images(10), labels_for(10), 32, train=True)
    assert len(loader) == 1
    (x, y), = collect(loader)
    assert sorted(source_index(denormalize(x)).tolist()) == list(range(10))
    empty = CifarLoader(noise_images(0), labels_for(0), 32, train=True)
    assert len(empty) == 0 and collect(empty) == []


def test_get_cifar10_loaders(cifar_dir):
    train, test = get_cifar10_loaders(batch_size=50, data_dir=cifar_dir, num_workers=2,
                                      download=False)
    assert len(train) == 4 and len(test) == 2
    x, y = next(iter(train))
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert sum(len(y) for _, y in test) == 100


@pytest.mark.parametrize('channels_last', [False, True])
def test_test_loader_is_normalized_source_in_order(cifar_dir, channels_last):
    _, _, test_x, test_y = load_cifar10(cifar_dir, download=False)
    data = make_loaders(cifar_dir, batch_size=32, val_fraction=0.0, eval_batch_size=40,
                        channels_last=channels_last, download=False)
    xs, ys = zip(*collect(data.test))
    x, y = torch.cat(xs), torch.cat(ys)
    if channels_last:
        assert xs[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, test_y)
    restored = x * STD + MEAN
    assert (restored - test_x.float()).abs().max() <= 1e-4 * 255
    # per-channel statistics are those of (x - mean) / std
    expected = (test_x.float() - MEAN) / STD
    assert torch.allclose(x, expected, atol=1e-5)


def test_training_batches_are_augmented_sources_with_their_labels():
    n = 200
    images, labels = noise_images(n, seed=7), labels_for(n)
    loader = CifarLoader(images, labels, 50, train=True, seed=3)
    unchanged, seen = 0, []
    for x, y in loader:
        x = denormalize(x)
        src = source_index(x)
        seen += src.tolist()
        assert torch.equal(y, labels[src])
        for b in range(len(y)):
            cands = torchvision_candidates(images[src[b]])
            assert any(torch.equal(x[b], ref) for ref in cands.values()), 'not a crop/flip'
            unchanged += torch.equal(x[b], images[src[b]])
    assert sorted(seen) == list(range(n))          # one epoch = each image once
    assert unchanged < n // 10                     # about 1 in 162 is the identity crop


def test_real_format_training_labels_match_sources(cifar_dir):
    """Through make_loaders on the pickled fixture: augmented, but every label still right."""
    train_x, train_y, _, _ = load_cifar10(cifar_dir, download=False)
    data = make_loaders(cifar_dir, batch_size=40, val_fraction=0.0, seed=0, download=False)
    order, _ = data.train._plan(data.train.epoch)
    for i, (x, y) in enumerate(data.train):
        idx = order[i * 40:(i + 1) * 40]
        assert torch.equal(y, train_y[idx])
        raw = denormalize(x)
        assert not torch.equal(raw, train_x[idx])
        for b in range(0, 40, 8):
            cands = torchvision_candidates(train_x[idx[b]])
            assert any(torch.equal(raw[b], ref) for ref in cands.values())


def test_options_objects_give_what_the_keywords_give(cifar_dir):
    """load_loaders(DataSource, LoaderOptions) is make_loaders' flat keywords, batch for batch;
    CifarLoader takes a LoaderOptions or its fields as keywords, or both (the keywords win)."""
    arrays = load_cifar10(cifar_dir, download=False)
    flat = make_loaders(cifar_dir, 16, 'cpu', 0.2, 5, 150, eval_batch_size=40, arrays=arrays,
                        split_seed=2, channels_last=True, padding=2, padding_mode='reflect',
                        flip='alternate')
    source = DataSource(cifar_dir, arrays=arrays, subset=150, val_fraction=0.2, split_seed=2)
    options = LoaderOptions('cpu', seed=5, channels_last=True, padding=2,
                            padding_mode='reflect', flip='alternate')
    grouped = load_loaders(source, 16, 40, options)
    assert grouped.num_train == flat.num_train == 120 and grouped.num_val == flat.num_val == 30
    for a, b in ((flat.train, grouped.train), (flat.val, grouped.val), (flat.test, grouped.test)):
        for (xa, ya), (xb, yb) in zip(collect(a), collect(b), strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert flat.val.seed == flat.test.seed == 0  # evaluation loaders: as before the options
    images, labels = noise_images(20), labels_for(20)
    by_keywords = CifarLoader(images, labels, 8, True, seed=3, padding=1)
    by_options = CifarLoader(images, labels, 8, True, LoaderOptions(seed=3, padding=1))
    mixed = CifarLoader(images, labels, 8, True, LoaderOptions(seed=9, padding=1), seed=3)
    for (xa, _), (xb, _), (xc, _) in zip(collect(by_keywords), collect(by_options),
                                         collect(mixed), strict=True):
        assert torch.equal(xa, xb) and torch.equal(xa, xc)
    with pytest.raises(TypeError, match='colour'):
        make_loaders(cifar_dir, arrays=arrays, colour=True)
    with pytest.raises(TypeError, match='mean'):  # the dataset's statistics, always
        make_loaders(cifar_dir, arrays=arrays, mean=(0.5, 0.5, 0.5))
    with pytest.raises(TypeError):
        CifarLoader(images, labels, 8, True, colour=True)


def test_same_seed_and_epoch_give_identical_batches(cifar_dir):
    arrays = load_cifar10(cifar_dir, download=False)
    a = make_loaders(cifar_dir, 32, seed=5, val_fraction=0.0, arrays=arrays).train
    b = make_loaders(cifar_dir, 32, seed=5, val_fraction=0.0, arrays=arrays).train
    a.set_epoch(3)
    b.set_epoch(1)
    collect(b)                                   # history must not matter
    b.set_epoch(3)
    for (xa, ya), (xb, yb) in zip(collect(a), collect(b), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # set_epoch picks an epoch explicitly: the same epoch twice repeats it exactly
    a.set_epoch(3)
    first = collect(a)
    a.set_epoch(3)
    second = collect(a)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(first, second))


def test_different_epoch_or_seed_changes_order():
    n = 128
    loader = CifarLoader(noise_images(n), labels_for(n), 32, train=True, seed=0)

    def order(seed, epoch):
        loader.seed = seed
        loader.set_epoch(epoch)
        return torch.cat([source_index(denormalize(x)) for x, _ in loader])

    e0, e1, s1 = order(0, 0), order(0, 1), order(1, 0)
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(n))
    assert not torch.equal(e0, e1) and not torch.equal(e0, s1)
    assert torch.equal(order(0, 0), e0)


@pytest.mark.parametrize('k', [0, 1, 3, 5])
def test_resume_with_start_batch_yields_the_rest_of_the_epoch(k):
    n = 160
    images, labels = noise_images(n, seed=8), labels_for(n)
    full_loader = CifarLoader(images, labels, 32, train=True, seed=2)
    full_loader.set_epoch(4)
    full = collect(full_loader)
    restarted = CifarLoader(images, labels, 32, train=True, seed=2)
    restarted.set_epoch(4, start_batch=k)
    rest = collect(restarted)
    assert len(rest) == len(full) - k
    for (xa, ya), (xb, yb) in zip(full[k:], rest, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # start_batch applies once: the next pass is the whole next epoch
    again = collect(restarted)
    full_loader.set_epoch(5)
    assert len(again) == len(full)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(again, collect(full_loader), strict=True))


@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('world_size', [2, 3])
def test_rank_slices_concatenate_to_the_single_process_batch(train, world_size):
    n = 150
    images, labels = noise_images(n, seed=9), labels_for(n)
    single = CifarLoader(images, labels, 32, train=train, seed=7)
    single.set_epoch(2)
    expected = collect(single)
    per_rank = []
    for rank in range(world_size):
        loader = CifarLoader(images, labels, 32, train=train, seed=7, rank=rank,
                             world_size=world_size)
        assert len(loader) == len(single)
        loader.set_epoch(2)
        per_rank.append(collect(loader))
    for i, (x, y) in enumerate(expected):
        parts = [batches[i] for batches in per_rank]
        assert all(len(p[1]) > 0 for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_subset_and_validation_split():
    n, n_test = 240, 60
    arrays = (noise_images(n, seed=10), labels_for(n), noise_images(n_test, seed=11),
              labels_for(n_test, seed=2))

    def indices(data):
        val = torch.cat([source_index(denormalize(x)) for x, _ in data.val])
        train = torch.cat([source_index(denormalize(x)) for x, _ in data.train])
        test = torch.cat([source_index(denormalize(x)) for x, _ in data.test])
        return train, val, test

    data = make_loaders(batch_size=20, val_fraction=0.2, seed=0, subset=100, arrays=arrays)
    assert (data.num_train, data.num_val, data.num_test) == (80, 20, 60)
    train, val, test = indices(data)
    assert len(train) == 80 and len(val) == 20
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(100))   # the first 100 images
    assert test.tolist() == list(range(60))
    # val labels are those of their source images
    assert torch.equal(torch.cat([y for _, y in data.val]), arrays[1][val])
    # the split belongs to the data: split_seed picks it, the run's seed does not change it
    expected_train, expected_val = split_train_val(100, 0.2, 0)
    assert val.tolist() == expected_val.tolist()
    assert sorted(train.tolist()) == expected_train.tolist()
    other_seed = indices(make_loaders(batch_size=20, val_fraction=0.2, seed=1, subset=100,
                                      arrays=arrays))[1]
    other_split = indices(make_loaders(batch_size=20, val_fraction=0.2, seed=0, subset=100,
                                       arrays=arrays, split_seed=1))[1]
    assert torch.equal(other_seed, val)
    assert set(other_split.tolist()) != set(val.tolist()) and len(other_split) == 20
    # a subset larger than the test set keeps the whole test set; no split means no val loader
    data = make_loaders(batch_size=20, val_fraction=0.0, subset=100, arrays=arrays)
    assert data.val is None and data.num_val == 0 and data.num_train == 100


def test_val_fraction_that_leaves_nothing_is_refused():
    arrays = (noise_images(10), labels_for(10), noise_images(5), labels_for(5))
    with pytest.raises(ValueError):
        make_loaders(val_fraction=0.01, arrays=arrays)


# ---------------------------------------------------------------------------------------------
# Data errors

def copy_fixture(cifar_dir, tmp_path):
    dst = tmp_path / 'data'
    shutil.copytree(cifar_dir, dst)
    return dst, dst / utils.FOLDER


def test_fixture_loads(cifar_dir):
    train_x, train_y, test_x, test_y = load_cifar10(cifar_dir, download=False)
    assert train_x.shape == (200, 3, 32, 32) and train_x.dtype == torch.uint8
    assert test_x.shape == (100, 3, 32, 32) and test_y.dtype == torch.int64
    assert train_y.shape == (200,)


def test_truncated_batch_raises_data_error_naming_the_file(cifar_dir, tmp_path):
    root, folder = copy_fixture(cifar_dir, tmp_path)
    path = folder / 'data_batch_3'
    size = path.stat().st_size
    with open(path, 'r+b') as f:
        f.truncate(size // 2)
    with pytest.raises(DataError, match='data_batch_3'):
        load_cifar10(str(root), download=False)
    with pytest.raises(DataError, match='data_batch_3'):
        get_cifar10_loaders(data_dir=str(root), download=False)


def write_pickle(path, obj):
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=2)


GOOD_DATA = np.zeros((4, 3072), np.uint8)


@pytest.mark.parametrize('payload, words', [
    ({'data': GOOD_DATA.astype(np.float32), 'labels': [0, 1, 2, 3]}, 'uint8'),
    ({'data': GOOD_DATA.reshape(4, 3, 32, 32), 'labels': [0, 1, 2, 3]}, 'uint8 N x 3072'),
    ({'data': np.zeros((4, 1024), np.uint8), 'labels': [0, 1, 2, 3]}, '3072'),
    ({'data': GOOD_DATA, 'labels': [0, 1, 2, 10]}, 'labels outside'),
    ({'data': GOOD_DATA, 'labels': [0, -1, 2, 3]}, 'labels outside'),
    ({'data': GOOD_DATA, 'labels': [0, 1, 2]}, 'labels'),
    ({'data': GOOD_DATA, 'labels': ['cat', 'dog', 'cat', 'dog']}, 'integers'),
    ({'data': GOOD_DATA, 'labels': [0.5, 1.7, 2.0, 3.0]}, 'integers'),
    ({'data': GOOD_DATA, 'labels': [[0, 1], [2, 3]]}, '4 images but'),
    ({'labels': [0, 1, 2, 3]}, "'data'"),
    ([GOOD_DATA], 'not a dict'),
    ({b'data': [1, 2, 3], b'labels': [0]}, "'data'"),
])
def test_pickle_that_is_not_cifar_raises_data_error(tmp_path, payload, words):
    path = tmp_path / 'data_batch_1'
    write_pickle(path, payload)
    with pytest.raises(DataError) as info:
        read_cifar_batch(str(path))
    assert str(path) in str(info.value) and words in str(info.value)


def test_foreign_batch_in_folder_is_named(cifar_dir, tmp_path):
    root, folder = copy_fixture(cifar_dir, tmp_path)
    write_pickle(folder / 'test_batch', {'data': GOOD_DATA, 'labels': [0, 1, 2, 11]})
    with pytest.raises(DataError, match='test_batch'):
        load_cifar10(str(root), download=False)


def test_bytes_keys_as_in_the_official_release_are_read(tmp_path):
    path = tmp_path / 'batch'
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    write_pickle(path, {b'data': data, b'labels': [3, 9], b'batch_label': b'x'})
    x, y = read_cifar_batch(str(path))
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.uint8 and y.tolist() == [3, 9]
    assert np.array_equal(x.reshape(2, 3072), data)


class _CreatesFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return open, (self.target, 'w')


class _MakesDir:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


@pytest.mark.parametrize('evil', [_CreatesFile, _MakesDir])
@pytest.mark.parametrize('nested', [False, True])
def test_malicious_pickle_is_refused_without_side_effects(cifar_dir, tmp_path, evil, nested):
    root, folder = copy_fixture(cifar_dir, tmp_path)
    marker = tmp_path / 'pwned'
    payload = evil(str(marker))
    if nested:
        payload = {'data': payload, 'labels': [0]}
    write_pickle(folder / 'data_batch_2', payload)
    with pytest.raises(DataError, match='data_batch_2'):
        load_cifar10(str(root), download=False)
    assert not marker.exists()


def test_missing_folder_without_download_says_what_to_do(tmp_path):
    missing = tmp_path / 'nowhere'
    for call in (lambda: load_cifar10(str(missing), download=False),
                 lambda: make_loaders(str(missing), download=False),
                 lambda: get_cifar10_loaders(data_dir=str(missing), download=False)):
        with pytest.raises(DataError) as info:
            call()
        message = str(info.value)
        assert 'cifar-10-python.tar.gz' in message and '--data-dir' in message
        assert str(missing) in message
    assert not missing.exists()


def test_incomplete_folder_counts_as_missing(cifar_dir, tmp_path):
    root, folder = copy_fixture(cifar_dir, tmp_path)
    os.remove(folder / 'data_batch_5')
    with pytest.raises(DataError, match='cifar-10-python.tar.gz'):
        load_cifar10(str(root), download=False)


def test_folder_itself_may_be_given(cifar_dir):
    folder = os.path.join(cifar_dir, utils.FOLDER)
    assert utils.find_cifar10_folder(folder) == folder
    assert load_cifar10(folder, download=False)[0].shape == (200, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# The notebook loop: each pass is the next epoch; loader.dataset has a length

def test_each_pass_over_the_training_loader_is_the_next_epoch(cifar_dir):
    train, _ = get_cifar10_loaders(batch_size=50, data_dir=cifar_dir, download=False, seed=3)
    passes = [collect(train) for _ in range(3)]   # for epoch in range(3): for x, y in train
    for a, b in zip(passes, passes[1:]):
        assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    # still reproducible: pass e is epoch e of seed 3, whoever asks for it
    again, _ = get_cifar10_loaders(batch_size=50, data_dir=cifar_dir, download=False, seed=3)
    again.set_epoch(2)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
               for p, q in zip(passes[2], collect(again), strict=True))


def test_loader_dataset_has_a_length_and_unaugmented_items(cifar_dir):
    train, test = get_cifar10_loaders(batch_size=64, data_dir=cifar_dir, download=False)
    arrays = load_cifar10(cifar_dir, download=False)
    assert len(test.dataset) == 100 and len(train.dataset) == 200
    image, label = test.dataset[7]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label == int(arrays[3][7])
    first_batch, labels = next(iter(test))
    assert torch.equal(image, first_batch[7]) and label == int(labels[7])
    assert test.dataset[-1][1] == int(arrays[3][-1])
    with pytest.raises(IndexError):
        test.dataset[100]
