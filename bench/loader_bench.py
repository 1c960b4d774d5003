"""Images per second of the folder datasets' loaders on one generated image folder.

    python bench/loader_bench.py [--images 2000] [--size 64] [--batch-size 256] [--epochs 2]
                                 [--workers N] [--format JPEG] [--folder DIR] [--json FILE]

Writes an ImageFolder layout of --images training images (and a tenth as many test images) of
--size x --size pixels in 10 classes (JPEG by default; kept in --folder when given, else a
temporary folder), then times full training epochs of:
  in-memory   the uint8 store decoded once (its decode time reported apart), batches gathered,
              cropped (padding 1/8 of the side) and flipped in batches, normalized
  streaming   the same loader with the images left in their files: DataLoader workers decode
              each batch, the crop and flip are applied after (the same batches)
  torchvision torchvision.datasets.ImageFolder + DataLoader with RandomCrop(padding),
              RandomHorizontalFlip, ToTensor, Normalize per image, the same workers
each pass consuming its batches (as float32 tensors) and nothing else: the figures are the
loaders' own ceilings on this machine, not a training run's rate. Prints images/s per loader
(the median over --epochs, after one warm-up epoch) and the machine.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from kd.data.datasets import load_dataset  # noqa: E402
from kd.data.loader import make_loaders  # noqa: E402
from kd.data.streaming import default_workers  # noqa: E402
from kd.engine.timing import Stopwatch  # noqa: E402

# the batches are consumed on the CPU (the loaders' device), so the clock needs no GPU wait
CPU = torch.device('cpu')


def write_folder(root, images, size, fmt, classes=10):
    """An ImageFolder layout of `images` training and images // 10 test images."""
    rng = np.random.default_rng(0)
    ext = {'JPEG': 'jpg', 'PNG': 'png'}[fmt]
    for split, n in (('train', images), ('val', max(classes, images // 10))):
        for i in range(n):
            label = i % classes
            folder = os.path.join(root, split, f'class{label:02d}')
            os.makedirs(folder, exist_ok=True)
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f'{i:06d}.{ext}'), fmt)


def epoch_rates(passes, epochs):
    """images/s of each timed pass (after one warm-up pass) of `passes`: a function running
    one epoch and returning its image count."""
    passes()  # warm-up: worker start-up, caches
    rates = []
    for _ in range(epochs):
        watch = Stopwatch(CPU).start()
        n = passes()
        rates.append(n / watch.elapsed())
    return rates


def ours(root, batch_size, in_memory, workers):
    arrays = load_dataset(root, 'imagefolder', in_memory=in_memory)
    if not in_memory:
        arrays.train_images.workers = workers
    data = make_loaders(root, batch_size, val_fraction=0.0, dataset='imagefolder',
                        arrays=arrays)

    def one_epoch():
        n = 0
        for x, _ in data.train:
            n += len(x)
        return n
    return one_epoch


def plain_torchvision(root, batch_size, workers, size):
    import torchvision  # lazily: only this benchmark's third loader needs it
    t = torchvision.transforms
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    transform = t.Compose([t.RandomCrop(size, padding=size // 8), t.RandomHorizontalFlip(),
                           t.ToTensor(), t.Normalize(mean, std)])
    dataset = torchvision.datasets.ImageFolder(os.path.join(root, 'train'), transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=workers > 0)

    def one_epoch():
        n = 0
        for x, _ in loader:
            n += len(x)
        return n
    return one_epoch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--images', type=int, default=2000)
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--workers', type=int, default=default_workers())
    p.add_argument('--format', choices=('JPEG', 'PNG'), default='JPEG')
    p.add_argument('--folder', help='where to write the images (default: a temporary folder)')
    p.add_argument('--json', help='write the figures to this file')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.batch_size = min(args.batch_size, args.images)  # at least one full batch an epoch
    with tempfile.TemporaryDirectory() as scratch:
        root = args.folder or scratch
        if not os.path.isdir(os.path.join(root, 'train')):
            write_folder(root, args.images, args.size, args.format)
        watch = Stopwatch(CPU).start()
        load_dataset(root, 'imagefolder')
        decode_s = watch.elapsed()
        loaders = {
            'in-memory': ours(root, args.batch_size, True, args.workers),
            'streaming': ours(root, args.batch_size, False, args.workers),
            'torchvision': plain_torchvision(root, args.batch_size, args.workers, args.size),
        }
        rates = {name: epoch_rates(run, args.epochs) for name, run in loaders.items()}
    with open('/proc/cpuinfo') as f:
        cpu = next((line.split(':', 1)[1].strip() for line in f
                    if line.startswith('model name')), platform.processor())
    result = {'images': args.images, 'size': args.size, 'format': args.format,
              'batch_size': args.batch_size, 'workers': args.workers,
              'decode_once_s': round(decode_s, 2), 'cpu': cpu, 'cores': os.cpu_count(),
              'torch': torch.__version__,
              'images_per_s': {n: round(statistics.median(r)) for n, r in rates.items()}}
    print(f'{args.images} {args.format} images of {args.size}x{args.size}, batch '
          f'{args.batch_size}, {args.workers} workers; {cpu}, {os.cpu_count()} cores')
    print(f'  decoding once into memory: {decode_s:.2f} s '
          f'({(args.images + max(10, args.images // 10)) / decode_s:.0f} images/s)')
    for name, rate in result['images_per_s'].items():
        print(f'  {name:12s} {rate:8d} images/s per epoch')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
