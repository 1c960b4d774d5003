"""The recipes' names under their old module, kd.recipes.recipe: the recipes now live in the
package kd.recipes (base.py, a file per recipe, optim.py, lookahead.py, tta.py, prepare.py,
defaults.py), which exports them all."""
from kd.recipes.base import (RECIPES, Recipe, get_recipe, recipe_names,  # noqa: F401  # re-export until the merge
                             register_recipe, resolve_recipe, scaled_lr)
from kd.recipes.defaults import (BASE_LR, BATCH_SIZE, DATASET, DEFAULTS, LOSS,  # noqa: F401  # re-export until the merge
                                 RECIPE, SPLIT_SEED, STUDENT_ARCH, TEACHER_ARCH, VAL_FRACTION)
from kd.recipes.lookahead import Lookahead, lookahead_decay_at, lookahead_step  # noqa: F401  # re-export until the merge
from kd.recipes.optim import (learning_rate, lr_at, make_optimizer, param_groups,  # noqa: F401  # re-export until the merge
                              set_learning_rates, triangular_factor, warmup_steps)
from kd.recipes.prepare import loader_options, prepare_model  # noqa: F401  # re-export until the merge
from kd.recipes.tta import tta_logits, tta_view_count, tta_views  # noqa: F401  # re-export until the merge
