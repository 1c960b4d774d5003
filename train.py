"""Training and evaluation.

One loop serves both phases: the teacher alone, or the KD student and the baseline student in
lockstep on identical batches (same order, same augmented images, one teacher forward per batch),
so their comparison is paired and the data work is done once. Everything a loop needs arrives as
an argument; the full state is written at the end of every epoch (and at a signal) so a run can
resume where it stopped.
"""
import csv
import io
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import (atomic_save, atomic_write_text, capture_rng_state, load_weights,
                        plain_state_dict, restore_rng_state)
from distributed import all_gather_cat, all_reduce_min, all_reduce_sum, any_rank, sync_batchnorm
from utils import kd_loss_terms

STATE_FORMAT = 1
STOP_CHECK_EVERY = 10  # batches between the ranks' agreement on a stop request (torchrun)


@dataclass
class Recipe:
    """One recipe for all three models (lr is for the global batch)."""
    epochs: int = 200
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_fraction: float = 0.03   # of all steps (but see warmup_steps), then cosine to zero
    temperature: float = 4.0
    alpha: float = 0.1


class TrainingInterrupted(Exception):
    def __init__(self, signum, state_path):
        super().__init__(f'stopped by signal {signum}')
        self.signum, self.state_path = signum, state_path


class NonFiniteLoss(Exception):
    pass


class StopSignal:
    """SIGINT/SIGTERM set a flag that the loop reads at the next batch boundary.

    A second signal interrupts at once (the state of the last finished epoch is kept on disk).
    """

    def __init__(self):
        self.signum = None

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
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


# ---------------------------------------------------------------------------------------------
# Precision

def cpu_has_fast_bf16():
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    for probe in ('_is_amx_tile_supported', '_is_avx512_bf16_supported'):
        try:
            if getattr(torch.cpu, probe)():
                return True
        except Exception:
            pass
    return False


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
    """The autocast dtype for a model, or None for float32.

    CUDA: bf16 where the GPU has it in hardware, else fp16 (with a GradScaler), unless amp is
    False. CPU, amp None (auto):
    bf16 only for the teacher and only on CPUs with bf16 instructions, because that is where it
    measured faster (bench/bench.py); on an AVX2-only CPU bf16 is 10x slower, and the small CNN
    got slower with bf16 even where the ResNet got faster. amp True / False forces it.
    """
    if device.type == 'cuda':
        if amp is False:
            return None
        return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
    if amp is None:
        return torch.bfloat16 if model_name == 'teacher' and cpu_has_fast_bf16() else None
    return torch.bfloat16 if amp else None


def configure_backends(device):
    """cuDNN autotuning on CUDA: every batch has the same shape, so the search pays once."""
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True


def autocast(device, dtype):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def precision_name(dtype):
    return {None: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}[dtype]


# ---------------------------------------------------------------------------------------------
# Optimisation

def warmup_steps(recipe, steps_per_epoch):
    """warmup_fraction of all steps, but at least one epoch (at most a fifth of the run).

    Short runs would otherwise jump to the peak lr within a step or two, which made both
    networks diverge in 3-epoch runs on 2,000 images.
    """
    total = recipe.epochs * steps_per_epoch
    return max(1, round(max(recipe.warmup_fraction * total, min(steps_per_epoch, 0.2 * total))))


def lr_at(step, total_steps, warmup_steps, peak_lr):
    """Linear warm-up to peak_lr over warmup_steps, then cosine to zero at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, recipe):
    return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                           nesterov=True, weight_decay=recipe.weight_decay)


def no_buffer_sync_argument():
    """DDP's argument that skips broadcasting buffers before every forward: synchronised
    BatchNorm already keeps them equal on every rank. (Renamed in newer PyTorch.)"""
    import inspect
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    if 'forward_sync_buffers' in params:
        return {'forward_sync_buffers': False}
    return {'broadcast_buffers': False}


class Trainee:
    """A model being trained: its plain module, what the loop calls, optimizer and precision.

    loss_kind is 'ce' (cross-entropy on labels) or 'kd' (kd_loss against the teacher).
    """

    def __init__(self, name, module, loss_kind, recipe, device, precision=None, ddp=False,
                 compile_model=False):
        self.name, self.loss_kind, self.precision = name, loss_kind, precision
        self.module = module.to(device, memory_format=torch.channels_last)
        model = self.module
        if ddp:
            self.module = model = sync_batchnorm(self.module, device)
            model = torch.nn.parallel.DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == 'cuda' else None,
                **no_buffer_sync_argument())
        self.train_model = torch.compile(model) if compile_model else model
        self.eval_model = torch.compile(self.module) if compile_model else self.module
        self.optimizer = make_optimizer(self.module, recipe)
        # fp16 needs loss scaling; bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(device.type) if precision == torch.float16 else None


def train_step(trainees, teacher, images, labels, recipe, teacher_precision=None):
    """One optimizer step for each trainee on the same batch; the teacher runs once.

    Returns, per trainee, detached (loss, ce, kd or None, number correct) tensors.
    """
    device = images.device
    teacher_logits = None
    if any(t.loss_kind == 'kd' for t in trainees):
        with torch.inference_mode(), autocast(device, teacher_precision):
            teacher_logits = teacher(images)
        # a copy made outside inference mode is an ordinary tensor autograd may save
        teacher_logits = teacher_logits.float().clone()
    results = []
    for t in trainees:
        with autocast(device, t.precision):
            logits = t.train_model(images)
        if t.loss_kind == 'kd':
            loss, ce, kd = kd_loss_terms(logits, teacher_logits, labels, recipe.temperature,
                                         recipe.alpha)
        else:
            loss, kd = F.cross_entropy(logits.float(), labels), None
            ce = loss
        t.optimizer.zero_grad(set_to_none=True)
        if t.scaler is not None:
            t.scaler.scale(loss).backward()
            t.scaler.step(t.optimizer)
            t.scaler.update()
        else:
            loss.backward()
            t.optimizer.step()
        correct = (logits.detach().argmax(1) == labels).sum()
        results.append((loss.detach(), ce.detach(), None if kd is None else kd.detach(), correct))
    return results


# ---------------------------------------------------------------------------------------------
# Evaluation

@torch.inference_mode()
def predict(model, loader, precision=None):
    """(float32 logits, labels) for every image of a non-augmenting loader.

    A loader sharded over torchrun processes gives each rank a slice of every batch; the
    slices are gathered, so every rank gets every image (in an order that differs from the
    single-process one) and the metrics agree across ranks and with a single process.
    """
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for images, y in loader:
        with autocast(images.device, precision):
            logits.append(model(images).float())
        labels.append(y)
    model.train(was_training)
    logits, labels = torch.cat(logits), torch.cat(labels)
    if getattr(loader, 'world_size', 1) > 1:
        logits, labels = all_gather_cat(logits), all_gather_cat(labels)
    return logits, labels


def accuracy(logits, labels):
    return 100.0 * (logits.argmax(1) == labels).sum().item() / max(1, len(labels))


def evaluate(model, loader, precision=None):
    """Top-1 accuracy in percent."""
    return accuracy(*predict(model, loader, precision))


# ---------------------------------------------------------------------------------------------
# The loop

CSV_FIELDS = ['epoch', 'lr', 'train_loss', 'train_ce', 'train_kd', 'train_acc', 'val_acc',
              'test_acc', 'seconds', 'images_per_s']


def write_csv(path, rows):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_FIELDS, extrasaction='ignore')
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ('' if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})
    atomic_write_text(path, buf.getvalue())


class _EpochSums:
    """Running per-trainee sums kept on the device (no host sync per batch)."""

    def __init__(self, names, device, saved=None):
        self.sums = {n: torch.zeros(5, dtype=torch.float64, device=device) for n in names}
        # loss, ce, kd, correct, count
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        if saved:
            for n, values in saved.items():
                self.sums[n] = torch.tensor(values, dtype=torch.float64, device=device)

    def add(self, name, batch_index, loss, ce, kd, correct, count):
        s = self.sums[name]
        s[0] += loss.double() * count
        s[1] += ce.double() * count
        if kd is not None:
            s[2] += kd.double() * count
        s[3] += correct.double()
        s[4] += count
        bad = ~torch.isfinite(loss)
        self.first_bad = torch.where(bad & (self.first_bad < 0), batch_index, self.first_bad)

    def to_lists(self):
        return {n: s.tolist() for n, s in self.sums.items()}


def train_phase(phase, trainees, data, recipe, run_dir, device, *, teacher=None,
                teacher_precision=None, config=None, resume_state=None, stop=None, dist=None,
                log=print, progress=True, epoch_callback=None):
    """Train `trainees` for recipe.epochs; write best_<name>.pth, log_<name>.csv, last_<phase>.pt.

    Selection: the epoch with the best validation accuracy (data.val), or the last epoch when
    there is no validation split. The test set is only reported. Returns a summary per model.
    """
    is_main = dist is None or dist.is_main
    multi_process = dist is not None and dist.enabled
    names = [t.name for t in trainees]
    steps_per_epoch = len(data.train)
    total_steps = recipe.epochs * steps_per_epoch
    n_warmup = warmup_steps(recipe, steps_per_epoch)
    state_path = os.path.join(run_dir, f'last_{phase}.pt')
    best = {n: {'val_acc': -1.0, 'epoch': 0} for n in names}
    history = {n: [] for n in names}
    start_epoch, start_batch, saved_sums, elapsed = 0, 0, None, 0.0
    if resume_state is not None:
        for t in trainees:
            t.module.load_state_dict(resume_state['models'][t.name])
            t.optimizer.load_state_dict(resume_state['optimizers'][t.name])
            if t.scaler is not None and resume_state.get('scalers', {}).get(t.name):
                t.scaler.load_state_dict(resume_state['scalers'][t.name])
        best, history = resume_state['best'], resume_state['history']
        start_epoch, start_batch = resume_state['epoch'], resume_state['batch']
        saved_sums, elapsed = resume_state.get('partial'), resume_state['elapsed']
        restore_rng_state(resume_state['rng'])

    def save_state(epoch, batch, sums, finished=False):
        if not is_main:
            return
        atomic_save({
            'format': STATE_FORMAT, 'phase': phase, 'finished': finished,
            'epoch': epoch, 'batch': batch, 'partial': sums, 'elapsed': elapsed,
            'models': {t.name: plain_state_dict(t.module) for t in trainees},
            'optimizers': {t.name: t.optimizer.state_dict() for t in trainees},
            'scalers': {t.name: t.scaler.state_dict() for t in trainees if t.scaler is not None},
            'best': best, 'history': history, 'rng': capture_rng_state(), 'config': config or {},
        }, state_path)

    for epoch in range(start_epoch, recipe.epochs):
        data.train.set_epoch(epoch, start_batch)
        # a saved partial epoch holds the sums of all ranks: rank 0 alone takes them back
        sums = _EpochSums(names, device, saved_sums if start_batch and is_main else None)
        t0, images_seen = time.time(), 0
        bar = tqdm(total=steps_per_epoch, initial=start_batch, leave=False,
                   desc=f'{phase} {epoch + 1}/{recipe.epochs}',
                   disable=(not progress) or (not is_main) or None)
        lr = recipe.lr
        for batch_index, (images, labels) in enumerate(data.train, start=start_batch):
            # over several processes the ranks agree on stopping every few batches only
            if stop is not None and (batch_index % STOP_CHECK_EVERY == 0 or not multi_process) \
                    and any_rank(stop.requested):
                elapsed += time.time() - t0
                for s in sums.sums.values():  # the saved partial epoch covers every rank
                    all_reduce_sum(s)
                save_state(epoch, batch_index, sums.to_lists())
                bar.close()
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, state_path)
            step = epoch * steps_per_epoch + batch_index
            lr = lr_at(step, total_steps, n_warmup, recipe.lr)
            for t in trainees:
                for group in t.optimizer.param_groups:
                    group['lr'] = lr
            out = train_step(trainees, teacher, images, labels, recipe, teacher_precision)
            for t, (loss, ce, kd, correct) in zip(trainees, out):
                sums.add(t.name, batch_index, loss, ce, kd, correct, len(labels))
            images_seen += len(labels)
            bar.update(1)
            if batch_index % 20 == 0 and bar.disable is False:
                bar.set_postfix(loss=f'{out[0][0].item():.3f}',
                                img_s=f'{images_seen / max(1e-9, time.time() - t0):.0f}')
        bar.close()
        start_batch, saved_sums = 0, None
        for s in sums.sums.values():
            all_reduce_sum(s)
        # the first bad batch on any rank: every rank stops, before writing anything
        first_bad = sums.first_bad.reshape(1).clone()
        first_bad[first_bad < 0] = steps_per_epoch
        bad = int(all_reduce_min(first_bad).item())
        if bad < steps_per_epoch:
            raise NonFiniteLoss(f'the {phase} loss became NaN or infinite in epoch {epoch + 1}, '
                                f'batch {bad + 1}; training stopped and the checkpoints of the '
                                f'last good epoch are kept. Try a lower --lr.')
        train_seconds = time.time() - t0
        row_common = {'epoch': epoch + 1, 'lr': round(lr, 6), 'seconds': round(train_seconds, 3),
                      'images_per_s': round(images_seen * (dist.world_size if dist else 1)
                                            / max(1e-9, train_seconds), 1)}
        for t in trainees:
            s = sums.sums[t.name].tolist()
            count = max(1.0, s[4])
            val_acc = evaluate(t.eval_model, data.val, t.precision) if data.val else None
            test_acc = evaluate(t.eval_model, data.test, t.precision)
            history[t.name].append(dict(
                row_common, train_loss=s[0] / count, train_ce=s[1] / count,
                train_kd=s[2] / count if t.loss_kind == 'kd' else None,
                train_acc=100.0 * s[3] / count, val_acc=val_acc, test_acc=test_acc))
            # the first epoch with the best validation accuracy; the last one without a split
            if val_acc is None or val_acc > best[t.name]['val_acc']:
                best[t.name] = {'val_acc': -1.0 if val_acc is None else val_acc,
                                'epoch': epoch + 1}
                if is_main:
                    atomic_save(plain_state_dict(t.module),
                                os.path.join(run_dir, f'best_{t.name}.pth'))
            if is_main:
                write_csv(os.path.join(run_dir, f'log_{t.name}.csv'), history[t.name])
        elapsed += time.time() - t0
        save_state(epoch + 1, 0, None)
        log(format_epoch_line(phase, epoch + 1, recipe.epochs, lr, trainees, history,
                              train_seconds, row_common['images_per_s']))
        if epoch_callback is not None:
            epoch_callback(epoch + 1, {t.name: history[t.name][-1] for t in trainees})

    return finish_phase(phase, trainees, data, run_dir, best, history, teacher,
                        teacher_precision, elapsed, save_state, dist)


def format_epoch_line(phase, epoch, epochs, lr, trainees, history, seconds, images_per_s):
    """One fixed-width line per epoch."""
    width = len(str(epochs))
    parts = [f'{phase:<8} {epoch:>{width}}/{epochs} lr {lr:6.4f}']
    for t in trainees:
        row = history[t.name][-1]
        val = f"{row['val_acc']:6.2f}" if row['val_acc'] is not None else '     -'
        parts.append(f"{t.name:<12} loss {row['train_loss']:6.3f} train {row['train_acc']:6.2f} "
                     f"val {val} test {row['test_acc']:6.2f}")
    parts.append(f'{seconds:7.1f}s {images_per_s:7.0f} img/s')
    return ' | '.join(parts)


def finish_phase(phase, trainees, data, run_dir, best, history, teacher, teacher_precision,
                 elapsed, save_state, dist):
    """Reload the selected weights, measure them on the test set, mark the state finished."""
    from distributed import barrier
    from report import agreement, expected_calibration_error
    barrier()  # rank 0 has written every best_*.pth
    teacher_logits = None
    if teacher is not None:
        teacher_logits, _ = predict(teacher, data.test, teacher_precision)
    summary = {}
    for t in trainees:
        last_test = history[t.name][-1]['test_acc'] if history[t.name] else None
        load_weights(t.module, os.path.join(run_dir, f'best_{t.name}.pth'))
        logits, labels = predict(t.eval_model, data.test, t.precision)
        entry = {
            'test_acc': accuracy(logits, labels), 'last_test_acc': last_test,
            'best_epoch': best[t.name]['epoch'],
            'best_val_acc': best[t.name]['val_acc'] if best[t.name]['val_acc'] >= 0 else None,
            'params': sum(p.numel() for p in t.module.parameters()),
            'ece': expected_calibration_error(logits, labels),
            'precision': precision_name(t.precision),
        }
        if teacher_logits is not None:
            entry.update(agreement(teacher_logits, logits))
        summary[t.name] = entry
    if teacher_logits is not None:
        summary['teacher_in_use'] = {'test_acc': accuracy(teacher_logits, labels)}
    save_state(len(history[trainees[0].name]), 0, None, finished=True)
    return {'models': summary, 'elapsed_seconds': round(elapsed, 2),
            'epochs_run': len(history[trainees[0].name])}
