"""Speed choices made by measuring on the machine at hand, never from a CPU flag.

- The precision of each network on a CPU: fp32 and bf16 are timed on the run's batch shape
  (a CPU may report bf16 instructions and still run bf16 slower), bf16 kept only when clearly
  faster, and the decision stored per machine, so the same command trains in the same
  precision every time (PrecisionDecisions).
- Whether students of one architecture train as one vmapped stack (stacked.py): on CUDA, when
  a few timed steps of both ways say so.
- The teacher's inference form during the students' phase: its weights never change there, so
  each BatchNorm that follows a convolution is folded into it (same outputs, fewer passes over
  memory), and for long runs an Inductor-compiled, frozen graph is tried and kept only when it
  measures faster and its compile time is repaid by the forwards ahead.
"""
import copy
import hashlib
import json
import math
import os
import statistics
import time  # wall-clock stamps (time.strftime): when a decision was made

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from kd.files.checkpoint import atomic_write_text
from kd.models.features import WithPoints, split_output, trace_points
from kd.engine.distributed import all_reduce_sum
from kd.models import build_model
from kd.report.report import cpu_identity
from kd.engine.stacked import StudentStack, stacking_problem
from kd.engine.timing import Stopwatch, seconds_per_call
from kd.engine.loop import autocast, choose_precision, precision_name, train_step, train_step_stacked

PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16}
PROBE_SLOWDOWN_LIMIT = 2.0   # a precision this much slower on the probe is not timed further
TIMED_STEPS = 5              # timed whole-batch steps per precision after warm-up (the median)
# bf16 changes the numerics; it is used only when clearly faster, so a near tie (whose winner
# flips with the load of the moment) always settles on fp32.
BF16_MIN_SPEEDUP = 1.2
CACHE_ENV = 'KD_CIFAR_CACHE_DIR'  # where the stored decisions go, instead of the user's cache


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


def measure_precisions(model, batch_shape, device, training, num_classes=10, steps=TIMED_STEPS):
    """Images/s of `model` in fp32 and in bf16 on random images of batch_shape.

    Runs on a copy, so the model and its BatchNorm statistics are untouched. Each precision is
    first run on a quarter batch (a warm-up, then one timed probe); one more than
    PROBE_SLOWDOWN_LIMIT times slower than the best there is not run on the whole batch
    (emulated bf16 can be 10x slower, and a whole teacher batch then costs a minute), and its
    probe rate is its figure. The others get one whole-batch warm-up step, then `steps` timed
    steps taken in turn (so a burst of load hits both), and the median step time is their
    figure. Returns {'fp32': images/s, 'bf16': images/s}.
    """
    model = copy.deepcopy(model).to(device, memory_format=torch.channels_last)
    model.train(training)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch_shape, generator=gen).to(device).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch_shape[0],), generator=gen).to(device)
    quarter = max(1, batch_shape[0] // 4)
    probe = {}
    for name, dtype in PRECISIONS.items():
        step = _step_fn(model, images[:quarter], labels[:quarter], dtype, training)
        # after one warm-up call: one-time kernel choices and allocations
        probe[name] = seconds_per_call(step, device, warmup=1)
    close = [n for n in PRECISIONS if probe[n] <= PROBE_SLOWDOWN_LIMIT * min(probe.values())]
    rates = {name: round(quarter / seconds, 1) for name, seconds in probe.items()}
    if len(close) > 1:  # a real contest: time the whole batch
        step_of = {name: _step_fn(model, images, labels, PRECISIONS[name], training)
                   for name in close}
        samples = {name: [] for name in close}
        for name in close:
            step_of[name]()
        for _ in range(steps):
            for name in close:
                samples[name].append(seconds_per_call(step_of[name], device))
        for name in close:
            rates[name] = round(batch_shape[0] / statistics.median(samples[name]), 1)
    return rates


def precision_from_rates(rates, min_speedup=BF16_MIN_SPEEDUP):
    """bf16 (torch.bfloat16) when rates['bf16'] >= min_speedup * rates['fp32'] images/s, else
    fp32 (None)."""
    return torch.bfloat16 if rates['bf16'] >= min_speedup * rates['fp32'] else None


# ---------------------------------------------------------------------------------------------
# The stored precision decisions

def decisions_path():
    """Where the CPU precision decisions are stored: $KD_CIFAR_CACHE_DIR/precision.json, else
    $XDG_CACHE_HOME/kd-cifar/precision.json, else ~/.cache/kd-cifar/precision.json."""
    folder = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'),
        'kd-cifar')
    return os.path.join(folder, 'precision.json')


def machine_key(processes=1):
    """What a precision decision holds for: CPU model and flags, torch version, thread count and
    the number of processes sharing the CPU (one readable line)."""
    model, flags = cpu_identity()
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    key = (f'{model}; flags {digest}; torch {torch.__version__}; '
           f'{torch.get_num_threads()} threads')
    return key + (f'; {processes} processes' if processes > 1 else '')


def decision_key(arch, training, batch_shape):
    """'resnet18 (training), batch 128x3x32x32': one decision per architecture, mode and shape."""
    mode = 'training' if training else 'inference'
    return f"{arch} ({mode}), batch {'x'.join(str(d) for d in batch_shape)}"


class PrecisionDecisions:
    """The JSON file of stored decisions: {'machines': {machine_key: {decision_key: entry}}},
    entry = {'fp32': images/s, 'bf16': images/s, 'chosen': 'fp32' | 'bf16', 'decided': date}.

    A file that cannot be read or parsed, or an entry that makes no sense, is noted in one line
    and measured again; a file that cannot be written is noted and the run goes on.
    """

    def __init__(self, path, machine, log=print):
        self.path, self.machine, self.log = path, machine, log
        self.data = self._read()

    def _read(self):
        empty = {'machines': {}}
        if not os.path.exists(self.path):
            return empty
        try:
            with open(self.path) as f:
                data = json.load(f)
            if not isinstance(data, dict) or not isinstance(data.get('machines'), dict):
                raise ValueError('not a file of precision decisions')
            return data
        except (OSError, UnicodeDecodeError, ValueError) as e:
            self.log(f'precision: cannot read {self.path} ({getattr(e, "strerror", None) or e}); '
                     f'measuring again')
            return empty

    def get(self, key):
        """The stored entry of `key` on this machine, or None (noted when it is damaged)."""
        entry = self.data['machines'].get(self.machine, {}).get(key)
        if entry is None:
            return None
        try:
            rates = {n: float(entry[n]) for n in PRECISIONS}
            if not all(math.isfinite(r) and r > 0 for r in rates.values()):
                raise ValueError
            return dict(rates, decided=str(entry.get('decided', 'an unknown date')))
        except (TypeError, KeyError, ValueError):
            self.log(f'precision: the stored decision for {key} in {self.path} is damaged; '
                     f'measuring again')
            return None

    def put(self, entries):
        """Store {key: entry} for this machine (atomically: a kill leaves the old file).
        Returns whether it was written."""
        machines = self.data['machines']
        if not isinstance(machines.get(self.machine), dict):
            machines[self.machine] = {}
        machines[self.machine].update(entries)
        self.data['rule'] = (f'bf16 only when at least {BF16_MIN_SPEEDUP}x the fp32 images/s; '
                             f'delete this file to measure again')
        try:
            os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True) + '\n')
            return True
        except OSError as e:
            self.log(f'precision: cannot store the decision in {self.path} '
                     f'({e.strerror or e}); it will be measured again next time')
            return False


# ---------------------------------------------------------------------------------------------
# The frozen teacher

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
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch_shape, generator=gen).to(device).contiguous(
        memory_format=torch.channels_last)
    quarter = images[:max(1, batch_shape[0] // 4)]

    def forward(model, x):
        with torch.inference_mode(), autocast(device, precision):
            logits, feats = split_output(model(x))
            return [logits.float()] + [feats[k].float() for k in sorted(feats)]

    def outputs_match(a, b, tolerance):
        return len(a) == len(b) and all(tensors_match(x, y, tolerance) for x, y in zip(a, b))

    eager = WithPoints(teacher, points) if points else teacher
    reference = forward(eager, quarter)  # also eager's warm-up
    tolerance = 1e-3 if precision is None else 5e-2
    candidates = {'eager': eager}
    try:
        folded = fold_batchnorm(teacher, points).to(device, memory_format=torch.channels_last)
        if outputs_match(reference, forward(folded, quarter), tolerance):
            candidates['folded'] = folded
        else:
            log('teacher: the folded form does not reproduce the eager outputs; not used')
    except Exception as e:  # a model fx cannot trace stays eager
        log(f'teacher: BatchNorm folding is not possible for this model ({type(e).__name__})')
    scale = batch_shape[0] / len(quarter)
    seconds = {name: scale * seconds_per_call(lambda m=model: forward(m, quarter), device)
               for name, model in candidates.items()}
    # Folding does the same arithmetic as eager minus one pass over every folded activation,
    # so it is used whenever it reproduces the outputs; its timing is recorded, not obeyed.
    best = 'folded' if 'folded' in candidates else 'eager'
    record = {'estimated_forward_seconds': round(forwards_ahead * seconds[best], 1)}
    if compile_model:
        watch = Stopwatch(device).start()
        try:
            compiled = compile_frozen(candidates[best])
            forward(compiled, images)  # compiles
            record['compile_seconds'] = round(watch.elapsed(), 1)
            seconds['compiled'] = seconds_per_call(lambda: forward(compiled, images), device,
                                                   warmup=1)
            if outputs_match(reference, forward(compiled, quarter), tolerance):
                candidates['compiled'], best = compiled, 'compiled'
            else:
                log('teacher: the compiled form does not reproduce the eager outputs; not used')
        except Exception as e:  # no compiler toolchain, an unsupported op: stay uncompiled
            record['compile_error'] = f'{type(e).__name__}: {str(e)[:200]}'
    record['seconds_per_batch'] = {k: round(v, 4) for k, v in seconds.items()}
    record['chosen'] = best
    return candidates[best], record


# ---------------------------------------------------------------------------------------------
# The choices of a run, made once per invocation

def rule_precisions(specs, device, amp, with_teacher):
    """({model name: dtype}, teacher dtype or None) by train.choose_precision's rule, which
    needs no timing: CUDA in any mode, and a CPU with --amp / --no-amp."""
    def role(spec):
        return 'teacher' if spec.name == 'teacher' else 'student'
    return ({s.name: choose_precision(role(s), device, amp) for s in specs},
            choose_precision('teacher', device, amp) if with_teacher else None)


def decide_precisions(specs, device, amp, dist, batch_shape, num_classes, teacher=None,
                      teacher_arch=None, store=None, log=print):
    """({model name: dtype}, teacher dtype or None, record) for a new run of this phase.

    CUDA, or amp True / False (--amp / --no-amp): rule_precisions. A CPU in auto mode: per
    architecture and mode (training; the teacher's inference) on this batch shape, the decision
    stored in `store` (a PrecisionDecisions) for this machine; without one, fp32 and bf16 are
    measured (measure_precisions), bf16 kept only when BF16_MIN_SPEEDUP times faster
    (precision_from_rates), and the figures stored. Every torchrun process uses the average of
    all processes' figures. One line per decision goes to `log`.
    record: {'source': '--amp' | '--no-amp' | 'rule' | 'stored' | 'measured' |
    'stored and measured', 'decisions': {key: {'fp32', 'bf16' (images/s), 'chosen', 'source',
    'decided'}} or None}.
    """
    if device.type != 'cpu' or amp is not None:
        precisions, teacher_precision = rule_precisions(specs, device, amp, teacher is not None)
        source = 'rule' if amp is None else '--amp' if amp else '--no-amp'
        return precisions, teacher_precision, {'source': source, 'decisions': None}
    jobs = {(s.arch, True): (lambda s=s: build_model(s.arch, num_classes=num_classes))
            for s in specs}
    if teacher is not None:
        jobs[(teacher_arch, False)] = lambda: teacher
    decisions, chosen = {}, {}
    for (arch, training), make in jobs.items():
        key = decision_key(arch, training, batch_shape)
        stored = store.get(key) if store is not None else None
        figures = torch.tensor([1.0] + [stored[n] for n in PRECISIONS] if stored else
                               [0.0] * (1 + len(PRECISIONS)), dtype=torch.float64)
        all_reduce_sum(figures)  # every process decides from the same figures
        if figures[0].item() == dist.world_size:
            source, decided = 'stored', stored['decided']
        else:
            figures = torch.tensor([0.0] + [v for v in measure_precisions(
                make(), batch_shape, device, training, num_classes).values()],
                dtype=torch.float64)
            all_reduce_sum(figures)
            source, decided = 'measured', time.strftime('%Y-%m-%d %H:%M')
        rates = {n: round(v / dist.world_size, 1)
                 for n, v in zip(PRECISIONS, figures[1:].tolist())}
        chosen[(arch, training)] = precision_from_rates(rates)
        name = precision_name(chosen[(arch, training)])
        decisions[key] = dict(rates, chosen=name, source=source, decided=decided)
        kept = None
        if source == 'measured' and store is not None and dist.is_main:
            kept = store.put({key: dict(rates, chosen=name, decided=decided)})
        where = (f'stored in {store.path}; delete it to measure again' if source == 'stored'
                 or kept else 'not stored')
        how = (f'decided on {decided[:10]}' if source == 'stored' else 'measured now')
        log(f"precision: {arch} ({'training' if training else 'inference'}): {name}, {how} on "
            f"this machine (fp32 {rates['fp32']:.0f} images/s, bf16 {rates['bf16']:.0f}; "
            f"bf16 only when {BF16_MIN_SPEEDUP:g}x faster); {where}")
    sources = sorted({d['source'] for d in decisions.values()}, reverse=True)
    return ({s.name: chosen[(s.arch, True)] for s in specs},
            chosen.get((teacher_arch, False)) if teacher is not None else None,
            {'source': ' and '.join(sources), 'decisions': decisions})


def decide_stacking(trainees, mode, compiled, num_classes, device, dist, teacher,
                    teacher_precision, recipe, batch_shape, log):
    """(train the students as one vmapped stack?, record). mode: --stack-students; on / off
    decide; auto stacks on CUDA when a few timed steps of both ways say the stack is faster.
    compiled: --compile; num_classes: the models' output count (for the timed labels)."""
    if mode == 'off' or len(trainees) < 2:
        return False, {'mode': mode, 'stacked': False}
    problem = stacking_problem(trainees, dist.enabled, compiled)
    if problem:
        if mode == 'on' or any(t.distiller is not None for t in trainees):
            log(f'students: not stacked ({problem}); they train one after another')
        return False, {'mode': mode, 'stacked': False, 'why_not': problem}
    if mode == 'on':
        return True, {'mode': 'on', 'stacked': True}
    if device.type != 'cuda':
        return False, {'mode': 'auto', 'stacked': False, 'why_not': 'auto stacks on CUDA only'}
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch_shape, generator=gen).to(device).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch_shape[0],), generator=gen).to(device)
    seconds = time_both(trainees, recipe, teacher, images, labels, teacher_precision)
    stacked = seconds['stacked'] < seconds['loop']
    log(f"students: {len(trainees)} in a loop {seconds['loop'] * 1e3:.1f} ms per step, stacked "
        f"{seconds['stacked'] * 1e3:.1f} ms -> {'stacked' if stacked else 'loop'}")
    return stacked, {'mode': 'auto', 'stacked': stacked,
                     'seconds_per_step': {k: round(v, 5) for k, v in seconds.items()}}


def time_both(trainees, recipe, teacher, images, labels, teacher_precision, steps=3):
    """Seconds per step of the plain loop and of the stack, {'loop': s, 'stacked': s}, on copies
    of the trainees (theirs are untouched): `steps` timed steps after one warm-up step each."""
    seconds = {}
    for mode in ('loop', 'stacked'):
        copies = copy.deepcopy(trainees)
        stack = StudentStack(copies, recipe) if mode == 'stacked' else None

        def step():
            if stack is None:
                train_step(copies, teacher, images, labels, recipe, teacher_precision)
            else:
                train_step_stacked(stack, teacher, images, labels, teacher_precision)

        seconds[mode] = seconds_per_call(step, images.device, steps, warmup=1)
    return seconds
