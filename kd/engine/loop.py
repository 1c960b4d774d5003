"""Training and evaluation.

One loop serves both phases: the teacher alone, or any number of students in lockstep on
identical batches (same order, same augmented images, one teacher forward per batch), so their
comparisons are paired and the data and teacher work is done once. Each student has a loss from
the registry in losses.py; the loop logs whatever parts its loss returns. Everything a loop needs
arrives as an argument; the full state is written at the end of every epoch (and at a signal) so
a run can resume where it stopped.
"""
import csv
import inspect
import io
import os
import signal
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from tqdm import tqdm

from kd.files.checkpoint import (atomic_save, atomic_write_text, capture_rng_state, plain_state_dict,
                        restore_rng_state)
from kd.engine.distributed import all_gather_cat, all_reduce_min, all_reduce_sum, any_rank, sync_batchnorm
from kd.models.features import FeatureCapture, split_output
from kd.methods.losses import get_loss
from kd.engine.progress import DurationEstimate
from kd.engine.metrics import agreement, expected_calibration_error
from kd.engine.stacked import StudentStack
from kd.engine.timing import Stopwatch
# the recipe builds the optimizer, its schedule, the weight averaging and the evaluation views;
# train.Recipe, train.lr_at, train.warmup_steps and train.make_optimizer stay importable from here
from kd.recipes.recipe import (Lookahead, Recipe, lookahead_step, lr_at, make_optimizer,  # noqa: F401
                    set_learning_rates, tta_logits, tta_view_count, warmup_steps)

STATE_FORMAT = 2  # 2: named loss parts, the selected epoch's test logits
STOP_CHECK_EVERY = 10  # batches between the ranks' agreement on a stop request (torchrun)


class TrainingInterrupted(Exception):
    def __init__(self, signum, state_path):
        super().__init__(f'stopped by signal {signum}')
        self.signum, self.state_path = signum, state_path


class NonFiniteLoss(Exception):
    pass


class StopNow(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: training stops at once, without saving. `kept` says in words
    which training states are on disk (StopSignal.describe_saved)."""

    def __init__(self, signum, kept):
        super().__init__(kept)
        self.signum, self.kept = signum, kept


class StartupInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM before training began (while measuring, loading, ...): nothing to save.

    A KeyboardInterrupt, so that no `except Exception` of the start-up swallows it."""

    def __init__(self, signum):
        super().__init__(f'stopped by signal {signum} before training')
        self.signum = signum


class StopSignal:
    """SIGINT/SIGTERM set a flag that the loop reads at the next batch boundary.

    A second signal interrupts at once with StopNow, which says what is on disk: train_phase
    records every state it starts from or saves in `saved`. While `immediate` is True (the
    start-up: timings, loading, the teacher's logits) there is nothing to save, and a signal
    raises StartupInterrupted at once instead.
    """

    def __init__(self, immediate=False):
        self.signum = None
        self.saved = {}  # state path -> (epochs finished, batches of the next, finished) or None
        self.immediate = immediate

    @property
    def requested(self):
        return self.signum is not None

    def install(self):
        self._previous = {s: signal.signal(s, self._handle)
                          for s in (signal.SIGINT, signal.SIGTERM)}

    def uninstall(self):
        for s, handler in getattr(self, '_previous', {}).items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.immediate:
            raise StartupInterrupted(signum)
        if self.signum is not None:
            raise StopNow(signum, self.describe_saved())
        self.signum = signum

    def describe_saved(self):
        """What the training states of this invocation hold, in words, or None when none has
        been saved (nor resumed from)."""
        if not any(self.saved.values()):
            return None
        parts = []
        for path, where in self.saved.items():
            if where is None:
                parts.append(f'nothing yet for {path}')
            elif where[2]:
                parts.append(f'the finished run in {path}')
            else:
                parts.append(f'{describe_position(*where[:2])} in {path}')
        return '; '.join(parts)


def describe_position(epoch, batch):
    """Where a saved state stands: 'the state of epoch 3' (epochs finished) or, saved mid-epoch,
    'the state of epoch 4 after batch 12'."""
    return f'the state of epoch {epoch + 1} after batch {batch}' if batch else \
        f'the state of epoch {epoch}'


# ---------------------------------------------------------------------------------------------
# Precision

def cuda_has_native_bf16(device=None):
    """True when the GPU computes bf16 in hardware (Ampere and newer).

    torch.cuda.is_bf16_supported() also counts emulation, which makes a T4, V100 or P100 run
    bf16 slowly in software; those get fp16 with loss scaling instead.
    """
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a PyTorch without the argument: judge by the compute capability
        return torch.cuda.get_device_capability(device)[0] >= 8


def choose_precision(model_name, device, amp=None):
    """The autocast dtype for a model, or None for float32, by rule (no measurement).

    CUDA: bf16 where the GPU has it in hardware, else fp16 (with a GradScaler), unless amp is
    False. CPU: float32 unless amp is True (bf16). In auto mode a training run on a CPU uses the
    per-machine decision instead (tuning.decide_precisions); this rule serves --evaluate and
    forced modes.
    """
    if device.type == 'cuda':
        if amp is False:
            return None
        return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
    return torch.bfloat16 if amp else None


def configure_backends(device):
    """cuDNN autotuning on CUDA: every batch has the same shape, so the search pays once."""
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True


def autocast(device, dtype):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


PRECISION_DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}  # autocast


def precision_name(dtype):
    return {d: n for n, d in PRECISION_DTYPES.items()}[dtype]


# ---------------------------------------------------------------------------------------------
# Optimisation

def no_buffer_sync_argument():
    """DDP's argument that skips broadcasting buffers before every forward: synchronised
    BatchNorm already keeps them equal on every rank. (Renamed in newer PyTorch.)"""
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    if 'forward_sync_buffers' in params:
        return {'forward_sync_buffers': False}
    return {'broadcast_buffers': False}


class Trainee:
    """A model being trained: its plain module, what the loop calls, optimizer, precision, loss.

    loss is a name from losses.LOSSES ('ce' for the baseline, 'kd', 'dkd', 'ls', ...);
    loss_params its hyper-parameters (default: the loss's own, LOSSES[loss].defaults, as on
    the command line: kd T=4 alpha=0.1, ls T=2 alpha=0.1). The recipe gives the optimizer
    (recipe.make_optimizer), the label smoothing of the hard-label term and the lookahead
    averaging (None without it).
    """

    def __init__(self, name, module, loss, recipe, device, precision=None, ddp=False,
                 compile_model=False, loss_params=None, distiller=None, points=None):
        self.name, self.precision = name, precision
        self.loss = get_loss(loss)
        self.loss_params = dict(loss_params if loss_params is not None else self.loss.defaults)
        self.module = module.to(device, memory_format=torch.channels_last)
        # a feature method's module (distillers.py): trained, synchronised and saved with the
        # student, never part of best_*.pth (self.module stays the plain student)
        self.distiller = distiller.to(device) if distiller is not None else None
        model = self.module
        if ddp:
            self.module = model = sync_batchnorm(self.module, device)
            if self.distiller is not None:
                self.distiller = sync_batchnorm(self.distiller, device)
        if self.distiller is not None:
            # one module for DDP: the distiller's parameters are reduced with the student's;
            # --compile compiles the student's forward inside it (the hooks compile with it)
            model = StudentWithDistiller(
                self.module, self.distiller, points,
                torch.compile(self.module) if compile_model else None)
        if ddp:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == 'cuda' else None,
                **no_buffer_sync_argument())
        compile_whole = compile_model and self.distiller is None
        self.train_model = torch.compile(model) if compile_whole else model
        self.eval_model = torch.compile(self.module) if compile_model else self.module
        self.optimizer = make_optimizer(self.module, recipe, extra=(
            self.distiller.parameters() if self.distiller is not None else ()))
        self.label_smoothing = recipe.label_smoothing
        self.lookahead = Lookahead(self.module) if recipe.lookahead_every else None
        # fp16 needs loss scaling; bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(device.type) if precision == torch.float16 else None

    def compute_loss(self, logits, teacher_logits, labels, epoch):
        smoothing = {'label_smoothing': self.label_smoothing} if self.label_smoothing else {}
        return self.loss.fn(logits, teacher_logits, labels, epoch=epoch, **smoothing,
                            **self.loss_params)

    def forward_loss(self, images, labels, teacher_out, batch, epoch):
        """(logits, loss, parts) of one training forward: the student and its loss, logit or
        feature method alike."""
        if self.distiller is None:
            with autocast(images.device, self.precision):
                logits = self.train_model(images)
            return (logits,) + tuple(self.compute_loss(logits, teacher_out.logits, labels, epoch))
        return self.train_model(images, labels, teacher_out, batch, epoch, self.precision,
                                self.label_smoothing)


class StudentWithDistiller(torch.nn.Module):
    """A student and its feature method's Distiller as one module, so DDP wraps (and reduces the
    gradients of) both: forward runs the student with its feature points hooked, then the
    distiller's loss. points: {name: spec} of the student's points the distiller reads;
    compiled: torch.compile(student), run instead of the student (the hooks compile with it)."""

    def __init__(self, student, distiller, points, compiled=None):
        super().__init__()
        self.student, self.distiller = student, distiller
        self.capture = FeatureCapture(student, {k: points[k] for k in distiller.student_points})
        # not a submodule: the student's parameters must appear once (to DDP, to state_dict)
        object.__setattr__(self, '_forward', compiled if compiled is not None else student)

    def forward(self, images, labels, teacher_out, batch, epoch, precision, label_smoothing):
        with autocast(images.device, precision), self.capture:
            logits = self._forward(images)
        loss, parts = self.distiller(logits, teacher_out.logits, labels,
                                     student_feats=self.capture.pop(),
                                     teacher_feats=teacher_out.feats, batch=batch, epoch=epoch,
                                     label_smoothing=label_smoothing)
        return logits, loss, parts


class StepResult(NamedTuple):
    loss: torch.Tensor     # detached scalar
    parts: dict            # name -> detached scalar (see losses.py)
    correct: torch.Tensor  # number of right top-1 predictions in the batch


class TeacherOut(NamedTuple):
    logits: torch.Tensor   # B x C float32, or None when no student needs the teacher
    feats: dict            # {point: float32 tensor}: the points some feature method reads


def teacher_outputs(teacher, images, precision):
    """The teacher's float32 logits and features (a form made with points returns
    (logits, {point: tensor})), once per batch, without autograd."""
    with torch.inference_mode(), autocast(images.device, precision):
        logits, feats = split_output(teacher(images))
    # copies made outside inference mode are ordinary tensors autograd may save
    return TeacherOut(logits.float().clone(), {k: v.float().clone() for k, v in feats.items()})


def teacher_forward(teacher, images, precision):
    """The teacher's float32 logits, once per batch, without autograd."""
    return teacher_outputs(teacher, images, precision).logits


def train_step(trainees, teacher, images, labels, recipe=None, teacher_precision=None, epoch=1,
               batch=None):
    """One optimizer step for each trainee on the same batch; the teacher runs once, if needed.

    epoch: the 1-based epoch, for losses that ramp up (DKD's warm-up). batch: the loader's
    utils.Batch (the images' training-set indices), for methods that index by sample (CRD).
    Returns a StepResult per trainee.
    """
    teacher_out = TeacherOut(None, {})
    if any(t.loss.uses_teacher for t in trainees):
        teacher_out = teacher_outputs(teacher, images, teacher_precision)
    results = []
    for t in trainees:
        logits, loss, parts = t.forward_loss(images, labels, teacher_out, batch, epoch)
        t.optimizer.zero_grad(set_to_none=True)
        if t.scaler is not None:
            t.scaler.scale(loss).backward()
            t.scaler.step(t.optimizer)
            t.scaler.update()
        else:
            loss.backward()
            t.optimizer.step()
        results.append(StepResult(loss.detach(), {k: v.detach() for k, v in parts.items()},
                                  (logits.detach().argmax(1) == labels).sum()))
    return results


def train_step_stacked(stack, teacher, images, labels, teacher_precision=None, epoch=1):
    """train_step for a stacked.StudentStack: one vmapped forward and backward for all students,
    each with its own loss; returns a StepResult per trainee, as train_step does."""
    trainees = stack.trainees
    teacher_logits = None
    if any(t.loss.uses_teacher for t in trainees):
        teacher_logits = teacher_forward(teacher, images, teacher_precision)
    with autocast(images.device, trainees[0].precision):
        logits = stack.forward(images)
    total, results = 0.0, []
    for i, t in enumerate(trainees):
        loss, parts = t.compute_loss(logits[i], teacher_logits, labels, epoch)
        total = total + loss
        results.append(StepResult(loss.detach(), {k: v.detach() for k, v in parts.items()},
                                  (logits[i].detach().argmax(1) == labels).sum()))
    stack.optimizer.zero_grad(set_to_none=True)
    total.backward()  # student i's weights get the gradient of its own loss only
    stack.optimizer.step()
    return results


# ---------------------------------------------------------------------------------------------
# Evaluation

@torch.inference_mode()
def predict(model, loader, precision=None, progress=None):
    """(float32 logits, labels) for every image of a non-augmenting loader, in dataset order.

    A loader sharded over torchrun processes gives each rank a slice of every batch; the
    slices are gathered and put back in dataset order, so every rank gets every image and the
    result equals the single-process one. progress: a description for a progress bar over the
    batches (stderr, removed when done, shown on a terminal only), or None for no bar.
    """
    logits, _, labels = predict_views(model, loader, precision, tta=False, progress=progress)
    return logits, labels


@torch.inference_mode()
def predict_views(model, loader, precision=None, tta=True, progress=None):
    """(single-view logits, test-time-augmented logits or None, labels), float32, for every
    image of a non-augmenting loader in dataset order (as predict, progress as there). tta:
    average the 6 views of recipe.tta_logits; the single view is one of them, so it costs
    nothing more."""
    was_training = model.training
    model.eval()
    outputs, labels = [], []

    def forward(x):
        with autocast(x.device, precision):
            return model(x).float()

    batches = loader if progress is None else tqdm(loader, desc=progress, leave=False,
                                                   disable=None)
    for images, y in batches:
        outputs.append(tta_logits(forward, images) if tta else (forward(images), None))
        labels.append(y)
    model.train(was_training)
    logits, labels = torch.cat([o[0] for o in outputs]), torch.cat(labels)
    averaged = torch.cat([o[1] for o in outputs]) if tta else None
    if getattr(loader, 'world_size', 1) > 1:
        order = all_gather_cat(loader.rank_indices())
        logits, labels = all_gather_cat(logits), all_gather_cat(labels)
        logits[order], labels[order] = logits.clone(), labels.clone()
        if averaged is not None:
            averaged = all_gather_cat(averaged)
            averaged[order] = averaged.clone()
    return logits, averaged, labels


def accuracy(logits, labels):
    return 100.0 * (logits.argmax(1) == labels).sum().item() / max(1, len(labels))


def evaluate(model, loader, precision=None):
    """Top-1 accuracy in percent."""
    return accuracy(*predict(model, loader, precision))


# ---------------------------------------------------------------------------------------------
# Logs

def csv_fields(part_names, tta=False):
    """The CSV columns; tta adds the test-time-augmented accuracies (filled at the last epoch)."""
    return (['epoch', 'lr', 'train_loss'] + [f'train_{p}' for p in part_names]
            + ['train_acc', 'val_acc', 'test_acc']
            + (['val_acc_tta', 'test_acc_tta'] if tta else []) + ['seconds', 'images_per_s'])


def write_csv(path, rows, fields):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fields, extrasaction='ignore')
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ('' if row.get(k) is None else row.get(k)) for k in fields})
    atomic_write_text(path, buf.getvalue())


def phase_part_names(parts_of):
    """The loss parts logged for a phase: the union over its models' parts, 'ce' first.

    parts_of: {model name: get_part_names(trainee)}. Every CSV of a phase has the same
    columns; a part a model's loss lacks stays empty."""
    names = []
    for parts in parts_of.values():
        for p in parts:
            if p not in names:
                names.append(p)
    return sorted(names, key=lambda p: p != 'ce')


def get_part_names(trainee):
    """The part names trainee's loss returns, as its registration declares them."""
    return list(trainee.loss.parts)


class EpochSums:
    """Running per-trainee sums of the loss, its parts, right predictions and images, kept on
    the device (no host sync per batch); the first batch with a non-finite loss is tracked."""

    def __init__(self, trainees, part_names, device, saved=None):
        self.keys = ['loss'] + list(part_names) + ['correct', 'count']
        self.sums = {t.name: torch.zeros(len(self.keys), dtype=torch.float64, device=device)
                     for t in trainees}
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        for name, values in (saved or {}).items():
            self.sums[name] = torch.tensor([values.get(k, 0.0) for k in self.keys],
                                           dtype=torch.float64, device=device)

    def add(self, name, batch_index, result, count):
        values = [result.loss] + [result.parts.get(k, torch.zeros((), device=result.loss.device))
                                  for k in self.keys[1:-2]]
        stacked = torch.stack([v.double() for v in values]) * count
        s = self.sums[name]
        s[:-2] += stacked
        s[-2] += result.correct.double()
        s[-1] += count
        bad = ~torch.isfinite(result.loss)
        self.first_bad = torch.where(bad & (self.first_bad < 0), batch_index, self.first_bad)

    def all_reduce(self):
        for s in self.sums.values():
            all_reduce_sum(s)

    def to_dicts(self):
        return {n: dict(zip(self.keys, s.tolist())) for n, s in self.sums.items()}

    def row(self, name, part_names_of_model):
        """The epoch's averages of one model, as CSV columns."""
        values = dict(zip(self.keys, self.sums[name].tolist()))
        count = max(1.0, values['count'])
        row = {'train_loss': values['loss'] / count, 'train_acc': 100.0 * values['correct'] / count}
        for p in self.keys[1:-2]:
            row[f'train_{p}'] = values[p] / count if p in part_names_of_model else None
        return row


# ---------------------------------------------------------------------------------------------
# The loop

@dataclass
class PhaseProgress:
    """Everything a phase has done so far: what the resume state holds besides the weights."""
    epoch: int = 0                 # epochs finished
    batch: int = 0                 # batches of epoch `epoch` done (a signal mid-epoch)
    partial: dict = None           # their sums
    elapsed: float = 0.0           # seconds in the loop, over all invocations
    best: dict = field(default_factory=dict)         # name -> {'val_acc', 'epoch'}
    history: dict = field(default_factory=dict)      # name -> [CSV row per epoch]
    best_logits: dict = field(default_factory=dict)  # name -> test logits of the selected epoch
    estimate: dict = None          # the time estimate printed early in the run
    tta: dict = field(default_factory=dict)  # name -> {'val_acc_tta', 'test_acc_tta'}, kept weights


def save_state(path, phase, trainees, progress, config, finished=False):
    """The whole training state, atomically, in a form torch.load(weights_only=True) reads."""
    atomic_save({
        'format': STATE_FORMAT, 'phase': phase, 'finished': finished,
        'epoch': progress.epoch, 'batch': progress.batch, 'partial': progress.partial,
        'elapsed': progress.elapsed, 'best': progress.best, 'history': progress.history,
        'best_logits': {n: v.cpu() for n, v in progress.best_logits.items()},
        'estimate': progress.estimate,
        'models': {t.name: plain_state_dict(t.module) for t in trainees},
        'optimizers': {t.name: t.optimizer.state_dict() for t in trainees},
        'scalers': {t.name: t.scaler.state_dict() for t in trainees if t.scaler is not None},
        'lookahead': {t.name: t.lookahead.state_dict() for t in trainees
                      if t.lookahead is not None},
        # feature methods' connectors and memories (their parameters' optimizer state is in
        # the trainee's optimizer)
        'distillers': {t.name: {k: v.cpu() for k, v in t.distiller.state_dict().items()}
                       for t in trainees if t.distiller is not None},
        'tta': progress.tta,
        'rng': capture_rng_state(), 'config': config or {},
    }, path)


def restore_state(state, trainees, device):
    """Load a saved state into the trainees; returns its PhaseProgress."""
    for t in trainees:
        t.module.load_state_dict(state['models'][t.name])
        t.optimizer.load_state_dict(state['optimizers'][t.name])
        if t.scaler is not None and state.get('scalers', {}).get(t.name):
            t.scaler.load_state_dict(state['scalers'][t.name])
        if t.lookahead is not None:
            t.lookahead.load_state_dict(state['lookahead'][t.name])
        if t.distiller is not None:
            t.distiller.load_state_dict(state['distillers'][t.name])
    restore_rng_state(state['rng'])
    return PhaseProgress(state['epoch'], state['batch'], state.get('partial'), state['elapsed'],
                         state['best'], state['history'],
                         {n: v.to(device) for n, v in state.get('best_logits', {}).items()},
                         state.get('estimate'), state.get('tta', {}))


def train_epoch(trainees, data, recipe, epoch, progress, sums, *, teacher, teacher_precision,
                stop, multi_process, bar, on_step=None, stack=None):
    """The batches of one epoch (from progress.batch on). Returns (last lr, images seen).

    Raises TrainingInterrupted (after the caller-visible sums are complete) on a stop request.
    """
    steps_per_epoch = len(data.train)
    total_steps = recipe.epochs * steps_per_epoch
    data.train.set_epoch(epoch, progress.batch)
    lr, images_seen = recipe.lr, 0
    for batch in data.train.batches():
        images, labels, batch_index = batch.images, batch.labels, batch.index
        # over several processes the ranks agree on stopping every few batches only
        if stop is not None and (batch_index % STOP_CHECK_EVERY == 0 or not multi_process) \
                and any_rank(stop.requested):
            raise _StopAt(batch_index)
        step = epoch * steps_per_epoch + batch_index
        if stack is not None:
            lr = set_learning_rates(stack.optimizer, recipe, step, steps_per_epoch)
            out = train_step_stacked(stack, teacher, images, labels, teacher_precision,
                                     epoch=epoch + 1)
        else:
            for t in trainees:
                lr = set_learning_rates(t.optimizer, recipe, step, steps_per_epoch)
            out = train_step(trainees, teacher, images, labels, recipe, teacher_precision,
                             epoch=epoch + 1, batch=batch)
            for t in trainees:  # stacks refuse recipes with lookahead (stacked.stacking_problem)
                lookahead_step(t.lookahead, t.module, recipe, step + 1, total_steps)
        for t, result in zip(trainees, out):
            sums.add(t.name, batch_index, result, len(labels))
        images_seen += len(labels)
        bar.update(1)
        if on_step is not None:
            on_step(len(labels), out)
    return lr, images_seen


class _StopAt(Exception):
    """A stop request seen before batch `batch_index` (the batches before it are done)."""

    def __init__(self, batch_index):
        super().__init__(batch_index)
        self.batch_index = batch_index


def evaluate_epoch(trainees, data, epoch, epochs, progress, run_dir, *, test_every, is_main,
                   recipe=None):
    """Validation (every epoch: it selects) and test (every test_every epochs (0: none), the
    last one, and whenever a model reaches a new best, so the selected epoch always has test
    logits).

    recipe.select 'last' keeps the last epoch's weights; recipe.tta adds, at the last epoch,
    the test-time-augmented accuracies (progress.tta). Updates progress.best / best_logits and
    writes best_<name>.pth. Returns {name: (val, test, {'val_acc_tta', 'test_acc_tta'} or {})}.
    """
    accs = {}
    keep_last = recipe is not None and recipe.select == 'last'
    tta = recipe is not None and recipe.tta != 'none' and epoch == epochs
    for t in trainees:
        views = {}
        if data.val and tta:
            val_logits, val_tta, val_labels = predict_views(t.eval_model, data.val, t.precision)
            val_acc, views['val_acc_tta'] = (accuracy(val_logits, val_labels),
                                             accuracy(val_tta, val_labels))
        else:
            val_acc = evaluate(t.eval_model, data.val, t.precision) if data.val else None
        best = progress.best.get(t.name, {'val_acc': -1.0, 'epoch': 0})
        # the first epoch with the best validation accuracy; the last one without a split
        # (or when the recipe keeps the last epoch)
        is_best = epoch == epochs if keep_last else val_acc is None or val_acc > best['val_acc']
        test_acc = None
        if is_best or (test_every and epoch % test_every == 0) or epoch == epochs:
            logits, test_tta, labels = predict_views(t.eval_model, data.test, t.precision, tta)
            test_acc = accuracy(logits, labels)
            if tta:
                views['test_acc_tta'] = accuracy(test_tta, labels)
        if views:
            progress.tta[t.name] = views
        if is_best:
            progress.best[t.name] = {'val_acc': -1.0 if val_acc is None else val_acc,
                                     'epoch': epoch}
            progress.best_logits[t.name] = logits
            if is_main:
                atomic_save(plain_state_dict(t.module), os.path.join(run_dir, f'best_{t.name}.pth'))
        accs[t.name] = (val_acc, test_acc, views)
    return accs


def train_phase(phase, trainees, data, recipe, run_dir, device, *, teacher=None,
                teacher_precision=None, config=None, resume_state=None, stop=None, dist=None,
                log=print, progress=True, epoch_callback=None, test_every=1,
                teacher_test_logits=None, runs_ahead=1, stacked=False, before_write=None,
                quick_run=None, fast_run=None):
    """Train `trainees` for recipe.epochs; write best_<name>.pth, log_<name>.csv, last_<phase>.pt.

    Selection: the epoch with the best validation accuracy (data.val), or the last epoch when
    there is no validation split. The test set is only reported, from the logits of the
    selected epoch. teacher_test_logits (students' phase): the teacher's test-set logits, for
    agreement; runs_ahead: how many runs like this one the invocation has (the time estimate
    covers them; 0: no estimate, as for the seeds after the first); stacked: train the students
    as one vmapped computation (stacked.StudentStack); before_write: called once, on the main
    process, before the run writes its first file (a run that fails before that, on a NaN in
    its first epoch say, leaves the folder as it found it); quick_run, fast_run: the commands of
    a quick run and of the fast recipe that the estimate suggests on a CPU past an hour. Lines go to `log` above the progress
    bar. Returns a summary per model.
    """
    log = above_bars(log)
    is_main = dist is None or dist.is_main
    multi_process = dist is not None and dist.enabled
    world_size = dist.world_size if dist else 1
    state_path = os.path.join(run_dir, f'last_{phase}.pt')
    parts_of = {t.name: get_part_names(t) for t in trainees}
    part_names = phase_part_names(parts_of)
    fields = csv_fields(part_names, tta=recipe.tta != 'none')
    prog = restore_state(resume_state, trainees, device) if resume_state is not None \
        else PhaseProgress()
    for t in trainees:
        prog.history.setdefault(t.name, [])
    steps_per_epoch = len(data.train)
    stack = None
    if stacked:
        stack = StudentStack(trainees, recipe)  # after the resume: it starts from its state
    timer = DurationEstimate(phase, recipe.epochs, steps_per_epoch, data, trainees, test_every,
                             runs_ahead, device, log, quick_run, fast_run=fast_run,
                             final_views=tta_view_count(recipe)) \
        if prog.estimate is None and runs_ahead else None

    def claim_folder():  # the run's first file: the folder becomes this run's only now
        nonlocal before_write
        if before_write is not None and is_main:
            before_write()
        before_write = None

    def save(finished=False):
        if is_main:
            claim_folder()
            save_state(state_path, phase, trainees, prog, config, finished)
            if stop is not None:  # what a second Ctrl-C reports as kept
                stop.saved[state_path] = (prog.epoch, prog.batch, finished)

    if stop is not None:
        stop.saved[state_path] = None if resume_state is None else (
            resume_state['epoch'], resume_state['batch'], resume_state['finished'])

    for epoch in range(prog.epoch, recipe.epochs):
        # a saved partial epoch holds the sums of all ranks: rank 0 alone takes them back
        sums = EpochSums(trainees, part_names, device,
                         prog.partial if prog.batch and is_main else None)
        watch = Stopwatch(device).start()  # the epoch's training, then with its evaluation
        bar = tqdm(total=steps_per_epoch, initial=prog.batch, leave=False,
                   desc=f'{phase} {epoch + 1}/{recipe.epochs}',
                   disable=(not progress) or (not is_main) or None)
        on_step = timer.on_step if timer is not None else None
        try:
            lr, images_seen = train_epoch(trainees, data, recipe, epoch, prog, sums,
                                          teacher=teacher, teacher_precision=teacher_precision,
                                          stop=stop, multi_process=multi_process, bar=bar,
                                          on_step=on_step, stack=stack)
        except _StopAt as s:
            bar.close()  # leave=False: it clears its line
            if stack is not None:
                stack.write_back()
            prog.elapsed += watch.elapsed()
            sums.all_reduce()  # the saved partial epoch covers every rank
            prog.batch, prog.partial = s.batch_index, sums.to_dicts()
            prog.estimate = timer.estimate if timer is not None else prog.estimate
            save()
            raise TrainingInterrupted(stop.signum or signal.SIGTERM, state_path) from None
        finally:  # also on an error: its message must not land on the bar's line
            bar.close()
        if stack is not None:  # evaluation and checkpoints read the trainees' modules
            stack.write_back()
        if timer is not None and timer.estimate is not None:
            prog.estimate, timer = timer.estimate, None
        sums.all_reduce()
        check_finite(sums, phase, epoch, steps_per_epoch,
                     kept_files(prog, run_dir, state_path, resume_state is not None))
        train_seconds = watch.elapsed()
        claim_folder()
        accs = evaluate_epoch(trainees, data, epoch + 1, recipe.epochs, prog, run_dir,
                              test_every=test_every, is_main=is_main, recipe=recipe)
        row_common = {'epoch': epoch + 1, 'lr': round(lr, 6), 'seconds': round(train_seconds, 3),
                      'images_per_s': round(images_seen * world_size / max(1e-9, train_seconds),
                                            1)}
        for t in trainees:
            val_acc, test_acc, views = accs[t.name]
            prog.history[t.name].append(dict(row_common, **sums.row(t.name, parts_of[t.name]),
                                             val_acc=val_acc, test_acc=test_acc, **views))
            if is_main:
                write_csv(os.path.join(run_dir, f'log_{t.name}.csv'), prog.history[t.name],
                          fields)
        prog.epoch, prog.batch, prog.partial = epoch + 1, 0, None
        prog.elapsed += watch.elapsed()
        save()
        log(format_epoch_line(phase, epoch + 1, recipe.epochs, lr, trainees, prog.history,
                              train_seconds, row_common['images_per_s']))
        if epoch_callback is not None:
            epoch_callback(epoch + 1, {t.name: prog.history[t.name][-1] for t in trainees})

    summary = finish_phase(trainees, data, prog, teacher_test_logits)
    save(finished=True)
    return summary


def above_bars(log):
    """`log` with the open progress bars cleared before each line and redrawn after it (tqdm's
    own way of writing while a bar is shown, as tqdm.write), so no line starts on a bar's."""
    def write(line):
        with tqdm.external_write_mode():
            log(line)
    return write


def kept_files(progress, run_dir, state_path, resumed):
    """What a run has written so far, in words, or None when nothing: the best_*.pth selected
    so far (progress.best) and the training state it last saved or resumed from."""
    kept = []
    epochs = sorted({b['epoch'] for b in progress.best.values()})
    if epochs:
        kept.append(f'the best_*.pth in {run_dir} selected in epoch{"s" * (len(epochs) > 1)} '
                    + ', '.join(map(str, epochs)))
    if progress.epoch or resumed:  # saved at the end of every epoch, or where it resumed
        kept.append(f'{describe_position(progress.epoch, progress.batch)} in {state_path}')
    return ' and '.join(kept) or None


def check_finite(sums, phase, epoch, steps_per_epoch, kept=None):
    """Stop every rank, before anything is written, when a loss became NaN or infinite.

    kept: kept_files's account of what the run has written so far (None: nothing)."""
    first_bad = sums.first_bad.reshape(1).clone()
    first_bad[first_bad < 0] = steps_per_epoch
    bad = int(all_reduce_min(first_bad).item())
    if bad < steps_per_epoch:
        what = (f'kept: {kept}. Try a lower --lr with --restart' if kept else
                'no checkpoint or training state of this run had been written. Try a lower '
                '--lr')
        raise NonFiniteLoss(f'the {phase} loss became NaN or infinite in epoch {epoch + 1}, '
                            f'batch {bad + 1}; training stopped, {what}.')


EPOCH_LINE_WIDTH = 120  # characters: a terminal's width; the CSVs hold every number


def format_epoch_line(phase, epoch, epochs, lr, trainees, history, seconds, images_per_s,
                      width=EPOCH_LINE_WIDTH):
    """The console line of one epoch, at most `width` characters whatever the number of models.

    history: {model name: [CSV row per epoch]} (accuracies in %, None where not measured).
    The most detail that fits: every model's training loss and accuracy with its validation
    and test accuracy; else every model's validation / test accuracy; else the baseline, the
    distilled student best on validation this epoch (named) and the count and range of the
    others (without a validation split: on the test accuracy, or the training accuracy in an
    epoch without a test).
    """
    rows = {t.name: history[t.name][-1] for t in trainees}
    head = f'{phase:<8} {epoch:>{len(str(epochs))}}/{epochs} lr {lr:6.4f}'
    speed = f'{seconds:6.1f}s {images_per_s:5.0f} img/s'
    name_width = max(len(n) for n in rows)

    def acc(value):
        return '     -' if value is None else f'{value:6.2f}'

    full = [f"{n:<{name_width}} loss {r['train_loss']:6.3f} train {r['train_acc']:6.2f} "
            f"val {acc(r['val_acc'])} test {acc(r['test_acc'])}" for n, r in rows.items()]
    by_model = ['val/test ' + ' · '.join(f"{n} {acc(r['val_acc'])}/{acc(r['test_acc'])}"
                                         for n, r in rows.items())]
    for parts in (full, by_model):
        line = ' | '.join([head, *parts, speed])
        if len(line) <= width:
            return line

    key = next((k for k in ('val_acc', 'test_acc', 'train_acc')
                if all(r[k] is not None for r in rows.values())), 'train_acc')
    what = {'val_acc': 'val', 'test_acc': 'test', 'train_acc': 'train acc.'}[key]
    distilled = sorted((n for n in rows if n != 'student_base'), key=lambda n: -rows[n][key])
    best, others = distilled[0], distilled[1:]

    def summary(name):
        parts = [f"baseline {rows['student_base'][key]:5.2f}"] if 'student_base' in rows else []
        parts.append(f'best {name} {rows[best][key]:5.2f}')
        values = [rows[n][key] for n in others]
        if len(others) == 1:
            parts.append(f'1 other {values[0]:5.2f}')
        elif others:
            parts.append(f'{len(others)} others {min(values):5.2f}–{max(values):5.2f}')
        return ' | '.join([head, f'{what} ' + ', '.join(parts), speed])

    # the name padded to the longest one keeps the line's width from epoch to epoch; it is cut
    # (…) only when even the name alone would not fit
    room = width - len(summary(''))
    name = best if len(best) <= room else best[:max(1, room - 1)] + '…'
    return summary(f'{name:<{min(max(len(n) for n in distilled), max(room, 1))}}')


def finish_phase(trainees, data, progress, teacher_test_logits=None):
    """The summary of each model: the selected epoch's test metrics, from its kept logits."""
    labels = data.test.labels
    summary = {}
    for t in trainees:
        logits = progress.best_logits[t.name]
        last = progress.history[t.name][-1] if progress.history[t.name] else {}
        best = progress.best[t.name]
        entry = {
            'test_acc': accuracy(logits, labels), 'last_test_acc': last.get('test_acc'),
            'best_epoch': best['epoch'],
            'best_val_acc': best['val_acc'] if best['val_acc'] >= 0 else None,
            'params': sum(p.numel() for p in t.module.parameters()),
            'ece': expected_calibration_error(logits, labels),
            'precision': precision_name(t.precision),
            'loss': t.loss.name, 'loss_params': t.loss_params,
            # test-time augmentation (recipe.tta) of the kept weights, beside the single view
            **progress.tta.get(t.name, {}),
        }
        if teacher_test_logits is not None:
            entry.update(agreement(teacher_test_logits, logits))
        summary[t.name] = entry
    if teacher_test_logits is not None:
        summary['teacher_in_use'] = {
            'test_acc': accuracy(teacher_test_logits, labels),
            'ece': expected_calibration_error(teacher_test_logits, labels)}
    return {'models': summary, 'elapsed_seconds': round(progress.elapsed, 2),
            'epochs_run': progress.epoch, 'estimate': progress.estimate,
            'test_logits': dict(progress.best_logits)}
