"""How long a phase will take: measured on its first steps, said once, recorded.

A user's first command may start 200 epochs on a laptop CPU; after a few dozen steps the run
says how long all of it will take, and past an hour on a CPU it suggests a quick run instead.
"""
from kd.engine.timing import Stopwatch


class DurationEstimate:
    """Times the first steps of a run and prints one line: images/s and the whole phase's
    expected duration, evaluation included; on a CPU, past an hour, the commands of a quick run
    and of the fast recipe (quick_run, fast_run: command lines, each printed on its own line,
    ready to paste)."""

    STEPS = 20  # steps timed (after 2 of warm-up), or the whole first epoch when shorter

    def __init__(self, phase, epochs, steps_per_epoch, data, trainees, test_every, runs_ahead,
                 device, log, quick_run=None, final_views=1, fast_run=None):
        self.phase, self.epochs, self.steps_per_epoch = phase, epochs, steps_per_epoch
        self.final_views = final_views  # views per image of the last epoch's evaluation (TTA)
        self.data, self.trainees, self.test_every = data, trainees, test_every
        self.runs_ahead, self.device, self.log = runs_ahead, device, log
        self.quick_run, self.fast_run = quick_run or [], fast_run or []
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
        if self.steps - 2 < min(self.STEPS, self.steps_per_epoch - 2):
            return
        seconds = self.watch.elapsed()
        per_step = seconds / (self.steps - 2)
        images_per_s = self.images / max(seconds, 1e-9)
        # an evaluation forward costs about a third of a training step, per image and model
        per_image_forward = per_step / max(1, self.data.train.batch_size) / 3 / len(self.trainees)
        eval_images = (self.data.num_val + self.data.num_test / self.test_every) \
            * len(self.trainees)
        # test-time augmentation evaluates the last epoch's validation and test images in
        # final_views views, the single view among them
        final_extra = (self.final_views - 1) * (self.data.num_val + self.data.num_test) \
            * len(self.trainees)
        per_epoch = per_step * self.steps_per_epoch + per_image_forward * eval_images
        total = (per_epoch * self.epochs + per_image_forward * final_extra) * self.runs_ahead
        self.estimate = {'images_per_s': round(images_per_s, 1),
                         'estimated_seconds': round(total, 1)}
        runs = f' x {self.runs_ahead} seeds' if self.runs_ahead > 1 else ''
        line = (f'{self.phase}: {images_per_s:.0f} images/s; {self.epochs} epoch{"s" if self.epochs != 1 else ""}{runs} should '
                f'take about {format_duration(total)} (training and evaluation)')
        self.log(line)
        if self.device.type == 'cpu' and total > 3600 and self.quick_run:
            self.log('On a CPU, try the pipeline on part of the data first, in its own folder:')
            for command in self.quick_run:
                self.log(f'  {command}')
            if self.fast_run:
                self.log('Or the fast recipe (airbench94\'s techniques, 10 '
                         'epochs), in its own folder:')
                for command in self.fast_run:
                    self.log(f'  {command}')


def format_duration(seconds):
    seconds = int(round(seconds))
    if seconds < 90:
        return f'{seconds} s'
    if seconds < 5400:
        return f'{seconds / 60:.0f} min'
    if seconds < 48 * 3600:
        return f'{seconds // 3600} h {seconds % 3600 // 60:02d} min'
    return f'{seconds / 86400:.1f} days'
