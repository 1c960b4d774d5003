"""The datasets this package trains on: one small description each, and the readers.

A DatasetSpec says everything that differs between datasets. For CIFAR-10 and CIFAR-100 (python
pickle releases): folder and file names, the key holding the labels, the number of classes and
their names, the normalization statistics, the image shape, the archive and how to download it.
For a folder of image files (tinyimagenet, imagefolder): a scan of --data-dir (kd/data/folders.py)
that finds the classes, the files and the image size; open_dataset puts them in the spec, and
the normalization is computed from the training images. The readers take a spec (or its name)
and return the same thing for all: uint8 N x C x H x W images (the spec's image_shape: 3 x 32 x
32 for CIFAR) and int64 labels, as CPU tensors (or, for a folder too large for memory, images
left in their files: streaming.FolderImages), in a DatasetArrays that also carries a sha256 of
each split's content. Those digests, not the folder, identify the data wherever a run records
or checks it.

Batch files are unpickled with a restricted unpickler that builds numpy arrays and plain
containers only: a data batch is data, not code.
"""
import codecs
import hashlib
import os
import pickle
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from typing import Callable

import numpy as np
import torch

from kd.data.errors import DataError, LayoutError
from kd.data.folders import channel_stats, decode_layout, scan_imagefolder, scan_tinyimagenet
from kd.data.streaming import FolderImages

CIFAR_URL = 'https://www.cs.toronto.edu/~kriz/cifar.html'


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """What a reader needs to know about one dataset: a python pickle release (CIFAR's: the
    folder, file and label-key fields) or, with `scan`, a folder of image files whose classes,
    files and image size a scan of --data-dir finds (open_dataset fills them in)."""
    name: str                  # registry key and CLI value: 'cifar10'
    title: str                 # for messages: 'CIFAR-10'
    folder: str = ''           # the extracted folder: 'cifar-10-batches-py'
    train_files: tuple = ()    # batch files of the training split, in order
    test_files: tuple = ()     # batch files of the test split, in order
    label_key: str = ''        # the batch dict's label entry: 'labels' / 'fine_labels'
    num_classes: int = None    # None until a folder dataset is opened
    mean: tuple = None         # per-channel mean of the training images, pixels in 0..1; None:
    std: tuple = None          # computed from the training images (DatasetArrays.normalization)
    classes: tuple = ()        # class names in label order
    channels: int = 3          # colour channels of an image: 3
    image_size: tuple = None   # (height, width) of an image in pixels: (32, 32)
    archive: str = ''          # the official archive: 'cifar-10-python.tar.gz'
    torchvision_class: str = ''  # torchvision.datasets class that downloads it: 'CIFAR10'
    url: str = CIFAR_URL       # where a person can fetch the archive by hand
    # a folder dataset: scan(data_dir, image_size) -> folders.FolderLayout, raising LayoutError
    scan: Callable = None
    layout: object = None      # the FolderLayout an opened folder dataset reads (open_dataset)
    # the training crop's padding as a share of the image's height (1/8: 8 px at 64 px, CIFAR's
    # 4 px per 32 px); None: the recipe's padding in pixels
    padding_share: float = None

    @property
    def image_shape(self):
        """One image's tensor shape, (channels, height, width): (3, 32, 32) for CIFAR."""
        return (self.channels, *self.image_size)

    @property
    def image_values(self):
        """Values per image (channels x height x width): a batch file's row length."""
        return self.channels * self.image_size[0] * self.image_size[1]

    def crop_padding(self, recipe_padding, height=None):
        """The training crop's zero padding in pixels: the recipe's (CIFAR: 4 px of 32), or, for
        a dataset that scales it with its images (padding_share), that share of their height
        (`height`, else the spec's image size)."""
        if not self.padding_share:
            return recipe_padding
        return max(1, round((height or self.image_size[0]) * self.padding_share))

    def batch_shape(self, n):
        """The shape of a batch of n images, (n, channels, height, width): what the memory,
        precision and stacking checks and the feature plan's probes run on."""
        return (int(n), *self.image_shape)

    @property
    def files(self):
        """All batch files, training first."""
        return tuple(self.train_files) + tuple(self.test_files)

    def download(self, root):
        """Download and extract the archive into `root` with torchvision (which checks the
        archive's checksum). Raises whatever torchvision raises; needs the network."""
        import torchvision  # lazily: only a download needs it, and importing it costs ~1 s
        getattr(torchvision.datasets, self.torchvision_class)(root, train=True, download=True)


CIFAR10 = DatasetSpec(
    name='cifar10', title='CIFAR-10', folder='cifar-10-batches-py',
    train_files=tuple(f'data_batch_{i}' for i in range(1, 6)), test_files=('test_batch',),
    label_key='labels', num_classes=10,
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
    classes=('airplane', 'automobile', 'bird', 'cat', 'deer',
             'dog', 'frog', 'horse', 'ship', 'truck'),
    channels=3, image_size=(32, 32),
    archive='cifar-10-python.tar.gz', torchvision_class='CIFAR10')

CIFAR100 = DatasetSpec(
    name='cifar100', title='CIFAR-100', folder='cifar-100-python',
    train_files=('train',), test_files=('test',),
    label_key='fine_labels', num_classes=100,
    mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
    # the 'fine_label_names' of the release's meta file, in label order
    classes=('apple', 'aquarium_fish', 'baby', 'bear', 'beaver', 'bed', 'bee', 'beetle',
             'bicycle', 'bottle', 'bowl', 'boy', 'bridge', 'bus', 'butterfly', 'camel',
             'can', 'castle', 'caterpillar', 'cattle', 'chair', 'chimpanzee', 'clock',
             'cloud', 'cockroach', 'couch', 'crab', 'crocodile', 'cup', 'dinosaur',
             'dolphin', 'elephant', 'flatfish', 'forest', 'fox', 'girl', 'hamster',
             'house', 'kangaroo', 'keyboard', 'lamp', 'lawn_mower', 'leopard', 'lion',
             'lizard', 'lobster', 'man', 'maple_tree', 'motorcycle', 'mountain', 'mouse',
             'mushroom', 'oak_tree', 'orange', 'orchid', 'otter', 'palm_tree', 'pear',
             'pickup_truck', 'pine_tree', 'plain', 'plate', 'poppy', 'porcupine',
             'possum', 'rabbit', 'raccoon', 'ray', 'road', 'rocket', 'rose',
             'sea', 'seal', 'shark', 'shrew', 'skunk', 'skyscraper', 'snail', 'snake',
             'spider', 'squirrel', 'streetcar', 'sunflower', 'sweet_pepper', 'table',
             'tank', 'telephone', 'television', 'tiger', 'tractor', 'train', 'trout',
             'tulip', 'turtle', 'wardrobe', 'whale', 'willow_tree', 'wolf', 'woman', 'worm'),
    channels=3, image_size=(32, 32),
    archive='cifar-100-python.tar.gz', torchvision_class='CIFAR100')

# Tiny-ImageNet (200 classes of 64 x 64 images): the labelled val/ split is the test set, as
# the field reports it. Its augmentation is CIFAR's scaled to 64 px: a random crop of the image
# zero-padded by 8 pixels, and a horizontal flip - the choice of the logit-distillation papers'
# Tiny-ImageNet tables (e.g. DKD's and the CTKD / MLKD code bases), and the one that stays a
# device-side gather on the uint8 store (a random-resized crop needs a resampling per image).
# The normalisation is computed from its training images (it declares none).
TINYIMAGENET = DatasetSpec(
    name='tinyimagenet', title='Tiny-ImageNet', folder='tiny-imagenet-200',
    url='http://cs231n.stanford.edu/tiny-imagenet-200.zip', scan=scan_tinyimagenet,
    padding_share=1 / 8)

# Any folder in torchvision ImageFolder's layout (train/<class>/*, val/<class>/* or
# test/<class>/*): the images' own size, or --image-size N (shorter side to N and centre crop,
# once at load time); the training crop pads by an eighth of the side, CIFAR's ratio.
IMAGEFOLDER = DatasetSpec(name='imagefolder', title='the image folder', scan=scan_imagefolder,
                          padding_share=1 / 8)

DATASETS = {spec.name: spec for spec in (CIFAR10, CIFAR100, TINYIMAGENET, IMAGEFOLDER)}


def register_dataset(spec):
    """Add `spec` (a DatasetSpec of a dataset in the python pickle format) under spec.name; a
    second dataset of the same name is refused. Returns the spec."""
    if spec.name in DATASETS:
        raise ValueError(f'a dataset named {spec.name!r} is already registered')
    DATASETS[spec.name] = spec
    return spec


def dataset_names():
    """The registered dataset names, e.g. for argparse choices: ['cifar10', 'cifar100', ...]."""
    return list(DATASETS)


def get_dataset(name):
    """The DatasetSpec called `name` ('cifar10', also 'CIFAR-10'); a DatasetSpec passes through.

    Raises KeyError naming the known datasets.
    """
    if isinstance(name, DatasetSpec):
        return name
    key = str(name).strip().lower().replace('-', '').replace('_', '')
    if key not in DATASETS:
        raise KeyError(f'unknown dataset {name!r}; known datasets: {", ".join(DATASETS)}')
    return DATASETS[key]


def open_dataset(name, data_dir='./data', image_size=None):
    """The DatasetSpec of `name` (or a spec) as a run on data_dir reads it: CIFAR's as
    registered; a folder dataset's with the scan of data_dir put in (its layout, class count
    and names, image size; image_size: --image-size). Scans are cached per folder and size.

    Raises KeyError for an unknown name, LayoutError for a folder that cannot be used or an
    --image-size given to a dataset of fixed size.
    """
    spec = get_dataset(name)
    if spec.scan is None:
        if image_size is not None and tuple(spec.image_size) != (image_size, image_size):
            raise LayoutError(f'--image-size is for the folder datasets ('
                              f'{", ".join(n for n, s in DATASETS.items() if s.scan)}); '
                              f'{spec.title} is {spec.image_size[0]}x{spec.image_size[1]}')
        return spec
    if spec.layout is not None:
        return spec
    root = os.path.abspath(data_dir)
    layout = _scan(spec, root, image_size, _folder_signature(root))
    return replace(spec, layout=layout, num_classes=len(layout.classes), classes=layout.names,
                   image_size=tuple(layout.image_size))


def _folder_signature(root):
    """The modification times of root and its entries two levels down: a changed folder is
    scanned again."""
    times = []
    for top, dirs, _ in os.walk(root):
        times.append((top, os.stat(top).st_mtime_ns))
        if top.count(os.sep) - root.count(os.sep) >= 2:
            dirs[:] = []
    return tuple(times)


@lru_cache(maxsize=8)
def _scan(spec, root, image_size, signature):
    del signature  # part of the cache key only
    return spec.scan(root, image_size)


# ---------------------------------------------------------------------------------------------
# Reading the python release from disk

def _numpy_core():
    return getattr(np, '_core', None) or np.core  # numpy 2 renamed numpy.core to numpy._core


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, nothing else: a data batch is data, not code.

    Allowed are the few callables numpy arrays and dtypes pickle through (protocols 0 to 5, numpy
    1 and 2 module names) and codecs.encode, which protocol-2 pickles use for bytes.
    """

    def find_class(self, module, name):
        core = _numpy_core()
        allowed = {
            ('numpy', 'ndarray'): np.ndarray,
            ('numpy', 'dtype'): np.dtype,
            ('_codecs', 'encode'): codecs.encode,
        }
        for prefix in ('numpy.core', 'numpy._core'):
            allowed[(f'{prefix}.multiarray', '_reconstruct')] = core.multiarray._reconstruct
            allowed[(f'{prefix}.multiarray', 'scalar')] = core.multiarray.scalar
            allowed[(f'{prefix}.numeric', '_frombuffer')] = core.numeric._frombuffer
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f'refusing to load {module}.{name}')
        return allowed[(module, name)]


def _describe(value):
    if isinstance(value, np.ndarray):
        return f'{value.dtype} {value.shape}'
    return type(value).__name__


def read_batch(path, spec):
    """One batch file of `spec`'s python release -> (uint8 images N x C x H x W numpy array,
    C x H x W the spec's image_shape; int64 labels N numpy array). Raises DataError naming the
    file for anything else."""
    spec = get_dataset(spec)
    what = f'{spec.title} batch'
    try:
        with open(path, 'rb') as f:
            raw = _ArrayOnlyUnpickler(f, encoding='bytes').load()
    except Exception as e:  # truncated, foreign or hostile file: all mean "not a batch"
        raise DataError(f'{path} is not a readable {what} ({type(e).__name__}: {e}); replace it '
                        f'with the file from the official python release ({spec.archive}, '
                        f'{spec.url})') from None
    if not isinstance(raw, dict):
        raise DataError(f'{path} is not a {what} (holds a {type(raw).__name__}, not a dict)')
    # the official release was pickled by Python 2: its keys arrive as bytes
    raw = {k.decode('latin-1') if isinstance(k, bytes) else k: v for k, v in raw.items()}
    data = raw.get('data')
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != spec.image_values:
        raise DataError(f"{path} is not a {what}: 'data' should be uint8 "
                        f'N x {spec.image_values}, got {_describe(data)}')
    key = spec.label_key
    if key not in raw:
        others = [s.title for s in DATASETS.values() if s.label_key != key and s.label_key in raw]
        hint = f' (it has {others[0]} labels: is it a {others[0]} file?)' if others else ''
        raise DataError(f"{path} is not a {what}: it has no '{key}' entry{hint}")
    try:
        labels = np.asarray(raw[key])
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(f"{path} is not a {what}: unreadable '{key}' ({e})") from None
    if labels.size and labels.dtype.kind not in 'iu':
        raise DataError(f"{path} is not a {what}: '{key}' should be integers, got {labels.dtype}")
    n = data.shape[0]
    if labels.ndim != 1:
        raise DataError(f"{path} is not a {what}: {n} images but '{key}' has shape "
                        f'{labels.shape}, not ({n},)')
    if labels.shape[0] != n:
        raise DataError(f'{path} is not a {what}: {n} images but {labels.shape[0]} labels')
    if labels.size and (labels.min() < 0 or labels.max() > spec.num_classes - 1):
        raise DataError(f"{path} is not a {what}: '{key}' holds labels outside "
                        f'0..{spec.num_classes - 1} (min {labels.min()}, max {labels.max()})')
    return data.reshape(-1, *spec.image_shape), labels.astype(np.int64)


def find_folder(data_dir, spec):
    """The folder holding all of `spec`'s batch files: data_dir/<spec.folder> or data_dir
    itself; None when neither has them all."""
    spec = get_dataset(spec)
    for folder in (os.path.join(data_dir, spec.folder), data_dir):
        if all(os.path.isfile(os.path.join(folder, f)) for f in spec.files):
            return folder
    return None


def ensure_dataset(data_dir, spec, download=True):
    """The folder holding `spec`'s python release, downloading it with torchvision if absent.

    Raises DataError saying where it looked and what to do when it is not there.
    """
    spec = get_dataset(spec)
    folder = find_folder(data_dir, spec)
    if folder is not None:
        return folder
    error = 'downloading was not allowed'
    if download:
        try:
            spec.download(data_dir)
        except Exception as e:  # no network, bad archive, unwritable folder, no torchvision ...
            error = f'the download failed: {type(e).__name__}: {e}'
        folder = find_folder(data_dir, spec)
        if folder is not None:
            return folder
    where = os.path.abspath(data_dir)
    hint = ''
    if os.path.isfile(os.path.join(data_dir, spec.archive)):
        hint = (f' ({spec.archive} is there but not extracted: extract it there with '
                f'"tar -xzf {spec.archive}"{"" if download else ", or allow downloading"})')
    raise DataError(
        f'{spec.title} was not found in {where} and {error}{hint}. Put {spec.archive} '
        f'({spec.url}) or its extracted {spec.folder} folder in that directory, or point '
        f'--data-dir at the directory that holds it.')


def content_sha256(images, labels):
    """sha256 (64 hex digits) of a split's content: the images' and labels' bytes with their
    shapes and dtypes, so equal digests mean the same pictures with the same labels in the same
    order, wherever the files lie. images, labels: contiguous CPU tensors (uint8 N x C x H x W,
    int64 N; images may be a streaming.FolderImages, read chunk by chunk, with the digest its
    decoded tensor would have). About 0.1 s for CIFAR's 184 MB on a CPU with SHA
    instructions."""
    h = hashlib.sha256()
    for tensor in (images, labels):
        if isinstance(tensor, FolderImages):  # left in its files: the same bytes, decoded
            h.update(f'|u1{tuple(tensor.shape)};'.encode())
            for chunk in tensor.chunks(1024):
                h.update(memoryview(chunk.contiguous().numpy()).cast('B'))
            continue
        array = tensor.contiguous().numpy()
        h.update(f'{array.dtype.str}{array.shape};'.encode())
        h.update(memoryview(array).cast('B'))
    return h.hexdigest()


def effective_subset(subset, num_train, num_test):
    """--subset as it acts on data of num_train training and num_test test images: None (all
    images) when it takes every image of both splits, else subset. Runs and records use this
    value, so a --subset at least as large as the data is the same run as no --subset."""
    if subset is None or subset >= max(num_train, num_test):
        return None
    return int(subset)


class DatasetArrays(tuple):
    """(train_images, train_labels, test_images, test_labels): uint8 N x C x H x W and int64 N
    CPU tensors, which unpack and index like the 4-tuple they are, and that carry a content digest
    per split (train_sha256, test_sha256: content_sha256 of the images and labels, computed once,
    on first use). These digests, not the folder they were read from, identify the data in run
    records, resume states and stored teacher logits. `normalization` is the per-channel
    (mean, std) of the training images, for datasets that declare none: computed once, on first
    use, and the same for the --subset arrays `first` makes (those of the whole dataset)."""

    def __new__(cls, train_images, train_labels, test_images, test_labels, whole=None):
        self = super().__new__(cls, (train_images, train_labels, test_images, test_labels))
        self._whole = whole  # the arrays `first` took these from: whose statistics they use
        return self

    def __getnewargs__(self):  # copy and pickle rebuild it from its four tensors
        return tuple(self)

    train_images = property(lambda self: self[0])
    train_labels = property(lambda self: self[1])
    test_images = property(lambda self: self[2])
    test_labels = property(lambda self: self[3])

    @cached_property
    def train_sha256(self):
        """Digest of the training images and labels (before any validation hold-out)."""
        return content_sha256(self[0], self[1])

    @cached_property
    def test_sha256(self):
        """Digest of the test images and labels."""
        return content_sha256(self[2], self[3])

    @cached_property
    def normalization(self):
        """(mean, std) per channel of the whole dataset's training images, pixels in 0..1."""
        if self._whole is not None:
            return self._whole.normalization
        return channel_stats(self[0])

    def first(self, subset):
        """The arrays --subset uses: the first `subset` training and test images (views, no
        copy), with digests of those images alone; self when subset is None or takes them all."""
        if effective_subset(subset, len(self[1]), len(self[3])) is None:
            return self
        return DatasetArrays(self[0][:subset], self[1][:subset], self[2][:subset],
                             self[3][:subset], whole=self)


def load_dataset(data_dir='./data', spec_or_name='cifar10', download=True, image_size=None,
                 in_memory=True):
    """The dataset named (or described) by spec_or_name as DatasetArrays: (train_images,
    train_labels, test_images, test_labels), uint8 N x C x H x W (the spec's image_shape) and
    int64 N CPU tensors, with content digests. A folder dataset is scanned (open_dataset;
    image_size: --image-size) and every image decoded once; with in_memory=False its images
    stay in their files (streaming.FolderImages, decoded batch by batch). Raises DataError when the files
    are missing (and cannot be downloaded) or are not the dataset's, LayoutError for a folder
    that cannot be used."""
    spec = get_dataset(spec_or_name)
    if spec.scan is not None:  # image files: decoded once into the uint8 store, or left there
        layout = open_dataset(spec, data_dir, image_size).layout
        if in_memory:
            return DatasetArrays(*decode_layout(layout))
        return DatasetArrays(*(x for items in (layout.train, layout.test) for x in (
            FolderImages([p for p, _ in items], layout.image_size),
            torch.tensor([label for _, label in items], dtype=torch.int64))))
    open_dataset(spec, data_dir, image_size)  # refuses an --image-size CIFAR cannot take
    folder = ensure_dataset(data_dir, spec, download)
    parts = {}
    for split, files in (('train', spec.train_files), ('test', spec.test_files)):
        batches = [read_batch(os.path.join(folder, f), spec) for f in files]
        parts[split] = (torch.from_numpy(np.concatenate([b[0] for b in batches])),
                        torch.from_numpy(np.concatenate([b[1] for b in batches])))
    return DatasetArrays(*parts['train'], *parts['test'])
