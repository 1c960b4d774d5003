"""The models of a phase: one ModelSpec per model it trains, the students' feature plan, and the
trainees of one seed built from them."""
from dataclasses import dataclass, field

import torch

from kd.engine.trainee import Trainee, TraineeOptions
from kd.methods.grid import SetValues, expand_grid, setting_name
from kd.methods.plan import is_feature_method, plan_features
from kd.methods.registry import get_loss
from kd.models import build_model, feature_points
from kd.models.features import given_points
from kd.recipes.prepare import prepare_model
from kd.run.config import UsageError


@dataclass
class ModelSpec:
    name: str                     # student_kd, student_base, kd_T4_a0.1, ... or teacher
    arch: str                     # a name from models.MODELS, or an architecture string
    loss: str                     # a name from kd.methods.registry.LOSSES
    params: dict = field(default_factory=dict)


def student_specs(config):
    """The students of a run: one per setting of the loss grid, plus the baseline.

    One setting keeps today's names (student_kd, student_base); several are named by their
    setting (kd_T4_a0.1, dkd_T4, ...), and the best of them on validation also becomes
    best_student_kd.pth.
    """
    grid = expand_grid(config.loss, config.temperature, config.alpha, config.beta, config.gamma,
                       config.logit_standardization, sets=config.sets + implied_sets(config))
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


def implied_sets(config):
    """The settings that points given by module path imply: a method's stage index ('hint',
    FitNets') beyond the fewest points given becomes that last given point (so
    `--teacher-points layer3 --student-points block2` pairs the two), unless --set gives it."""
    given = [len(p) for p in (config.teacher_points, config.student_points) if p]
    if not given:
        return ()
    explicit = {(s.method, s.name) for s in config.sets}
    out = []
    for loss in config.loss:
        hint = get_loss(loss).settings.get('hint')
        if hint is not None and (loss, 'hint') not in explicit and hint.default > min(given):
            out.append(SetValues(loss, 'hint', (min(given),)))
    return tuple(out)


@dataclass(frozen=True)
class GivenPoints:
    """Feature points given by module path (--teacher-points, --student-points), or None."""
    teacher: tuple = None
    student: tuple = None

    @classmethod
    def of(cls, config):
        return cls(config.teacher_points, config.student_points)


def feature_plan(specs, teacher, teacher_arch, device, num_classes, image_shape,
                 given=GivenPoints()):
    """The kd.methods.plan.FeaturePlan of the students' feature methods (None when none), measured
    on images of the dataset's image_shape (C, H, W); given: the GivenPoints, in place of the
    registered ones. A model without the points a method reads, or without a given module
    path, is a usage error, found before any training."""
    built = {}
    students = [(s.arch, s.loss, built.setdefault(s.arch, build_model(s.arch, num_classes)),
                 s.params) for s in specs]
    try:
        teacher_points = (given_points(given.teacher, teacher, f'the teacher {teacher_arch}')
                          if given.teacher else feature_points(teacher_arch, teacher))
        student_points = {arch: given_points(given.student, module, f'the student {arch}')
                          for arch, module in built.items()} if given.student else None
        methods = list(dict.fromkeys(s.loss for s in specs if is_feature_method(s.loss)))
        if not teacher_points and methods:
            raise ValueError(f'--loss {" ".join(methods)}: the teacher {teacher_arch} names no '
                             f'feature points; give them by module path (--teacher-points '
                             f'PATH,...)')
        return plan_features(students, teacher, teacher_points, device, num_classes,
                             teacher_arch=teacher_arch, image_shape=image_shape,
                             student_points=student_points)
    except ValueError as e:
        raise UsageError(str(e)) from None


def distilled_names(specs):
    return [s.name for s in specs if s.name not in ('teacher', 'student_base')]


@dataclass(frozen=True)
class TraineeSetup:
    """What the trainees of every seed of a phase share."""
    recipe: object                # the run's recipe.Recipe
    device: torch.device
    precisions: dict              # {model name: autocast dtype, None for fp32}
    num_classes: int              # the models' outputs
    compile_model: bool = False   # torch.compile them (--compile)
    ddp: bool = False             # wrap them for torchrun's processes


def make_trainees(specs, setup, seed, train_loader=None, features=None):
    """The trainees of one seed (setup: a TraineeSetup), torch.compile'd when
    setup.compile_model. Students start from identical weights: differences between them come
    from their losses alone. train_loader: the images the recipe initialises from
    (recipe.prepare_model: the whitening layer), whose labels by index CRD's memory uses;
    features: the kd.methods.plan.FeaturePlan of feature methods (None: logit losses only)."""
    recipe, num_classes = setup.recipe, setup.num_classes
    torch.manual_seed(seed)
    first = prepare_model(build_model(specs[0].arch, num_classes=num_classes), recipe,
                          train_loader)
    trainees = []
    for spec in specs:
        module = first if spec is specs[0] else build_model(spec.arch, num_classes=num_classes)
        if module is not first:
            prepare_model(module, recipe, train_loader,
                          like=first if spec.arch == specs[0].arch else None)
        trainees.append(Trainee(spec.name, module, spec.loss, recipe, setup.device,
                                setup.precisions[spec.name], TraineeOptions(
                                    ddp=setup.ddp, compile_model=setup.compile_model,
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
