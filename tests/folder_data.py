"""Tiny image folders for the folder datasets' tests: a Tiny-ImageNet layout and ImageFolder
layouts, each class with its own colour so a model can learn something in a few steps."""
import os

import numpy as np
from PIL import Image


def _image(rng, label, size):
    h, w = size
    colour = np.array([(40 * label) % 256, (90 * label + 60) % 256, (150 - 30 * label) % 256])
    pixels = colour[None, None, :] + rng.normal(0, 30, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_tinyimagenet(root, wnids=('n01', 'n02', 'n03', 'n04'), train_per_class=6,
                       val_per_class=3, seed=0, annotations=True):
    """DATA_DIR/tiny-imagenet-200 in the official layout at 64 x 64 (JPEG); returns root.
    val images are named val_<i>.JPEG in an order that interleaves the classes, and labelled
    in val_annotations.txt (unless annotations=False)."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, 'tiny-imagenet-200')
    os.makedirs(os.path.join(base, 'val', 'images'))
    os.makedirs(os.path.join(base, 'test', 'images'))
    with open(os.path.join(base, 'wnids.txt'), 'w') as f:
        f.write(''.join(f'{w}\n' for w in wnids))
    with open(os.path.join(base, 'words.txt'), 'w') as f:
        f.write('n00\tsomething else\n' + ''.join(f'{w}\tthing {w}, a {w}\n' for w in wnids))
    for label, wnid in enumerate(wnids):
        folder = os.path.join(base, 'train', wnid, 'images')
        os.makedirs(folder)
        for i in range(train_per_class):
            _image(rng, label, (64, 64)).save(os.path.join(folder, f'{wnid}_{i}.JPEG'))
    lines = []
    for i in range(val_per_class * len(wnids)):
        label = (i * 3) % len(wnids)
        name = f'val_{i}.JPEG'
        _image(rng, label, (64, 64)).save(os.path.join(base, 'val', 'images', name))
        lines.append(f'{name}\t{wnids[label]}\t0\t0\t63\t63\n')
    _image(rng, 0, (64, 64)).save(os.path.join(base, 'test', 'images', 'test_0.JPEG'))
    if annotations:
        with open(os.path.join(base, 'val', 'val_annotations.txt'), 'w') as f:
            f.write(''.join(lines))
    return root


def write_imagefolder(root, classes=('cat', 'dog', 'owl'), train_per_class=8, test_per_class=3,
                      size=(48, 48), sizes=None, test_name='val', ext='png', seed=0):
    """root/train/<class>/*.<ext> and root/<test_name>/<class>/*.<ext>; sizes: a list of
    (h, w) cycled over the images (mixed sizes), else every image `size`. Returns root."""
    rng = np.random.default_rng(seed)
    n = 0
    for split, per_class in (('train', train_per_class), (test_name, test_per_class)):
        for label, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder)
            for i in range(per_class):
                shape = sizes[n % len(sizes)] if sizes else size
                n += 1
                _image(rng, label, shape).save(os.path.join(folder, f'{i:03d}.{ext}'))
    return root
