"""How long a phase will take: measured on its first steps, said once, recorded.

A user's first command may start 200 epochs on a laptop CPU; after a few dozen steps the run
says how long all of it will take, and hands the expected seconds to its caller (on_estimate),
which past an hour on a CPU suggests a quick run instead.
"""
from dataclasses import dataclass

from kd.engine.timing import Stopwatch


@dataclass(frozen=True)
class PhaseWork:
    """What a phase has ahead, as the estimate counts it."""
    epochs: int
    steps_per_epoch: int
    batch_size: int        # training images per step
    models: int            # trained together
    val_images: int
    test_images: int
    test_every: int = 1    # epochs between test evaluations
    runs: int = 1          # runs like this one in the invocation (seeds)
    final_views: int = 1   # views per image of the last epoch's evaluation (TTA)


class DurationEstimate:
    """Times the first steps of a run and prints one line: images/s and the whole phase's
    expected duration, evaluation included; then calls on_estimate(seconds, log) with the
    expected seconds (unrounded) and the log to write with (the caller's advice, if any)."""

    STEPS = 20  # steps timed (after 2 of warm-up), or the whole first epoch when shorter

    def __init__(self, phase, work, device, log, on_estimate=None):
        self.phase, self.work, self.device = phase, work, device
        self.log, self.on_estimate = log, on_estimate
        self.watch, self.steps, self.images, self.estimate = None, 0, 0, None

    def on_step(self, batch_images, out):
        """After each training step: batch_images, the images of the step (on this process);
        out, the step's outputs (unused: the stopwatch waits for the device itself)."""
        self.steps += 1
        if self.steps == 2:  # warm-up over: one-time kernel choices and allocations
            self.watch = Stopwatch(self.device).start()
            return
        if self.estimate is not None or self.watch is None:
            return
        self.images += batch_images
        if self.steps - 2 < min(self.STEPS, self.work.steps_per_epoch - 2):
            return
        seconds = self.watch.elapsed()
        per_step = seconds / (self.steps - 2)
        images_per_s = self.images / max(seconds, 1e-9)
        total = expected_seconds(self.work, per_step)
        self.estimate = {'images_per_s': round(images_per_s, 1),
                         'estimated_seconds': round(total, 1)}
        epochs, runs = self.work.epochs, self.work.runs
        seeds = f' x {runs} seeds' if runs > 1 else ''
        plural = 's' if epochs != 1 else ''
        line = (f'{self.phase}: {images_per_s:.0f} images/s; {epochs} epoch{plural}{seeds} should '
                f'take about {format_duration(total)} (training and evaluation)')
        self.log(line)
        if self.on_estimate is not None:
            self.on_estimate(total, self.log)


def expected_seconds(work, per_step):
    """The seconds of a whole PhaseWork, training and evaluation, from one step's seconds."""
    # an evaluation forward costs about a third of a training step, per image and model
    per_image_forward = per_step / max(1, work.batch_size) / 3 / work.models
    eval_images = (work.val_images + work.test_images / work.test_every) * work.models
    # test-time augmentation evaluates the last epoch's validation and test images in
    # final_views views, the single view among them
    final_extra = (work.final_views - 1) * (work.val_images + work.test_images) * work.models
    per_epoch = per_step * work.steps_per_epoch + per_image_forward * eval_images
    return (per_epoch * work.epochs + per_image_forward * final_extra) * work.runs


def format_duration(seconds):
    seconds = int(round(seconds))
    if seconds < 90:
        return f'{seconds} s'
    if seconds < 5400:
        return f'{seconds / 60:.0f} min'
    if seconds < 48 * 3600:
        return f'{seconds // 3600} h {seconds % 3600 // 60:02d} min'
    return f'{seconds / 86400:.1f} days'
