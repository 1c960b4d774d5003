"""Training recipes: the Recipe every path trains by, and its registry.

A recipe is everything about how a network is trained that is not the network or the loss: the
optimizer and its parameter groups, the learning-rate schedule, batch size and epochs, the
augmentation, the weight averaging, the checkpoint selection and the evaluation (test-time
augmentation). A `Recipe` holds those values; optim.py, lookahead.py, tta.py and prepare.py
build each from it, in one place, for every path (the plain loop, stacked students, torchrun).

Each registered recipe is one file of this package (standard.py, fast.py, reference.py) calling
`register_recipe(Recipe(name=...))`; the package's __init__ imports them all, so the registry
is complete on `import kd.recipes`. `get_recipe(name)` and `recipe_names()` look them up; flags
given on the command line override a recipe's values (`resolve_recipe`).
"""
from dataclasses import asdict, dataclass, replace

from kd.recipes.defaults import BASE_LR, BATCH_SIZE, STUDENT_ARCH, TEACHER_ARCH


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
