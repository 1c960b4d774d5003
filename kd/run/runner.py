"""One invocation: the device and processes, the students' teacher, the data, then the phase
(phase.py, once per seed) or --evaluate (evaluate.py), and the results.

main.py parses the command line, config.resolve turns it into one frozen RunConfig, and
run(config) does the rest, here, with explicit arguments, so it can be driven from Python as well:
run(main.parse_config(['--train-teacher', '--epochs', '3'])).
"""
import os
from dataclasses import replace

from kd.data.datasets import effective_subset, load_dataset
from kd.data.streaming import decide_in_memory, decoded_bytes
from kd.data.loader import split_train_val
from kd.engine.distributed import barrier, init_distributed
from kd.engine.signals import StopSignal
from kd.engine.precision import configure_backends
from kd.engine.timing import Stopwatch
from kd.files.checkpoint import CheckpointError
from kd.report.tables import describe_gains, print_table
from kd.report.results import write_results
from kd.run.commands import missing_teacher_message, rerun_command
from kd.run.config import UsageError
from kd.run.configuration import print_configuration
from kd.run.device import resolve_device
from kd.run.memory import available_bytes
from kd.run.evaluate import evaluate_checkpoints
from kd.run.outdir import check_out_dir
from kd.run.phase import run_info, train_phase_for_seeds
from kd.run.record import RunRecord, TeacherInfo
from kd.run.specs import phase_specs
from kd.run.teacher import SPLIT_KEYS, TeacherMismatch, check_data, load_teacher


def run(config, log=print):
    """Run what `config` asks for (a config.RunConfig, e.g. main.parse_config(argv)); returns
    the exit code. `config` is left as it is.

    Until training starts (loading, timing, the teacher's logits) SIGINT / SIGTERM raise
    train.StartupInterrupted at once: there is nothing to save. From the first batch on they
    stop at the next batch boundary and save the state (train.TrainingInterrupted)."""
    stop = StopSignal(immediate=True)
    stop.install()
    try:
        return _run(config, log, stop)
    finally:
        stop.uninstall()


def _run(config, log, stop):
    device, dist = start_processes(config)
    main_log = log if dist.is_main else (lambda *_: None)
    teacher, teacher_info = load_students_teacher(config, device, main_log)
    record = RunRecord.start(config, device, dist.world_size,
                             phase_specs(config) if config.phase != 'evaluate' else (),
                             teacher_info)
    if dist.is_main:
        print_configuration(record.configuration(), log)
    record, arrays = select_data(record, dist, log)
    configure_backends(device)
    if config.phase == 'evaluate':
        if dist.is_main:
            try:
                evaluate_checkpoints(config, device, arrays, log)
            except TeacherMismatch as e:
                raise UsageError(str(e)) from None
        barrier()
        return 0
    phase_watch = Stopwatch(device).start()
    try:
        summaries, dirs, record = train_phase_for_seeds(record, dist, arrays, stop, teacher,
                                                        log)
    finally:
        stop.uninstall()  # writing the results: Ctrl-C raises KeyboardInterrupt as usual
    if dist.is_main:
        report_phase(record, summaries, dirs, phase_watch.elapsed(), log)
    # every process leaves together: one that tears its process group down while rank 0 still
    # writes the results can abort in the communication library's threads at exit
    barrier()
    return 0


def start_processes(config):
    """(device, DistInfo): --device resolved, torchrun's processes joined, the batch checked to
    divide among them, and --out-dir proved writable, before anything is read."""
    device = resolve_device(config.device)
    dist, device = init_distributed(device)
    if dist.enabled and config.batch_size % dist.world_size:
        raise UsageError(f'--batch-size {config.batch_size} (global) is not divisible by the '
                         f'{dist.world_size} processes')
    check_out_dir(config.out_dir)
    return device, dist


def load_students_teacher(config, device, log):
    """(teacher model, record.TeacherInfo) of the students' phase, (None, None) otherwise: a
    missing or wrong teacher is refused before any data is read."""
    if config.phase != 'students':
        return None, None
    if not os.path.exists(config.teacher_checkpoint):
        raise CheckpointError(missing_teacher_message(config))
    try:
        teacher, arch, sha, record = load_teacher(
            config.teacher_checkpoint, device, config.num_classes, arch=config.teacher_arch,
            default_arch=config.recipe.teacher_arch,
            split={k: getattr(config, k) for k in SPLIT_KEYS if k != 'subset'}, log=log)
    except TeacherMismatch as e:
        raise UsageError(str(e)) from None
    return teacher, TeacherInfo(arch, sha, sum(p.numel() for p in teacher.parameters()),
                                record)


def select_data(record, dist, log):
    """(record with the effective --subset, the images the run uses): the dataset read (one
    process downloads, the others wait), --subset applied and said, the split and the
    students' teacher checked against it before anything is written."""
    config = record.config
    spec = config.dataset_spec()  # a folder dataset: its scan of --data-dir
    main_log = log if dist.is_main else (lambda *_: None)
    in_memory = True
    if spec.scan is not None:  # a folder dataset: decoded into memory, or streamed
        in_memory, why = decide_in_memory(config.data_in_memory, decoded_bytes(spec),
                                          available_bytes(record.device))
        main_log(why)
    if dist.is_main:  # one process downloads; the others wait and read
        full = load_dataset(config.data_dir, spec, in_memory=in_memory)
    barrier()
    if not dist.is_main:
        full = load_dataset(config.data_dir, spec, download=False, in_memory=in_memory)
    if spec.scan is not None:
        main_log(describe_folder_data(spec, full))
    arrays = full  # --evaluate takes each checkpoint's own test images unless --subset is given
    if config.phase != 'evaluate':  # from here on, --subset is what it does: None when all
        subset = effective_subset(config.subset, len(full[1]), len(full[3]))
        if dist.is_main and config.subset:
            log(describe_subset(config.subset, subset, spec.title, len(full[1]), len(full[3])))
        config = replace(config, subset=subset)  # recorded: what ran
        record = replace(record, config=config)
        arrays = full.first(subset)
    check_split(len(arrays[1]), config.subset, config.val_fraction, config.split_seed)
    if config.phase == 'students':  # before anything is written
        try:
            check_data(config.teacher_checkpoint, record.teacher.record,
                       {k: getattr(config, k) for k in SPLIT_KEYS}, full, arrays, main_log)
        except TeacherMismatch as e:
            raise UsageError(str(e)) from None
    return record, arrays


def report_phase(record, summaries, dirs, seconds, log):
    """The phase's results written (results.json, results.md) and printed: the time, peak
    memory, the table, and for the students their gains and the grid's confirming command."""
    config, phase = record.config, record.config.phase
    results = write_results(config.out_dir, phase, summaries, record.to_dict(),
                            run_info(config, record.device), {phase: list(dirs.values())}, log)
    log(f'\nFinished the {phase} phase in {seconds:.0f}s (peak memory '
        f'{results["phases"][phase]["peak_memory_mb"]:.0f} MB); results in '
        f'{os.path.join(config.out_dir, "results.json")} and results.md')
    print_table(results['models'], log)
    if phase == 'students':
        for line in describe_gains(results):
            log(line)
        chosen = rerun_command(results['models'], config)
        if chosen:
            log(chosen)


def describe_folder_data(spec, arrays):
    """The line saying what a folder dataset's scan found and how it normalizes."""
    mean, std = spec.mean or arrays.normalization[0], spec.std or arrays.normalization[1]
    h, w = spec.image_size
    return (f'{spec.title} in {spec.layout.root}: {len(arrays[1])} training and '
            f'{len(arrays[3])} test images of {spec.num_classes} classes at {h}x{w}; '
            f'normalized with the training images\' mean {mean} and std {std}')


def describe_subset(asked, effective, title, num_train, num_test):
    """The line saying what --subset `asked` does to data of num_train / num_test images
    (effective: datasets.effective_subset's value)."""
    if effective is None:
        return (f'  --subset {asked}: {title} has {num_train} training and {num_test} test '
                f'images, so all of them are used (a full-data run, recorded as no --subset)')
    used = [f'the first {asked} of {n} {what}' if asked < n else f'all {n} {what}'
            for n, what in ((num_train, 'training images'), (num_test, 'test images'))]
    return (f'  --subset {asked}: a quick run on part of {title} ({" and ".join(used)}), not '
            f'comparable to full-data numbers')



def check_split(num_train_images, subset, val_fraction, split_seed):
    """Refuse a --val-fraction that leaves no image on one side of the split of the first
    `subset` (None: all) of num_train_images, before anything is written (UsageError)."""
    n = min(num_train_images, subset or num_train_images)
    try:
        split_train_val(n, val_fraction, split_seed)
    except ValueError as e:
        raise UsageError(str(e) + (f' (with --subset {subset})' if subset else '')) from None

