"""Speed choices made by measuring on the machine at hand, never from a CPU flag.

- The precision of each network on a CPU: fp32 and bf16 are timed on the run's batch shape,
  and the faster one trains (a CPU may report bf16 instructions and still run bf16 slower).
- Whether students of one architecture train as one vmapped stack (stacked.py): on CUDA, when
  a few timed steps of both ways say so.
- The teacher's inference form during the students' phase: its weights never change there, so
  each BatchNorm that follows a convolution is folded into it (same outputs, fewer passes over
  memory), and for long runs an Inductor-compiled, frozen graph is tried and kept only when it
  measures faster and its compile time is repaid by the forwards ahead.
"""
import copy
import time

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from train import autocast

PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16}
PROBE_SLOWDOWN_LIMIT = 2.0   # a precision this much slower on the probe is not timed further
COMPILE_WORTH_SECONDS = 600  # try compiling the teacher only when its forwards take longer


def _seconds(fn, repeats):
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _step_fn(model, images, labels, dtype, training):
    """One forward (inference) or forward + backward (training) of model in dtype."""
    device = images.device
    if not training:
        def step():
            with torch.inference_mode(), autocast(device, dtype):
                model(images)
        return step

    def step():
        with autocast(device, dtype):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def measure_precisions(model, batch_shape, device, training, num_classes=10):
    """Images/s of `model` in fp32 and in bf16 on random images of batch_shape.

    Runs on a copy, so the model and its BatchNorm statistics are untouched. Each precision is
    first run once on a quarter batch (its warm-up, timed as a probe); one more than
    PROBE_SLOWDOWN_LIMIT times slower than the best there is not run on the whole batch
    (emulated bf16 can be 10x slower, and a whole teacher batch then costs a minute), and its
    probe rate is its figure. Returns {'fp32': images/s, 'bf16': images/s}.
    """
    model = copy.deepcopy(model).to(device, memory_format=torch.channels_last)
    model.train(training)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch_shape, generator=gen).to(device).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch_shape[0],), generator=gen).to(device)
    quarter = max(1, batch_shape[0] // 4)
    probe = {name: _seconds(_step_fn(model, images[:quarter], labels[:quarter], dtype, training),
                            1) for name, dtype in PRECISIONS.items()}
    close = [n for n in PRECISIONS if probe[n] <= PROBE_SLOWDOWN_LIMIT * min(probe.values())]
    rates = {name: round(quarter / seconds, 1) for name, seconds in probe.items()}
    if len(close) > 1:  # a real contest: time the whole batch
        for name in close:
            step = _step_fn(model, images, labels, PRECISIONS[name], training)
            rates[name] = round(batch_shape[0] / _seconds(step, 1), 1)
    return rates


def faster_precision(rates):
    """The dtype with the higher images/s (fp32 on a tie)."""
    name = max(rates, key=lambda n: (rates[n], n == 'fp32'))
    return PRECISIONS[name]


# ---------------------------------------------------------------------------------------------
# The frozen teacher

class _Tracer(fx.Tracer):
    """Traces through the project's modules but keeps each nn.Linear subclass whole (the
    classifier runs its own autocast context, which symbolic tracing cannot follow)."""

    def is_leaf_module(self, module, qualified_name):
        return isinstance(module, nn.Linear) or super().is_leaf_module(module, qualified_name)


def fold_batchnorm(model):
    """A copy of `model` for inference with every BatchNorm2d that directly follows a Conv2d
    folded into that convolution's weights and bias.

    conv -> BN computes gamma * (W x + b - mean) / sqrt(var + eps) + beta, itself a convolution
    with weights W * gamma / sqrt(var + eps): one pass over the activations instead of two.
    Other layers are kept as they are. The copy is in eval mode and holds no gradients.
    """
    model = copy.deepcopy(model).eval()
    graph_module = fx.GraphModule(model, _Tracer().trace(model))
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


def outputs_match(a, b, tolerance):
    """Equal up to tolerance relative to the logits' scale (a deep net's can be in the hundreds)."""
    return bool((a - b).abs().max() <= tolerance * max(1.0, a.abs().max().item()))


def compile_frozen(model):
    """torch.compile for inference with Inductor's freezing (constants folded into the graph)."""
    return torch.compile(model, options={'freezing': True})


def fastest_teacher(teacher, batch_shape, device, precision, forwards_ahead, log=print):
    """The teacher in its fastest inference form here, and a record of the choice.

    BatchNorm-folded when that reproduces the eager outputs (else eager); then, only when the
    forwards ahead would take longer than COMPILE_WORTH_SECONDS, that model compiled with
    Inductor's freezing, kept if it reproduces the outputs and its compile time plus its
    forwards measure shorter than the uncompiled forwards. Timings of every form are recorded.
    """
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch_shape, generator=gen).to(device).contiguous(
        memory_format=torch.channels_last)
    quarter = images[:max(1, batch_shape[0] // 4)]

    def forward(model, x):
        with torch.inference_mode(), autocast(device, precision):
            return model(x).float()

    reference = forward(teacher, quarter)  # also eager's warm-up
    tolerance = 1e-3 if precision is None else 5e-2
    candidates = {'eager': teacher}
    try:
        folded = fold_batchnorm(teacher).to(device, memory_format=torch.channels_last)
        if outputs_match(reference, forward(folded, quarter), tolerance):
            candidates['folded'] = folded
        else:
            log('teacher: the folded form does not reproduce the eager outputs; not used')
    except Exception as e:  # a model fx cannot trace stays eager
        log(f'teacher: BatchNorm folding is not possible for this model ({type(e).__name__})')
    scale = batch_shape[0] / len(quarter)
    seconds = {name: scale * _seconds(lambda m=model: forward(m, quarter), 1)
               for name, model in candidates.items()}
    # Folding does the same arithmetic as eager minus one pass over every folded activation,
    # so it is used whenever it reproduces the outputs; its timing is recorded, not obeyed
    # (one timed batch is too noisy to flip a choice that changes the numerics run to run).
    best = 'folded' if 'folded' in candidates else 'eager'
    record = {'estimated_forward_seconds': round(forwards_ahead * seconds[best], 1)}
    if forwards_ahead * seconds[best] > COMPILE_WORTH_SECONDS:
        start = time.perf_counter()
        try:
            compiled = compile_frozen(candidates[best])
            forward(compiled, images)  # compiles
            record['compile_seconds'] = round(time.perf_counter() - start, 1)
            forward(compiled, images)
            seconds['compiled'] = _seconds(lambda: forward(compiled, images), 1)
            close = outputs_match(reference, forward(compiled, quarter), tolerance)
            saving = forwards_ahead * (seconds[best] - seconds['compiled'])
            if close and saving > record['compile_seconds']:
                candidates['compiled'], best = compiled, 'compiled'
        except Exception as e:  # no compiler toolchain, an unsupported op: stay eager
            record['compile_error'] = f'{type(e).__name__}: {str(e)[:200]}'
    record['seconds_per_batch'] = {k: round(v, 4) for k, v in seconds.items()}
    record['chosen'] = best
    return candidates[best], record


# ---------------------------------------------------------------------------------------------
# The choices of a run, made once per invocation

def decide_precisions(specs, device, args, dist, batch_shape, teacher, saved, log):
    """({model name: dtype}, teacher dtype, measurements) for this phase.

    CUDA, or --amp / --no-amp given: train.choose_precision's rule. CPU in auto mode: fp32 and
    bf16 timed per architecture on this run's batch shape (the students share one figure), the
    faster kept; every torchrun process uses the average of all processes' figures. A resumed
    run keeps the precisions it started with.
    """
    import torch
    from distributed import all_reduce_sum
    from models import build_model
    from train import choose_precision, precision_name
    by_name = {precision_name(d): d for d in (None, torch.bfloat16, torch.float16)}
    if saved is not None:
        precisions, teacher_precision = saved
        return ({n: by_name[p] for n, p in precisions.items()},
                by_name[teacher_precision] if teacher_precision else None, None)
    if device.type != 'cpu' or args.amp is not None:
        role = lambda spec: 'teacher' if spec.name == 'teacher' else 'student'  # noqa: E731
        return ({s.name: choose_precision(role(s), device, args.amp) for s in specs},
                choose_precision('teacher', device, args.amp) if teacher is not None else None,
                None)
    measured, chosen = {}, {}
    jobs = {(s.arch, True): (lambda s=s: build_model(s.arch, num_classes=args.num_classes))
            for s in specs}
    if teacher is not None:
        jobs[('teacher', False)] = lambda: teacher
    for (arch, training), make in jobs.items():
        rates = measure_precisions(make(), batch_shape, device, training, args.num_classes)
        totals = torch.tensor([rates[n] for n in PRECISIONS], dtype=torch.float64)
        all_reduce_sum(totals)  # every process decides from the same figures
        rates = {n: round(v / dist.world_size, 1) for n, v in zip(PRECISIONS, totals.tolist())}
        key = f"{arch} ({'training' if training else 'teacher inference'})"
        measured[key] = dict(rates, chosen=precision_name(faster_precision(rates)))
        chosen[(arch, training)] = faster_precision(rates)
        log(f'precision: {key}: fp32 {rates["fp32"]:.0f} images/s, bf16 {rates["bf16"]:.0f} '
            f'images/s -> {measured[key]["chosen"]}')
    return ({s.name: chosen[(s.arch, True)] for s in specs},
            chosen.get(('teacher', False)), measured)


def decide_stacking(trainees, args, device, dist, teacher, teacher_precision, recipe,
                    batch_shape, log):
    """(train the students as one vmapped stack?, record). --stack-students on / off decide;
    auto stacks on CUDA when a few timed steps of both ways say the stack is faster."""
    import torch
    from stacked import stacking_problem, time_both
    if args.stack_students == 'off' or len(trainees) < 2:
        return False, {'mode': args.stack_students, 'stacked': False}
    problem = stacking_problem(trainees, dist.enabled, args.compile)
    if problem:
        if args.stack_students == 'on':
            log(f'students: not stacked ({problem}); they train one after another')
        return False, {'mode': args.stack_students, 'stacked': False, 'why_not': problem}
    if args.stack_students == 'on':
        return True, {'mode': 'on', 'stacked': True}
    if device.type != 'cuda':
        return False, {'mode': 'auto', 'stacked': False, 'why_not': 'auto stacks on CUDA only'}
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch_shape, generator=gen).to(device).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, args.num_classes, (batch_shape[0],), generator=gen).to(device)
    seconds = time_both(trainees, recipe, teacher, images, labels, teacher_precision)
    stacked = seconds['stacked'] < seconds['loop']
    log(f"students: {len(trainees)} in a loop {seconds['loop'] * 1e3:.1f} ms per step, stacked "
        f"{seconds['stacked'] * 1e3:.1f} ms -> {'stacked' if stacked else 'loop'}")
    return stacked, {'mode': 'auto', 'stacked': stacked,
                     'seconds_per_step': {k: round(v, 5) for k, v in seconds.items()}}
