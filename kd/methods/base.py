"""The contract of feature distillers: methods that read intermediate features and own
parameters of their own (mdistiller's Distiller, distillers/_base.py, as a loss module rather
than a wrapper of the two networks).

A method is a `Distiller` subclass registered with `registry.register_distiller`, so it is a
name in the same registry as the logit losses (`--loss fitnet at crd`), declaring its settings
there (its weights, and constants such as FitNet's hint stage or CRD's K). One instance is built
per student (`plan.build_distiller`) with every setting's value in `self.params`: it owns the method's connectors, embeddings and
memories, which train with the student under its optimizer and schedule, are saved in the
resume state and are wrapped by DistributedDataParallel with it, but never enter best_*.pth
(the plain student).

The contract, in `Distiller.forward(student_logits, teacher_logits, labels, *, student_feats,
teacher_feats, batch, epoch, label_smoothing)`:
- logits are B x C (any floating dtype), labels B int64;
- feats map the point names the method asked for (`points(...)`: 'stem', 'stage2',
  'stage2_pre', 'pooled', ... as kd/models/registry.py names them) to the tensors of this batch:
  B x C x H x W for stages, B x D for 'pooled'; the teacher's are float32 copies without
  gradient;
- batch: the loader's utils.Batch (the images' indices in the training set, for CRD's memory);
- epoch: the 1-based epoch, for warm-ups;
- it returns (loss, parts): parts maps every name of the registered `parts` to an unweighted
  scalar ('ce' the plain cross-entropy), as the logit losses do.
Feature terms run in float32 with autocast off (float64 stays float64): forward hands them to
`distill` as one `DistillInputs`.
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import torch
import torch.nn as nn

from kd.methods.losses import hard_label_ce
from kd.methods.registry import get_loss


class DistillInputs(NamedTuple):
    """What `Distiller.distill` computes a batch's loss from.

    logits: the student's, B x C in float32 (float64 kept); teacher_logits: the teacher's, as
    given; labels: B int64; ce: the plain cross-entropy of the logits on the labels (with the
    recipe's label smoothing); student_feats / teacher_feats: {point: tensor} of the points the
    method reads, in the logits' dtype; batch: the loader's Batch (or None); epoch: the 1-based
    epoch; label_smoothing: the recipe's."""
    logits: Any
    teacher_logits: Any
    labels: Any
    ce: Any
    student_feats: Mapping[str, Any]
    teacher_feats: Mapping[str, Any]
    batch: Any
    epoch: float
    label_smoothing: float


@dataclass(frozen=True)
class BuildContext:
    """What a method's constructor may use besides its hyper-parameters.

    student_shapes / teacher_shapes: {point: torch.Size} of every point of the two models,
    measured at batch 1 (a method picks the ones it reads); train_labels: N int64, the labels of
    the training images by their index in the training set (the loader's Batch.indices);
    num_classes: C; teacher_bn: {pre-activation point: (weight, bias)}, detached copies of the
    affine parameters of the teacher's BatchNorm before the ReLU at that point
    (kd.models.registry.bn_before_relu; OFD's margins), None when the teacher names none.
    """
    student_shapes: Mapping[str, torch.Size]
    teacher_shapes: Mapping[str, torch.Size]
    train_labels: torch.Tensor
    num_classes: int
    teacher_bn: Mapping[str, tuple] = None


class Distiller(nn.Module, ABC):
    """The base of feature methods (see the module docstring for the forward contract).

    Subclasses implement `points` (which points they read of two models with these shapes;
    ValueError, a message for the user, when a model lacks them), may override
    `check_teacher` (anything else the teacher must give), and implement `distill`, the loss from
    a DistillInputs of float32 (or float64) logits and features; the base handles dtypes and
    autocast. params: the method's declared settings, every default filled in
    (registry.DistillLoss.filled); `method`: its registered name (set by register_distiller).
    """
    method = None

    def __init__(self, params, context):
        super().__init__()
        self.params = self.settings(params)
        self.student_points, self.teacher_points = self.points(
            context.student_shapes, context.teacher_shapes, self.params)
        self.check_teacher(self.teacher_points, context.teacher_bn)

    @classmethod
    def settings(cls, params=None):
        """`params` with the defaults of every setting the method declares filled in."""
        return get_loss(cls.method).filled(dict(params or {}))

    @classmethod
    @abstractmethod
    def points(cls, student_shapes, teacher_shapes, params=None):
        """(student point names, teacher point names) this method reads with settings `params`
        (None: its defaults)."""

    @classmethod
    def check_teacher(cls, teacher_points, teacher_bn):
        """ValueError (a message for the user) when the teacher lacks something besides its
        points that the method needs at `teacher_points` (teacher_bn as BuildContext's); called
        when a run is planned, before any training, and when the method is built."""

    def forward(self, student_logits, teacher_logits, labels, *, student_feats, teacher_feats,
                batch=None, epoch=1, label_smoothing=0.0):
        with torch.autocast(student_logits.device.type, enabled=False):
            s = _as_float(student_logits)
            ce = hard_label_ce(s, labels, label_smoothing)
            sf = {k: _as_float(student_feats[k]) for k in self.student_points}
            tf = {k: teacher_feats[k].to(s.dtype) for k in self.teacher_points}
            return self.distill(DistillInputs(s, teacher_logits, labels, ce, sf, tf, batch,
                                              epoch, label_smoothing))

    @abstractmethod
    def distill(self, x):
        """(loss, {part: unweighted scalar}) from x, a DistillInputs of float32 (or float64)
        logits and features."""


def _as_float(x):
    return x if x.dtype == torch.float64 else x.float()


def stage_names(shapes):
    """'stage1', 'stage2', ... present in a {point: shape} map, in order."""
    n = 0
    while f'stage{n + 1}' in shapes:
        n += 1
    return [f'stage{i}' for i in range(1, n + 1)]
