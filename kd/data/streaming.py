"""Images left in their files, for a folder dataset whose decoded pixels would not fit the
memory budget: FolderImages stands where the uint8 store would (same length, shape, dtype, the
same slicing and index selection, as lazy views) and stream_batches decodes the batches a
loader asks for with torch.utils.data.DataLoader workers into pinned memory.

The loader (kd.data.loader.CifarLoader) draws the epoch's order, crops and flips exactly as
for the in-memory store and applies them on the device after the copy, so both give the same
batches for a seed; only where the uint8 pixels come from differs.

decide_in_memory makes the choice: the decoded bytes against a share of the free memory,
or the user's --data-in-memory on / off.
"""
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kd.data.folders import decode_image

# the decoded dataset is kept in memory when it takes at most this share of the free memory
# (the models, their activations and the optimiser need the rest)
IN_MEMORY_SHARE = 0.5
MODES = ('auto', 'on', 'off')


class FolderImages:
    """uint8 N x 3 x H x W images that stay in their files: `paths` decoded at `size` (height,
    width) on demand. Indexing with a slice, an index tensor or a list gives a lazy view;
    decode() or an integer index gives pixels."""
    dtype = torch.uint8

    def __init__(self, paths, size, workers=None):
        self.paths, self.size = tuple(paths), tuple(size)
        self.workers = default_workers() if workers is None else int(workers)

    def __len__(self):
        return len(self.paths)

    @property
    def shape(self):
        return torch.Size((len(self.paths), 3, *self.size))

    def __getitem__(self, index):
        if isinstance(index, int):
            return torch.from_numpy(decode_image(self.paths[index], self.size))
        if isinstance(index, slice):
            paths = self.paths[index]
        else:
            paths = [self.paths[int(i)] for i in torch.as_tensor(index).cpu().tolist()]
        return FolderImages(paths, self.size, self.workers)

    def decode(self):
        """All the images as one uint8 tensor (for a view small enough to hold)."""
        if not self.paths:
            return torch.empty(self.shape, dtype=torch.uint8)
        return torch.cat(list(self.chunks(256)))

    def chunks(self, size):
        """The images, decoded by the workers, as uint8 tensors of up to `size` images, in
        order: what the content digest and the normalisation statistics read."""
        groups = [list(range(lo, min(lo + size, len(self)))) for lo in range(0, len(self), size)]
        yield from stream_batches(self, groups, torch.device('cpu'), self.workers)


class _Decoded(Dataset):
    """FolderImages as a map-style dataset of 3 x H x W uint8 tensors."""

    def __init__(self, images):
        self.paths, self.size = images.paths, images.size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return torch.from_numpy(decode_image(self.paths[i], self.size))


def stream_batches(images, groups, device, workers):
    """The uint8 images of each index list in `groups`, in turn, on `device`: decoded by
    `workers` DataLoader processes (0: in this one), pinned and copied without blocking on a
    GPU."""
    cuda = torch.device(device).type == 'cuda'
    loader = DataLoader(_Decoded(images), batch_sampler=groups, num_workers=workers,
                        pin_memory=cuda, prefetch_factor=4 if workers else None)
    for x in loader:
        yield x.to(device, non_blocking=True)


def default_workers():
    """DataLoader workers per process: the cores, at most 8 (decoding, not the model, is the
    work here)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                      else os.cpu_count() or 1))


def decoded_bytes(spec):
    """The bytes an opened folder dataset's images take decoded (uint8, both splits)."""
    layout = spec.layout
    return (len(layout.train) + len(layout.test)) * 3 * int(np.prod(layout.image_size))


def decide_in_memory(mode, need, free):
    """(keep the decoded images in memory?, the line saying why): `mode` 'on' / 'off' as
    asked, 'auto' in memory when `need` bytes take at most IN_MEMORY_SHARE of `free`."""
    if mode not in MODES:
        raise ValueError(f'--data-in-memory must be one of {", ".join(MODES)}, not {mode!r}')
    mb = f'{need / 2**20:.1f} MB decoded'
    if mode != 'auto':
        keep = mode == 'on'
        return keep, (f'data: {"decoded once into memory" if keep else "streamed from the files"}'
                      f' ({mb}), as --data-in-memory {mode} asks')
    keep = need <= IN_MEMORY_SHARE * free
    how = 'decoded once into memory' if keep else 'streamed from the files by DataLoader workers'
    return keep, (f'data: {how} ({mb}, {"within" if keep else "over"} {IN_MEMORY_SHARE:.0%} of '
                  f'the {free / 2**20:.0f} MB free)')
