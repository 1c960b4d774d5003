"""The recipe registry: a recipe is one file calling register_recipe, and the package imports
every such file, so the registry is complete whichever recipes module is imported first."""
import ast
import glob
import importlib
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from kd.recipes import RECIPES, Recipe, get_recipe, recipe_names, register_recipe, resolve_recipe


def test_each_recipe_file_is_imported_by_the_package():
    package = os.path.join(ROOT, 'kd', 'recipes')
    registering = set()
    for path in glob.glob(os.path.join(package, '*.py')):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Call) and getattr(node.func, 'id', None) == 'register_recipe':
                registering.add(os.path.basename(path)[:-3])
    assert registering == {'standard', 'fast', 'reference'}
    init = ast.parse(open(os.path.join(package, '__init__.py')).read())
    imported = {a.name for n in ast.walk(init) if isinstance(n, ast.ImportFrom)
                and n.module == 'kd.recipes' for a in n.names}
    assert registering <= imported


def test_the_registry_is_complete_whichever_module_comes_first():
    code = 'from kd.recipes.base import recipe_names; print(recipe_names())'
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "['fast', 'reference', 'standard']"


def test_a_new_recipe_is_one_file(tmp_path, monkeypatch):
    (tmp_path / 'my_recipe.py').write_text(
        'from kd.recipes import Recipe, register_recipe\n\n'
        "MINE = register_recipe(Recipe(name='mine', epochs=3, batch_size=256))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = importlib.import_module('my_recipe')
        assert get_recipe('mine') is module.MINE and 'mine' in recipe_names()
        # the flags resolve over it as over any recipe: the lr scales with its batch
        assert resolve_recipe('mine', batch_size=512).lr == pytest.approx(2 * module.MINE.lr)
    finally:
        RECIPES.pop('mine', None)
        sys.modules.pop('my_recipe', None)


def test_a_second_recipe_of_a_name_and_an_unknown_name_are_refused():
    with pytest.raises(ValueError, match="'fast' is already registered"):
        register_recipe(Recipe(name='fast'))
    with pytest.raises(KeyError, match='known recipes: fast, reference, standard'):
        get_recipe('nope')
    assert get_recipe('standard') == Recipe()
