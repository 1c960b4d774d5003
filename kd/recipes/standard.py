"""The standard recipe, the default: 200 epochs of SGD (Nesterov momentum 0.9, weight decay
5e-4) at batch 128 and lr 0.1, a linear warm-up then cosine to zero, 4-pixel crops and random
flips, the weights of the epoch best on the validation split. Its values are Recipe's defaults."""
from kd.recipes.base import Recipe, register_recipe

STANDARD = register_recipe(Recipe(name='standard'))
