"""Speed choices made by measuring on the machine at hand, never from a CPU flag.

- The precision of each network on a CPU: fp32 and bf16 are timed on the run's batch shape
  (a CPU may report bf16 instructions and still run bf16 slower), bf16 kept only when clearly
  faster, and the decision stored per machine, so the same command trains in the same
  precision every time (PrecisionDecisions).
- Whether students of one architecture train as one vmapped stack (stacked.py): on CUDA, when
  a few timed steps of both ways say so.

The teacher's inference form during the students' phase is chosen in teacher_form.py.
"""
import copy
import hashlib
import json
import math
import os
import statistics
import time  # wall-clock stamps (time.strftime): when a decision was made
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kd.files.checkpoint import atomic_write_text
from kd.engine.distributed import DistInfo, all_reduce_sum
from kd.models import build_model
from kd.report.provenance import cpu_identity
from kd.engine.stacked import StudentStack, stacking_problem
from kd.engine.timing import seconds_per_call
from kd.engine.precision import autocast, choose_precision, precision_name
from kd.engine.step import train_step, train_step_stacked

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
# The choices of a run, made once per invocation

def rule_precisions(specs, device, amp, with_teacher):
    """({model name: dtype}, teacher dtype or None) by train.choose_precision's rule, which
    needs no timing: CUDA in any mode, and a CPU with --amp / --no-amp."""
    def role(spec):
        return 'teacher' if spec.name == 'teacher' else 'student'
    return ({s.name: choose_precision(role(s), device, amp) for s in specs},
            choose_precision('teacher', device, amp) if with_teacher else None)


@dataclass(frozen=True)
class Workload:
    """What the speed choices time: the run's device, one process's batch shape (N, C, H, W),
    the models' class count (for the timed labels) and the torchrun processes (DistInfo)."""
    device: torch.device
    batch_shape: tuple
    num_classes: int = 10
    dist: DistInfo = field(default_factory=DistInfo)


def decide_precisions(specs, workload, amp, teacher=None, teacher_arch=None, store=None,
                      log=print):
    """({model name: dtype}, teacher dtype or None, record) for a new run of this phase, on
    workload (a Workload).

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
    device = workload.device
    if device.type != 'cpu' or amp is not None:
        precisions, teacher_precision = rule_precisions(specs, device, amp, teacher is not None)
        source = 'rule' if amp is None else '--amp' if amp else '--no-amp'
        return precisions, teacher_precision, {'source': source, 'decisions': None}
    jobs = {(s.arch, True): (lambda s=s: build_model(s.arch, num_classes=workload.num_classes))
            for s in specs}
    if teacher is not None:
        jobs[(teacher_arch, False)] = lambda: teacher
    decisions, chosen = {}, {}
    for (arch, training), make in jobs.items():
        key = decision_key(arch, training, workload.batch_shape)
        decisions[key] = decide_one(arch, training, make, workload, store, log)
        chosen[(arch, training)] = PRECISIONS[decisions[key]['chosen']]
    sources = sorted({d['source'] for d in decisions.values()}, reverse=True)
    return ({s.name: chosen[(s.arch, True)] for s in specs},
            chosen.get((teacher_arch, False)) if teacher is not None else None,
            {'source': ' and '.join(sources), 'decisions': decisions})


def decide_one(arch, training, make, workload, store, log):
    """The decision of one architecture and mode (decide_precisions's entry): stored when every
    process has it in `store`, else measured on make() and stored."""
    dist, batch_shape = workload.dist, workload.batch_shape
    key = decision_key(arch, training, batch_shape)
    stored = store.get(key) if store is not None else None
    figures = torch.tensor([1.0] + [stored[n] for n in PRECISIONS] if stored else
                           [0.0] * (1 + len(PRECISIONS)), dtype=torch.float64)
    all_reduce_sum(figures)  # every process decides from the same figures
    if figures[0].item() == dist.world_size:
        source, decided = 'stored', stored['decided']
    else:
        figures = torch.tensor([0.0] + [v for v in measure_precisions(
            make(), batch_shape, workload.device, training, workload.num_classes).values()],
            dtype=torch.float64)
        all_reduce_sum(figures)
        source, decided = 'measured', time.strftime('%Y-%m-%d %H:%M')
    rates = {n: round(v / dist.world_size, 1)
             for n, v in zip(PRECISIONS, figures[1:].tolist())}
    name = precision_name(precision_from_rates(rates))
    kept = None
    if source == 'measured' and store is not None and dist.is_main:
        kept = store.put({key: dict(rates, chosen=name, decided=decided)})
    where = (f'stored in {store.path}; delete it to measure again' if source == 'stored'
             or kept else 'not stored')
    how = (f'decided on {decided[:10]}' if source == 'stored' else 'measured now')
    log(f"precision: {arch} ({'training' if training else 'inference'}): {name}, {how} on "
        f"this machine (fp32 {rates['fp32']:.0f} images/s, bf16 {rates['bf16']:.0f}; "
        f"bf16 only when {BF16_MIN_SPEEDUP:g}x faster); {where}")
    return dict(rates, chosen=name, source=source, decided=decided)


def decide_stacking(trainees, workload, recipe, mode, compiled, teacher=None,
                    teacher_precision=None, log=print):
    """(train the students as one vmapped stack?, record). mode: --stack-students; on / off
    decide; auto stacks on CUDA when a few timed steps of both ways (on workload's batch shape,
    with `teacher` in teacher_precision) say the stack is faster. compiled: --compile."""
    if mode == 'off' or len(trainees) < 2:
        return False, {'mode': mode, 'stacked': False}
    problem = stacking_problem(trainees, workload.dist.enabled, compiled)
    if problem:
        if mode == 'on' or any(t.distiller is not None for t in trainees):
            log(f'students: not stacked ({problem}); they train one after another')
        return False, {'mode': mode, 'stacked': False, 'why_not': problem}
    if mode == 'on':
        return True, {'mode': 'on', 'stacked': True}
    device, batch_shape = workload.device, workload.batch_shape
    if device.type != 'cuda':
        return False, {'mode': 'auto', 'stacked': False, 'why_not': 'auto stacks on CUDA only'}
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch_shape, generator=gen).to(device).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, workload.num_classes, (batch_shape[0],), generator=gen).to(device)
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
