"""One training step of every trainee on one batch, the teacher run once for all of them.

A stepper is what the loop calls for each batch: step(batch, epoch, step, steps_per_epoch,
teacher) -> (learning rate, [StepResult per trainee]) and write_back() before the loop reads
the trainees' modules (evaluation, checkpoints). LockstepSteps, each trainee its own forward and
optimizer step, is the loop's default; stacked.StudentStack runs the students as one vmapped
computation.
"""
from typing import NamedTuple

import torch

from kd.engine.precision import autocast
from kd.models.features import split_output
from kd.recipes.lookahead import lookahead_step
from kd.recipes.optim import set_learning_rates


class StepResult(NamedTuple):
    loss: torch.Tensor     # detached scalar
    parts: dict            # name -> detached scalar (see kd/methods/losses.py)
    correct: torch.Tensor  # number of right top-1 predictions in the batch


class TeacherOut(NamedTuple):
    logits: torch.Tensor   # B x C float32, or None when no student needs the teacher
    feats: dict            # {point: float32 tensor}: the points some feature method reads


class PhaseTeacher(NamedTuple):
    """The teacher of a students' phase, as the loop uses it."""
    model: torch.nn.Module = None     # the form run for the training forwards (None: none)
    precision: torch.dtype = None     # its autocast dtype (None: float32)
    test_logits: torch.Tensor = None  # its test-set logits, for the students' agreement


NO_TEACHER = PhaseTeacher()  # the teacher's own phase


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
    kd.data.loader.Batch (the images' training-set indices), for methods that index by sample
    (CRD).
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


class LockstepSteps:
    """The loop's default stepper: each trainee its own forward, backward and optimizer step
    (train_step), then its lookahead averaging, on the same batch."""

    def __init__(self, trainees, recipe):
        self.trainees, self.recipe = trainees, recipe

    def step(self, batch, epoch, step, steps_per_epoch, teacher):
        """Train on `batch` (a loader Batch) at `step` of the run (0-based, over all epochs) in
        0-based `epoch`. Returns (the learning rate, a StepResult per trainee)."""
        recipe = self.recipe
        lr = recipe.lr
        for t in self.trainees:
            lr = set_learning_rates(t.optimizer, recipe, step, steps_per_epoch)
        out = train_step(self.trainees, teacher.model, batch.images, batch.labels, recipe,
                         teacher.precision, epoch=epoch + 1, batch=batch)
        for t in self.trainees:  # stacks refuse recipes with lookahead (stacked.stacking_problem)
            lookahead_step(t.lookahead, t.module, recipe, step + 1,
                           recipe.epochs * steps_per_epoch)
        return lr, out

    def write_back(self):
        """Nothing to copy: the trainees' modules are the ones trained."""
