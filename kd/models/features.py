"""Intermediate features by name, taken without touching a model's `forward`.

A point spec is a module path: 'layer2' is the output of `model.layer2`, 'fc:in' the first
input of `model.fc` (kd/models/registry.py names the standard points of every registered model;
`given_points` names those of any model from the paths a user gives, --teacher-points and
--student-points). Two ways to read them, giving the same tensors:

- `FeatureCapture`: forward hooks on the modules, for the students (they train eagerly, under
  DistributedDataParallel or torch.compile);
- `trace_points`: a torch.fx graph whose output is (logits, {point: tensor}), for the frozen
  teacher, whose BatchNorm-folded or compiled rebuild has no modules left to hook.
"""
import difflib

import torch.fx as fx
import torch.nn as nn


def parse_point(spec):
    """'path' -> ('path', False); 'path:in' -> ('path', True). ValueError on another suffix."""
    path, sep, where = spec.partition(':')
    if sep and where != 'in':
        raise ValueError(f"feature point {spec!r}: a module path, or a path ending in ':in'")
    return path, bool(sep)


def nearest_modules(model, path, n=5):
    """', '.join of `model`'s module paths closest to `path` (difflib), else its first few."""
    names = [name for name, _ in model.named_modules() if name]
    close = difflib.get_close_matches(path, names, n=n, cutoff=0.4)
    return ', '.join(close or names[:n]) or 'it has no submodules'


def check_points(model, points):
    """Raise ValueError naming the first point whose module `model` does not have, and the
    model's module paths nearest to it."""
    for name, spec in points.items():
        require_module(model, parse_point(spec)[0], f'feature point {name!r}: the model')


def require_module(model, path, what):
    """Raise ValueError when `model` has no module at `path`: '{what} has no module ...',
    with the model's module paths nearest to it."""
    try:
        model.get_submodule(path)
    except AttributeError:
        raise ValueError(f'{what} has no module {path!r} (nearest: '
                         f'{nearest_modules(model, path)})') from None


def given_points(specs, model, what='model'):
    """{point name: spec} of module paths given in order (--teacher-points, --student-points):
    'stage1'..'stageN' as the feature methods read stages, each also as its 'stageN_pre' (a
    user's model names no pre-activation apart: ReviewKD reads the teacher's there; OFD still
    needs its BatchNorms named, so it refuses such a teacher), and 'pooled' the input of the
    model's last nn.Linear (its classifier's embedding, as CRD and the relation methods read it)
    unless it has none. ValueError naming a path `model` lacks and its nearest module names
    (`what` says which model)."""
    points = {}
    for i, spec in enumerate(specs, 1):
        points[f'stage{i}'] = points[f'stage{i}_pre'] = spec
    for spec in specs:
        require_module(model, parse_point(spec)[0], what)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        points['pooled'] = f'{linears[-1]}:in'
    return points


class FeatureCapture:
    """Forward hooks that keep the named points of `model` from the forwards run inside
    `with capture:`; `pop()` returns {point: tensor} and forgets them.

    points: {name: spec}. Outside the `with` the hooks store nothing (evaluation keeps no
    features). Hooks sit on the modules themselves, so they fire through DDP and torch.compile
    wrappers; register them after any module replacement (SyncBatchNorm conversion makes new
    modules).
    """

    def __init__(self, model, points):
        check_points(model, points)
        self.active, self.feats, self.handles = False, {}, []
        for name, spec in points.items():
            path, is_input = parse_point(spec)
            module = model.get_submodule(path)
            if is_input:
                self.handles.append(module.register_forward_pre_hook(self._input_hook(name)))
            else:
                self.handles.append(module.register_forward_hook(self._output_hook(name)))

    def _input_hook(self, name):
        def hook(module, args):
            if self.active:
                self.feats[name] = args[0]
        return hook

    def _output_hook(self, name):
        def hook(module, args, output):
            if self.active:
                self.feats[name] = output
        return hook

    def __enter__(self):
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False

    def pop(self):
        feats, self.feats = self.feats, {}
        return feats

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


class WithPoints(nn.Module):
    """`model` whose forward returns (logits, {point: tensor}), by hooks (the eager form of a
    model that torch.fx cannot trace)."""

    def __init__(self, model, points):
        super().__init__()
        self.model = model
        self.capture = FeatureCapture(model, points)

    def forward(self, x):
        with self.capture:
            logits = self.model(x)
        return logits, self.capture.pop()


class ModuleTracer(fx.Tracer):
    """Traces through the project's modules but keeps each nn.Linear subclass whole (the
    classifier runs its own autocast context, which symbolic tracing cannot follow), and
    remembers the graph nodes of every module call's first input and output by module path."""

    def __init__(self):
        super().__init__()
        self.inputs, self.outputs = {}, {}

    def is_leaf_module(self, module, qualified_name):
        return isinstance(module, nn.Linear) or super().is_leaf_module(module, qualified_name)

    def call_module(self, module, forward, args, kwargs):
        path = self.path_of_module(module)
        out = super().call_module(module, forward, args, kwargs)
        if args and isinstance(args[0], fx.Proxy):
            self.inputs[path] = args[0].node
        if isinstance(out, fx.Proxy):
            self.outputs[path] = out.node
        return out


def trace_points(model, points=None):
    """A GraphModule of `model` (same parameters and buffers); with `points` ({name: spec}) its
    output is (logits, {name: tensor}), else the logits as `model` returns them. Raises what
    torch.fx raises for an untraceable model, ValueError for a point no module call gives."""
    tracer = ModuleTracer()
    graph = tracer.trace(model)
    if points:
        check_points(model, points)
        nodes = {}
        for name, spec in points.items():
            path, is_input = parse_point(spec)
            found = (tracer.inputs if is_input else tracer.outputs).get(path)
            if found is None:
                raise ValueError(f'feature point {name!r}: module {path!r} is not called in '
                                 f'the forward')
            nodes[name] = found
        output = next(n for n in graph.nodes if n.op == 'output')
        output.args = ((output.args[0], nodes),)
    return fx.GraphModule(model, graph)


def split_output(out):
    """(logits, {point: tensor}) of a model's output, with or without points."""
    return out if isinstance(out, tuple) else (out, {})
