"""An image folder in torchvision ImageFolder's layout: PNGs at 48 x 48 at their own size, mixed
sizes with and without --image-size, val/ or test/, the refusals, and a run in-process."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import main
from folder_data import write_imagefolder
from kd.data.datasets import LayoutError, load_dataset, open_dataset
from kd.data.folders import decode_image
from kd.data.loader import make_loaders


def test_classes_sorted_and_images_at_their_own_size(tmp_path):
    root = write_imagefolder(str(tmp_path / 'f'), classes=('owl', 'cat', 'dog'))
    spec = open_dataset('imagefolder', root)
    assert spec.classes == ('cat', 'dog', 'owl') and spec.num_classes == 3
    assert spec.image_shape == (3, 48, 48)
    train_x, train_y, test_x, test_y = load_dataset(root, spec)
    assert train_x.shape == (24, 3, 48, 48) and test_x.shape == (9, 3, 48, 48)
    assert train_y.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert test_y.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    # the pixels are the PNG's (lossless), in C x H x W order
    png = np.asarray(Image.open(os.path.join(root, 'train', 'cat', '000.png')))
    assert torch.equal(train_x[0], torch.from_numpy(png.copy()).permute(2, 0, 1))


def test_test_folder_and_grey_jpegs_converted_to_rgb(tmp_path):
    root = write_imagefolder(str(tmp_path / 'f'), test_name='test', ext='jpg')
    Image.new('L', (48, 48), 77).save(os.path.join(root, 'train', 'cat', 'grey.jpg'))
    train_x, train_y, test_x, _ = load_dataset(root, 'imagefolder')
    assert len(test_x) == 9 and train_x.shape[1] == 3
    grey = train_x[8]  # after cat's 000..007.jpg
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_mixed_sizes_need_image_size_then_resize_and_centre_crop(tmp_path, capsys):
    root = write_imagefolder(str(tmp_path / 'f'), sizes=[(40, 60), (48, 48), (30, 20)])
    with pytest.raises(LayoutError, match=r'different sizes \(height x width: 40x60 \(11\), '
                                          r'48x48 \(11\), 30x20 \(11\)\); give --image-size'):
        open_dataset('imagefolder', root)
    out = tmp_path / 'out'
    code = main.main(['--train-teacher', '--dataset', 'imagefolder', '--data-dir', root,
                      '--out-dir', str(out), '--device', 'cpu'])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and '40x60' in err
    assert not out.exists()
    spec = open_dataset('imagefolder', root, image_size=32)
    assert spec.image_shape == (3, 32, 32)
    assert load_dataset(root, spec).train_images.shape == (24, 3, 32, 32)


def test_resize_is_shorter_side_then_centre_crop(tmp_path):
    # a 40 x 80 image (h x w) whose left, middle and right thirds differ in colour
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :20] = 255
    pixels[:, 20:60, 1] = 200
    pixels[:, 60:, 2] = 100
    path = str(tmp_path / 'wide.png')
    Image.fromarray(pixels).save(path)
    x = decode_image(path, (20, 20))  # shorter side 40 -> 20: 20 x 40, centre 20 columns
    assert x.shape == (3, 20, 20)
    inner = x[:, :, 2:-2]  # the antialiased resize blends the edge columns
    assert (inner[1] == 200).all() and (inner[0] == 0).all()  # only the middle third is left


@pytest.mark.parametrize('breaks, message', [
    (lambda root: os.rename(os.path.join(root, 'val'), os.path.join(root, 'other')),
     'val (or test/) is missing'),
    (lambda root: [os.remove(os.path.join(root, 'train', 'dog', f))
                   for f in os.listdir(os.path.join(root, 'train', 'dog'))],
     'an empty class folder'),
    (lambda root: os.makedirs(os.path.join(root, 'val', 'emu')), 'emu'),
    (lambda root: os.rename(os.path.join(root, 'train'), os.path.join(root, 'training')),
     'train is missing'),
])
def test_a_broken_layout_is_refused_in_one_line(tmp_path, capsys, breaks, message):
    root = write_imagefolder(str(tmp_path / 'f'))
    breaks(root)
    code = main.main(['--dataset', 'imagefolder', '--data-dir', root,
                      '--out-dir', str(tmp_path / 'out'), '--device', 'cpu'])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'out').exists()


def test_the_loader_serves_48px_batches_padded_by_6(tmp_path):
    root = write_imagefolder(str(tmp_path / 'f'))
    data = make_loaders(root, 6, val_fraction=0.25, eval_batch_size=4, dataset='imagefolder')
    assert data.train.padding == 6 and (data.num_train, data.num_val) == (18, 6)
    assert next(iter(data.train))[0].shape == (6, 3, 48, 48)
    assert data.normalization == data.arrays.normalization


def test_a_teacher_trains_on_the_folder(tmp_path, capsys):
    root = write_imagefolder(str(tmp_path / 'f'))
    out = str(tmp_path / 'out')
    assert main.main(['--train-teacher', '--dataset', 'imagefolder', '--data-dir', root,
                      '--teacher-arch', 'cnn', '--out-dir', out, '--device', 'cpu',
                      '--epochs', '1', '--batch-size', '6', '--no-amp',
                      '--image-size', '40']) == 0
    assert 'of 3 classes at 40x40' in capsys.readouterr().out
    with open(os.path.join(out, 'results.json')) as f:
        config = json.load(f)['phases']['teacher']['config']
    # what ran: the crop's padding is an eighth of the 40 px side, not the recipe's 4 of 32
    assert config['recipe_values']['crop_padding'] == 5 and config['image_size'] == 40
    # every command the run suggests keeps the size the images were read at
    from kd.run.commands import fast_run_commands, quick_run_commands
    from kd.run.config import resolve
    parsed = resolve(main.build_parser().parse_args(
        ['--train-teacher', '--dataset', 'imagefolder', '--data-dir', root, '--image-size', '40']))
    for line in quick_run_commands(parsed, 'cnn') + fast_run_commands(parsed):
        assert '--image-size 40' in line, line


def test_a_model_too_deep_for_the_images_is_refused_before_training(tmp_path, capsys):
    """8x8 images: MobileNetV2's downsampling needs 16x16, so the run stops before writing
    anything, with one line naming the size; a model that fits trains."""
    root = write_imagefolder(str(tmp_path / 'data'), size=(8, 8))
    out = tmp_path / 'out'
    code = main.main(['--train-teacher', '--dataset', 'imagefolder', '--data-dir', root,
                      '--teacher-arch', 'mobilenetv2', '--epochs', '1', '--batch-size', '8',
                      '--device', 'cpu', '--no-amp', '--out-dir', str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        "error: model 'mobilenetv2' cannot run on 8x8 images: its downsampling needs at least "
        "16x16"]
    assert not any(p.suffix in ('.pth', '.pt', '.json') for p in out.rglob('*'))
