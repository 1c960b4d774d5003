"""The teacher's inference form during the students' phase: its weights never change there, so
each BatchNorm that follows a convolution is folded into it (same outputs, fewer passes over
memory), and with --compile an Inductor-compiled, frozen graph is tried; a form is used only when
it reproduces the eager outputs, and the forms' speeds are recorded, not obeyed.
"""
import copy

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from kd.engine.precision import autocast
from kd.engine.timing import Stopwatch, seconds_per_call
from kd.models.features import WithPoints, split_output, trace_points


def fold_batchnorm(model, points=None):
    """A copy of `model` for inference with every BatchNorm2d that directly follows a Conv2d
    folded into that convolution's weights and bias.

    conv -> BN computes gamma * (W x + b - mean) / sqrt(var + eps) + beta, itself a convolution
    with weights W * gamma / sqrt(var + eps): one pass over the activations instead of two.
    Other layers are kept as they are. The copy is in eval mode and holds no gradients.
    points ({name: spec}, features.py): the copy returns (logits, {name: tensor}) with those
    features, equal to the eager ones (a convolution whose output is itself a point is not
    folded; a BatchNorm's point becomes its folded convolution's output).
    """
    model = copy.deepcopy(model).eval()
    graph_module = trace_points(model, points)
    modules = dict(graph_module.named_modules())
    for node in list(graph_module.graph.nodes):
        if node.op != 'call_module' or type(modules[node.target]) is not nn.BatchNorm2d:
            continue
        conv_node = node.args[0]
        if not (isinstance(conv_node, fx.Node) and conv_node.op == 'call_module'
                and type(modules[conv_node.target]) is nn.Conv2d and len(conv_node.users) == 1):
            continue
        fused = fuse_conv_bn_eval(modules[conv_node.target], modules[node.target])
        parent, _, name = conv_node.target.rpartition('.')
        setattr(graph_module.get_submodule(parent) if parent else graph_module, name, fused)
        node.replace_all_uses_with(conv_node)
        graph_module.graph.erase_node(node)
    graph_module.graph.eliminate_dead_code()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    for p in graph_module.parameters():
        p.requires_grad_(False)
    return graph_module


def tensors_match(a, b, tolerance):
    """Equal up to tolerance relative to the tensor's scale (a deep net's logits can be in the
    hundreds)."""
    return bool((a - b).abs().max() <= tolerance * max(1.0, a.abs().max().item()))


def compile_frozen(model):
    """torch.compile for inference with Inductor's freezing (constants folded into the graph)."""
    return torch.compile(model, options={'freezing': True})


class FormTrial:
    """The teacher's forms tried on one batch of random images of batch_shape in `precision`:
    each must reproduce the eager outputs (logits and features) on a quarter batch."""

    def __init__(self, eager, batch_shape, device, precision):
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch_shape, generator=gen).to(device).contiguous(
            memory_format=torch.channels_last)
        self.quarter = self.images[:max(1, batch_shape[0] // 4)]
        self.device, self.precision = device, precision
        self.tolerance = 1e-3 if precision is None else 5e-2
        self.reference = self.forward(eager, self.quarter)  # also eager's warm-up

    def forward(self, model, x):
        with torch.inference_mode(), autocast(self.device, self.precision):
            logits, feats = split_output(model(x))
            return [logits.float()] + [feats[k].float() for k in sorted(feats)]

    def reproduces(self, model):
        out = self.forward(model, self.quarter)
        return len(out) == len(self.reference) and all(
            tensors_match(x, y, self.tolerance) for x, y in zip(self.reference, out))


def fastest_teacher(teacher, batch_shape, device, precision, forwards_ahead, log=print,
                    compile_model=False, points=None):
    """The teacher in its inference form for the students' forwards, and a record of it.

    points ({name: spec}, features.py): the form returns (logits, {name: tensor}) with the
    features the feature distillers need, and must reproduce the eager ones too.
    BatchNorm-folded when that reproduces the eager outputs (else eager); with compile_model
    (--compile), that model compiled with Inductor's freezing, kept if it reproduces the
    outputs. No timing decides the form: each form rounds differently, and the students learn
    from its logits, so a choice that followed the load of the moment (or the number of seeds
    ahead) would give the same command, or the same seed in a grid, other numbers. The forms'
    seconds per batch are measured and recorded (forwards_ahead: the training forwards ahead,
    for the record's estimate).
    """
    eager = WithPoints(teacher, points) if points else teacher
    trial = FormTrial(eager, batch_shape, device, precision)
    candidates = {'eager': eager}
    try:
        folded = fold_batchnorm(teacher, points).to(device, memory_format=torch.channels_last)
        if trial.reproduces(folded):
            candidates['folded'] = folded
        else:
            log('teacher: the folded form does not reproduce the eager outputs; not used')
    except Exception as e:  # a model fx cannot trace stays eager
        log(f'teacher: BatchNorm folding is not possible for this model ({type(e).__name__})')
    scale = batch_shape[0] / len(trial.quarter)
    seconds = {name: scale * seconds_per_call(lambda m=model: trial.forward(m, trial.quarter),
                                              device)
               for name, model in candidates.items()}
    # Folding does the same arithmetic as eager minus one pass over every folded activation,
    # so it is used whenever it reproduces the outputs; its timing is recorded, not obeyed.
    best = 'folded' if 'folded' in candidates else 'eager'
    record = {'estimated_forward_seconds': round(forwards_ahead * seconds[best], 1)}
    if compile_model:
        compiled = try_compiled(candidates[best], trial, seconds, record, log)
        if compiled is not None:
            candidates['compiled'], best = compiled, 'compiled'
    record['seconds_per_batch'] = {k: round(v, 4) for k, v in seconds.items()}
    record['chosen'] = best
    return candidates[best], record


def try_compiled(model, trial, seconds, record, log):
    """`model` compiled with Inductor's freezing (compile_frozen), or None when it does not
    reproduce the eager outputs or does not compile. Its compile time, seconds per whole batch
    or error go into `seconds` and `record` (fastest_teacher's, filled as it measures)."""
    watch = Stopwatch(trial.device).start()
    try:
        compiled = compile_frozen(model)
        trial.forward(compiled, trial.images)  # compiles
        record['compile_seconds'] = round(watch.elapsed(), 1)
        seconds['compiled'] = seconds_per_call(lambda: trial.forward(compiled, trial.images),
                                               trial.device, warmup=1)
        if trial.reproduces(compiled):
            return compiled
        log('teacher: the compiled form does not reproduce the eager outputs; not used')
    except Exception as e:  # no compiler toolchain, an unsupported op: stay uncompiled
        record['compile_error'] = f'{type(e).__name__}: {str(e)[:200]}'
    return None
