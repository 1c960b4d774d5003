"""The shape of the code the house keeps (read from the source with ast, well under a second):
modules of one job, functions that read in one screen, objects where parameters pile up, and
registries complete on import."""
import ast
import glob
import os
import subprocess
import sys

from conftest import ROOT

PACKAGE = sorted(glob.glob(os.path.join(ROOT, 'kd', '**', '*.py'), recursive=True))
FACES = sorted(glob.glob(os.path.join(ROOT, '*.py')))

MODULE_LINES = 450      # a package module past this holds more than one job
FUNCTION_LINES = 90     # no function past this, anywhere
LONG_FUNCTION = 60      # ... and at most LONG_FUNCTIONS past this
LONG_FUNCTIONS = 3
MAX_PARAMETERS = 12     # no function past this, anywhere
MANY_PARAMETERS = 8     # ... and at most MANY_PARAMETER_FUNCTIONS past this: ask for an object
MANY_PARAMETER_FUNCTIONS = 5


def _functions():
    """(where, lines, parameters) of every function of the package and the faces; `self` and
    `cls` are not counted."""
    found = []
    for path in PACKAGE + FACES:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
                names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
                names = [n for n in names if n not in ('self', 'cls')]
                where = f'{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}'
                found.append((where, node.end_lineno - node.lineno + 1, len(names)))
    return found


def test_package_modules_hold_one_job():
    long = [f'{os.path.relpath(p, ROOT)}: {n} lines' for p in PACKAGE
            for n in [sum(1 for _ in open(p))] if n > MODULE_LINES]
    assert not long, long


def test_functions_read_in_one_screen():
    functions = _functions()
    too_long = [f'{w}: {n} lines' for w, n, _ in functions if n > FUNCTION_LINES]
    assert not too_long, too_long
    long = [f'{w}: {n} lines' for w, n, _ in functions if n > LONG_FUNCTION]
    assert len(long) <= LONG_FUNCTIONS, long


def test_parameters_pile_up_into_objects():
    functions = _functions()
    too_many = [f'{w}: {p} parameters' for w, _, p in functions if p > MAX_PARAMETERS]
    assert not too_many, too_many
    many = [f'{w}: {p} parameters' for w, _, p in functions if p > MANY_PARAMETERS]
    assert len(many) <= MANY_PARAMETER_FUNCTIONS, many


def _fresh(code):
    """What `code` prints in a new interpreter (nothing imported before it)."""
    out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_a_registry_is_complete_on_import():
    """Importing a registry's own module brings every family with it (the package's __init__
    imports them): the loss registry alone lists the feature methods, the model registry the
    whole zoo."""
    import kd.methods  # noqa: F401  (this process: everything, to compare with)
    import kd.models  # noqa: F401
    from kd.methods.registry import LOSSES
    from kd.models.registry import MODELS
    assert _fresh('from kd.methods.registry import LOSSES; print(*LOSSES)') == list(LOSSES)
    assert _fresh('from kd.models.registry import MODELS; print(*MODELS)') == list(MODELS)
    assert {'fitnet', 'crd', 'reviewkd', 'dkd'} <= set(LOSSES) and len(MODELS) >= 26
