"""--tensorboard: the per-epoch scalars of every model and seed in OUT_DIR/tensorboard/<phase>."""
import os


def open_tensorboard(out_dir, on, phase, log):
    """A SummaryWriter into OUT_DIR/tensorboard/<phase> (one run per phase, as the folder
    holds), or None when not on (--tensorboard) or when tensorboard is not installed."""
    if not on:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: needs tensorboard
    except ImportError:
        log('tensorboard is not installed: --tensorboard is ignored (pip install tensorboard)')
        return None
    return SummaryWriter(os.path.join(out_dir, 'tensorboard', phase))


def log_tensorboard(writer, phase, seed, epoch, rows):
    for model, row in rows.items():
        for key, value in row.items():
            if key != 'epoch' and value is not None:
                writer.add_scalar(f'seed{seed}/{model}/{key}', value, epoch)
    writer.flush()
