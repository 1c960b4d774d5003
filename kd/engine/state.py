"""A phase's saved state: what it has done so far (PhaseProgress) and the state file that holds
it with the weights, optimizers and random state, so a run resumes where it stopped."""
from dataclasses import dataclass, field

from kd.files.checkpoint import atomic_save, capture_rng_state, plain_state_dict, restore_rng_state

STATE_FORMAT = 2  # 2: named loss parts, the selected epoch's test logits


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
    """The whole training state, atomically, in a form torch.load(weights_only=True) reads.

    config: what the run records about itself, opaque here: a dict, or a record with to_dict()
    (saved as its dict), or None."""
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
        'rng': capture_rng_state(), 'config': recorded_config(config),
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



def recorded_config(config):
    """The config as the state file holds it: a plain dict ({} for None)."""
    if hasattr(config, 'to_dict'):
        return config.to_dict()
    return config or {}
