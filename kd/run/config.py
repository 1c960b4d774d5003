"""The run configuration: the command line's flags resolved once into one frozen `RunConfig`.

    config = resolve(main.build_parser().parse_args(argv))   # main.parse_config(argv)
    kd.run.runner.run(config)

`resolve` is the only constructor: it puts the recipe's values where a flag left one open (epochs,
batch size, learning rate scaled to the batch, weight decay, test interval), the dataset's class
count and the teacher checkpoint's default path in, and refuses bad values (UsageError, exit 2).
Nothing changes a RunConfig afterwards; a run that learns the effective --subset from the data
makes a new one with dataclasses.replace.

Every default has one home: the flags' in recipe.DEFAULTS, the optimisation's in the registered
recipes (recipe.py), the methods' settings in their declarations (kd/methods/registry.py:
LOSSES[name].settings, which --set reaches). What a run
prints ('Configuration:') and records (results.json, the resume state's 'config') derive from
this object.
"""
import os
from dataclasses import dataclass
from typing import Optional

from kd.data.datasets import LayoutError, open_dataset
from kd.methods.grid import parse_sets
from kd.models import ArchError, check_model
from kd.models.features import parse_point
from kd.recipes.defaults import DEFAULTS
from kd.recipes.base import Recipe, get_recipe, resolve_recipe, scaled_lr

PHASES = ('teacher', 'students', 'evaluate')


class UsageError(Exception):
    """Bad usage or a bad flag value: exit code 2."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything a run of main.py asks for, every default applied. Build it with `resolve`."""

    phase: str
    """'teacher' (--train-teacher), 'students' (the default) or 'evaluate' (--evaluate)."""
    recipe: Recipe
    """The training recipe (--recipe) with --epochs, --batch-size, --lr and --weight-decay put in
    (recipe.resolve_recipe): the epochs, global batch, peak lr and weight decay that run."""
    dataset: str
    """The dataset's registry name (--dataset): 'cifar10' or 'cifar100'."""
    num_classes: int
    """The dataset's class count (10 or 100)."""
    data_dir: str
    """Folder holding the dataset, or where it is downloaded (--data-dir)."""
    out_dir: str
    """Folder of the checkpoints, logs and results (--out-dir)."""
    subset: Optional[int]
    """The first N training and N test images (--subset); None: all of them. A training run
    replaces it with the effective value once the data is read (None where N covers it all)."""
    val_fraction: float
    """Share of the training images held out to select the best epoch, in [0, 1)."""
    split_seed: int
    """Seed of which training images are held out (--split-seed), >= 0."""
    test_every: int
    """Test accuracy every this many epochs (--test-every, else the recipe's; a recipe's 0,
    'the last epoch only', resolves to its epochs)."""
    teacher_arch: Optional[str]
    """--teacher-arch as given; None: the teacher checkpoint's record, else the recipe's."""
    student_arch: Optional[str]
    """--student-arch as given; None: the recipe's (`student_model`)."""
    teacher_points: Optional[tuple] = None
    """--teacher-points: the teacher's feature points by module path ('layer3', 'fc:in'), in
    order, read as stage1..N by the feature methods; None: its registered points."""
    student_points: Optional[tuple] = None
    """--student-points: the students' feature points by module path, as --teacher-points."""
    loss: tuple
    """Names of the distillation losses (--loss), in order; each trains one student per setting."""
    temperature: Optional[tuple]
    """--temperature values (> 0) of the grid; None: each loss's default (registry.LOSSES)."""
    alpha: Optional[tuple]
    """--alpha values (the hard labels' weight, in [0, 1]); None: each loss's default."""
    beta: Optional[tuple]
    """--beta values (>= 0: a method's distillation weight); None: each method's default."""
    gamma: Optional[tuple]
    """--gamma values (>= 0: a method's second weight, e.g. rkd's angle term, dist's intra-class
    relation); None: each method's default."""
    logit_standardization: Optional[tuple]
    """--logit-standardization values, 'off' and / or 'on', for the losses that take the switch
    (kd, dkd, dist); None: off."""
    sets: tuple = ()
    """--set METHOD.NAME=VALUE[,VALUE...]: (grid.SetValues(method, name, typed values), ...), in
    the order given, each a declared setting of a method of --loss (over the shared flag's
    values for that method); (): none."""
    no_baseline: bool
    """Train only the distilled students, not the cross-entropy baseline."""
    seeds: tuple
    """The seeds to run, >= 0: --seeds, else (--seed,)."""
    per_seed_folders: bool
    """One folder OUT_DIR/seed<N>/ per seed, results aggregated (--seeds was given)."""
    teacher_checkpoint: str
    """The students' teacher weights: --teacher-checkpoint, else OUT_DIR/best_teacher.pth."""
    teacher_checkpoint_given: bool
    """Whether --teacher-checkpoint was given (which advice a missing file gets)."""
    device: str
    """--device as given: 'auto', 'cpu', 'cuda' or 'cuda:N' (kd.run.device.resolve_device)."""
    amp: Optional[bool]
    """--amp True, --no-amp False; None: decided per device (and kept on --resume)."""
    stack_students: str
    """'auto', 'on' or 'off': students of one architecture as one vmapped computation."""
    compile: bool
    """torch.compile the models."""
    resume: bool
    """Continue the unfinished run saved in out_dir."""
    restart: bool
    """Set an unfinished run in out_dir aside and start over."""
    tensorboard: bool
    """Also write the per-epoch scalars to OUT_DIR/tensorboard/<phase>."""
    image_size: Optional[int] = None
    """--image-size N of a folder dataset (shorter side to N, centre crop); None: its own."""
    data_in_memory: str = 'auto'
    """--data-in-memory: a folder dataset decoded once into memory ('on'), streamed from its
    files by DataLoader workers ('off'), or in memory when it fits the budget ('auto')."""

    def __post_init__(self):
        if self.phase not in PHASES:
            raise UsageError(f'phase must be one of {", ".join(PHASES)}, not {self.phase!r}')
        for alpha in self.alpha or ():
            if not 0.0 <= alpha <= 1.0:
                raise UsageError(f'--alpha must be in [0, 1], got {alpha}')
        for temperature in self.temperature or ():
            if temperature <= 0:
                raise UsageError(f'--temperature must be > 0, got {temperature}')
        for key in ('beta', 'gamma'):
            for value in getattr(self, key) or ():
                if value < 0:
                    raise UsageError(f'--{key} must be >= 0, got {value}')
        for flag in ('loss', 'temperature', 'alpha', 'beta', 'gamma', 'logit_standardization'):
            values = getattr(self, flag) or ()
            if len(set(values)) != len(values):
                raise UsageError(f'--{flag.replace("_", "-")} must not repeat a value')
        if self.lr < 0:
            raise UsageError(f'--lr must be >= 0, got {self.lr}')
        if self.weight_decay < 0:
            raise UsageError(f'--weight-decay must be >= 0, got {self.weight_decay}')
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f'--val-fraction must be in [0, 1), got {self.val_fraction}')
        if any(s < 0 for s in self.seeds):
            raise UsageError('--seed and --seeds must be >= 0')
        if self.split_seed < 0:
            raise UsageError(f'--split-seed must be >= 0, got {self.split_seed}')
        if len(set(self.seeds)) != len(self.seeds):
            raise UsageError('--seeds must not repeat a seed')
        if self.resume and self.restart:
            raise UsageError('--resume and --restart exclude each other')

    # the recipe's values are the run's: one home, no copies to drift apart
    @property
    def epochs(self):
        return self.recipe.epochs

    @property
    def batch_size(self):
        """The global batch, whatever the number of torchrun processes."""
        return self.recipe.batch_size

    @property
    def lr(self):
        return self.recipe.lr

    @property
    def weight_decay(self):
        return self.recipe.weight_decay

    @property
    def student_model(self):
        """The students' architecture: --student-arch, else the recipe's."""
        return self.student_arch or self.recipe.student_arch

    def dataset_spec(self):
        """The dataset as this run reads it (datasets.open_dataset: a folder dataset's scan of
        data_dir put in; cached, so calling it again costs nothing)."""
        return open_dataset(self.dataset, self.data_dir, self.image_size)

    def record(self):
        """The configuration keys every run records (results.json's config, the resume state's
        'config', compared by kd.run.resume.RUN_KEYS on --resume): {key: value}, JSON-ready."""
        return {'dataset': self.dataset, 'num_classes': self.num_classes, 'epochs': self.epochs,
                'batch_size': self.batch_size, 'lr': self.lr,
                'weight_decay': self.weight_decay, 'val_fraction': self.val_fraction,
                'split_seed': self.split_seed, 'subset': self.subset,
                'test_every': self.test_every, 'data_dir': self.data_dir,
                'out_dir': self.out_dir, 'compile': self.compile,
                # a folder dataset's size (CIFAR's records keep their keys)
                **({'image_size': self.image_size} if self.image_size else {})}


def resolve(args):
    """The RunConfig of parsed flags `args` (main.build_parser's namespace; a flag it lacks takes
    its recipe.DEFAULTS value). Raises UsageError (exit 2) naming the flag of a bad value."""
    given = {**DEFAULTS, **vars(args)}
    if given['evaluate'] and given['train_teacher']:
        raise UsageError('--evaluate and --train-teacher exclude each other')
    try:  # the recipe's values fill what the command line leaves open
        recipe = resolve_recipe(given['recipe'], epochs=given['epochs'],
                                batch_size=given['batch_size'], lr=given['lr'],
                                weight_decay=given['weight_decay'])
        spec = open_dataset(given['dataset'], given['data_dir'], given['image_size'])
    except KeyError as e:
        raise UsageError(e.args[0]) from None
    except LayoutError as e:  # a folder that cannot be used: before anything is written
        raise UsageError(str(e)) from None
    in_memory = given['data_in_memory']
    if in_memory == 'off' and spec.scan is None:
        raise UsageError(f'--data-in-memory off is for the folder datasets; '
                         f'{given["dataset"]} is always held in memory')
    if given['seed'] < 0:  # also when --seeds replaces it
        raise UsageError('--seed and --seeds must be >= 0')
    per_seed = given['seeds'] is not None
    checkpoint = given['teacher_checkpoint']
    sets = resolve_sets(given['sets'], given['loss'],
                        training_students=not (given['evaluate'] or given['train_teacher']))

    def values(name):
        return None if given[name] is None else tuple(given[name])

    return RunConfig(
        phase='evaluate' if given['evaluate'] else 'teacher' if given['train_teacher']
        else 'students',
        recipe=recipe, dataset=given['dataset'], num_classes=spec.num_classes,
        data_dir=given['data_dir'], out_dir=given['out_dir'], subset=given['subset'],
        val_fraction=given['val_fraction'], split_seed=given['split_seed'],
        test_every=(given['test_every'] if given['test_every'] is not None
                    else recipe.test_every or recipe.epochs),  # 0: the last epoch only
        teacher_arch=checked_arch(given['teacher_arch'], '--teacher-arch'),
        student_arch=checked_arch(given['student_arch'], '--student-arch'),
        teacher_points=point_list(given['teacher_points']),
        student_points=point_list(given['student_points']),
        loss=tuple(given['loss']), temperature=values('temperature'), alpha=values('alpha'),
        beta=values('beta'), gamma=values('gamma'),
        logit_standardization=values('logit_standardization'), sets=sets,
        no_baseline=given['no_baseline'],
        seeds=tuple(given['seeds']) if per_seed else (given['seed'],), per_seed_folders=per_seed,
        teacher_checkpoint=(checkpoint if checkpoint is not None
                            else os.path.join(given['out_dir'], 'best_teacher.pth')),
        teacher_checkpoint_given=checkpoint is not None,
        device=given['device'], amp=given['amp'], stack_students=given['stack_students'],
        compile=given['compile'], resume=given['resume'], restart=given['restart'],
        tensorboard=given['tensorboard'], image_size=given['image_size'],
        data_in_memory=in_memory)


def checked_arch(arch, flag):
    """`arch` (None, a registered name or an architecture string, kd/models/external.py) once
    it names a model that exists; UsageError, one line with the nearest names, else."""
    if arch is not None:
        try:
            check_model(arch)
        except ArchError as e:
            raise UsageError(f'{flag} {arch}: {e}') from None
    return arch


def point_list(values):
    """--teacher-points / --student-points as a tuple of module paths (each value may hold
    several, separated by commas), or None when not given; UsageError for an empty one."""
    if values is None:
        return None
    points = tuple(p.strip() for v in values for p in v.split(','))
    if not all(points):
        raise UsageError(f'feature points {",".join(values)!r}: an empty module path')
    for point in points:
        try:
            parse_point(point)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return points


def resolve_sets(texts, losses, training_students=True):
    """The --set arguments `texts` (or None) as grid.SetValues; UsageError, one line, for bad
    syntax, an unknown method or setting, a value of the wrong type, out of range or repeated,
    a setting given twice, or (when the students train) a method --loss does not train."""
    try:
        sets = parse_sets(texts)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for s in sets:
        if training_students and s.method not in losses:
            raise UsageError(f'--set {s.method}.{s.name}: --loss does not train {s.method} (it '
                             f'trains {" ".join(losses)})')
    return sets


# every flag a RunConfig holds, by argparse name ('phase' is --train-teacher / --evaluate,
# 'seeds' is --seed or --seeds, 'sets' is --set)
FLAGS = ('phase', 'recipe', 'dataset', 'teacher_arch', 'student_arch', 'teacher_points',
         'student_points', 'loss', 'epochs',
         'batch_size', 'lr', 'weight_decay', 'temperature', 'alpha', 'beta', 'gamma',
         'logit_standardization', 'sets', 'seeds', 'data_dir',
         'out_dir', 'device', 'subset', 'val_fraction', 'split_seed', 'test_every', 'no_baseline',
         'teacher_checkpoint', 'amp', 'stack_students', 'compile', 'resume', 'restart',
         'tensorboard', 'image_size', 'data_in_memory')


def flag_args(config, dests):
    """The command-line arguments that give `config`'s values of `dests` (argparse names, or
    FLAGS) where they differ from the defaults: what a printed command keeps of a run's flags.

    The defaults are recipe.DEFAULTS and, for epochs, batch size, lr (at this batch size),
    weight decay and test interval, the recipe's values. A dest the config lacks, or one set to
    None, is left out. resolve(parse_args(flag_args(config, FLAGS))) == config.
    """
    recipe = get_recipe(config.recipe.name)
    by_recipe = {'epochs': recipe.epochs, 'batch_size': recipe.batch_size,
                 'lr': scaled_lr(recipe, config.batch_size),
                 'weight_decay': recipe.weight_decay,
                 'test_every': recipe.test_every or config.epochs}
    out = []
    for dest in dests:
        if dest == 'phase':
            out += {'teacher': ['--train-teacher'], 'evaluate': ['--evaluate']}.get(
                config.phase, [])
            continue
        if dest in ('seed', 'seeds'):
            if config.per_seed_folders:
                out += ['--seeds'] + [str(s) for s in config.seeds]
            elif config.seeds[0] != DEFAULTS['seed']:
                out += ['--seed', str(config.seeds[0])]
            continue
        if dest == 'sets':  # --set METHOD.NAME=V1,V2, once per setting
            out += [x for s in config.sets for x in ('--set', s.arg())]
            continue
        if dest == 'teacher_checkpoint':
            if config.teacher_checkpoint_given:
                out += ['--teacher-checkpoint', config.teacher_checkpoint]
            continue
        value = config.recipe.name if dest == 'recipe' else getattr(config, dest, None)
        default = by_recipe[dest] if dest in by_recipe else DEFAULTS.get(dest)
        if value is None or value == default:
            continue
        flag = '--' + dest.replace('_', '-')
        if value is True:
            out.append(flag)
        elif value is False:  # a BooleanOptionalAction (--amp / --no-amp)
            out.append('--no-' + dest.replace('_', '-'))
        else:
            out += [flag] + [str(v) for v in (value if isinstance(value, (list, tuple))
                                              else [value])]
    return out
