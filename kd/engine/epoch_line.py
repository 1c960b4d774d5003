"""The console line of an epoch, and logging above the progress bars."""
from typing import NamedTuple

from tqdm import tqdm


class EpochStats(NamedTuple):
    """An epoch's numbers beside the models' rows, as measured (the CSV rounds them)."""
    epoch: int            # 1-based
    epochs: int           # of the phase
    lr: float             # the last step's learning rate
    seconds: float        # the epoch's training
    images_per_s: float   # over all processes


EPOCH_LINE_WIDTH = 120  # characters: a terminal's width; the CSVs hold every number


def format_epoch_line(phase, stats, rows, width=EPOCH_LINE_WIDTH):
    """The console line of one epoch, at most `width` characters whatever the number of models.

    stats: the epoch's EpochStats; rows: {model name: its CSV row of the epoch} (accuracies in
    %, None where not measured), in the trainees' order.
    The most detail that fits: every model's training loss and accuracy with its validation
    and test accuracy; else every model's validation / test accuracy; else the baseline, the
    distilled student best on validation this epoch (named) and the count and range of the
    others (without a validation split: on the test accuracy, or the training accuracy in an
    epoch without a test).
    """
    epoch, epochs = stats.epoch, stats.epochs
    head = f'{phase:<8} {epoch:>{len(str(epochs))}}/{epochs} lr {stats.lr:6.4f}'
    speed = f'{stats.seconds:6.1f}s {stats.images_per_s:5.0f} img/s'
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



def above_bars(log):
    """`log` with the open progress bars cleared before each line and redrawn after it (tqdm's
    own way of writing while a bar is shown, as tqdm.write), so no line starts on a bar's."""
    def write(line):
        with tqdm.external_write_mode():
            log(line)
    return write
