"""The code's structure: imports at the top of files and flowing one way, one optimizer builder,
one synchronising clock. Read from the source (ast), so these tests take well under a second."""
import ast
import glob
import os

import pytest
import torch

from kd import recipes as recipe
from kd.engine import timing
from conftest import ROOT
from kd.models import StudentNet, build_model
from kd.engine.progress import DurationEstimate, PhaseWork
from kd.engine.stacked import StudentStack
from kd.engine.trainee import Trainee
from kd.recipes.base import Recipe

PROJECT = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "kd", "**", "*.py"), recursive=True))
BENCH = sorted(glob.glob(os.path.join(ROOT, 'bench', '*.py')))

# Imports that stay inside functions, each for a reason given beside it in the code.
LAZY = {
    'matplotlib': 'optional: a run without it writes no plots',
    'torch.utils.tensorboard': 'optional: --tensorboard needs the tensorboard package',
    'torchvision': 'about a second to import, in every process; only a download, the '
                   'recorded versions and torchvision:NAME models need it',
    'timm': 'optional (requirements-optional.txt): only timm:NAME models need it',
}
# bench/reference_kd.py is the reference code's training script, kept as its authors wrote it
# (its own SGD and wall clock), to be compared against.
REFERENCE = os.path.join(ROOT, 'bench', 'reference_kd.py')


def _tree(path):
    with open(path) as f:
        return ast.parse(f.read(), path)


def _name(path):
    return os.path.relpath(path, ROOT)


def _imported_modules(node):
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0:
        return [node.module]
    return []


def _nested_imports(tree):
    """(line, module) of every import inside a function or class."""
    found = []
    for scope in ast.walk(tree):
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for node in ast.walk(scope):
                found += [(node.lineno, m) for m in _imported_modules(node)]
    return found


def test_project_imports_are_at_the_top():
    misplaced = []
    for path in PROJECT + BENCH:
        lines = open(path).read().splitlines()
        for line, module in _nested_imports(_tree(path)):
            allowed = any(module == m or module.startswith(m + '.') for m in LAZY)
            if not allowed:
                misplaced.append(f'{_name(path)}:{line}: {module}')
    assert not misplaced, 'imports inside functions (move them to the top):\n' + \
        '\n'.join(misplaced)
    # each lazy import says why, on its line or the first lazy import line of its function
    for path in PROJECT + BENCH:
        lines = open(path).read().splitlines()
        for scope in ast.walk(_tree(path)):
            if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
                nested = [n for n in ast.walk(scope) if _imported_modules(n)]
                if nested and not any('#' in lines[n.lineno - 1] for n in nested):
                    pytest.fail(f'{_name(path)}:{nested[0].lineno}: a lazy import without '
                                f'a comment saying why')


def _module_name(path):
    """'kd.engine.loop' for kd/engine/loop.py, 'kd.models' for kd/models/__init__.py."""
    parts = os.path.splitext(os.path.relpath(path, ROOT))[0].split(os.sep)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


PROJECT_MODULES = {_module_name(p) for p in PROJECT}


def _import_targets(node):
    """The project modules an import statement reaches (`from kd.methods import hints` reaches
    kd.methods.hints, `from kd.models import build_model` the package kd.models)."""
    targets = []
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
        targets = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in PROJECT_MODULES
                   else node.module for a in node.names]
    return {t for t in targets if t in PROJECT_MODULES}


def _import_graph():
    graph = {}
    for path in PROJECT:
        name = _module_name(path)
        graph[name] = set()
        for node in ast.walk(_tree(path)):  # top-level and lazy imports alike
            graph[name] |= _import_targets(node) - {name}
    return graph


def _find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 'done'
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


FACES = ('main', 'models', 'utils', 'train')   # the top level people use
# what each layer of the package may not import (the graph flows from the command line down)
FORBIDDEN = {
    'kd.models': ('kd.methods', 'kd.data', 'kd.recipes', 'kd.engine', 'kd.files', 'kd.report',
                  'kd.run'),
    'kd.data': ('kd.models', 'kd.methods', 'kd.recipes', 'kd.engine', 'kd.report', 'kd.run'),
    'kd.files': ('kd.models', 'kd.methods', 'kd.data', 'kd.engine', 'kd.report', 'kd.run'),
    'kd.methods': ('kd.recipes', 'kd.report', 'kd.run'),
    'kd.recipes': ('kd.methods', 'kd.engine', 'kd.report', 'kd.run'),
    'kd.engine': ('kd.report', 'kd.run'),
    'kd.report': ('kd.run',),
    'kd.run': (),
}


def _layer(module):
    return next((layer for layer in FORBIDDEN if module == layer
                 or module.startswith(layer + '.')), None)


def _reaches(module, layer):
    return module == layer or module.startswith(layer + '.')


def test_import_graph_is_acyclic_and_layered():
    graph = _import_graph()
    cycle = _find_cycle(graph)
    assert cycle is None, 'an import cycle: ' + ' -> '.join(cycle)
    assert _find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    # nothing imports the command line; nothing in the package imports the faces
    assert not any('main' in deps for deps in graph.values())
    inward = [f'{m} -> {d}' for m, deps in graph.items() if m.startswith('kd')
              for d in deps if d in FACES]
    assert not inward, inward
    wrong = [f'{m} -> {d}' for m, deps in graph.items() if _layer(m)
             for d in deps for banned in FORBIDDEN[_layer(m)] if _reaches(d, banned)]
    assert not wrong, 'imports against the layering:\n' + '\n'.join(sorted(wrong))


def test_the_loop_receives_the_stacked_students_as_a_stepper():
    """The loop steps through whatever stepper its caller names (LoopOptions.steps); it never
    imports the stacked students itself, directly or through another engine module."""
    graph = _import_graph()
    reached, todo = set(), ['kd.engine.loop']
    while todo:
        for d in graph[todo.pop()] - reached:
            reached.add(d)
            todo.append(d)
    assert 'kd.engine.stacked' not in reached


def test_the_top_level_holds_the_faces_and_one_package():
    top = sorted(os.path.splitext(os.path.basename(p))[0] for p in PROJECT
                 if os.path.dirname(p) == ROOT)
    assert [m for m in top if m not in FACES] == [], top
    packages = [d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, '__init__.py'))]
    assert packages == ['kd']
    # a folder per domain
    assert sorted(d for d in os.listdir(os.path.join(ROOT, 'kd'))
                  if os.path.isfile(os.path.join(ROOT, 'kd', d, '__init__.py'))) == \
        sorted(layer.split('.')[1] for layer in FORBIDDEN)


# ---------------------------------------------------------------------------------------------
# One optimizer builder

OPTIMIZERS = {name for name in dir(torch.optim) if isinstance(getattr(torch.optim, name), type)
              and issubclass(getattr(torch.optim, name), torch.optim.Optimizer)}


def test_one_optimizer_builder():
    built = []
    for path in PROJECT + [p for p in BENCH if p != REFERENCE]:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, 'id', None)
                if name in OPTIMIZERS:
                    built.append(f'{_name(path)}:{node.lineno}: {name}(')
    assert [b.split(':')[0] for b in built] == [os.path.join('kd', 'recipes', 'optim.py')], built


@pytest.mark.parametrize('recipe_', [Recipe(epochs=1), Recipe(epochs=1, lr=0.05, momentum=0.8,
                                                               weight_decay=1e-3)])
def test_a_stack_and_the_loop_build_the_same_optimizer(recipe_):
    torch.manual_seed(0)
    trainees = [Trainee(f's{i}', StudentNet(), 'kd', recipe_, torch.device('cpu'))
                for i in range(2)]
    stack = StudentStack(trainees, recipe_)
    loop, stacked = trainees[0].optimizer, stack.optimizer
    assert type(stacked) is type(loop) and stacked.defaults == loop.defaults

    def without_params(groups):
        return [{k: v for k, v in g.items() if k != 'params'} for g in groups]
    assert without_params(stacked.param_groups) == without_params(loop.param_groups)
    assert stacked.param_groups[0]['lr'] == recipe_.lr
    assert stacked.param_groups[0]['momentum'] == recipe_.momentum
    assert stacked.param_groups[0]['weight_decay'] == recipe_.weight_decay
    # the same parameters, stacked along a new first dimension
    assert [p.shape[1:] for p in stacked.param_groups[0]['params']] == \
        [p.shape for p in loop.param_groups[0]['params']]


def test_make_optimizer_takes_extra_parameters_into_the_main_group():
    connector = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
    for recipe_, main in ((Recipe(), 'all'), (recipe.get_recipe('fast'), 'other')):
        model = recipe.prepare_model(build_model('airbench94_small'), recipe_, None) \
            if main == 'other' else StudentNet()
        groups = recipe.param_groups(model, recipe_)
        optimizer = recipe.make_optimizer(model, recipe_,
                                          extra=list(connector.parameters()) + [frozen])
        by_name = {g['group']: g for g in optimizer.param_groups}
        held = {id(p) for p in by_name[main]['params']}
        assert {id(p) for p in connector.parameters()} <= held and id(frozen) not in held
        assert len(by_name[main]['params']) == len(groups[-1]['params']) + 2
        # the other groups are untouched
        assert [len(g['params']) for g in optimizer.param_groups[:-1]] == \
            [len(g['params']) for g in groups[:-1]]
    # given groups (the stacked tensors) are taken as they are
    weight = torch.nn.Parameter(torch.ones(2, 3))
    optimizer = recipe.make_optimizer([{'params': [weight], 'lr': 0.5, 'weight_decay': 0.0,
                                        'group': 'all'}], Recipe(momentum=0.7))
    assert optimizer.param_groups[0]['lr'] == 0.5 and optimizer.defaults['momentum'] == 0.7
    assert optimizer.defaults['nesterov'] is True


# ---------------------------------------------------------------------------------------------
# One synchronising clock

@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda.synchronize and the stopwatch's clock replaced by recorders: `events` holds
    'sync' and 'clock' in the order they happen; the clock advances 1 s per reading."""
    events, now = [], [0.0]

    def synchronize(device=None):
        events.append('sync')

    def clock():
        events.append('clock')
        now[0] += 1.0
        return now[0]
    monkeypatch.setattr(torch.cuda, 'synchronize', synchronize)
    monkeypatch.setattr(timing, 'perf_counter', clock)
    return events


def test_timer_synchronises_around_the_timed_calls(fake_cuda):
    events = fake_cuda
    seconds = timing.seconds_per_call(lambda: events.append('call'), torch.device('cuda'),
                                      repeats=3, warmup=1)
    # the warm-up call, then: wait for it, read the clock, 3 calls, wait for them, read it
    assert events == ['call', 'sync', 'clock', 'call', 'call', 'call', 'sync', 'clock']
    assert seconds == pytest.approx(1.0 / 3)
    events.clear()
    watch = timing.Stopwatch('cuda:0').start()
    events.append('work')
    assert watch.elapsed() == 1.0 and watch.elapsed() == 2.0
    assert events == ['sync', 'clock', 'work', 'sync', 'clock', 'sync', 'clock']
    with pytest.raises(RuntimeError):
        timing.Stopwatch('cpu').elapsed()
    events.clear()
    timing.seconds_per_call(lambda: None, torch.device('cpu'))  # a CPU: nothing to wait for
    assert events == ['clock', 'clock']


def test_the_duration_estimate_uses_the_stopwatch(fake_cuda):
    """The estimate's interval starts after the warm-up steps' work and ends after the timed
    steps' work (a CUDA step returns once its kernels are queued)."""
    events, lines = fake_cuda, []
    timer = DurationEstimate('teacher', PhaseWork(10, 352, 128, 1, 5000, 10000),
                             torch.device('cuda'), lines.append)
    for _ in range(2 + DurationEstimate.STEPS):
        events.append('step')
        timer.on_step(128, out=None)
    timed = events[events.index('clock') + 1:]
    assert events[:4] == ['step', 'step', 'sync', 'clock']
    assert timed == ['step'] * DurationEstimate.STEPS + ['sync', 'clock']
    assert timer.estimate['images_per_s'] == pytest.approx(128 * DurationEstimate.STEPS)
    assert len(lines) == 1 and lines[0].startswith('teacher: ')


def _clock_reads(tree):
    """(line, what) of every clock read that is not timing's: time.time(), perf_counter,
    monotonic, process_time (a wall-clock stamp uses time.strftime / localtime by name)."""
    clocks = {'time', 'perf_counter', 'perf_counter_ns', 'monotonic', 'monotonic_ns',
              'process_time', 'time_ns'}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                node.value.id == 'time' and node.attr in clocks:
            found.append((node.lineno, f'time.{node.attr}'))
        if isinstance(node, ast.ImportFrom) and node.module == 'time':
            found += [(node.lineno, f'from time import {a.name}') for a in node.names
                      if a.name in clocks]
    return found


def test_no_other_clock():
    others = [f'{_name(path)}:{line}: {what}'
              for path in PROJECT + BENCH if path not in (timing.__file__, REFERENCE)
              for line, what in _clock_reads(_tree(path))]
    assert not others, 'intervals measured outside timing.py:\n' + '\n'.join(others)
    assert _clock_reads(ast.parse('import time\nt = time.perf_counter()\n')) == \
        [(2, 'time.perf_counter')]
