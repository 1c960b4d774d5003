"""The training loop.

One loop serves both phases: the teacher alone, or any number of students in lockstep on
identical batches (same order, same augmented images, one teacher forward per batch), so their
comparisons are paired and the data and teacher work is done once. Each student has a loss from
the registry in kd/methods/losses.py; the loop logs whatever parts its loss returns. Everything
a loop needs arrives as an argument (LoopOptions, LoopCallbacks, PhaseFiles); how a batch trains
the models is the stepper's (step.py); the full state is written at the end of every epoch (and
at a signal) so a run can resume where it stopped.
"""
import os
import signal
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from kd.engine.distributed import any_rank
from kd.engine.epoch_line import EpochStats, above_bars, format_epoch_line
from kd.engine.epoch_log import (EpochSums, check_finite, csv_fields, get_part_names, kept_files,
                                 phase_part_names, write_csv)
from kd.engine.progress import DurationEstimate, PhaseWork
from kd.engine.selection import evaluate_epoch, finish_phase
from kd.engine.signals import TrainingInterrupted
from kd.engine.state import PhaseProgress, restore_state, save_state
from kd.engine.step import NO_TEACHER, LockstepSteps
from kd.engine.timing import Stopwatch
from kd.recipes.tta import tta_view_count


STOP_CHECK_EVERY = 10  # batches between the ranks' agreement on a stop request (torchrun)


@dataclass(frozen=True)
class LoopOptions:
    """How the loop runs a phase."""
    device: torch.device
    dist: object = None       # torchrun's distributed.DistInfo (None: one process)
    test_every: int = 1       # epochs between test evaluations (0: the selected and last only)
    # how many runs like this one the invocation has: the time estimate covers them (0: no
    # estimate, as for the seeds after the first)
    runs_ahead: int = 1
    progress_bar: bool = True
    # the stepper's factory, (trainees, recipe) -> stepper (step.py), called after a resume so
    # that it starts from the restored state: step.LockstepSteps, or stacked.StudentStack to
    # train the students as one vmapped computation
    steps: Callable = LockstepSteps


@dataclass(frozen=True)
class LoopCallbacks:
    """What the loop calls back, and the stop flag it reads."""
    log: Callable = print          # a line of text, written above the progress bar
    # signals.StopSignal: read at batch boundaries; each state saved is noted in its `saved`
    stop: object = None
    # called once, on the main process, before the run's first file (a run that fails before
    # that, on a NaN in its first epoch say, leaves the folder as it found it)
    before_write: Callable = None
    on_epoch: Callable = None      # on_epoch(epoch, {name: CSV row}) after each epoch
    on_estimate: Callable = None   # on_estimate(seconds, log) once the time estimate is known


@dataclass(frozen=True)
class PhaseFiles:
    """Where a phase writes, what its state files record and the state it resumes from."""
    run_dir: str
    config: object = None        # saved in the state, opaque here (a dict or one with to_dict())
    resume_state: dict = None    # a state saved by an earlier run (state.save_state), or None


def train_phase(phase, trainees, data, recipe, files, *, options, teacher=None,
                callbacks=LoopCallbacks()):
    """Train `trainees` for recipe.epochs; write best_<name>.pth, log_<name>.csv, last_<phase>.pt
    into files.run_dir.

    Selection: the epoch with the best validation accuracy (data.val), or the last epoch when
    there is no validation split. The test set is only reported, from the logits of the
    selected epoch. teacher: the students' step.PhaseTeacher (its test_logits give the
    agreement); None in the teacher's phase. Returns a summary per model.
    """
    return _PhaseRun(phase, trainees, data, recipe, files, teacher, options, callbacks).run()


class _StopAt(Exception):
    """A stop request seen before batch `batch_index` (the batches before it are done)."""

    def __init__(self, batch_index):
        super().__init__(batch_index)
        self.batch_index = batch_index


class _PhaseRun:
    """One call of train_phase: its progress, stepper, time estimate and files."""

    def __init__(self, phase, trainees, data, recipe, files, teacher, options, callbacks):
        self.phase, self.trainees, self.data, self.recipe = phase, trainees, data, recipe
        self.files, self.options, self.callbacks = files, options, callbacks
        self.teacher = teacher if teacher is not None else NO_TEACHER
        self.log, self.stop = above_bars(callbacks.log), callbacks.stop
        self._before_write = callbacks.before_write
        dist = options.dist
        self.is_main = dist is None or dist.is_main
        self.multi_process = dist is not None and dist.enabled
        self.world_size = dist.world_size if dist else 1
        self.state_path = os.path.join(files.run_dir, f'last_{phase}.pt')
        self.parts_of = {t.name: get_part_names(t) for t in trainees}
        self.part_names = phase_part_names(self.parts_of)
        self.fields = csv_fields(self.part_names, tta=recipe.tta != 'none')
        resume = files.resume_state
        self.prog = restore_state(resume, trainees, options.device) if resume is not None \
            else PhaseProgress()
        for t in trainees:
            self.prog.history.setdefault(t.name, [])
        self.steps_per_epoch = len(data.train)
        self.stepper = options.steps(trainees, recipe)  # after the resume: from its state
        self.timer = self._duration_estimate() \
            if self.prog.estimate is None and options.runs_ahead else None
        if self.stop is not None:
            self.stop.saved[self.state_path] = None if resume is None else (
                resume['epoch'], resume['batch'], resume['finished'])

    def _duration_estimate(self):
        data, options = self.data, self.options
        work = PhaseWork(self.recipe.epochs, self.steps_per_epoch, data.train.batch_size,
                         len(self.trainees), data.num_val, data.num_test, options.test_every,
                         options.runs_ahead, tta_view_count(self.recipe))
        return DurationEstimate(self.phase, work, options.device, self.log,
                                self.callbacks.on_estimate)

    def run(self):
        for epoch in range(self.prog.epoch, self.recipe.epochs):
            self.run_epoch(epoch)
        summary = finish_phase(self.trainees, self.data, self.prog, self.teacher.test_logits)
        self.save(finished=True)
        return summary

    def claim_folder(self):
        """The run's first file: the folder becomes this run's only now."""
        if self._before_write is not None and self.is_main:
            self._before_write()
        self._before_write = None

    def save(self, finished=False):
        if self.is_main:
            self.claim_folder()
            save_state(self.state_path, self.phase, self.trainees, self.prog, self.files.config,
                       finished)
            if self.stop is not None:  # what a second Ctrl-C reports as kept
                self.stop.saved[self.state_path] = (self.prog.epoch, self.prog.batch, finished)

    def run_epoch(self, epoch):
        """Train, check, evaluate, log and save one epoch (0-based)."""
        prog, device = self.prog, self.options.device
        # a saved partial epoch holds the sums of all ranks: rank 0 alone takes them back
        sums = EpochSums(self.trainees, self.part_names, device,
                         prog.partial if prog.batch and self.is_main else None)
        watch = Stopwatch(device).start()  # the epoch's training, then with its evaluation
        lr, images_seen = self.train_epoch(epoch, sums, watch)
        self.stepper.write_back()  # evaluation and checkpoints read the trainees' modules
        if self.timer is not None and self.timer.estimate is not None:
            prog.estimate, self.timer = self.timer.estimate, None
        sums.all_reduce()
        check_finite(sums, self.phase, epoch, self.steps_per_epoch,
                     kept_files(prog, self.files.run_dir, self.state_path,
                                self.files.resume_state is not None))
        train_seconds = watch.elapsed()
        self.claim_folder()
        accs = evaluate_epoch(self.trainees, self.data, self.recipe, epoch + 1, prog,
                              self.options.test_every,
                              self.files.run_dir if self.is_main else None)
        stats = EpochStats(epoch + 1, self.recipe.epochs, lr, train_seconds, round(
            images_seen * self.world_size / max(1e-9, train_seconds), 1))
        rows = self.record(stats, sums, accs)
        prog.epoch, prog.batch, prog.partial = epoch + 1, 0, None
        prog.elapsed += watch.elapsed()
        self.save()
        self.log(format_epoch_line(self.phase, stats, rows))
        if self.callbacks.on_epoch is not None:
            self.callbacks.on_epoch(epoch + 1, rows)

    def record(self, stats, sums, accs):
        """Each model's CSV row of the epoch, added to its history and log_<name>.csv.
        Returns {name: row}."""
        common = {'epoch': stats.epoch, 'lr': round(stats.lr, 6),
                  'seconds': round(stats.seconds, 3), 'images_per_s': stats.images_per_s}
        rows = {}
        for t in self.trainees:
            val_acc, test_acc, views = accs[t.name]
            rows[t.name] = dict(common, **sums.row(t.name, self.parts_of[t.name]),
                                val_acc=val_acc, test_acc=test_acc, **views)
            self.prog.history[t.name].append(rows[t.name])
            if self.is_main:
                write_csv(os.path.join(self.files.run_dir, f'log_{t.name}.csv'),
                          self.prog.history[t.name], self.fields)
        return rows

    def train_epoch(self, epoch, sums, watch):
        """The batches of one epoch (from prog.batch on), under a progress bar. Returns (last
        lr, images seen). On a stop request: saves the state mid-epoch and raises
        TrainingInterrupted."""
        prog = self.prog
        bar = tqdm(total=self.steps_per_epoch, initial=prog.batch, leave=False,
                   desc=f'{self.phase} {epoch + 1}/{self.recipe.epochs}',
                   disable=(not self.options.progress_bar) or (not self.is_main) or None)
        try:
            return self.batches(epoch, sums, bar)
        except _StopAt as s:
            bar.close()  # leave=False: it clears its line
            self.stepper.write_back()
            prog.elapsed += watch.elapsed()
            sums.all_reduce()  # the saved partial epoch covers every rank
            prog.batch, prog.partial = s.batch_index, sums.to_dicts()
            prog.estimate = self.timer.estimate if self.timer is not None else prog.estimate
            self.save()
            raise TrainingInterrupted(self.stop.signum or signal.SIGTERM,
                                      self.state_path) from None
        finally:  # also on an error: its message must not land on the bar's line
            bar.close()

    def batches(self, epoch, sums, bar):
        """Step through the epoch's batches; raises _StopAt on a stop request (the sums then
        hold the batches done)."""
        steps_per_epoch, stop = self.steps_per_epoch, self.stop
        on_step = self.timer.on_step if self.timer is not None else None
        self.data.train.set_epoch(epoch, self.prog.batch)
        lr, images_seen = self.recipe.lr, 0
        for batch in self.data.train.batches():
            index, count = batch.index, len(batch.labels)
            # over several processes the ranks agree on stopping every few batches only
            if stop is not None and (index % STOP_CHECK_EVERY == 0 or not self.multi_process) \
                    and any_rank(stop.requested):
                raise _StopAt(index)
            lr, out = self.stepper.step(batch, epoch, epoch * steps_per_epoch + index,
                                        steps_per_epoch, self.teacher)
            for t, result in zip(self.trainees, out):
                sums.add(t.name, index, result, count)
            images_seen += count
            bar.update(1)
            if on_step is not None:
                on_step(count, out)
        return lr, images_seen
