"""Training recipes. base.py holds the Recipe and its registry; each recipe is one file that
registers itself when imported (standard.py, fast.py, reference.py), and this package imports
every one, so the registry is complete on `import kd.recipes`. What a recipe builds: optim.py
(optimizer, parameter groups, learning-rate schedule), lookahead.py (weight averaging), tta.py
(test-time augmentation), prepare.py (model set-up, the loader's augmentation); defaults.py
holds every default of the command line."""
from kd.recipes import fast, reference, standard  # noqa: F401  (each registers its recipe)
from kd.recipes.base import (RECIPES, Recipe, get_recipe, recipe_names,  # noqa: F401
                             register_recipe, resolve_recipe, scaled_lr)
from kd.recipes.defaults import (BASE_LR, BATCH_SIZE, DATASET, DEFAULTS, LOSS,  # noqa: F401
                                 RECIPE, SPLIT_SEED, STUDENT_ARCH, TEACHER_ARCH, VAL_FRACTION)
from kd.recipes.lookahead import Lookahead, lookahead_decay_at, lookahead_step  # noqa: F401
from kd.recipes.optim import (learning_rate, lr_at, make_optimizer, param_groups,  # noqa: F401
                              set_learning_rates, triangular_factor, warmup_steps)
from kd.recipes.prepare import loader_options, prepare_model  # noqa: F401
from kd.recipes.tta import tta_logits, tta_view_count, tta_views  # noqa: F401
