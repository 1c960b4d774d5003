"""CIFAR in device memory, batched augmentation, and get_cifar10_loaders.

Reading the files is datasets.py's job (one description per dataset); the names below that
read CIFAR-10 are kept for notebooks that import them from here. Which images a run's loaders
serve is a DataSource, how they serve them (device, seed, torchrun share, augmentation) a
LoaderOptions; load_loaders takes both, make_loaders the same as flat keywords.

The whole dataset is held as one uint8 tensor on the training device; each batch is gathered,
randomly cropped (4-pixel zero padding for CIFAR, an eighth of the side for the folder
datasets) and flipped for all images at once, then normalized. There are no DataLoader workers:
on a GPU the card never waits for PIL, and on a CPU the cores do model work instead of
decoding. The exception is a folder dataset too large for the memory budget: its images stay in
their files (streaming.FolderImages) and DataLoader workers decode each batch, which is then
cropped, flipped and normalized exactly as above, so the batches are the same.
"""
import hashlib
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from kd.data.streaming import stream_batches
from kd.data.datasets import (CIFAR10, DatasetArrays, ensure_dataset, find_folder, get_dataset,
                              load_dataset, read_batch)

# CIFAR-10's constants and readers under the names notebooks already use (datasets.py has them
# for every dataset)
CIFAR10_MEAN, CIFAR10_STD, CIFAR10_CLASSES = CIFAR10.mean, CIFAR10.std, CIFAR10.classes
FOLDER = CIFAR10.folder
TRAIN_FILES, TEST_FILES = list(CIFAR10.train_files), list(CIFAR10.test_files)


def read_cifar_batch(path):
    """One CIFAR-10 batch file -> (uint8 images N x 3 x 32 x 32, int64 labels N)."""
    return read_batch(path, CIFAR10)


def find_cifar10_folder(data_dir):
    return find_folder(data_dir, CIFAR10)


def ensure_cifar10(data_dir, download=True):
    return ensure_dataset(data_dir, CIFAR10, download)


def load_cifar10(data_dir='./data', download=True):
    """(train_images, train_labels, test_images, test_labels) as uint8 / int64 CPU tensors."""
    return load_dataset(data_dir, CIFAR10, download)


# ---------------------------------------------------------------------------------------------
# Batched augmentation and the device-resident loader

def epoch_generator(seed, epoch):
    """A CPU generator for one epoch of one run: the same numbers on every device and rank."""
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def crop_flip(images, dy, dx, flip, padding=4, padding_mode='constant'):
    """Random-crop (zero padding, or reflect-padded with padding_mode='reflect') and
    horizontal-flip a whole batch with two gathers.

    images: B x C x H x W (any dtype); dy, dx: B offsets in [0, 2*padding]; flip: B bools.
    Output pixel (i, j) of image b is padded_b[dy_b + i, dx_b + j], with j mirrored when flipped,
    which is what RandomCrop(H, padding) followed by RandomHorizontalFlip() produces. The
    index tensors are expanded views, so the only real work is the two gathers.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding), mode=padding_mode)
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = (dy[:, None] + ar_h)[:, None, :, None].expand(b, c, h, w + 2 * padding)
    cols = dx[:, None] + torch.where(flip[:, None], ar_w.flip(0), ar_w)
    cols = cols[:, None, None, :].expand(b, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


@dataclass(frozen=True)
class LoaderOptions:
    """How a CifarLoader serves its images (which images is the caller's): where they live, the
    run's seed, the memory format, this process's share under torchrun, the normalization and
    the training augmentation. make_loaders sets mean and std from the dataset."""
    device: object = 'cpu'          # where the images live and the batches come out
    seed: int = 0                   # order and augmentation (see epoch_generator)
    channels_last: bool = False     # batches in channels-last memory format
    rank: int = 0                   # this process's rank under torchrun
    world_size: int = 1             # the number of processes under torchrun
    mean: tuple = CIFAR10.mean      # per-channel statistics of the pixels in 0..1
    std: tuple = CIFAR10.std
    padding: int = 4                # random translation by up to this many pixels
    padding_mode: str = 'constant'  # 'constant' (zeros) or 'reflect'
    flip: str = 'random'            # 'random' or 'alternate' (see CifarLoader)

    @classmethod
    def names(cls):
        return {f.name for f in fields(cls)}


@dataclass(frozen=True)
class DataSource:
    """Which images make_loaders serves, and which training images it holds out."""
    data_dir: str = './data'
    dataset: object = 'cifar10'  # a name from datasets.DATASETS, or a DatasetSpec
    download: bool = True        # download the files when they are not in data_dir
    arrays: tuple = None         # already-loaded (train_x, train_y, test_x, test_y): no disk read
    subset: int = None           # only the first N training and the first N test images
    val_fraction: float = 0.1    # held out of the training images for validation
    split_seed: int = 0          # which images are held out (see split_train_val)
    image_size: int = None       # --image-size of a folder dataset (datasets.open_dataset)

    @classmethod
    def names(cls):
        return {f.name for f in fields(cls)}


class CifarLoader:
    """Batches of (normalized float32 images, int64 labels) from uint8 tensors held on `device`
    (or from a streaming.FolderImages, decoded batch by batch by DataLoader workers).

    Training loaders shuffle and augment with a per-epoch generator derived from (seed, epoch),
    so epoch e is the same batches whatever happened before it: a resumed run sees what an
    uninterrupted one would. With world_size > 1 each global batch is split into contiguous
    per-rank slices, so N processes see together exactly what one process sees.

    Augmentation: a random translation by up to `padding` pixels (crop of the image padded with
    zeros, or reflected with padding_mode='reflect'), and a horizontal flip: flip='random' flips
    each image with probability 1/2 each epoch; flip='alternate' flips each image at random in
    epoch 0 and then in exactly every other epoch (a function of seed and epoch, so a resumed
    run flips what an uninterrupted one would).

    options: a LoaderOptions (default: its defaults); `changes`: any of its fields by keyword
    (device=, seed=, rank=, padding=, ...: the keywords this class has always taken), which
    replace those of `options`.
    """

    def __init__(self, images, labels, batch_size, train, options=None, **changes):
        options = replace(options or LoaderOptions(), **changes)
        self.options = options
        self.device = torch.device(options.device)
        # a FolderImages (images too large for memory) stays in its files: see _gathered
        self.images = images.to(self.device) if isinstance(images, torch.Tensor) else images
        self.labels = labels.to(self.device)
        self.batch_size, self.train, self.seed = int(batch_size), train, options.seed
        self.channels_last = options.channels_last
        self.rank, self.world_size = options.rank, options.world_size
        self.epoch, self.start_batch = 0, 0
        self.padding, self.padding_mode = options.padding, options.padding_mode
        self.flip = options.flip
        shape = (1, len(options.mean), 1, 1)
        self.mean = torch.tensor(options.mean, device=self.device).view(shape) * 255
        self.inv_std = 1 / (torch.tensor(options.std, device=self.device).view(shape) * 255)

    def __len__(self):
        n = len(self.labels)
        if self.train:  # a partial last batch would skew BatchNorm statistics and the lr schedule
            return max(1, n // self.batch_size) if n else 0
        return -(-n // self.batch_size)

    def set_epoch(self, epoch, start_batch=0):
        """Make the next pass epoch `epoch` (order and augmentation); skip its first `start_batch`.

        Without it, each pass over a training loader is the next epoch, so a plain
        `for epoch in range(n): for x, y in loader:` sees fresh crops and flips every time.
        """
        self.epoch, self.start_batch = epoch, start_batch

    @property
    def dataset(self):
        """The images behind the loader, unaugmented (len(loader.dataset) as with a DataLoader)."""
        return CifarImages(self)

    def normalize(self, images_uint8):
        if not isinstance(images_uint8, torch.Tensor):  # a FolderImages view: decoded now
            images_uint8 = images_uint8.decode().to(self.device)
        if self.channels_last:  # reorder the 1-byte pixels, not the 4-byte floats
            images_uint8 = images_uint8.contiguous(memory_format=torch.channels_last)
        return (images_uint8.float() - self.mean) * self.inv_std

    def _plan(self, epoch):
        """Epoch order and augmentation, drawn on the CPU from (seed, epoch), then moved to the
        device once: the batches then index device tensors, with no host-to-device copy each."""
        n = len(self.labels)
        if not self.train:
            return torch.arange(n, device=self.device), None
        g = epoch_generator(self.seed, epoch)
        order = torch.randperm(n, generator=g)
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=g)
        if self.flip == 'alternate':
            flips = self.first_epoch_flips() ^ bool(epoch % 2)
        else:
            flips = torch.rand(n, generator=g) < 0.5
        # offsets and flips are per image (not per position), as before: indexed by order below
        order, offsets, flips = (t.to(self.device, non_blocking=True)
                                 for t in (order, offsets, flips))
        return order, (offsets, flips)

    def __iter__(self):
        for batch in self.batches():
            yield batch.images, batch.labels

    def batches(self):
        """The next pass as Batch objects: images and labels with the images' indices (what
        methods that index by sample, such as CRD's memory, need). Iterating the loader itself
        yields (images, labels) of the same pass."""
        epoch, start_batch = self.epoch, self.start_batch
        if self.train:  # the next pass is the next epoch, unless set_epoch says otherwise
            self.epoch, self.start_batch = epoch + 1, 0
        order, aug = self._plan(epoch)
        steps = range(start_batch, len(self))
        for i, x in zip(steps, self._gathered(order, [self._rank_slice(i) for i in steps])):
            lo, hi = self._rank_slice(i)
            idx = order[lo:hi]
            if aug is not None:
                offsets, flips = aug[0][idx], aug[1][idx]
                x = crop_flip(x, offsets[:, 0], offsets[:, 1], flips, self.padding,
                              self.padding_mode)
            start, stop = self._global_slice(i)
            yield Batch(self.normalize(x), self.labels[idx], idx, i, epoch, self.seed,
                        order[start:stop], lo - start)


    def _gathered(self, order, slices):
        """The uint8 images at positions [lo, hi) of the epoch's order, for each slice in turn:
        gathered from the device store, or decoded from the files by DataLoader workers (a
        FolderImages, streaming.stream_batches) and copied to the device."""
        if isinstance(self.images, torch.Tensor):
            for lo, hi in slices:
                yield self.images[order[lo:hi]]
            return
        order = order.cpu()  # one copy, not one per batch
        groups = [order[lo:hi].tolist() for lo, hi in slices]
        yield from stream_batches(self.images, groups, self.device, self.images.workers)

    def first_epoch_flips(self):
        """flip='alternate': which images epoch 0 flips (N bools, from the seed alone)."""
        # a generator of its own: the per-epoch draws stay those of flip='random'
        state = np.random.SeedSequence([int(self.seed)], spawn_key=(1,)).generate_state(2)
        g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return torch.rand(len(self.labels), generator=g) < 0.5

    def _global_slice(self, i):
        """Positions [start, stop) in the epoch's order of global batch i (all ranks)."""
        n, bs = len(self.labels), self.batch_size
        start, stop = i * bs, min((i + 1) * bs, n)
        if self.train and i == len(self) - 1 and n < bs:
            stop = n  # fewer images than one batch: use them all
        return start, stop

    def _rank_slice(self, i):
        """Positions [lo, hi) in the epoch's order of this rank's part of global batch i."""
        start, stop = self._global_slice(i)
        # this rank's contiguous slice of the global batch
        lo = start + (stop - start) * self.rank // self.world_size
        hi = start + (stop - start) * (self.rank + 1) // self.world_size
        return lo, hi

    def rank_indices(self):
        """The image indices this rank's passes over an evaluation loader yield, in order."""
        if self.train:
            raise ValueError('rank_indices is for evaluation loaders (a fixed order)')
        return torch.cat([torch.arange(*self._rank_slice(i), device=self.device)
                          for i in range(len(self))])


class Batch(NamedTuple):
    """One batch of a CifarLoader pass, with where its images come from."""
    images: torch.Tensor          # B x C x H x W float32 (the dataset's image shape), normalized
    labels: torch.Tensor          # B int64
    indices: torch.Tensor         # B int64: the images' indices in the loader's image set
    index: int                    # the batch's position in its epoch (0-based)
    epoch: int                    # the pass's epoch (0-based)
    seed: int                     # the loader's seed (of order and augmentation)
    global_indices: torch.Tensor  # the indices of the whole batch over all torchrun ranks
    row_lo: int                   # where this rank's rows start in global_indices


class CifarImages:
    """The images of a CifarLoader as a map-style dataset: (normalized image, label), no
    augmentation. Lets notebook code use len(loader.dataset) and loader.dataset[i]."""

    def __init__(self, loader):
        self._loader = loader

    def __len__(self):
        return len(self._loader.labels)

    def __getitem__(self, index):
        index = range(len(self))[index]  # negative indices, and IndexError out of range
        x = self._loader.images[index:index + 1]
        return self._loader.normalize(x)[0], int(self._loader.labels[index])


@dataclass
class CifarData:
    train: CifarLoader
    val: CifarLoader     # None when val_fraction is 0
    test: CifarLoader
    num_train: int
    num_val: int
    num_test: int
    val_indices: torch.Tensor = None  # which training images are held out
    # the CPU arrays the loaders were built from (after --subset): their train_sha256 /
    # test_sha256 identify exactly the images these loaders hold
    arrays: DatasetArrays = None
    # (mean, std) computed from the training images of a dataset that declares none (recorded
    # with the run); None when the dataset declares them (CIFAR)
    normalization: tuple = None

    def val_fingerprint(self):
        """A short hash of the held-out image indices: equal fingerprints, same split."""
        indices = self.val_indices if self.val_indices is not None else torch.zeros(0)
        return hashlib.sha256(indices.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def split_train_val(num_images, val_fraction, split_seed=0):
    """Indices (train, val): a random val_fraction of the training images, held out.

    The split belongs to the data, not to a run: split_seed (default 0) is the same for the
    teacher and every seed of the students, so they all hold out the same images and the
    teacher never trained on the students' validation images.
    """
    n_val = int(round(num_images * val_fraction))
    if val_fraction > 0 and (n_val < 1 or n_val >= num_images):
        raise ValueError(f'--val-fraction {val_fraction} leaves {n_val} of {num_images} training '
                         f'images for validation; it needs at least one image on each side')
    perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(int(split_seed)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def normalization(spec, arrays):
    """(mean, std) the loaders normalize with: the spec's, else (a dataset that declares none)
    the whole dataset's training images' (arrays.normalization, computed once)."""
    if spec.mean is not None:
        return spec.mean, spec.std
    if not isinstance(arrays, DatasetArrays):
        arrays = DatasetArrays(*arrays)
    return arrays.normalization


def load_loaders(source, batch_size=128, eval_batch_size=1000, options=None):
    """Train / validation / test loaders (a CifarData) over the images `source` (a DataSource)
    names, held on options.device.

    batch_size: the training loader's; eval_batch_size: the validation and test loaders'.
    options: a LoaderOptions: seed (order and augmentation), device, channels_last, rank,
    world_size and the training loader's augmentation; its mean and std are replaced by the
    dataset's. The result's .arrays are the images used (after source.subset), with their
    content digests.
    """
    spec = get_dataset(source.dataset)
    arrays = source.arrays
    if arrays is None:
        arrays = load_dataset(source.data_dir, spec, source.download, source.image_size)
    elif not isinstance(arrays, DatasetArrays):
        arrays = DatasetArrays(*arrays)
    arrays = arrays.first(source.subset)
    train_x, train_y, test_x, test_y = arrays
    train_idx, val_idx = split_train_val(len(train_y), source.val_fraction, source.split_seed)
    mean, std = normalization(spec, arrays)
    options = replace(options or LoaderOptions(), mean=mean, std=std)
    # the recipe's padding, or a share of the images' side for a dataset that scales it
    options = replace(options, padding=spec.crop_padding(options.padding, train_x.shape[-2]))
    train = CifarLoader(train_x[train_idx], train_y[train_idx], batch_size, True, options)
    # evaluation loaders neither shuffle nor augment: they keep the default seed and
    # augmentation, as they always had (their batches carry seed 0)
    evaluation = LoaderOptions(options.device, channels_last=options.channels_last,
                               rank=options.rank, world_size=options.world_size,
                               mean=mean, std=std)
    val = (CifarLoader(train_x[val_idx], train_y[val_idx], eval_batch_size, False, evaluation)
           if len(val_idx) else None)
    test = CifarLoader(test_x, test_y, eval_batch_size, False, evaluation)
    return CifarData(train, val, test, len(train_idx), len(val_idx), len(test_y), val_idx,
                     arrays, None if spec.mean is not None else (mean, std))


def make_loaders(data_dir='./data', batch_size=128, device='cpu', val_fraction=0.1, seed=0,
                 subset=None, eval_batch_size=1000, **keywords):
    """load_loaders with flat keywords, as this function has always been called: train /
    validation / test loaders over a CIFAR dataset held on `device`.

    keywords: DataSource's (dataset: a name from datasets.DATASETS or a DatasetSpec; arrays:
    already-loaded (train_x, train_y, test_x, test_y), to skip reading the disk again; download;
    split_seed: which images are held out for validation) and LoaderOptions' (channels_last,
    rank, world_size; padding, padding_mode, flip: the training loader's augmentation).
    seed: order and augmentation. subset: use only the first N training and the first N test
    images. The result's .arrays are the images used (after subset), with their content digests.
    """
    # mean and std are the dataset's; the other fields are this function's own parameters
    unknown = set(keywords) - (DataSource.names() | LoaderOptions.names()) | \
        ({'mean', 'std'} & set(keywords))
    if unknown:
        raise TypeError(f'make_loaders() got unexpected keyword arguments {sorted(unknown)}')
    source = DataSource(data_dir=data_dir, subset=subset, val_fraction=val_fraction,
                        **{k: v for k, v in keywords.items() if k in DataSource.names()})
    options = LoaderOptions(device=device, seed=seed,
                            **{k: v for k, v in keywords.items() if k in LoaderOptions.names()})
    return load_loaders(source, batch_size, eval_batch_size, options)


def get_cifar10_loaders(batch_size=128, data_dir='./data', num_workers=2, device=None,
                        val_fraction=0.0, seed=0, subset=None, download=True):
    """(train_loader, test_loader) for CIFAR-10, as in the reference code.

    Both yield (images, labels): float32 N x 3 x 32 x 32 normalized images and int64 labels,
    already on `device` (default CPU). The training loader crops (4-pixel padding) and flips.
    num_workers is accepted for compatibility and unused: the data lives in device memory.
    """
    del num_workers
    source = DataSource(data_dir, download=download, subset=subset, val_fraction=val_fraction)
    data = load_loaders(source, batch_size, batch_size, LoaderOptions(device or 'cpu', seed))
    return data.train, data.test
