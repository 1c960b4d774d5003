"""Training recipes, registered by name, and every default of the command line.

A recipe is everything about how a network is trained that is not the network or the loss: the
optimizer and its parameter groups, the learning-rate schedule, batch size and epochs, the
augmentation, the weight averaging, the checkpoint selection and the evaluation (test-time
augmentation). Each is built here, in one place, from a `Recipe`, and every path (the plain loop,
stacked students, torchrun) uses what is built here.

- `standard`: the 200-epoch recipe (SGD, warm-up then cosine, crop and flip), the default.
- `fast`: the techniques of airbench94 (Jordan, "94% on CIFAR-10 in 3.29 seconds on a single
  GPU", arXiv 2404.00498): ten epochs of batch 1,024 with a patch-whitening first layer,
  lookahead weight averaging and test-time augmentation.

`register_recipe(Recipe(name=...))` adds one; `get_recipe(name)` and `recipe_names()` look them up.
Flags given on the command line override a recipe's values (`resolve_recipe`).
"""
import math
from dataclasses import asdict, dataclass, replace
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F

BATCH_SIZE = 128      # the standard recipe's global batch; its learning rate scales with it
BASE_LR = 0.1         # the standard recipe's learning rate for a batch of 128
DATASET = 'cifar10'
TEACHER_ARCH = 'resnet18'
STUDENT_ARCH = 'cnn'
LOSS = 'kd'
VAL_FRACTION = 0.1
SPLIT_SEED = 0
RECIPE = 'standard'

# Every command-line flag's default, by argparse name: main.build_parser and config.flag_args
# read them here. None: resolved later (the recipe's epochs, batch size, lr, weight decay, test
# interval and architectures; each loss's temperature, alpha and beta from
# losses.LOSSES[name].defaults, gamma likewise, logit standardisation off;
# the teacher checkpoint OUT_DIR/best_teacher.pth; amp decided per device).
DEFAULTS = MappingProxyType({
    'train_teacher': False, 'evaluate': False, 'recipe': RECIPE, 'dataset': DATASET,
    'teacher_arch': None, 'student_arch': None, 'loss': (LOSS,), 'epochs': None,
    'batch_size': None, 'lr': None, 'weight_decay': None, 'temperature': None, 'alpha': None,
    'beta': None, 'gamma': None, 'logit_standardization': None,
    'seed': 0, 'seeds': None, 'data_dir': './data', 'out_dir': '.', 'device': 'auto',
    'subset': None, 'val_fraction': VAL_FRACTION, 'split_seed': SPLIT_SEED, 'test_every': None,
    'no_baseline': False, 'teacher_checkpoint': None, 'num_workers': 2, 'amp': None,
    'stack_students': 'auto', 'compile': False, 'resume': False, 'restart': False,
    'tensorboard': False,
})


@dataclass(frozen=True)
class Recipe:
    """One recipe for every model of a run. The defaults are the standard recipe's."""

    name: str = 'standard'
    """The registry name (--recipe)."""
    epochs: int = 200
    """Epochs per model."""
    batch_size: int = BATCH_SIZE
    """The global batch, whatever the number of torchrun processes."""
    lr: float = BASE_LR
    """Peak learning rate. lr_unit 'batch': of SGD on the batch-mean loss, as given.
    lr_unit 'per_1024': airbench's unit, see `param_groups`."""
    lr_unit: str = 'batch'
    """'batch' (lr and weight_decay are SGD's own) or 'per_1024' (see `param_groups`)."""
    weight_decay: float = 5e-4
    """L2 weight decay, in the unit of lr_unit."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """Nesterov momentum (the reference code's plain momentum: False)."""
    schedule: str = 'warmup_cosine'
    """'warmup_cosine' (linear warm-up, then cosine to zero), 'triangular' or 'multistep'."""
    milestones: tuple = ()
    """multistep: the 0-based epochs from which the lr is multiplied by lr_decay once more."""
    lr_decay: float = 0.1
    """multistep: the factor at each milestone."""
    warmup_fraction: float = 0.03
    """warmup_cosine: share of all steps warmed up (but see `warmup_steps`)."""
    triangle: tuple = (0.2, 0.23, 0.07)
    """triangular: (factor at the first step, where the peak is as a share of all steps,
    factor at the last step); the lr rises linearly to its peak and falls linearly after."""
    label_smoothing: float = 0.0
    """Label smoothing of every hard-label cross-entropy term (the baseline's and the losses')."""
    bias_lr_scale: float = 1.0
    """Learning-rate factor of the biases of BatchNorm layers with a frozen scale and of a
    whitening layer (their weight decay is divided by it, so their decay per step is the
    other parameters')."""
    whiten_images: int = 0
    """Initialise a model's patch-whitening layer (models that have one) from the statistics of
    this many training images, and freeze its filters; 0: no whitening initialisation."""
    whiten_bias_epochs: int = 0
    """Epochs during which the whitening layer's bias trains (it is frozen afterwards)."""
    freeze_norm_scales: bool = False
    """Keep the BatchNorm scales at 1 in models that offer it (`freeze_norm_scales`: the
    airbench family); their biases still train."""
    crop_padding: int = 4
    """Random translation: pad by this many pixels and crop back to the image's size."""
    padding_mode: str = 'constant'
    """How the translation pads: 'constant' (zeros) or 'reflect'."""
    flip: str = 'random'
    """'random' (each image flipped with probability 1/2 each epoch) or 'alternate' (each image
    randomly in the first epoch, then flipped in exactly every other epoch)."""
    lookahead_every: int = 0
    """Lookahead weight averaging every this many steps; 0: none."""
    lookahead_decay: float = 0.95 ** 5
    """Lookahead: the averaging decay at the last step (see `lookahead_decay_at`)."""
    lookahead_power: float = 3.0
    """Lookahead: the decay grows as (step / total steps) ** this power."""
    tta: str = 'none'
    """Test-time augmentation: 'none' or 'flip_shift' (6 views, see `tta_logits`)."""
    select: str = 'best_val'
    """Kept weights: 'best_val' (the epoch best on the validation split) or 'last' epoch."""
    test_every: int = 1
    """Default of --test-every; 0: the test set is evaluated at the last epoch only."""
    teacher_arch: str = TEACHER_ARCH
    """Default of --teacher-arch."""
    student_arch: str = STUDENT_ARCH
    """Default of --student-arch."""

    def __post_init__(self):
        choices = {'lr_unit': ('batch', 'per_1024'),
                   'schedule': ('warmup_cosine', 'triangular', 'multistep'),
                   'padding_mode': ('constant', 'reflect'), 'flip': ('random', 'alternate'),
                   'tta': ('none', 'flip_shift'), 'select': ('best_val', 'last')}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f'recipe {self.name!r}: {key} must be one of {allowed}, '
                                 f'not {getattr(self, key)!r}')
        if self.tta != 'none' and self.select != 'last':
            # the views are evaluated once, at the end: only the last epoch's weights have them
            raise ValueError(f'recipe {self.name!r}: test-time augmentation needs select="last"')

    def to_dict(self):
        return asdict(self)


RECIPES = {}


def register_recipe(recipe):
    """Add `recipe` under recipe.name (a second recipe of the same name is refused)."""
    if recipe.name in RECIPES:
        raise ValueError(f'a recipe named {recipe.name!r} is already registered')
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name):
    """The Recipe registered as `name`; KeyError naming the known recipes otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f'unknown recipe {name!r}; known recipes: {", ".join(recipe_names())}') \
            from None


def recipe_names():
    return sorted(RECIPES)


register_recipe(Recipe())

# airbench94's hyper-parameters (arXiv 2404.00498, section 3 and its released configuration)
register_recipe(Recipe(
    name='fast', epochs=10, batch_size=1024, lr=11.5, lr_unit='per_1024', weight_decay=0.0153,
    momentum=0.85, schedule='triangular', triangle=(0.2, 0.23, 0.07), label_smoothing=0.2,
    bias_lr_scale=64.0, whiten_images=5000, whiten_bias_epochs=3, freeze_norm_scales=True,
    crop_padding=2,
    padding_mode='reflect', flip='alternate', lookahead_every=5, tta='flip_shift', select='last',
    test_every=0, teacher_arch='airbench94', student_arch='airbench94_small'))

# The benchmark tables' recipe (RepDistiller train_student.py / mdistiller engine/cfg.py, CIFAR-100):
# batch 64, lr 0.05 (their MobileNet / ShuffleNet students use 0.01: --lr 0.01), plain momentum
# 0.9, weight decay 5e-4, 240 epochs, lr x 0.1 from epochs 150, 180 and 210 (their 1-based
# "epoch > 150" is the 0-based epoch 150 on)
register_recipe(Recipe(
    name='reference', epochs=240, batch_size=64, lr=0.05, nesterov=False, schedule='multistep',
    milestones=(150, 180, 210), lr_decay=0.1, teacher_arch='resnet32x4', student_arch='resnet8x4'))


def scaled_lr(recipe, batch_size):
    """The learning rate of `recipe` at a global batch of `batch_size` images.

    An lr in 'batch' units follows the batch size linearly from the recipe's own (standard:
    0.1 at 128, so 0.2 at 256); a 'per_1024' lr (the fast recipe's) is per image already and
    needs no scaling. The one formula behind --lr's default and the printed note on it.
    """
    if recipe.lr_unit == 'batch' and batch_size != recipe.batch_size:
        return recipe.lr * batch_size / recipe.batch_size
    return recipe.lr


def resolve_recipe(name, *, epochs=None, batch_size=None, lr=None, weight_decay=None):
    """The registered recipe `name` with the values given explicitly (not None) put in.

    An lr left open is `scaled_lr` of the recipe at the batch size. Raises KeyError for an
    unknown name.
    """
    recipe = get_recipe(name)
    changes = {k: v for k, v in (('epochs', epochs), ('batch_size', batch_size),
                                 ('weight_decay', weight_decay)) if v is not None}
    if lr is not None:
        changes['lr'] = lr
    elif batch_size is not None:
        changes['lr'] = scaled_lr(recipe, batch_size)
    return replace(recipe, **changes)


# ---------------------------------------------------------------------------------------------
# The optimizer and its parameter groups

def _whitening_bias(module):
    layer = getattr(module, 'whiten', None)
    return layer.bias if isinstance(layer, torch.nn.Conv2d) and layer.bias is not None else None


def param_groups(module, recipe):
    """SGD's parameter groups for `module` under `recipe`: [{'params', 'lr', 'weight_decay',
    'base_lr', 'group'}], trainable parameters only.

    lr_unit 'batch': one group, lr and weight decay as given. lr_unit 'per_1024' (airbench's):
    with m the momentum and B the batch, a step moves a parameter by lr / (1024 * (1 + 1/(1-m)))
    per image's gradient (the batch-mean gradient's SGD learning rate is that times B), and
    shrinks it by weight_decay * B / (1024 * (1 + 1/(1-m))) of itself, whatever its group
    (constant gradients under Nesterov momentum make steps 1 + 1/(1-m) times the gradient, so
    the factor keeps the step size independent of m). Three groups then: 'whitening_bias' and
    'norm_bias' (biases of BatchNorm layers whose scale is frozen) at bias_lr_scale times the lr,
    and 'other'.
    """
    if recipe.lr_unit == 'batch':  # every parameter, as SGD(module.parameters(), ...) takes them
        return [{'params': list(module.parameters()), 'lr': recipe.lr,
                 'weight_decay': recipe.weight_decay, 'base_lr': recipe.lr, 'group': 'all'}]
    scale = 1024 * (1 + 1 / (1 - recipe.momentum))
    lr = recipe.lr * recipe.batch_size / scale
    decay_per_step = recipe.weight_decay * recipe.batch_size / scale
    whitening_bias = _whitening_bias(module)
    norm_biases = [m.bias for m in module.modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine
                   and not m.weight.requires_grad and m.bias.requires_grad]
    special = {id(p) for p in norm_biases} | ({id(whitening_bias)} if whitening_bias is not None
                                              else set())
    other = [p for p in module.parameters() if p.requires_grad and id(p) not in special]
    groups = []
    for name, params, group_lr in (
            ('whitening_bias', [whitening_bias] if whitening_bias is not None
             and whitening_bias.requires_grad else [], lr * recipe.bias_lr_scale),
            ('norm_bias', norm_biases, lr * recipe.bias_lr_scale), ('other', other, lr)):
        if params:
            groups.append({'params': params, 'lr': group_lr,
                           'weight_decay': decay_per_step / group_lr if group_lr else 0.0,
                           'base_lr': group_lr, 'group': name})
    return groups


def make_optimizer(module, recipe, extra=()):
    """The recipe's optimizer, Nesterov SGD with its momentum: the one place an optimizer is
    built, for the plain loop, stacked students and torchrun alike.

    module: an nn.Module, whose groups are `param_groups(module, recipe)`, or a list of such
    groups already made (stacked students give their stacked tensors). extra: more parameters
    (a feature method's connectors), in the main group ('all' or 'other', the last) with its lr
    and weight decay, as the reference code trains them (one SGD over the student and the
    method's modules); those not requiring a gradient are left out.
    """
    groups = param_groups(module, recipe) if isinstance(module, torch.nn.Module) \
        else [dict(g) for g in module]
    extra = [p for p in extra if p.requires_grad]
    if extra:
        groups[-1]['params'] = list(groups[-1]['params']) + extra
    return torch.optim.SGD(groups, momentum=recipe.momentum, nesterov=recipe.nesterov)


# ---------------------------------------------------------------------------------------------
# The learning-rate schedule

def warmup_steps(recipe, steps_per_epoch):
    """warmup_fraction of all steps, but at least one epoch (at most a fifth of the run).

    Short runs would otherwise jump to the peak lr within a step or two, which made both
    networks diverge in 3-epoch runs on 2,000 images.
    """
    total = recipe.epochs * steps_per_epoch
    return max(1, round(max(recipe.warmup_fraction * total, min(steps_per_epoch, 0.2 * total))))


def lr_at(step, total_steps, warmup_steps, peak_lr):
    """Linear warm-up to peak_lr over warmup_steps, then cosine to zero at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def triangular_factor(step, total_steps, start=0.2, peak_at=0.23, end=0.07):
    """The triangular schedule's factor at 0-based `step` of `total_steps`: `start` at step 0,
    1 at step int(peak_at * total_steps), `end` at step total_steps, linear in between."""
    peak = max(1, int(peak_at * total_steps))
    return float(np.interp(step, [0, peak, max(peak + 1, total_steps)], [start, 1.0, end]))


def learning_rate(recipe, group_base_lr, step, steps_per_epoch):
    """A group's learning rate at 0-based `step` (steps_per_epoch steps per epoch)."""
    total = recipe.epochs * steps_per_epoch
    if recipe.schedule == 'warmup_cosine':
        return lr_at(step, total, warmup_steps(recipe, steps_per_epoch), group_base_lr)
    if recipe.schedule == 'multistep':
        epoch = step // steps_per_epoch
        return group_base_lr * recipe.lr_decay ** sum(epoch >= m for m in recipe.milestones)
    return group_base_lr * triangular_factor(step, total, *recipe.triangle)


def set_learning_rates(optimizer, recipe, step, steps_per_epoch):
    """Set every group's lr for 0-based `step`; the whitening bias stops after
    whiten_bias_epochs. Returns the lr of the last group (the weights'), for the logs."""
    lr = None
    for group in optimizer.param_groups:
        base = group.get('base_lr', recipe.lr)
        if group.get('group') == 'whitening_bias' and \
                step >= recipe.whiten_bias_epochs * steps_per_epoch:
            group['lr'] = 0.0
        else:
            group['lr'] = learning_rate(recipe, base, step, steps_per_epoch)
        lr = group['lr']
    return lr


# ---------------------------------------------------------------------------------------------
# Lookahead weight averaging

def lookahead_decay_at(recipe, steps_done, total_steps):
    """The averaging decay after `steps_done` of `total_steps`: lookahead_decay *
    (steps_done / total_steps) ** lookahead_power (small early, when the weights move fast)."""
    return recipe.lookahead_decay * (steps_done / total_steps) ** recipe.lookahead_power


class Lookahead:
    """Lookahead weight averaging (Zhang et al., 2019, as airbench94 uses it).

    Keeps a slow copy of the module's floating-point state (weights and BatchNorm statistics).
    Every `lookahead_every` steps, update(decay) moves the slow copy towards the trained weights,
    slow = decay * slow + (1 - decay) * fast, and puts the slow copy back into the module
    (fast = slow); so does the last step (lookahead_step).
    """

    def __init__(self, module):
        self.slow = {k: v.detach().clone() for k, v in module.state_dict().items()
                     if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module, decay):
        for key, fast in module.state_dict().items():
            if key in self.slow:
                self.slow[key].lerp_(fast, 1 - decay)
                fast.copy_(self.slow[key])

    def state_dict(self):
        return {k: v.cpu().clone() for k, v in self.slow.items()}

    def load_state_dict(self, state):
        for k, v in state.items():
            self.slow[k].copy_(v)


def lookahead_step(lookahead, module, recipe, steps_done, total_steps):
    """The averaging due after `steps_done` steps (a count from 1), if any: every
    lookahead_every steps and after the last step, so the trained weights are the slow ones.
    (airbench94 instead copies the slow weights after the last step, dropping the steps since
    the last multiple of 5; here those steps are averaged in like any others.)"""
    if lookahead is not None and (steps_done % recipe.lookahead_every == 0
                                  or steps_done >= total_steps):
        lookahead.update(module, lookahead_decay_at(recipe, steps_done, total_steps))


# ---------------------------------------------------------------------------------------------
# Test-time augmentation

def tta_views(images):
    """The 6 views of `flip_shift` and their weights: [(weight, view)], views B x C x H x W.

    The image and its mirror (weight 1/4 each), and both of them translated by one pixel
    (reflect-padded) up-left and down-right (1/8 each), as in airbench94.
    """
    padded = F.pad(images, (1, 1, 1, 1), mode='reflect')
    h, w = images.shape[-2:]
    shifted = [padded[..., :h, :w], padded[..., 2:h + 2, 2:w + 2]]
    views = []
    for weight, x in [(0.25, images)] + [(0.125, s) for s in shifted]:
        views += [(weight, x), (weight, x.flip(-1))]
    return views


def tta_view_count(recipe):
    """Forward passes per image of the recipe's test-time augmentation (1 without it)."""
    return 6 if recipe.tta == 'flip_shift' else 1


def tta_logits(forward, images):
    """(single-view logits, flip_shift logits): forward(x) -> logits; the TTA logits are the
    weighted mean of the 6 views' logits (tta_views), the single view is the first view."""
    single, total = None, 0.0
    for weight, view in tta_views(images):
        logits = forward(view.contiguous(memory_format=torch.channels_last)
                         if images.is_contiguous(memory_format=torch.channels_last) else view)
        single = logits if single is None else single
        total = total + weight * logits
    return single, total


# ---------------------------------------------------------------------------------------------
# Models and data under a recipe

def loader_options(recipe):
    """The training loader's augmentation options (utils.make_loaders' keywords)."""
    return {'padding': recipe.crop_padding, 'padding_mode': recipe.padding_mode,
            'flip': recipe.flip}


def prepare_model(module, recipe, train_loader, like=None):
    """Set up what the recipe sets up in a new model: its frozen BatchNorm scales
    (freeze_norm_scales) and its patch-whitening layer (`init_whitening`, for models that have
    them), the latter from the first whiten_images images of train_loader's (unaugmented)
    training images. like: a prepared module of the same architecture whose weights and frozen
    parameters are copied instead (students start from identical weights). Returns the module."""
    if like is not None:
        module.load_state_dict(like.state_dict())
        for p, q in zip(module.parameters(), like.parameters()):
            p.requires_grad_(q.requires_grad)
        return module
    if recipe.freeze_norm_scales and hasattr(module, 'freeze_norm_scales'):
        module.freeze_norm_scales()
    if recipe.whiten_images and hasattr(module, 'init_whitening') and train_loader is not None:
        images = train_loader.images[:recipe.whiten_images]
        module.init_whitening(train_loader.normalize(images).to(
            next(module.parameters()).device))
    return module
