"""Running a phase: devices, seeds and their folders, resume look-up, the teacher, results.

main.py parses and validates the command line and calls run(args); everything a run does after
that is here, with explicit arguments, so it can be driven from Python as well.
"""
import hashlib
import os
import shlex
import shutil
import sys
import tempfile
import time

MODEL_NAMES = ('teacher', 'student_kd', 'student_base')
# Configuration keys that change what a run computes: a resumed run must agree on all of them.
RUN_KEYS = {
    'teacher': ('epochs', 'batch_size', 'lr', 'weight_decay', 'seed', 'val_fraction',
                'split_seed', 'subset', 'precision'),
    'students': ('epochs', 'batch_size', 'lr', 'weight_decay', 'seed', 'val_fraction',
                 'split_seed', 'subset', 'precision', 'temperature', 'alpha', 'no_baseline',
                 'teacher_sha256'),
}


class UsageError(Exception):
    """Bad usage or a bad flag value: exit code 2."""


def resolve_device(name):
    import torch
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f'--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)') \
            from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UsageError(f'--device {name}: CUDA is not available on this machine '
                             f'(use --device cpu)')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f'--device {name}: this machine has {torch.cuda.device_count()} GPU(s)')
    elif device.type != 'cpu':
        raise UsageError(f'--device {name!r} is not supported (use auto, cpu, cuda or cuda:N)')
    return device


def check_out_dir(path):
    """Create --out-dir if needed and prove it is writable, before any training."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f'--out-dir {path} is a file, not a directory')
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix='.write-test-', dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f'--out-dir {path} cannot be written: {e.strerror or e}') from None


def run_info(args, device):
    from report import device_name
    return {'data_dir': args.data_dir, 'subset': args.subset, 'device': device_name(device)}


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def resume_command():
    argv = [a for a in sys.argv[1:] if a not in ('--resume', '--restart')]
    nproc = int(os.environ.get('LOCAL_WORLD_SIZE', os.environ.get('WORLD_SIZE', '1')))
    launcher = f'torchrun --nproc_per_node={nproc}' if 'RANK' in os.environ else 'python'
    return launcher + ' ' + ' '.join(shlex.quote(a) for a in [sys.argv[0]] + argv + ['--resume'])


# ---------------------------------------------------------------------------------------------
# Phases

def run_dirs(out_dir, seeds, per_seed_folders):
    return {s: (os.path.join(out_dir, f'seed{s}') if per_seed_folders else out_dir) for s in seeds}


def find_states(phase, dirs, args, config_by_seed):
    """Load the saved state of each seed for --resume, or refuse to overwrite an unfinished run."""
    from checkpoint import load_file
    states = {}
    for seed, d in dirs.items():
        path = os.path.join(d, f'last_{phase}.pt')
        if not os.path.exists(path):
            continue
        state = load_file(path, 'training state')
        if not isinstance(state, dict) or 'config' not in state or 'finished' not in state:
            raise UsageError(f'{path} is not a training state of this program; '
                             f'remove it or use --restart')
        if not state['finished'] and not args.resume and not args.restart:
            raise UsageError(
                f"{path} holds an unfinished {phase} run (epoch {state['epoch']} of "
                f"{state['config'].get('epochs')}). Resume it with --resume, or start over "
                f"with --restart.")
        if args.resume:
            new = config_by_seed[seed]
            changed = [k for k in RUN_KEYS[phase] if state['config'].get(k) != new.get(k)]
            if changed:
                details = ', '.join(f"{k}: {state['config'].get(k)!r} -> {new.get(k)!r}"
                                    for k in changed)
                raise UsageError(f'cannot resume {path}: the configuration changed ({details}); '
                                 f'use the original flags, or --restart to start over')
            states[seed] = state
    return states


def train_phase_for_seeds(phase, args, device, dist, arrays, log, stop, teacher=None,
                          teacher_sha=None):
    """Train one phase once per seed; return {seed: summary} and the run folders."""
    import torch
    from models import StudentNet, TeacherNet
    from report import write_results
    from train import Recipe, Trainee, choose_precision, precision_name, train_phase
    from utils import make_loaders

    seeds = args.seeds if args.seeds is not None else [args.seed]
    dirs = run_dirs(args.out_dir, seeds, args.seeds is not None)
    recipe = Recipe(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                    temperature=args.temperature, alpha=args.alpha)
    names = ['teacher'] if phase == 'teacher' else \
        ['student_kd'] + ([] if args.no_baseline else ['student_base'])
    precisions = {n: choose_precision(n, device, args.amp) for n in names}
    teacher_precision = choose_precision('teacher', device, args.amp)
    base_config = {k: getattr(args, k) for k in (
        'epochs', 'batch_size', 'lr', 'weight_decay', 'val_fraction', 'split_seed', 'subset',
        'data_dir', 'out_dir', 'compile', 'amp')}
    base_config['device'] = str(device)
    base_config['world_size'] = dist.world_size
    base_config['precision'] = {n: precision_name(p) for n, p in precisions.items()}
    if phase == 'students':
        base_config.update(temperature=args.temperature, alpha=args.alpha,
                           no_baseline=args.no_baseline, teacher_checkpoint=args.teacher_checkpoint,
                           teacher_sha256=teacher_sha,
                           teacher_precision=precision_name(teacher_precision))
    configs = {s: dict(base_config, seed=s) for s in seeds}
    states = find_states(phase, dirs, args, configs)
    if args.resume and not states and dist.is_main:
        log(f'--resume: no saved {phase} state in {args.out_dir}; starting from the beginning')

    writer = open_tensorboard(args, log) if dist.is_main else None
    summaries = {}
    for seed in seeds:
        if dist.is_main:
            os.makedirs(dirs[seed], exist_ok=True)
        data = make_loaders(args.data_dir, args.batch_size, device, args.val_fraction, seed,
                            args.subset, eval_batch_size=5000 if device.type == 'cuda' else 1000,
                            channels_last=True, rank=dist.rank, world_size=dist.world_size,
                            arrays=arrays, split_seed=args.split_seed)
        configs[seed]['val_images_sha256'] = data.val_fingerprint()
        torch.manual_seed(seed)
        if phase == 'teacher':
            modules = {'teacher': TeacherNet()}
        else:  # both students start from the same weights: the pair differs only by the loss
            initial = StudentNet().state_dict()
            modules = {n: StudentNet() for n in names}
            for module in modules.values():
                module.load_state_dict(initial)
        trainees = [Trainee(n, modules[n], 'kd' if n == 'student_kd' else 'ce', recipe, device,
                            precisions[n], ddp=dist.enabled, compile_model=args.compile)
                    for n in names]
        if dist.is_main:
            log(f'[{phase}, seed {seed}] {data.num_train} training, {data.num_val} validation, '
                f'{data.num_test} test images; {len(data.train)} steps per epoch; precision '
                + ', '.join(f'{n} {precision_name(p)}' for n, p in precisions.items())
                + (f', teacher {precision_name(teacher_precision)}' if teacher is not None else ''))
        callback = (lambda epoch, rows, s=seed: log_tensorboard(writer, phase, s, epoch, rows)) \
            if writer else None
        seed_start = time.time()
        summaries[seed] = train_phase(
            phase, trainees, data, recipe, dirs[seed], device, teacher=teacher,
            teacher_precision=teacher_precision, config=configs[seed],
            resume_state=states.get(seed), stop=stop, dist=dist,
            log=log if dist.is_main else (lambda *_: None), epoch_callback=callback)
        summaries[seed]['wall_seconds'] = round(time.time() - seed_start, 2)
        if dist.is_main:
            write_model_records(dirs[seed], summaries[seed]['models'], configs[seed])
        if args.seeds is not None and dist.is_main:
            write_results(dirs[seed], phase, {seed: summaries[seed]}, configs[seed],
                          run_info(args, device), {phase: [dirs[seed]]}, log=lambda *_: None)
    if writer:
        writer.close()
    # the same held-out images for every seed (the split belongs to the data)
    base_config['val_images_sha256'] = configs[seeds[0]]['val_images_sha256']
    if args.seeds is not None and dist.is_main:
        first = dirs[seeds[0]]
        for n in names:  # the top-level files stay usable by the README's snippet
            for ext in ('.pth', '.json'):
                shutil.copyfile(os.path.join(first, f'best_{n}{ext}'),
                                os.path.join(args.out_dir, f'best_{n}{ext}'))
    return summaries, dirs, base_config


def write_model_records(run_dir, models, config):
    """best_<name>.json beside each best_<name>.pth: what the weights are and which data
    selected them, so a later phase can check it was trained on the same split."""
    from checkpoint import write_record
    for name, entry in models.items():
        path = os.path.join(run_dir, f'best_{name}.pth')
        if not os.path.exists(path):
            continue
        write_record(path, {
            'model': name, 'seed': config['seed'],
            **{k: config.get(k) for k in SPLIT_KEYS + ('val_images_sha256', 'epochs')},
            'best_epoch': entry.get('best_epoch'), 'best_val_acc': entry.get('best_val_acc'),
            'test_acc': entry.get('test_acc'), 'sha256': file_sha256(path),
            **({'teacher_sha256': config['teacher_sha256']} if 'teacher_sha256' in config else {}),
        })


def open_tensorboard(args, log):
    if not args.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log('tensorboard is not installed: --tensorboard is ignored (pip install tensorboard)')
        return None
    return SummaryWriter(os.path.join(args.out_dir, 'tensorboard'))


def log_tensorboard(writer, phase, seed, epoch, rows):
    for model, row in rows.items():
        for key, value in row.items():
            if key != 'epoch' and value is not None:
                writer.add_scalar(f'seed{seed}/{model}/{key}', value, epoch)
    writer.flush()


def load_for_inference(model, path, device):
    """Weights from path (refused with a clear message if wrong) in eval mode, no gradients."""
    import torch
    from checkpoint import load_weights
    model = load_weights(model, path).to(device, memory_format=torch.channels_last).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def evaluate_checkpoints(args, device, arrays, log):
    """--evaluate: test accuracy of each best_*.pth in --out-dir."""
    from models import StudentNet, TeacherNet
    from report import print_table
    from train import choose_precision, evaluate
    from utils import make_loaders
    data = make_loaders(args.data_dir, args.batch_size, device, 0.0, args.seed, args.subset,
                        eval_batch_size=1000, channels_last=True, arrays=arrays)
    models = {}
    for name in MODEL_NAMES:
        path = os.path.join(args.out_dir, f'best_{name}.pth')
        if not os.path.exists(path):
            continue
        model = load_for_inference(TeacherNet() if name == 'teacher' else StudentNet(), path,
                                   device)
        acc = evaluate(model, data.test, choose_precision(name, device, args.amp))
        models[name] = {'test_acc': acc, 'params': sum(p.numel() for p in model.parameters())}
    if not models:
        raise UsageError(f'no best_*.pth in {args.out_dir}: train first, or point --out-dir at '
                         f'the folder holding them')
    log(f'Test set: {data.num_test} images')
    print_table(models, log)
    return models


SPLIT_KEYS = ('split_seed', 'val_fraction', 'subset')  # what decides the held-out images


def check_split(args, num_train_images):
    """Refuse a --val-fraction that leaves no image on one side, before anything is written."""
    from utils import split_train_val
    n = min(num_train_images, args.subset or num_train_images)
    try:
        split_train_val(n, args.val_fraction, args.split_seed)
    except ValueError as e:
        raise UsageError(str(e) + (f' (with --subset {args.subset})' if args.subset else '')) \
            from None


def check_teacher_record(args, log):
    """Refuse a teacher that held out other images than these students will (exit 2).

    The students select on their validation images; a teacher that trained on them has
    memorised their labels, and its soft targets there are not what it gives unseen images.
    """
    from checkpoint import read_record, record_path
    record = read_record(args.teacher_checkpoint)
    if record is None:
        log(f'note: {record_path(args.teacher_checkpoint)} does not exist, so it cannot be '
            f'checked that the teacher held out the same validation images as these students '
            f'({", ".join(f"{k}={getattr(args, k)}" for k in SPLIT_KEYS)})')
        return
    differ = [k for k in SPLIT_KEYS if record.get(k) != getattr(args, k)]
    if differ:
        details = ', '.join(f'--{k.replace("_", "-")} {record.get(k)} for the teacher but '
                            f'{getattr(args, k)} here' for k in differ)
        raise UsageError(f'the teacher {args.teacher_checkpoint} was trained on another split '
                         f'of the data ({details}): the students would select on images the '
                         f'teacher trained on. Use the teacher\'s values, or train a teacher '
                         f'with these.')


def run(args, log=print):
    """Run what args ask for (main.py's parsed and validated flags); returns the exit code."""
    from distributed import init_distributed
    from report import device_name, write_results
    from utils import load_cifar10

    device = resolve_device(args.device)
    dist, device = init_distributed(device)
    if dist.enabled and args.batch_size % dist.world_size:
        raise UsageError(f'--batch-size {args.batch_size} (global) is not divisible by the '
                         f'{dist.world_size} processes')
    if args.lr is None:
        args.lr = 0.1 * args.batch_size / 128
    if args.teacher_checkpoint is None:
        args.teacher_checkpoint = os.path.join(args.out_dir, 'best_teacher.pth')
    phase = 'evaluate' if args.evaluate else 'teacher' if args.train_teacher else 'students'
    if dist.is_main:
        log('Configuration:')
        for key, value in sorted(vars(args).items()):
            log(f'  {key:<20} {value}')
        log(f'  {"device (resolved)":<20} {device_name(device)}'
            + (f' x {dist.world_size} processes' if dist.enabled else ''))
        if args.subset:
            log(f'  --subset {args.subset}: a quick run on part of CIFAR-10, not comparable to '
                f'full-data numbers')
    check_out_dir(args.out_dir)

    teacher, teacher_sha = None, None
    if phase == 'students':  # refuse a bad teacher before reading data or writing anything
        from checkpoint import CheckpointError
        from models import TeacherNet
        if not os.path.exists(args.teacher_checkpoint):
            raise CheckpointError(f'no teacher checkpoint at {args.teacher_checkpoint}: run '
                                  f'`python main.py --train-teacher` first, or pass '
                                  f'--teacher-checkpoint')
        teacher = load_for_inference(TeacherNet(), args.teacher_checkpoint, device)
        teacher_sha = file_sha256(args.teacher_checkpoint)
        check_teacher_record(args, log if dist.is_main else (lambda *_: None))

    if dist.is_main:  # one process downloads; the others wait and read
        arrays = load_cifar10(args.data_dir)
    from distributed import barrier
    barrier()
    if not dist.is_main:
        arrays = load_cifar10(args.data_dir, download=False)
    check_split(args, len(arrays[1]))
    from train import configure_backends
    configure_backends(device)

    if phase == 'evaluate':
        if dist.is_main:
            evaluate_checkpoints(args, device, arrays, log)
        return 0

    start = time.time()
    from train import StopSignal
    stop = StopSignal()  # SIGINT/SIGTERM: finish the batch, save, exit 130/143
    stop.install()
    try:
        summaries, dirs, config = train_phase_for_seeds(phase, args, device, dist, arrays, log,
                                                        stop, teacher, teacher_sha)
    finally:
        stop.uninstall()
    if dist.is_main:
        results = write_results(args.out_dir, phase, summaries, config, run_info(args, device),
                                {phase: list(dirs.values())}, log)
        from report import describe_gain, print_table
        log(f'\nFinished the {phase} phase in {time.time() - start:.0f}s; results in '
            f'{os.path.join(args.out_dir, "results.json")} and results.md')
        print_table(results['models'], log)
        if phase == 'students' and not args.no_baseline:
            log(describe_gain(results.get('kd_gain')))
    return 0


