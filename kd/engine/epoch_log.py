"""What an epoch records: the running sums of each model's loss, loss parts and right
predictions (EpochSums), the CSV log they become, and the check that stops a run whose loss
became NaN or infinite, saying which of its files are kept."""
import csv
import io

import torch

from kd.engine.distributed import all_reduce_min, all_reduce_sum
from kd.engine.signals import NonFiniteLoss, describe_position
from kd.files.checkpoint import atomic_write_text


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
