"""Feature distillers: every method, and building them for a run.

Importing this module registers every feature method in the method registry
(registry.LOSSES), next to the logit losses; the contract a method implements is in base.py.
Methods, each with its authors' CIFAR-100 configuration (mdistiller engine/cfg.py, else the
authors' repository) as its settings' defaults, by family:
- hints.py: fitnet (FitNets), at (attention transfer), nst (neuron selectivity
  transfer), vid (variational information distillation), ofd (overhaul of feature
  distillation);
- relations.py: sp (similarity-preserving KD), rkd (relational KD), pkt (probabilistic
  knowledge transfer), kdsvd (KD with SVD);
- contrastive.py: crd, crd_kd (contrastive representation distillation);
- reviewkd.py: reviewkd (knowledge review: attention-based fusion, hierarchical context loss).
"""
from dataclasses import dataclass

import torch

from kd.data.datasets import CIFAR10
from kd.methods.base import BuildContext
from kd.models.features import FeatureCapture
from kd.methods.registry import get_loss
from kd.models import bn_before_relu, feature_points


def is_feature_method(loss_name):
    return get_loss(loss_name).distiller is not None


@torch.no_grad()
def point_shapes(model, points, device, image_shape=CIFAR10.image_shape):
    """{point: torch.Size} of `model`'s points at batch 1 on images of image_shape (C, H, W: the
    dataset's; one eval-mode forward on zeros: the running statistics are untouched)."""
    capture = FeatureCapture(model, points)
    was_training = model.training
    model.eval()
    try:
        with capture:
            dtype = next(model.parameters()).dtype
            model(torch.zeros(1, *image_shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        capture.remove()
    return {k: v.shape for k, v in capture.pop().items()}


def teacher_batchnorms(teacher, names):
    """{point: (weight, bias)} of the BatchNorms `names` ({point: module path}, as
    kd.models.registry.bn_before_relu) of `teacher`: detached float32 copies on the CPU (ones and zeros
    for a BN without affine parameters), or None when `names` is empty."""
    if not names:
        return None
    modules = dict(teacher.named_modules())
    out = {}
    for point, path in names.items():
        bn = modules[path]
        c = bn.num_features
        weight = bn.weight if bn.weight is not None else torch.ones(c)
        bias = bn.bias if bn.bias is not None else torch.zeros(c)
        out[point] = (weight.detach().float().cpu().clone(), bias.detach().float().cpu().clone())
    return out


def build_distiller(loss_name, params, context):
    """The Distiller of feature method `loss_name` with settings `params` (its defaults
    filled in). ValueError (a message for the user) when the models lack what it reads."""
    return get_loss(loss_name).distiller(params, context)


@dataclass
class FeaturePlan:
    """What the feature methods of a students' phase read: each student architecture's points
    and shapes, the union of the teacher points some student needs (the teacher's form
    returns exactly those) and the teacher's BatchNorms before its ReLUs (BuildContext's)."""
    student_points: dict     # arch -> {point: spec}
    student_shapes: dict     # arch -> {point: torch.Size}
    teacher_points: dict     # {point: spec}, the union needed
    teacher_shapes: dict     # {point: torch.Size}, all of the teacher's
    num_classes: int
    teacher_bn: dict = None  # {pre-activation point: (weight, bias)}, None when none named

    def build(self, loss_name, params, arch, train_labels):
        """The Distiller of one student, or None for a logit loss."""
        if not is_feature_method(loss_name):
            return None
        context = BuildContext(self.student_shapes[arch], self.teacher_shapes, train_labels,
                               self.num_classes, self.teacher_bn)
        return build_distiller(loss_name, params, context)

    def state_bytes(self, loss_name, params, arch, train_labels):
        """About how much memory one student's method holds while training: its parameters with
        their gradients and momentum (3 copies) and its buffers (CRD's memories), in bytes; 0
        for a logit loss. Its activations are left out."""
        distiller = self.build(loss_name, params, arch, train_labels)
        if distiller is None:
            return 0
        return 3 * sum(p.numel() * p.element_size() for p in distiller.parameters()) + \
            sum(b.numel() * b.element_size() for b in distiller.buffers())


def plan_features(students, teacher, teacher_points, device, num_classes, teacher_arch=None,
                  image_shape=CIFAR10.image_shape, student_points=None):
    """The FeaturePlan of `students` [(arch, loss name, student module built as arch[, the
    setting's params: what the method reads may depend on them, e.g. FitNet's hint])] against
    `teacher` (eager, with its points {name: spec}; teacher_arch: its registered name, for the
    BatchNorms given to register_model, else its class's bn_before_relu() names them), or None
    when no student uses a feature method. ValueError (a message for the user) when a model
    lacks the points a method reads, or the teacher something else it needs. image_shape: the
    dataset's (C, H, W), which the points' shapes are measured at (the connectors are sized from
    them). student_points: {arch: {point: spec}} given by module path (features.given_points),
    in place of what the registry names for those architectures."""
    students = [s for s in students if is_feature_method(s[1])]
    if not students:
        return None
    teacher_shapes = point_shapes(teacher, teacher_points, device, image_shape)
    teacher_bn = teacher_batchnorms(teacher, bn_before_relu(teacher_arch, teacher))
    plan = FeaturePlan({}, {}, {}, teacher_shapes, num_classes, teacher_bn)
    for arch, loss_name, module, *params in students:
        if arch not in plan.student_points:
            plan.student_points[arch] = (student_points or {}).get(arch) or \
                feature_points(arch, module)
            if not plan.student_points[arch]:
                raise ValueError(f'--loss {loss_name}: model {arch!r} names no feature points; '
                                 f'give them by module path (--student-points PATH,...) or '
                                 f'register it with register_model({arch!r}, points=...)')
            plan.student_shapes[arch] = point_shapes(module, plan.student_points[arch], device,
                                                     image_shape)
        method = get_loss(loss_name).distiller
        _, needed = method.points(plan.student_shapes[arch], teacher_shapes,
                                  method.settings(params[0] if params else None))
        method.check_teacher(needed, teacher_bn)
        plan.teacher_points.update({k: teacher_points[k] for k in needed})
    return plan
