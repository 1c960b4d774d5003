"""How a run stops: the interrupt exceptions and the SIGINT/SIGTERM flag the loop reads.

The command line catches these (main.py): a first signal stops at the next batch boundary and
saves the state (TrainingInterrupted), a second stops at once (StopNow), one before training
began has nothing to save (StartupInterrupted); a NaN or infinite loss is NonFiniteLoss.
"""
import signal


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
