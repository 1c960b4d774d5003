"""Side-by-side speed of this project's data and training path against the reference way.

    python bench/bench.py --data-dir DIR                  # device auto, 5000 images for (c)
    python bench/bench.py --data-dir DIR --quick          # a smoke test in about a minute

(a) training-loader images/s: utils.CifarLoader (make_loaders on the device) against
    torchvision.datasets.CIFAR10 + PIL transforms (RandomCrop(32, 4), RandomHorizontalFlip,
    ToTensor, Normalize) + DataLoader(num_workers=2, shuffle), batch 128, batches moved to the
    device; steady state (the timer starts once the first batch is out).
(b) train-step images/s of TeacherNet and StudentNet: fp32 NCHW without autocast, and the
    project's default mode (train.choose_precision(name, device, None), channels_last,
    train.train_step), on one fixed batch.
(c) one KD + baseline epoch of `--subset` images: the project's lockstep loop (train.Trainee +
    train.train_step over make_loaders: one teacher forward and one augmented batch per step for
    both students) against the reference way (fp32 NCHW, the DataLoader pipeline of (a), one epoch
    of the KD student with the teacher forward under no_grad, then a separate epoch of the
    baseline student). Same models, same initial weights, same number of images (full batches).

Disk reads are done once, outside every timer. Results: a table on stdout and --json.
"""
import argparse
import copy
import datetime
import json
import os
import platform
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
import torchvision.transforms as T  # noqa: E402

from kd.data.datasets import CIFAR10  # noqa: E402
from kd.methods.registry import LOSSES  # noqa: E402
from kd.models import StudentNet, TeacherNet  # noqa: E402
from kd.report.provenance import cpu_identity  # noqa: E402
from kd.run.device import device_arg  # noqa: E402
from kd.engine.timing import Stopwatch, seconds_per_call  # noqa: E402
from kd.recipes.base import Recipe
from kd.engine.trainee import Trainee
from kd.engine.precision import choose_precision, precision_name
from kd.recipes.optim import make_optimizer
from kd.engine.step import train_step
from kd.data.loader import (CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, load_cifar10,  # noqa: E402
                            make_loaders)
from kd.methods.plain_kd import kd_loss  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data-dir', default='./data',
                   help='folder holding cifar-10-batches-py (default: ./data)')
    p.add_argument('--device', default='auto', type=device_arg,
                   help='auto, cpu, cuda or cuda:N (default: auto)')
    p.add_argument('--subset', type=int, default=5000,
                   help='training images for the epoch of (c) (default: 5000)')
    p.add_argument('--batches', type=int, default=100,
                   help='batches timed in (a) and, at most, in (b) (default: 100)')
    p.add_argument('--max-seconds', type=float, default=20.0,
                   help='stop a (b) measurement after this many timed seconds (default: 20)')
    p.add_argument('--batch-size', type=int, default=128, help='(default: 128)')
    p.add_argument('--workers', type=int, default=2,
                   help='DataLoader workers of the reference pipeline (default: 2)')
    p.add_argument('--threads', type=int, default=None,
                   help='torch.set_num_threads for the main process (default: torch default)')
    p.add_argument('--quick', action='store_true',
                   help='tiny sizes for a smoke test (subset 512, 6 batches, 3 s per step test)')
    p.add_argument('--json', default=os.path.join(ROOT, 'bench', 'results.json'),
                   help='where to write the results (default: bench/results.json)')
    args = p.parse_args(argv)
    if args.quick:
        args.subset, args.batches, args.max_seconds = min(args.subset, 512), 6, 3.0
    return args


# ---------------------------------------------------------------------------------------------
# Machine and timing

def cpu_model():
    return cpu_identity()[0]


def machine_info(device):
    info = {'cpu': cpu_model(), 'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
            'gpu': torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
            'torch': torch.__version__, 'python': platform.python_version()}
    info['torchvision'] = torchvision.__version__
    try:
        info['load_average'] = os.getloadavg()
    except OSError:
        pass
    return info


# ---------------------------------------------------------------------------------------------
# The reference pipeline: torchvision dataset + PIL transforms + DataLoader workers

def reference_dataset(data_dir, subset=None):
    """torchvision.datasets.CIFAR10 (train) with the usual PIL augmentation, optionally the first N."""
    class CIFAR10(torchvision.datasets.CIFAR10):
        # The md5 checks fail on re-encoded mirrors of the python release (same format, other
        # bytes); the files are validated by utils.read_cifar_batch when the project reads them.
        # Only the checks are skipped: reading, __getitem__ and the transforms are torchvision's.
        def _check_integrity(self):
            return True

        def _load_meta(self):
            self.classes = list(CIFAR10_CLASSES)
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    dataset = CIFAR10(data_dir, train=True, download=False, transform=transform)
    if subset:
        dataset = torch.utils.data.Subset(dataset, range(min(subset, len(dataset))))
    return dataset


def reference_loader(dataset, batch_size, workers, device):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                       num_workers=workers, drop_last=True,
                                       pin_memory=device.type == 'cuda')


def time_batches(loader, num_batches, device):
    """Steady-state images/s over num_batches batches (after the first), moved to device."""
    seen, watch, it = 0, Stopwatch(device), iter(loader)
    for i in range(num_batches + 1):
        try:
            x, y = next(it)
        except StopIteration:
            if hasattr(loader, 'set_epoch'):
                loader.set_epoch(getattr(loader, 'epoch', 0) + 1)
            it = iter(loader)
            x, y = next(it)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if i == 0:
            watch.start()
            continue
        seen += len(y)
    seconds = watch.elapsed()
    return {'images': seen, 'seconds': round(seconds, 4), 'images_per_s': seen / seconds}


def bench_loader(arrays, data_dir, device, batch_size, workers, num_batches):
    data = make_loaders(batch_size=batch_size, device=device, val_fraction=0.0,
                        channels_last=True, arrays=arrays)
    project = time_batches(data.train, num_batches, device)
    dataset = reference_dataset(data_dir)
    reference = time_batches(reference_loader(dataset, batch_size, workers, device),
                             num_batches, device)
    return {'project': project, 'reference': reference,
            'speedup': project['images_per_s'] / reference['images_per_s']}


# ---------------------------------------------------------------------------------------------
# (b) train steps

def time_steps(step, batch_size, num_steps, max_seconds, device):
    """num_steps timed steps, fewer when one step says they would take over max_seconds (the
    device is synchronised around the timed steps only, so they run back to back)."""
    # after one warm-up step (cuDNN picks its kernels in step 1), one probe step
    one = seconds_per_call(step, device, warmup=1)
    done = max(1, min(num_steps, int(max_seconds / max(one, 1e-9))))
    seconds = seconds_per_call(step, device, done) * done
    return {'steps': done, 'seconds': round(seconds, 4), 'images_per_s': done * batch_size / seconds}


def fp32_step(model, optimizer, images, labels):
    def step():
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def bench_steps(device, batch_size, num_steps, max_seconds):
    recipe = Recipe()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(CIFAR10.batch_shape(batch_size), generator=g).to(device)
    labels = torch.randint(0, 10, (batch_size,), generator=g).to(device)
    rows = []
    for name, cls in (('teacher', TeacherNet), ('student', StudentNet)):
        torch.manual_seed(0)
        model = cls().to(device)
        r = time_steps(fp32_step(model, make_optimizer(model, recipe), images, labels),
                       batch_size, num_steps, max_seconds, device)
        rows.append(dict(r, model=name, mode='fp32 NCHW'))
        del model
        precision = choose_precision('teacher' if name == 'teacher' else 'student_kd', device, None)
        torch.manual_seed(0)
        trainee = Trainee(name, cls(), 'ce', recipe, device, precision)
        x_cl = images.contiguous(memory_format=torch.channels_last)
        r = time_steps(lambda: train_step([trainee], None, x_cl, labels, recipe),
                       batch_size, num_steps, max_seconds, device)
        rows.append(dict(r, model=name, mode=f'default {precision_name(precision)} channels_last'))
        del trainee
    return rows


# ---------------------------------------------------------------------------------------------
# (c) one KD + baseline epoch

def fresh_models(device, memory_format):
    torch.manual_seed(0)
    teacher = TeacherNet().to(device, memory_format=memory_format).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = StudentNet()
    return teacher, student.state_dict()


def project_epoch(arrays, device, batch_size, subset):
    """make_loaders + one lockstep epoch of train.train_step (KD and baseline students)."""
    recipe = Recipe()
    teacher, init = fresh_models(device, torch.channels_last)
    teacher_precision = choose_precision('teacher', device, None)
    trainees = []
    for name, kind in (('student_kd', 'kd'), ('student_base', 'ce')):
        module = StudentNet()
        module.load_state_dict(copy.deepcopy(init))
        trainees.append(Trainee(name, module, kind, recipe, device,
                                choose_precision(name, device, None)))
    watch = Stopwatch(device).start()
    data = make_loaders(batch_size=batch_size, device=device, val_fraction=0.0, subset=subset,
                        channels_last=True, arrays=arrays)
    data.train.set_epoch(0)
    seen = 0
    for images, labels in data.train:
        train_step(trainees, teacher, images, labels, recipe, teacher_precision)
        seen += len(labels)
    return {'images': seen, 'seconds': round(watch.elapsed(), 3)}


def reference_epochs(data_dir, device, batch_size, subset, workers):
    """fp32 NCHW: a KD-student epoch (teacher under no_grad), then a baseline-student epoch."""
    recipe = Recipe()
    teacher, init = fresh_models(device, torch.contiguous_format)
    dataset = reference_dataset(data_dir, subset)
    seen = 0
    watch = Stopwatch(device).start()
    for kind in ('kd', 'ce'):
        student = StudentNet()
        student.load_state_dict(init)
        student = student.to(device).train()
        optimizer = make_optimizer(student, recipe)
        for images, labels in reference_loader(dataset, batch_size, workers, device):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            logits = student(images)
            if kind == 'kd':
                with torch.no_grad():
                    teacher_logits = teacher(images)
                loss = kd_loss(logits, teacher_logits, labels, **LOSSES['kd'].defaults)
            else:
                loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(labels)
    return {'images': seen // 2, 'seconds': round(watch.elapsed(), 3)}


# ---------------------------------------------------------------------------------------------
# Report

def format_table(results):
    """Fixed-width text: a 50-character label, then right-aligned numeric columns."""
    a, rows, c = results.get('loader'), results.get('train_step', []), results.get('epoch')
    args, dev = results['args'], results['device']

    def line(label, *cols):
        return f'  {label:<50}' + ''.join(f'{col:>11}' for col in cols)

    out = []
    if a:
        out += [line(f"(a) training loader, {args['batches']} x {args['batch_size']} images",
                     'images/s', 'speed-up'),
                line(f'    project CifarLoader on {dev}', f"{a['project']['images_per_s']:.0f}",
                     f"{a['speedup']:.1f}x"),
                line(f"    torchvision + PIL + DataLoader({args['workers']} workers)",
                     f"{a['reference']['images_per_s']:.0f}", '1.0x')]
    if rows:
        out += ['', line(f"(b) train step, batch {args['batch_size']}", 'images/s', 'vs fp32',
                         'steps')]
        for r in rows:
            base = next(q for q in rows if q['model'] == r['model'] and q['mode'] == 'fp32 NCHW')
            out.append(line(f"    {r['model']:<8} {r['mode']}", f"{r['images_per_s']:.1f}",
                            f"{r['images_per_s'] / base['images_per_s']:.2f}x", r['steps']))
    if c:
        p, ref = c['project'], c['reference']
        out += ['', line(f"(c) one KD + baseline epoch, {p['images']} images", 'seconds',
                         'images/s', 'speed-up'),
                line('    project: lockstep train_step + CifarLoader', f"{p['seconds']:.1f}",
                     f"{p['images'] / p['seconds']:.1f}", f"{c['speedup']:.2f}x"),
                line('    reference: fp32 NCHW, DataLoader, 2 epochs', f"{ref['seconds']:.1f}",
                     f"{ref['images'] / ref['seconds']:.1f}", '1.00x')]
    return '\n'.join(out)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    machine = machine_info(device)
    command = ' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    date = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
    print(f'date     {date}')
    print(f"machine  {machine['gpu'] or 'no GPU'}; CPU {machine['cpu']} "
          f"({machine['cpu_count']} logical cores, torch threads {machine['torch_threads']})")
    if 'load_average' in machine:
        print(f"load     {' '.join(f'{x:.2f}' for x in machine['load_average'])} (1/5/15 min)")
    print(f"torch    {machine['torch']}, torchvision {machine['torchvision']}, "
          f"python {machine['python']}")
    print(f'command  {command}\n', flush=True)

    watch = Stopwatch(device).start()
    arrays = load_cifar10(args.data_dir, download=False)
    print(f'read CIFAR-10 from {args.data_dir} in {watch.elapsed():.1f}s', flush=True)
    results = {'date': date, 'machine': machine, 'device': str(device), 'command': command,
               'args': dict(vars(args), device=str(device))}

    print('(a) loaders ...', flush=True)
    results['loader'] = bench_loader(arrays, args.data_dir, device, args.batch_size,
                                     args.workers, args.batches)
    print('(b) train steps ...', flush=True)
    results['train_step'] = bench_steps(device, args.batch_size, args.batches, args.max_seconds)
    print(f'(c) one KD + baseline epoch of {args.subset} images ...', flush=True)
    project = project_epoch(arrays, device, args.batch_size, args.subset)
    reference = reference_epochs(args.data_dir, device, args.batch_size, args.subset, args.workers)
    results['epoch'] = {'project': project, 'reference': reference,
                        'speedup': reference['seconds'] / project['seconds']}
    assert project['images'] == reference['images'], (project, reference)
    results['total_seconds'] = round(watch.elapsed(), 1)

    print('\n' + format_table(results))
    print(f"\ntotal {results['total_seconds']:.0f}s")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
        json.dump(results, f, indent=2)
        f.write('\n')
    print(f'wrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
