"""Running a phase: the device, the models of the phase, seeds and their folders, resume look-up,
precision and teacher choices, and the results.

main.py parses the command line, config.resolve turns it into one frozen RunConfig, and
run(config) does the rest, here, with explicit arguments, so it can be driven from Python as well:
run(main.parse_config(['--train-teacher', '--epochs', '3'])).
"""
import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time  # wall-clock stamps only (when a file was saved); intervals: timing
from dataclasses import dataclass, field, replace

import torch

from kd.files.checkpoint import (CheckpointError, file_sha256, load_file, read_checkpoint, read_record,
                        record_path, write_record)
from kd.run.config import UsageError, flag_args  # noqa: F401  (runner's names, as before)
from kd.data.datasets import effective_subset, get_dataset, load_dataset
from kd.methods.plan import plan_features
from kd.engine.distributed import barrier, init_distributed
from kd.methods.losses import HYPER, HYPER_PARAMETERS, expand_grid, get_loss, setting_name, takes
from kd.methods.grid import setting_args
from kd.run.memory import GridTooLarge, check_memory, peak_memory_mb
from kd.models import build_model, feature_points
from kd.run.outdir import planned_files, read_manifest, set_aside, write_manifest
from kd.recipes.recipe import RECIPE
from kd.recipes.recipe import STUDENT_ARCH as DEFAULT_STUDENT_ARCH  # noqa: F401  (runner's name, as before)
from kd.recipes.recipe import get_recipe, loader_options, prepare_model, recipe_names, scaled_lr
from kd.report.report import (describe_gains, device_name, print_table, ranked_students, read_results,
                    warmup_notes, write_results)
from kd.run.teacher import (NO_RECORD_SPLIT, SPLIT_KEYS, TeacherMismatch, check_data, load_for_inference,
                     load_teacher, logits_key, logits_path, provenance_problems, rebuild,
                     save_test_logits, store_test_logits, teacher_test_logits)
from kd.engine.timing import Stopwatch
from kd.engine.loop import (PRECISION_DTYPES, STATE_FORMAT, StopSignal, Trainee, accuracy, choose_precision,
                   configure_backends, precision_name, predict, predict_views, train_phase)
from kd.engine.loop import LoopCallbacks, LoopOptions, PhaseFiles
from kd.engine.stacked import StudentStack
from kd.engine.step import LockstepSteps, PhaseTeacher
from kd.engine.trainee import TraineeOptions
from kd.run.advice import cpu_run_advice
from kd.run.tuning import (PrecisionDecisions, decide_precisions, decide_stacking, decisions_path,
                    fastest_teacher, machine_key)
from kd.data.loader import make_loaders, split_train_val

# Configuration keys that change what a run computes: a resumed run must agree on all of them.
RUN_KEYS = {
    'teacher': ('dataset', 'teacher_arch', 'epochs', 'batch_size', 'lr', 'weight_decay', 'seed',
                'val_fraction', 'split_seed', 'subset', 'precision', 'recipe'),
    'students': ('dataset', 'student_arch', 'students', 'epochs', 'batch_size', 'lr',
                 'weight_decay', 'seed', 'val_fraction', 'split_seed', 'subset', 'precision',
                 'teacher_sha256', 'recipe'),
}


def resolve_device(name):
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
            count = torch.cuda.device_count()
            raise UsageError(f'--device {name}: this machine has {count} GPU'
                             f'{"s" if count != 1 else ""} (cuda:0 to cuda:{count - 1})')
    elif device.type != 'cpu':
        raise UsageError(f'--device {name!r} is not supported (use auto, cpu, cuda or cuda:N)')
    return device


def device_arg(text):
    """argparse `type=` of a --device flag (the benchmarks'): resolve_device(text), its refusal
    raised as argparse's, so the script exits 2 with the message alone."""
    try:
        return resolve_device(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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


def run_info(config, device):
    return {'data_dir': config.data_dir, 'subset': config.subset, 'device': device_name(device)}


def program():
    """How this program was started (`main.py`, or the path the user typed to it)."""
    argv0 = sys.argv[0] if sys.argv else ''
    return shlex.quote(argv0) if os.path.basename(argv0) == 'main.py' else 'main.py'


def _is_resume_or_restart(arg):
    # argparse also accepts an unambiguous prefix (--resu, --rest)
    return arg.startswith('--re') and ('--resume'.startswith(arg) or '--restart'.startswith(arg))


def resume_command():
    argv = [a for a in sys.argv[1:] if not _is_resume_or_restart(a)]
    nproc = int(os.environ.get('LOCAL_WORLD_SIZE', os.environ.get('WORLD_SIZE', '1')))
    launcher = f'torchrun --nproc_per_node={nproc}' if 'RANK' in os.environ else 'python'
    return ' '.join([launcher, program()] + [shlex.quote(a) for a in argv + ['--resume']])


QUICK_RUN = ['--epochs', '3', '--subset', '2000']
# what a run's data and precision depend on, kept by every printed command
DATA_FLAGS = ('recipe', 'dataset', 'data_dir', 'val_fraction', 'split_seed', 'device', 'amp')


def missing_teacher_message(config):
    """What to do when the students' teacher checkpoint does not exist: check the path given
    to --teacher-checkpoint, or train the teacher into --out-dir with this run's data flags."""
    if config.teacher_checkpoint_given:
        return (f'no teacher checkpoint at {config.teacher_checkpoint}: check the path given to '
                f'--teacher-checkpoint')
    flags = flag_args(config, DATA_FLAGS + ('subset', 'recipe', 'teacher_arch', 'out_dir'))
    return (f'no teacher checkpoint at {config.teacher_checkpoint}: train one first with '
            + ' '.join(['python', program(), '--train-teacher'] + [shlex.quote(f) for f in flags])
            + ', or give one with --teacher-checkpoint')


def command_lines(commands):
    """Each argument list of `commands` as a line to paste: python PROGRAM ARGS, quoted."""
    return [' '.join(['python', program()] + [shlex.quote(a) for a in c]) for c in commands]


def quick_run_commands(config, teacher_arch):
    """The commands of a quick run (3 epochs, 2,000 images) suggested on a CPU: into their own
    folder OUT_DIR/quick, so they run when pasted even with this run's unfinished state in
    OUT_DIR, with this run's data, dataset, split, device, precision and architectures. The
    students' phase gets the quick teacher's command first: its students need a teacher of the
    same data. Returns command lines (str)."""
    folder = os.path.normpath(os.path.join(config.out_dir, 'quick'))
    common = flag_args(config, DATA_FLAGS + ('batch_size',))
    arch = ['--teacher-arch', teacher_arch] if teacher_arch != config.recipe.teacher_arch else []
    commands = [['--train-teacher', *QUICK_RUN, *arch, *common, '--out-dir', folder]]
    if config.phase == 'students':
        commands.append([*QUICK_RUN, *flag_args(config, ('student_arch', 'loss', 'temperature',
                                                          'alpha', 'beta', 'gamma',
                                                          'logit_standardization', 'sets',
                                                          'no_baseline')),
                         *common, '--out-dir', folder])
    return command_lines(commands)


def fast_run_commands(config):
    """The commands of the same phase under the fast recipe (its own networks, 10 epochs), into
    OUT_DIR/fast, with this run's data, dataset, split, device, precision and, for the students,
    loss settings; the students' phase gets the fast teacher's command first. [] when the run
    already uses the fast recipe. Returns command lines (str)."""
    if config.recipe.name == 'fast':
        return []
    folder = os.path.normpath(os.path.join(config.out_dir, 'fast'))
    common = ['--recipe', 'fast', *flag_args(config, tuple(f for f in DATA_FLAGS if f != 'recipe')
                                                     + ('subset',)), '--out-dir', folder]
    commands = [['--train-teacher', *common]]
    if config.phase == 'students':
        commands.append([*flag_args(config, ('loss', *HYPER_PARAMETERS, 'sets', 'no_baseline')),
                         *common])
    return command_lines(commands)


# ---------------------------------------------------------------------------------------------
# The models of a phase

@dataclass
class ModelSpec:
    name: str                     # student_kd, student_base, kd_T4_a0.1, ... or teacher
    arch: str                     # a name from models.MODELS
    loss: str                     # a name from losses.LOSSES
    params: dict = field(default_factory=dict)


def student_specs(config):
    """The students of a run: one per setting of the loss grid, plus the baseline.

    One setting keeps today's names (student_kd, student_base); several are named by their
    setting (kd_T4_a0.1, dkd_T4, ...), and the best of them on validation also becomes
    best_student_kd.pth.
    """
    grid = expand_grid(config.loss, config.temperature, config.alpha, config.beta, config.gamma,
                       config.logit_standardization, sets=config.sets)
    arch = config.student_model
    if len(grid) == 1:
        specs = [ModelSpec('student_kd', arch, *grid[0])]
    else:
        specs = [ModelSpec(setting_name(loss, params), arch, loss, params)
                 for loss, params in grid]
    if not config.no_baseline:
        specs.append(ModelSpec('student_base', arch, 'ce', {}))
    return specs


def phase_specs(config):
    """The models `config.phase` trains ('teacher' or 'students')."""
    if config.phase == 'teacher':
        return [ModelSpec('teacher', config.teacher_arch or config.recipe.teacher_arch, 'ce', {})]
    return student_specs(config)


def feature_plan(specs, teacher, teacher_info, device, num_classes, image_shape):
    """The distillers.FeaturePlan of the students' feature methods (None when none); a model
    without the points a method reads is a usage error, found before any training."""
    built = {}
    students = [(s.arch, s.loss, built.setdefault(s.arch, build_model(s.arch, num_classes)),
                 s.params) for s in specs]
    try:
        return plan_features(students, teacher, feature_points(teacher_info['arch'], teacher),
                             device, num_classes, teacher_arch=teacher_info['arch'],
                             image_shape=image_shape)
    except ValueError as e:
        raise UsageError(str(e)) from None


def distilled_names(specs):
    return [s.name for s in specs if s.name not in ('teacher', 'student_base')]


# ---------------------------------------------------------------------------------------------
# Seeds, folders and resume

def run_dirs(out_dir, seeds, per_seed_folders):
    return {s: (os.path.join(out_dir, f'seed{s}') if per_seed_folders else out_dir) for s in seeds}


def load_states(phase, dirs):
    """{seed: (path, state)} of the saved training states in the run folders, each read once."""
    states = {}
    for seed, d in dirs.items():
        path = os.path.join(d, f'last_{phase}.pt')
        if not os.path.exists(path):
            continue
        state = load_file(path, 'training state')
        if not isinstance(state, dict) or 'config' not in state or 'finished' not in state:
            raise UsageError(f'{path} is not a training state of this program; '
                             f'remove it or use --restart')
        states[seed] = (path, state)
    return states


def find_states(phase, saved, resume, restart, config_by_seed):
    """The saved state of each seed for --resume, or a refusal to overwrite an unfinished run.

    saved: load_states's result; resume, restart: --resume, --restart. Needs no timing, so it
    runs before any: the precision is compared only when config_by_seed has one (--amp /
    --no-amp); in auto mode a resumed run takes its saved precision (saved_precisions)."""
    states = {}
    for seed, (path, state) in saved.items():
        if not state['finished'] and not resume and not restart:
            raise UsageError(
                f"{path} holds an unfinished {phase} run (epoch {state['epoch']} of "
                f"{state['config'].get('epochs')}). Resume it with --resume, or start over "
                f"with --restart.")
        if resume:
            if state.get('format') != STATE_FORMAT:
                raise UsageError(f'{path} was saved by an older version of this program and '
                                 f'cannot be resumed; start over with --restart')
            new = config_by_seed[seed]
            # states saved before recipes existed ran the standard one
            changed = [k for k in RUN_KEYS[phase] if (k != 'precision' or k in new)
                       and state['config'].get(k, 'standard' if k == 'recipe' else None)
                       != new.get(k)]
            if changed:
                details = ', '.join(f"{k}: {state['config'].get(k)!r} -> {new.get(k)!r}"
                                    for k in changed)
                raise UsageError(f'cannot resume {path}: the configuration changed ({details}); '
                                 f'use the original flags, or --restart to start over')
            states[seed] = state
    return states


def check_resume_data(saved, arrays, log):
    """Refuse to resume a run on other images than it started on (UsageError, exit 2).

    saved: load_states's result; arrays: the DatasetArrays this invocation uses (after
    --subset). The images are compared by content digest, so a copy of the data in another
    folder resumes, and other pictures under the same path do not. A state written without the
    digests (an older version) gets a one-line note."""
    now = {'train_images_sha256': arrays.train_sha256, 'test_images_sha256': arrays.test_sha256}
    for path, state in saved.values():
        config = state['config']
        if not any(k in config for k in now):
            log(f'note: {path} was saved by an older version that did not record its images\' '
                f'digests, so it cannot be checked that it resumes on the same data')
            continue
        differ = [f'{what} images (sha256 {str(config.get(k))[:12]} saved, {now[k][:12]} now)'
                  for k, what in (('train_images_sha256', 'training'),
                                  ('test_images_sha256', 'test')) if config.get(k) != now[k]]
        if differ:
            raise UsageError(f'cannot resume {path}: it was started on other data (its '
                             f'{" and ".join(differ)}); point --data-dir at the data it was '
                             f'started on (any folder holding the same files), or --restart to '
                             f'start over')


def saved_precisions(saved, resume):
    """(precisions, teacher precision, record) of a run to be resumed, by name: a resumed run
    keeps its own, whatever was stored or measured since. None when not resuming (resume:
    --resume)."""
    if not resume:
        return None
    for _, state in saved.values():
        config = state['config']
        if 'precision' in config:
            source = config.get('precision_source') or 'unrecorded'
            if not source.startswith('resumed'):
                source = f'resumed ({source})'
            return (config['precision'], config.get('teacher_precision'),
                    {'source': source, 'decisions': config.get('precision_decisions')})
    return None


def resumed_amp(saved, amp):
    """The --amp setting a resumed run records: the one it started with when amp is None
    (auto), else amp, once it agrees with the precision the run trained in.

    A resumed run keeps its precision, so an explicit --amp (bf16 / fp16) on a run that trained
    any model in fp32, or --no-amp on one that used a lower precision, would be recorded but
    not run: UsageError, naming the saved precision. saved: load_states's result.
    """
    started = amp
    for path, state in saved.values():
        config = state['config']
        if 'precision' not in config:
            continue
        used = set(config['precision'].values()) | (
            {config['teacher_precision']} if config.get('teacher_precision') else set())
        if (amp is True and 'fp32' in used) or (amp is False and used != {'fp32'}):
            raise UsageError(
                f"cannot resume {path} with --{'' if amp else 'no-'}amp: that run trained in "
                f"{' and '.join(sorted(used))}, and a resumed run keeps its precision; resume "
                f"without --{'' if amp else 'no-'}amp, or start over with --restart")
        if amp is None:
            started = config.get('amp')
    return started


def describe_resume(seed, path, state, steps_per_epoch):
    """The line a resumed seed prints: where it continues and when its state was saved."""
    saved = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(os.path.getmtime(path)))
    epochs = state['config'].get('epochs')
    if state['finished']:
        return (f'seed {seed}: finished all {epochs} epochs already (state saved {saved} in '
                f'{path}); nothing to train')
    return (f"resuming seed {seed} from epoch {state['epoch'] + 1} of {epochs}, batch "
            f"{state['batch'] + 1} of {steps_per_epoch} (state saved {saved} in {path})")


def make_trainees(specs, recipe, device, precisions, num_classes, compile_model, dist, seed,
                  train_loader=None, features=None):
    """The trainees of one seed, with num_classes outputs, torch.compile'd when compile_model.
    Students start from identical weights: differences between them come from their losses
    alone. train_loader: the images the recipe initialises from (recipe.prepare_model: the
    whitening layer), whose labels by index CRD's memory uses; features: the
    distillers.FeaturePlan of feature methods (None: logit losses only)."""
    torch.manual_seed(seed)
    first = prepare_model(build_model(specs[0].arch, num_classes=num_classes), recipe,
                          train_loader)
    trainees = []
    for spec in specs:
        module = first if spec is specs[0] else build_model(spec.arch, num_classes=num_classes)
        if module is not first:
            prepare_model(module, recipe, train_loader,
                          like=first if spec.arch == specs[0].arch else None)
        trainees.append(Trainee(spec.name, module, spec.loss, recipe, device,
                                precisions[spec.name], TraineeOptions(
                                    ddp=dist.enabled, compile_model=compile_model,
                                    loss_params=spec.params,
                                    distiller=distiller_of(features, spec, seed, train_loader),
                                    points=features.student_points.get(spec.arch)
                                    if features is not None else None)))
    return trainees


def distiller_of(features, spec, seed, train_loader):
    """The feature method's Distiller of a student (None for a logit loss), initialised from
    `seed` alone: a method's connectors start the same in a grid and alone."""
    if features is None:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return features.build(spec.loss, spec.params, spec.arch, train_loader.labels)


# ---------------------------------------------------------------------------------------------
# A phase, once per seed

def train_phase_for_seeds(config, device, dist, arrays, log, stop, teacher=None,
                          teacher_info=None, configuration=None):
    """Train config.phase once per seed; return {seed: summary}, the run folders and the
    recorded config.

    configuration: resolved_configuration's view, recorded in the config as printed."""

    phase, recipe, seeds = config.phase, config.recipe, list(config.seeds)
    dirs = run_dirs(config.out_dir, seeds, config.per_seed_folders)
    specs = phase_specs(config)
    main_log = log if dist.is_main else (lambda *_: None)

    def loaders(seed):
        return make_loaders(config.data_dir, config.batch_size, device, config.val_fraction,
                            seed, config.subset,
                            eval_batch_size=5000 if device.type == 'cuda' else 1000,
                            channels_last=True, rank=dist.rank, world_size=dist.world_size,
                            arrays=arrays, split_seed=config.split_seed, dataset=config.dataset,
                            **loader_options(recipe))

    data = loaders(seeds[0])
    features = feature_plan(specs, teacher, teacher_info, device, config.num_classes,
                            get_dataset(config.dataset).image_shape) \
        if phase == 'students' else None
    batch_shape = get_dataset(config.dataset).batch_shape(config.batch_size // dist.world_size)
    try:
        extra = {s.name: features.state_bytes(s.loss, s.params, s.arch, data.train.labels)
                 for s in specs} if features is not None else None
        memory_estimate = check_memory(specs, device, config.num_classes, batch_shape, main_log,
                                       extra)
    except GridTooLarge as e:
        raise UsageError(str(e)) from None
    # every refusal that needs no timing comes before any timing
    saved = load_states(phase, dirs)
    if config.resume:
        check_resume_data(saved, data.arrays, main_log)
    amp = resumed_amp(saved, config.amp) if config.resume else config.amp
    base_config = config.record()
    base_config.update(amp=amp, configuration=configuration, device=str(device),
                       world_size=dist.world_size, val_images_sha256=data.val_fingerprint(),
                       # what the images are, whichever folder they were read from
                       train_images_sha256=data.arrays.train_sha256,
                       test_images_sha256=data.arrays.test_sha256,
                       memory_estimate_mb=round(memory_estimate / 2**20, 1),
                       recipe=recipe.name, recipe_values=recipe.to_dict())
    teacher_logits, teacher_form, logits_reused = None, None, True
    if phase == 'teacher':
        base_config['teacher_arch'] = specs[0].arch
    else:
        distilled = [s for s in specs if s.name != 'student_base']
        # every loss's resolved settings; one setting also as its T and alpha (those it takes)
        base_config.update(distilled[0].params if len(distilled) == 1 else {})
        base_config.update(
            student_arch=specs[0].arch, loss=list(config.loss),
            loss_settings=loss_settings(specs), no_baseline=config.no_baseline,
            students=[{'name': s.name, 'loss': s.loss, 'params': s.params} for s in specs],
            teacher_checkpoint=config.teacher_checkpoint, teacher_arch=teacher_info['arch'],
            teacher_sha256=teacher_info['sha256'])
    states = find_states(phase, saved, config.resume, config.restart,
                         {s: dict(base_config, seed=s) for s in seeds})
    if config.resume and not states:
        main_log(f'--resume: no saved {phase} state in {config.out_dir}; starting from the '
                 f'beginning')

    resumed = saved_precisions(saved, config.resume)
    if resumed is not None:
        precisions = {n: PRECISION_DTYPES[p] for n, p in resumed[0].items()}
        teacher_precision = PRECISION_DTYPES[resumed[1]] if resumed[1] else None
        precision_record = resumed[2]
        main_log(f"precision: {', '.join(sorted(set(resumed[0].values())))}, as the run being "
                 f"resumed")
    else:
        store = PrecisionDecisions(decisions_path(), machine_key(dist.world_size), main_log) \
            if device.type == 'cpu' and config.amp is None else None
        precisions, teacher_precision, precision_record = decide_precisions(
            specs, device, config.amp, dist, batch_shape, config.num_classes, teacher=teacher,
            teacher_arch=teacher_info['arch'] if teacher_info else None, store=store,
            log=main_log)
    base_config.update(precision={n: precision_name(p) for n, p in precisions.items()},
                       precision_source=precision_record['source'],
                       precision_decisions=precision_record['decisions'])
    if phase == 'students':
        base_config['teacher_precision'] = precision_name(teacher_precision)
        teacher_key = logits_key(teacher_info['sha256'], config.dataset,
                                 data.arrays.test_sha256, data.num_test)
        teacher_logits, logits_reused = teacher_test_logits(
            teacher, config.teacher_checkpoint, teacher_key, data.test, teacher_precision,
            main_log)
        forwards = config.epochs * len(data.train) * len(seeds)
        teacher, teacher_form = fastest_teacher(
            teacher, batch_shape, device, teacher_precision, forwards, main_log,
            compile_model=bool(config.compile),
            points=features.teacher_points if features is not None else None)
        base_config['teacher_form'] = teacher_form
        main_log(f"teacher: {teacher_form['chosen']} form for the training forwards "
                 f"({', '.join(f'{k} {v:.3f}s' for k, v in teacher_form['seconds_per_batch'].items())}"
                 f" per batch)")
    configs = {s: dict(base_config, seed=s) for s in seeds}
    folders = [os.path.relpath(dirs[s], config.out_dir) for s in seeds]
    names = [s.name for s in specs] + (['student_kd'] if len(distilled_names(specs)) > 1
                                       else [])
    files = planned_files(phase, names, folders, top_copies=config.per_seed_folders)
    manifest = dict(models={s.name: {'arch': s.arch, 'loss': s.loss, 'params': s.params}
                            for s in specs},
                    folders=folders, subset=config.subset, dataset=config.dataset, seeds=seeds)
    def claim_folder():
        """Before this run's first file: a fresh run must not mix its files with an earlier
        run's, so that run's files are set aside; the manifest then names this run's."""
        if not states:
            keep = [] if teacher is None else [config.teacher_checkpoint,
                                               record_path(config.teacher_checkpoint),
                                               logits_path(config.teacher_checkpoint)]
            set_aside(config.out_dir, phase, keep=keep, log=main_log)
        write_manifest(config.out_dir, phase, files=files, finished=False, **manifest)
        os.makedirs(dirs[seeds[0]], exist_ok=True)  # set_aside removes the seed folders it empties
        writers.extend(w for w in [open_tensorboard(config.out_dir, config.tensorboard, phase,
                                                    log)] if w is not None)
    if not logits_reused and dist.is_main:  # stored only now that the run is going ahead
        store_test_logits(config.teacher_checkpoint, teacher_logits, teacher_key, main_log)
    quick_run = quick_run_commands(
        config, specs[0].arch if phase == 'teacher' else teacher_info['arch'])
    fast_run = fast_run_commands(config)

    writers = []  # opened by claim_folder, once an earlier run's event files are set aside
    summaries = {}
    for index, seed in enumerate(seeds):
        if dist.is_main and index > 0:  # the first seed's is made by claim_folder
            os.makedirs(dirs[seed], exist_ok=True)
        data = data if index == 0 else loaders(seed)
        trainees = make_trainees(specs, recipe, device, precisions, config.num_classes,
                                 config.compile, dist, seed, data.train, features)
        if index == 0:
            stacked, base_config['stacking'] = decide_stacking(
                trainees, config.stack_students, config.compile, config.num_classes, device,
                dist, teacher, teacher_precision, recipe, batch_shape, main_log)
            for recorded in configs.values():
                recorded['stacking'] = base_config['stacking']
        main_log(f'[{phase}, seed {seed}] {data.num_train} training, {data.num_val} validation, '
                 f'{data.num_test} test images; {len(data.train)} step{"s" if len(data.train) != 1 else ""}'
                 f' per epoch; '
                 f'{len(trainees)} model{"s" if len(trainees) != 1 else ""}, precision '
                 + ', '.join(sorted({precision_name(p) for p in precisions.values()}))
                 + (f', teacher {precision_name(teacher_precision)}' if teacher is not None
                    else ''))
        if seed in states and dist.is_main:
            main_log(describe_resume(seed, saved[seed][0], states[seed], len(data.train)))
        callback = (lambda epoch, rows, s=seed: [log_tensorboard(w, phase, s, epoch, rows)
                                                 for w in writers]) \
            if config.tensorboard and dist.is_main else None
        seed_watch = Stopwatch(device).start()
        if stop is not None:  # from here a signal stops at the next batch and saves the state
            stop.immediate = False
        summaries[seed] = train_phase(
            phase, trainees, data, recipe, PhaseFiles(dirs[seed], configs[seed], states.get(seed)),
            teacher=PhaseTeacher(teacher, teacher_precision, teacher_logits),
            options=LoopOptions(device, dist, test_every=config.test_every,
                                runs_ahead=len(seeds) if index == 0 else 0,
                                steps=StudentStack if stacked else LockstepSteps),
            callbacks=LoopCallbacks(log=main_log, stop=stop, on_epoch=callback,
                                    before_write=claim_folder if index == 0 else None,
                                    on_estimate=cpu_run_advice(device, quick_run, fast_run)))
        summaries[seed]['wall_seconds'] = round(seed_watch.elapsed(), 2)
        summaries[seed]['peak_memory_mb'] = peak_memory_mb(device)
        test_logits = summaries[seed].pop('test_logits')
        for spec in specs:
            summaries[seed]['models'][spec.name]['arch'] = spec.arch
        if teacher_info is not None:  # the teacher as it ran, not as an earlier run reported it
            summaries[seed]['models'].setdefault('teacher_in_use', {}).update(
                teacher_in_use(config.teacher_checkpoint, teacher_info))
        if dist.is_main:
            hashes = write_model_records(dirs[seed], specs, summaries[seed]['models'],
                                         configs[seed])
            for name, sha256 in hashes.items():  # which weights the results describe
                summaries[seed]['models'][name]['sha256'] = sha256
            if phase == 'teacher':  # the students' phase and --evaluate reuse them
                save_test_logits(os.path.join(dirs[seed], 'best_teacher.pth'),
                                 test_logits['teacher'], logits_key(
                                     hashes['teacher'], config.dataset, data.arrays.test_sha256,
                                     data.num_test))
            else:
                best = promote_best_student(dirs[seed], specs, summaries[seed]['models'],
                                            main_log)
                if best is not None and index == 0:  # the top-level copy is the first seed's
                    manifest['models']['student_kd'] = dict(manifest['models'][best],
                                                            copy_of=best)
        if config.per_seed_folders and dist.is_main:
            write_results(dirs[seed], phase, {seed: summaries[seed]}, configs[seed],
                          run_info(config, device), {phase: [dirs[seed]]}, log=lambda *_: None)
    for writer in writers:
        writer.close()
    if config.per_seed_folders and dist.is_main:
        first = dirs[seeds[0]]
        for name in os.listdir(first):  # the top-level files stay usable by the README's snippet
            if name.startswith('best_'):
                shutil.copyfile(os.path.join(first, name), os.path.join(config.out_dir, name))
    if dist.is_main:
        write_manifest(config.out_dir, phase, files=files, finished=True, **manifest)
    return summaries, dirs, base_config


def teacher_in_use(checkpoint, teacher_info):
    """What describes the students' teacher besides its accuracy on this run's test images:
    its checkpoint (path), hash, architecture and size, and the selection its record (whose
    hash was checked against the weights loaded) reports."""
    record = teacher_info.get('record') or {}
    return {'checkpoint': checkpoint, 'sha256': teacher_info['sha256'],
            'arch': teacher_info['arch'], 'params': teacher_info['params'],
            'seeds': [record['seed']] if 'seed' in record else [],
            **({} if teacher_info.get('record') else {'split': NO_RECORD_SPLIT}),
            **{k: record[k] for k in ('best_epoch', 'best_val_acc') if k in record}}


def write_model_records(run_dir, specs, models, config):
    """best_<name>.json beside each best_<name>.pth: what the weights are (architecture, class
    count, loss) and which data selected them, so later phases can rebuild and check them.
    Returns {name: sha256 of its checkpoint}."""
    hashes = {}
    for spec in specs:
        path = os.path.join(run_dir, f'best_{spec.name}.pth')
        entry = models.get(spec.name, {})
        if not os.path.exists(path):
            continue
        hashes[spec.name] = file_sha256(path)
        write_record(path, {
            'model': spec.name, 'arch': spec.arch, 'num_classes': config['num_classes'],
            'loss': spec.loss, 'loss_params': spec.params, 'seed': config['seed'],
            **{k: config.get(k) for k in ('dataset', 'split_seed', 'val_fraction', 'subset',
                                          'val_images_sha256', 'train_images_sha256',
                                          'test_images_sha256', 'epochs', 'recipe')},
            'best_epoch': entry.get('best_epoch'), 'best_val_acc': entry.get('best_val_acc'),
            'test_acc': entry.get('test_acc'), 'sha256': hashes[spec.name],
            # the precision it trained and was tested in: --evaluate reproduces test_acc with it
            **({'precision': entry['precision']} if entry.get('precision') else {}),
            **({'teacher_sha256': config['teacher_sha256']} if 'teacher_sha256' in config else {}),
        })
    return hashes


def promote_best_student(run_dir, specs, models, log):
    """With several distilled students, best_student_kd.pth is the one best on validation."""
    names = distilled_names(specs)
    if len(names) < 2:
        return None
    best = max(names, key=lambda n: (models[n].get('best_val_acc') or -1.0,
                                     -names.index(n)))
    for ext in ('.pth', '.json'):
        shutil.copyfile(os.path.join(run_dir, f'best_{best}{ext}'),
                        os.path.join(run_dir, f'best_student_kd{ext}'))
    log(f'best_student_kd.pth is {best}, the distilled student best on validation')
    return best


def open_tensorboard(out_dir, on, phase, log):
    """A SummaryWriter into OUT_DIR/tensorboard/<phase> (one run per phase, as the folder
    holds), or None when not on (--tensorboard) or when tensorboard is not installed."""
    if not on:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: needs tensorboard
    except ImportError:
        log('tensorboard is not installed: --tensorboard is ignored (pip install tensorboard)')
        return None
    return SummaryWriter(os.path.join(out_dir, 'tensorboard', phase))


def log_tensorboard(writer, phase, seed, epoch, rows):
    for model, row in rows.items():
        for key, value in row.items():
            if key != 'epoch' and value is not None:
                writer.add_scalar(f'seed{seed}/{model}/{key}', value, epoch)
    writer.flush()


# ---------------------------------------------------------------------------------------------
# --evaluate

def checkpoint_names(out_dir):
    """The best_<name>.pth in out_dir: teacher, student_kd, student_base first, then the rest."""
    names = [f[len('best_'):-len('.pth')] for f in os.listdir(out_dir)
             if f.startswith('best_') and f.endswith('.pth')]
    first = ['teacher', 'student_kd', 'student_base']
    return [n for n in first if n in names] + sorted(n for n in names if n not in first)


def last_run_models(out_dir):
    """The checkpoints --evaluate reports: those of the last run of each phase in out_dir.

    Returns ({name: that run's manifest or results.json config, or None}, notes). A phase's
    models come from its manifest run_<phase>.json; for folders written before manifests,
    from results.json's record of the phase; with neither, every best_*.pth is taken."""
    results = read_results(out_dir) or {}
    models, notes = {}, []
    for phase in ('teacher', 'students'):
        manifest = read_manifest(out_dir, phase)
        config = (results.get('phases', {}).get(phase) or {}).get('config')
        if manifest is not None:
            names, info = list(manifest['models']), manifest
            if not manifest.get('finished'):
                notes.append(f'note: the last {phase} run in {out_dir} is unfinished: its '
                             f'best_*.pth are the best epochs so far (finish it with --resume)')
        elif phase == 'teacher':
            names, info = ['teacher'], config
        elif config and config.get('students'):
            names, info = [s['name'] for s in config['students']], config
            promoted = read_record(os.path.join(out_dir, 'best_student_kd.pth')) \
                if 'student_kd' not in names else None
            if promoted and promoted.get('model') in names:  # the grid's copy of its best
                names.append('student_kd')
        else:
            names, info = [n for n in checkpoint_names(out_dir) if n != 'teacher'], None
        for name in names:
            if os.path.exists(os.path.join(out_dir, f'best_{name}.pth')):
                models[name] = info
            elif manifest is not None:
                notes.append(f'note: best_{name}.pth of the last {phase} run is not in '
                             f'{out_dir}: skipped')
    return models, notes


def test_images(subset, total):
    """Which of the `total` test images --subset `subset` takes, in words."""
    if subset and subset < total:
        return f'the first {subset} of the {total} test images'
    return f'all {total} test images'


def evaluate_checkpoints(config, device, arrays, log):
    """--evaluate: test accuracy of the checkpoints of the last run of each phase in --out-dir,
    each rebuilt from its record, on the test images its run used (its record's --subset),
    unless --subset is given (then said to differ from results.md where it does)."""
    listed, notes = last_run_models(config.out_dir)
    if not listed:
        raise UsageError(f'no best_*.pth in {config.out_dir}: train first, or point --out-dir at '
                         f'the folder holding them')
    for note in notes:
        log(note)
    total = len(arrays[3])
    trained_on, records = {}, {}
    for name, info in listed.items():
        path = os.path.join(config.out_dir, f'best_{name}.pth')
        records[name] = read_record(path)
        trained_on[name] = (records[name] or info or {}).get('subset', config.subset)
    explicit = config.subset is not None
    differ = sorted({s for s in trained_on.values()  # compared as the images they take
                     if test_images(s, total) != test_images(config.subset, total)}, key=str) \
        if explicit else []
    if differ:
        runs = ' and '.join(test_images(s, total) for s in differ)
        log(f'note: --subset {config.subset}: these accuracies are on other test images than '
            f'results.md\'s (the runs that trained these checkpoints used {runs})')
    teacher_path = os.path.join(config.out_dir, 'best_teacher.pth')
    teacher_sha256 = (read_checkpoint(teacher_path, 'teacher checkpoint')[1]
                      if 'teacher' in listed else None)
    groups = {}
    for name in listed:
        groups.setdefault(config.subset if explicit else trained_on[name], []).append(name)
    models = {}
    for subset, names in groups.items():
        data = make_loaders(config.data_dir, config.batch_size, device, 0.0, config.seeds[0],
                            subset, eval_batch_size=1000, channels_last=True, arrays=arrays,
                            dataset=config.dataset)
        log(f'Test set: {data.num_test} images, {test_images(subset, total)}'
            + (' (--subset)' if explicit else ', as in the runs that trained these checkpoints')
            + (f': {", ".join(names)}' if len(groups) > 1 else ''))
        for name in names:
            path = os.path.join(config.out_dir, f'best_{name}.pth')
            is_teacher = name == 'teacher'
            # the recipe that trained it decides its evaluation (test-time augmentation)
            recorded = (records[name] or {}).get('recipe')
            recipe = get_recipe(recorded if recorded in recipe_names() else config.recipe.name)
            model, arch = rebuild(path, records[name],
                                  config.teacher_arch if is_teacher else config.student_arch,
                                  recipe.teacher_arch if is_teacher else recipe.student_arch,
                                  config.num_classes,
                                  '--teacher-arch' if is_teacher else '--student-arch',
                                  dataset=config.dataset)
            loaded, sha256 = read_checkpoint(path, f'{type(model).__name__} checkpoint')
            # the accuracy below is that of these weights, whatever their record or folder
            # say (a manifest has said already whether its run is unfinished)
            manifest = isinstance(listed[name], dict) and 'finished' in listed[name]
            for problem in provenance_problems(path, records[name], sha256,
                                               'teacher' if is_teacher else 'students',
                                               check_unfinished=not manifest):
                log(f'note: {problem}')
            for problem in evaluation_differences(name, records[name], data.arrays.test_sha256,
                                                  teacher_sha256):
                log(f'note: {problem}')
            model = load_for_inference(model, path, device, arch=arch,
                                       num_classes=config.num_classes, record=records[name],
                                       log=log, loaded=loaded)
            precision = evaluation_precision(records[name], is_teacher, device, config.amp, log)
            bar = f'evaluate {name}'
            if is_teacher:
                key = logits_key(sha256, config.dataset, data.arrays.test_sha256, data.num_test)
                logits, reused = teacher_test_logits(model, path, key, data.test, precision,
                                                     log, bar)
                if not reused:
                    store_test_logits(path, logits, key, log)
            else:
                logits = predict(model, data.test, precision, bar)[0]
            models[name] = {'test_acc': accuracy(logits, data.test.labels), 'arch': arch,
                            'params': sum(p.numel() for p in model.parameters())}
            if recipe.tta != 'none':
                tta = predict_views(model, data.test, precision, progress=f'{bar} (TTA)')[1]
                models[name]['test_acc_tta'] = accuracy(tta, data.test.labels)
    print_table(models, log)
    return models


def evaluation_precision(record, is_teacher, device, amp, log):
    """The autocast dtype --evaluate runs a checkpoint in: --amp / --no-amp when given, else
    the precision its run tested it in (its record's, said in one line when it is not the
    rule's), else choose_precision's rule. Rounding differs between precisions, so only the
    recorded one reproduces the run's test accuracy."""
    rule = choose_precision('teacher' if is_teacher else 'student', device, amp)
    recorded = (record or {}).get('precision')
    if amp is not None or recorded not in PRECISION_DTYPES:
        return rule
    dtype = PRECISION_DTYPES[recorded]
    if dtype == torch.float16 and device.type != 'cuda':
        return rule
    if dtype != rule:
        log(f'precision: {recorded}, as its run tested it (--amp / --no-amp choose another)')
    return dtype


def evaluation_differences(name, record, test_sha256, teacher_sha256):
    """What makes --evaluate's numbers for best_<name>.pth differ in meaning from its run's
    (sentences): test images other than those its run was tested on (by content digest), or,
    for a student, a best_teacher.pth beside it other than the teacher it was distilled from."""
    if not record:
        return []
    out = []
    tested = record.get('test_images_sha256')
    if tested and tested != test_sha256:
        out.append(f'best_{name}.pth: these test images differ from those its run was tested on '
                   f'(test digest {tested[:12]} recorded, {test_sha256[:12]} here), so its '
                   f'accuracy here is not comparable with results.md')
    taught = record.get('teacher_sha256')
    if name != 'teacher' and teacher_sha256 and taught and taught != teacher_sha256:
        out.append(f'best_{name}.pth was distilled from another teacher (sha256 {taught[:12]}) '
                   f'than the best_teacher.pth here ({teacher_sha256[:12]}): a teacher retrained '
                   f'in this folder sets the earlier one aside under previous/')
    return out


# ---------------------------------------------------------------------------------------------
# The resolved configuration

def loss_settings(specs):
    """{loss: {hyper-parameter: [values]}} of the distilled students in specs (the settings that
    train, defaults applied), in the students' order; the baseline's 'ce' takes none."""
    settings = {}
    for spec in specs:
        if spec.loss == 'ce':
            continue
        entry = settings.setdefault(spec.loss, {})
        for key, value in spec.params.items():
            if value not in entry.setdefault(key, []):
                entry[key].append(value)
    for loss, entry in settings.items():  # a switch seen on somewhere: say where it was off too
        switch = entry.get('logit_standardization')
        if switch and any('logit_standardization' not in s.params for s in specs
                          if s.loss == loss):
            switch.insert(0, False)
        for key, h in get_loss(loss).settings.items():  # a constant left out where at default
            if not h.axis and key in entry and any(key not in s.params for s in specs
                                                   if s.loss == loss):
                entry[key].append(h.default)
    return settings


def describe_loss_settings(settings, given=()):
    """['kd: T=4 (its default), alpha=0.1 (its default)', ...]: one line per loss of
    loss_settings's result. given: the hyper-parameters given on the command line (where one
    does not apply to a loss, its line says so: '--beta does not apply')."""
    symbols = {'temperature': 'T', 'alpha': 'alpha', 'beta': 'beta', 'gamma': 'gamma',
               'logit_standardization': 'logit standardisation'}
    lines = []
    for name, values in settings.items():
        spec = get_loss(name)
        on = any(values.get('logit_standardization', []))
        defaults = spec.defaults_for(on)
        parts = []
        for key, used in values.items():
            text = ', '.join(spec.setting(key).text(v) for v in used)
            if used == [defaults.get(key)] and not spec.setting(key).switch:
                text += ' (its default)'
            parts.append(f'{symbols.get(key, key)}={text}')
        parts += [f'{HYPER[key].flag} does not apply' for key in HYPER_PARAMETERS
                  if key in given and not takes(spec, key)]
        lines.append(f'{name}: ' + ', '.join(parts))
    return lines


def resolved_configuration(config, device, world_size=1, specs=None, teacher_arch=None):
    """What config.phase ('teacher', 'students' or 'evaluate') runs with, every value resolved,
    as an ordered {label: value}: only the settings that apply to the phase, defaults applied (the
    learning rate scaled to the batch, each loss's own T and alpha, the teacher's architecture
    from its checkpoint's record), never None. Values are strings, numbers or lists of strings
    (one line each). The run prints it under 'Configuration:' and results.json records it as
    its phase's config['configuration'].

    config: the RunConfig; device: the torch.device it resolved to; specs: phase_specs's models
    of the phase (not for 'evaluate'); teacher_arch: the students' teacher's architecture.
    """

    def architecture(name, default):
        return name + (' (the default)' if name == default else '')

    def amp():
        if config.amp is None and config.phase != 'evaluate':  # measured or ruled later on
            return ('kept from the saved run, else auto (decided below)' if config.resume else
                    'auto (decided below)')
        # --evaluate, and forced modes, follow the fixed rule
        role = 'student' if config.phase == 'students' else 'teacher'
        name = precision_name(choose_precision(role, device, config.amp))
        return name + (' (auto)' if config.amp is None else ' (--amp)' if config.amp else
                       ' (--no-amp)')

    view = {'phase': config.phase, 'dataset': f'{config.dataset} ({config.num_classes} classes)',
            'data dir': config.data_dir,
            'subset': 'all' if config.subset is None else config.subset}
    if config.phase == 'evaluate':
        if config.subset is None:  # each checkpoint on the test images its run used
            view['subset'] = 'as in the runs that trained the checkpoints'
        view['checkpoints'] = (f'the last run of each phase in {config.out_dir} '
                               f'(run_teacher.json, run_students.json)')
        view['amp'] = amp()
        view['device'] = device_name(device)
        return view
    recipe = config.recipe  # the recipe's values where a flag left one open
    view['recipe'] = recipe.name + (' (the default)' if recipe.name == RECIPE else '')
    if config.phase == 'teacher':
        view['teacher arch'] = architecture(specs[0].arch, recipe.teacher_arch)
    else:
        view['student arch'] = architecture(specs[0].arch, recipe.student_arch)
        view['teacher checkpoint'] = config.teacher_checkpoint
        view['teacher arch'] = teacher_arch
        view['losses'] = describe_loss_settings(
            loss_settings(specs), [k for k in HYPER_PARAMETERS if getattr(config, k) is not None])
        distilled = distilled_names(specs)
        view['students'] = f'{len(distilled)}: ' + ', '.join(distilled)
        view['baseline'] = ('off (--no-baseline)' if config.no_baseline else
                            'student_base (cross-entropy on the labels only)')
    view['epochs'] = recipe.epochs
    view['batch size'] = recipe.batch_size
    if recipe.lr_unit == 'per_1024':  # the fast recipe's unit
        view['lr'] = f'{recipe.lr:g} per 1,024 images'
        view['weight decay'] = f'{recipe.weight_decay:g} per 1,024 images'
    else:
        base = get_recipe(recipe.name)  # as registered: the lr at its own batch size
        view['lr'] = f'{recipe.lr:g}' + (
            f' ({base.lr:g} x batch size {recipe.batch_size} / {base.batch_size})'
            if recipe.lr == scaled_lr(base, recipe.batch_size) else '')
        view['weight decay'] = f'{recipe.weight_decay:g}'
    if not config.per_seed_folders:
        view['seed'] = config.seeds[0]
    else:
        view['seeds'] = ', '.join(map(str, config.seeds)) + ' (one folder each: seed<N>/)'
    view['val fraction'] = f'{config.val_fraction:g}' + (
        ' (no validation: the last epoch is kept)' if config.val_fraction == 0 else '')
    view['split seed'] = config.split_seed
    every = config.test_every
    view['test every'] = f'{every} epoch(s)' if every < recipe.epochs else 'the last epoch only'
    view['amp'] = amp()
    if config.phase == 'students':
        view['stack students'] = config.stack_students
    view['compile'] = 'on' if config.compile else 'off'
    view['resume'] = 'on' if config.resume else 'off (--restart)' if config.restart else 'off'
    view['tensorboard'] = 'on' if config.tensorboard else 'off'
    view['out dir'] = config.out_dir
    view['device'] = device_name(device) + (f' x {world_size} processes' if world_size > 1
                                            else '')
    return view


def print_configuration(view, log=print):
    """resolved_configuration's view, one label per line (a list continues on the next lines)."""
    log('Configuration:')
    for label, value in view.items():
        for i, line in enumerate(value if isinstance(value, list) else [value]):
            log(f'  {label if i == 0 else "":<20} {line}')


# ---------------------------------------------------------------------------------------------
# A whole invocation

def rerun_command(models, config):
    """For a grid: the setting best on validation, whether it beats the baseline there, notes on
    losses whose warm-up outlasted the run, and the command that confirms it over seeds.
    Returns the lines as one string, or None for fewer than two distilled settings."""
    distilled = [n for n in ranked_students(models) if n not in ('student_base', 'student_kd')]
    if len(distilled) < 2:
        return None
    best = models[distilled[0]]
    best_val = best.get('best_val_acc')
    if best_val is None:
        return ('No validation split (--val-fraction 0): nothing ranks the settings without '
                'the test set; run with a validation split to choose one.')
    lines = [f'Best on validation: {distilled[0]} ({best_val:.2f}%).']
    base_val = models.get('student_base', {}).get('best_val_acc')
    if base_val is not None and best_val <= base_val:
        lines.append(f'It does not beat the baseline on validation ({best_val:.2f}% against the '
                     f"baseline's {base_val:.2f}%).")
    epochs = config.epochs
    lines += warmup_notes({n: models[n] for n in distilled}, epochs)
    params = best.get('loss_params') or {}
    flags = ['--loss', best['loss']] + setting_args(best['loss'], params)
    # everything else that made this run's numbers, so the seeds confirm this very setting
    keep = ['--epochs', str(epochs)] + flag_args(
        config, DATA_FLAGS + ('subset', 'student_arch', 'batch_size', 'lr', 'weight_decay',
                            'test_every', 'stack_students', 'compile')) + \
        ['--teacher-checkpoint', config.teacher_checkpoint,
         '--out-dir', os.path.normpath(os.path.join(config.out_dir, distilled[0]))]
    lines.append(f'Confirm it over seeds, paired with the baseline: python {program()} '
                 + ' '.join(shlex.quote(a) for a in flags + keep + ['--seeds', '0', '1', '2', '3',
                                                                     '4']))
    return '\n'.join(lines)


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

    device = resolve_device(config.device)
    dist, device = init_distributed(device)
    if dist.enabled and config.batch_size % dist.world_size:
        raise UsageError(f'--batch-size {config.batch_size} (global) is not divisible by the '
                         f'{dist.world_size} processes')
    spec = get_dataset(config.dataset)
    phase = config.phase
    check_out_dir(config.out_dir)
    main_log = log if dist.is_main else (lambda *_: None)

    teacher, teacher_info, record = None, None, None
    if phase == 'students':  # refuse a missing or wrong teacher before reading data
        if not os.path.exists(config.teacher_checkpoint):
            raise CheckpointError(missing_teacher_message(config))
        try:
            teacher, arch, sha, record = load_teacher(
                config.teacher_checkpoint, device, config.num_classes, arch=config.teacher_arch,
                default_arch=config.recipe.teacher_arch,
                split={k: getattr(config, k) for k in SPLIT_KEYS if k != 'subset'},
                log=main_log)
        except TeacherMismatch as e:
            raise UsageError(str(e)) from None
        teacher_info = {'arch': arch, 'sha256': sha,
                        'params': sum(p.numel() for p in teacher.parameters()),
                        'record': record}
    configuration = resolved_configuration(
        config, device, dist.world_size, phase_specs(config) if phase != 'evaluate' else None,
        teacher_info['arch'] if teacher_info else None)
    if dist.is_main:
        print_configuration(configuration, log)

    if dist.is_main:  # one process downloads; the others wait and read
        full = load_dataset(config.data_dir, spec)
    barrier()
    if not dist.is_main:
        full = load_dataset(config.data_dir, spec, download=False)
    arrays = full  # --evaluate takes each checkpoint's own test images unless --subset is given
    if phase != 'evaluate':  # from here on, --subset is what it does: None when it takes all
        subset = effective_subset(config.subset, len(full[1]), len(full[3]))
        if dist.is_main and config.subset:
            log(describe_subset(config.subset, subset, spec.title, len(full[1]), len(full[3])))
        config = replace(config, subset=subset)  # recorded: what ran
        configuration['subset'] = 'all' if subset is None else subset
        arrays = full.first(subset)
    check_split(len(arrays[1]), config.subset, config.val_fraction, config.split_seed)
    if phase == 'students':  # before anything is written
        try:
            check_data(config.teacher_checkpoint, record,
                       {k: getattr(config, k) for k in SPLIT_KEYS}, full, arrays, main_log)
        except TeacherMismatch as e:
            raise UsageError(str(e)) from None
    configure_backends(device)

    if phase == 'evaluate':
        if dist.is_main:
            try:
                evaluate_checkpoints(config, device, arrays, log)
            except TeacherMismatch as e:
                raise UsageError(str(e)) from None
        barrier()
        return 0
    phase_watch = Stopwatch(device).start()
    try:
        summaries, dirs, recorded = train_phase_for_seeds(config, device, dist, arrays, log,
                                                          stop, teacher, teacher_info,
                                                          configuration)
    finally:
        stop.uninstall()  # writing the results: Ctrl-C raises KeyboardInterrupt as usual
    if dist.is_main:
        results = write_results(config.out_dir, phase, summaries, recorded,
                                run_info(config, device), {phase: list(dirs.values())}, log)
        log(f'\nFinished the {phase} phase in {phase_watch.elapsed():.0f}s (peak memory '
            f'{results["phases"][phase]["peak_memory_mb"]:.0f} MB); results in '
            f'{os.path.join(config.out_dir, "results.json")} and results.md')
        print_table(results['models'], log)
        if phase == 'students':
            for line in describe_gains(results):
                log(line)
            chosen = rerun_command(results['models'], config)
            if chosen:
                log(chosen)
    # every process leaves together: one that tears its process group down while rank 0 still
    # writes the results can abort in the communication library's threads at exit
    barrier()
    return 0
