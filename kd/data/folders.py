"""Datasets stored as image files: Tiny-ImageNet's official layout and any ImageFolder layout.

A scan (scan_tinyimagenet, scan_imagefolder) reads the folder structure only - class lists,
file lists, the image size (image headers, not pixels) - and refuses a layout it cannot use
with a LayoutError naming what is wrong: the run turns it into a one-line usage error before
anything is written. decode_layout then decodes every image once (Pillow, converted to RGB) into
the uint8 N x 3 x H x W store the loaders hold, the same tensors a pickle release gives.

Resizing (--image-size N, or an image of another size than the dataset's): the shorter side is
resized to N (bilinear, antialiased), then the centre N x N is cropped. This happens once, at
load time, for the training and the test images alike; the training loader's random crop and
flip then act on the N x N images on the device, as for CIFAR.
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

from kd.data.errors import DataError, LayoutError

# the file endings torchvision.datasets.ImageFolder accepts (its IMG_EXTENSIONS)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
TINY_FOLDER = 'tiny-imagenet-200'


@dataclass(frozen=True)
class FolderLayout:
    """What a scan found: the classes in label order and the labelled files of each split."""
    root: str                     # the folder scanned
    classes: tuple                # class folder names (wnids for Tiny-ImageNet), in label order
    names: tuple                  # the classes' readable names, in label order
    train: tuple                  # ((path, label), ...) of the training split, in load order
    test: tuple                   # ((path, label), ...) of the test split
    image_size: tuple             # (height, width) every image is decoded to
    resize: Optional[int] = None  # --image-size: shorter side to N, centre crop N x N


def _images_in(folder):
    """The image files directly in `folder`, sorted by name (the order of labels and digests)."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS)
                  and os.path.isfile(os.path.join(folder, f)))


def _need_folder(path, what):
    if not os.path.isdir(path):
        raise LayoutError(f'{path} is missing: {what}')


def _need_file(path, what):
    if not os.path.isfile(path):
        raise LayoutError(f'{path} is missing: {what}')


def scan_tinyimagenet(data_dir, image_size=None):
    """The FolderLayout of DATA_DIR/tiny-imagenet-200 (or DATA_DIR itself when it is that
    folder): classes from wnids.txt in its order, their names from words.txt, training images
    train/<wnid>/images/*.JPEG, test images val/images/* labelled by val/val_annotations.txt;
    test/ (unlabelled) is ignored. 64 x 64 unless image_size is given."""
    root = os.path.join(data_dir, TINY_FOLDER)
    if not os.path.isdir(root) and os.path.isfile(os.path.join(data_dir, 'wnids.txt')):
        root = data_dir
    _need_folder(root, f'--data-dir should hold the {TINY_FOLDER} folder of the official release')
    wnids_path = os.path.join(root, 'wnids.txt')
    _need_file(wnids_path, 'the class list of Tiny-ImageNet (one wnid a line)')
    with open(wnids_path) as f:
        classes = tuple(line.strip() for line in f if line.strip())
    if not classes:
        raise LayoutError(f'{wnids_path} lists no classes')
    names = dict.fromkeys(classes, '')
    words = os.path.join(root, 'words.txt')
    if os.path.isfile(words):
        with open(words) as f:
            for line in f:
                wnid, _, name = line.rstrip('\n').partition('\t')
                if wnid in names:
                    names[wnid] = name.strip()
    label = {wnid: i for i, wnid in enumerate(classes)}
    train = []
    for wnid in classes:
        folder = os.path.join(root, 'train', wnid, 'images')
        _need_folder(folder, f'the training images of class {wnid} (train/<wnid>/images/)')
        files = _images_in(folder)
        if not files:
            raise LayoutError(f'{folder} holds no images: an empty class folder')
        train += [(p, label[wnid]) for p in files]
    test = _tiny_val(root, label)
    size = (image_size, image_size) if image_size else (64, 64)
    return FolderLayout(root, classes, tuple(names[w] or w for w in classes), tuple(train),
                        tuple(test), size, image_size)


def _tiny_val(root, label):
    """((path, label), ...) of Tiny-ImageNet's val/ images, sorted by file name."""
    folder = os.path.join(root, 'val', 'images')
    _need_folder(folder, 'the labelled validation images (val/images/), the test set')
    annotations = os.path.join(root, 'val', 'val_annotations.txt')
    _need_file(annotations, 'the labels of val/images/ (val/val_annotations.txt)')
    labels = {}
    with open(annotations) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2 or parts[1] not in label:
                raise LayoutError(f'{annotations} line {n}: expected "FILE WNID ..." with a wnid '
                                  f'of wnids.txt, got {line.strip()!r}')
            labels[parts[0]] = label[parts[1]]
    test = []
    for path in _images_in(folder):
        name = os.path.basename(path)
        if name not in labels:
            raise LayoutError(f'{path} has no label in {annotations}')
        test.append((path, labels[name]))
    if not test:
        raise LayoutError(f'{folder} holds no images')
    return test


def scan_imagefolder(data_dir, image_size=None):
    """The FolderLayout of DATA_DIR/train/<class>/* and DATA_DIR/val/<class>/* (test/<class>/*
    when there is no val/): torchvision ImageFolder's layout, classes the train/ sub-folders
    sorted by name. Without image_size every image must have the same size (read from the
    headers), else LayoutError names the sizes found."""
    train_dir = os.path.join(data_dir, 'train')
    _need_folder(train_dir, 'an image folder needs train/<class>/ and val/<class>/ (or test/)')
    test_dir = next((os.path.join(data_dir, d) for d in ('val', 'test')
                     if os.path.isdir(os.path.join(data_dir, d))), None)
    if test_dir is None:
        raise LayoutError(f'{os.path.join(data_dir, "val")} (or test/) is missing: an image '
                          f'folder needs train/<class>/ and val/<class>/ (or test/<class>/)')
    classes = tuple(sorted(d for d in os.listdir(train_dir)
                           if os.path.isdir(os.path.join(train_dir, d))))
    if not classes:
        raise LayoutError(f'{train_dir} has no class folders (train/<class>/)')
    label = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, folder in (('train', train_dir), ('test', test_dir)):
        found = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        unknown = [d for d in found if d not in label]
        if unknown:
            raise LayoutError(f'{folder} has class folders that train/ lacks: '
                              f'{", ".join(unknown[:5])}')
        items = []
        for c in found:
            files = _images_in(os.path.join(folder, c))
            if not files:
                raise LayoutError(f'{os.path.join(folder, c)} holds no images: an empty class '
                                  f'folder')
            items += [(p, label[c]) for p in files]
        if not items:
            raise LayoutError(f'{folder} holds no class folders with images')
        splits[split] = tuple(items)
    size = (image_size, image_size) if image_size else _common_size(splits)
    return FolderLayout(data_dir, classes, classes, splits['train'], splits['test'], size,
                        image_size)


def _common_size(splits):
    """(height, width) shared by every image of `splits`, read from the headers; LayoutError
    naming the sizes found (with counts) when they differ."""
    def size_of(path):
        try:
            with Image.open(path) as im:
                return im.size[::-1]
        except OSError as e:
            raise DataError(f'{path} is not an image Pillow can read ({e})') from None
    paths = [p for items in splits.values() for p, _ in items]
    with ThreadPoolExecutor(_workers()) as pool:
        sizes = list(pool.map(size_of, paths))
    counts = {}
    for s in sizes:
        counts[s] = counts.get(s, 0) + 1
    if len(counts) > 1:
        shown = ', '.join(f'{h}x{w} ({n})' for (h, w), n in
                          sorted(counts.items(), key=lambda kv: -kv[1])[:6])
        raise LayoutError(f'the images have different sizes (height x width: {shown}); give '
                          f'--image-size N to resize them (shorter side to N, centre crop N x N)')
    return sizes[0]


def _workers():
    return min(8, os.cpu_count() or 1)


def decode_image(path, size):
    """The image at `path` as a uint8 3 x H x W array of `size` (height, width): converted to
    RGB; an image of another size has its shorter side resized to the size's side and is
    centre-cropped (size is then square: --image-size, or Tiny-ImageNet's 64 x 64)."""
    try:
        with Image.open(path) as im:
            im = im.convert('RGB')
            h, w = size
            if im.size != (w, h):
                side = max(h, w)
                scale = side / min(im.size)
                new = (max(side, round(im.size[0] * scale)), max(side, round(im.size[1] * scale)))
                im = im.resize(new, Image.BILINEAR, reducing_gap=None)
                left, top = (new[0] - w) // 2, (new[1] - h) // 2
                im = im.crop((left, top, left + w, top + h))
            array = np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise DataError(f'{path} is not an image Pillow can read ({e})') from None
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # a writable C x H x W copy


def decode_items(items, size):
    """(uint8 N x 3 x H x W tensor, int64 N labels) of ((path, label), ...), decoded in a
    thread pool (Pillow releases the GIL while decoding)."""
    out = np.empty((len(items), 3, *size), dtype=np.uint8)

    def fill(i):
        out[i] = decode_image(items[i][0], size)
    with ThreadPoolExecutor(_workers()) as pool:
        list(pool.map(fill, range(len(items))))
    labels = np.array([label for _, label in items], dtype=np.int64)
    return torch.from_numpy(out), torch.from_numpy(labels)


def decode_layout(layout):
    """(train_images, train_labels, test_images, test_labels) of a FolderLayout, decoded once."""
    return (*decode_items(layout.train, layout.image_size),
            *decode_items(layout.test, layout.image_size))


def image_chunks(images, size):
    """Consecutive uint8 tensors of up to `size` images of `images`: slices of a tensor, or the
    decoded chunks of images left in their files (streaming.FolderImages.chunks)."""
    if hasattr(images, 'chunks'):
        yield from images.chunks(size)
        return
    for lo in range(0, len(images), size):
        yield images[lo:lo + size]


def channel_stats(images, chunk=4096):
    """(mean, std) per channel of uint8 N x C x H x W `images`, pixels in 0..1, as tuples of
    floats rounded to 4 digits (what a DatasetSpec declares): the normalisation of a dataset
    that declares none, from its training images (a tensor, or streaming.FolderImages)."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for x in image_chunks(images, chunk):
        x = x.to(torch.float64).transpose(0, 1).reshape(c, -1) / 255
        total += x.sum(1)
        squares += (x * x).sum(1)
    n = max(1, math.prod(images.shape) // c)
    mean = total / n
    std = (squares / n - mean * mean).clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)
