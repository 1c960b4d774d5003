"""Feature distillers: methods that read intermediate features and own parameters of their own.

A method is a `Distiller` subclass registered with `losses.register_distiller`, so it is a name
in the same registry as the logit losses (`--loss fitnet at crd`). One instance is built per
student (`build_distiller`): it owns the method's connectors, embeddings and memories, which
train with the student under its optimizer and schedule, are saved in the resume state and are
wrapped by DistributedDataParallel with it, but never enter best_*.pth (the plain student).

The contract, in `Distiller.forward(student_logits, teacher_logits, labels, *, student_feats,
teacher_feats, batch, epoch, label_smoothing)`:
- logits are B x C (any floating dtype), labels B int64;
- feats map the point names the method asked for (`points(...)`: 'stem', 'stage2', 'pooled',
  ... as models.py names them) to the tensors of this batch: B x C x H x W for stages, B x D for
  'pooled'; the teacher's are float32 copies without gradient;
- batch: the loader's utils.Batch (the images' indices in the training set, for CRD's memory);
- it returns (loss, parts): parts maps every name of the registered `parts` to an unweighted
  scalar ('ce' the plain cross-entropy), as the logit losses do.
Feature terms run in float32 with autocast off (float64 stays float64).

Methods here, each with its authors' CIFAR-100 configuration (mdistiller engine/cfg.py;
RepDistiller's run scripts):
- fitnet: FitNets (Romero et al., 2015), CE + 100 * MSE(regressor(student hint), teacher hint);
- at: attention transfer (Zagoruyko & Komodakis, 2017), CE + 1000 * sum over stages of the
  squared distance between normalised attention maps, p = 2;
- crd: contrastive representation distillation (Tian et al., 2020), CE + 0.8 * NCE loss over
  embeddings against a momentum memory of every training image (16384 negatives, tau 0.07);
- crd_kd: crd with KD, CE + T^2 KL (T = 4) + 0.8 * NCE, as RepDistiller's `-a 1 -b 0.8`.
"""
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from distributed import all_gather_cat, all_reduce_sum
from features import FeatureCapture
from losses import get_loss, hard_label_ce, kd_loss, register_distiller
from models import feature_points

# FitNets (mdistiller CFG.FITNET): the hint is feats[HINT_LAYER], post-activation
FITNET_HINT_LAYER = 2
# attention transfer (mdistiller CFG.AT.P): attention maps are the channel mean of |F|^p
AT_P = 2
# CRD (mdistiller CFG.CRD; RepDistiller's train_student.py defaults)
CRD_FEAT_DIM = 128      # embedding size
CRD_NCE_K = 16384       # negatives per sample
CRD_NCE_T = 0.07        # temperature of the scores
CRD_NCE_M = 0.5         # momentum of the memory update
CRD_EPS = 1e-7          # ContrastLoss's eps


@dataclass(frozen=True)
class BuildContext:
    """What a method's constructor may use besides its hyper-parameters.

    student_shapes / teacher_shapes: {point: torch.Size} of every point of the two models,
    measured at batch 1 (a method picks the ones it reads); train_labels: N int64, the labels of
    the training images by their index in the training set (the loader's Batch.indices);
    num_classes: C.
    """
    student_shapes: Mapping[str, torch.Size]
    teacher_shapes: Mapping[str, torch.Size]
    train_labels: torch.Tensor
    num_classes: int


class Distiller(nn.Module, ABC):
    """The base of feature methods (see the module docstring for the forward contract).

    Subclasses implement `points` (which points they read of two models with these shapes;
    ValueError, a message for the user, when a model lacks them) and `distill`, the loss from
    float32 (or float64) logits and features; the base handles dtypes and autocast.
    params: the hyper-parameters (HYPER_PARAMETERS names), defaults filled in.
    """

    def __init__(self, params, context):
        super().__init__()
        self.params = dict(params)
        self.student_points, self.teacher_points = self.points(context.student_shapes,
                                                               context.teacher_shapes)

    @classmethod
    @abstractmethod
    def points(cls, student_shapes, teacher_shapes):
        """(student point names, teacher point names) this method reads."""

    def forward(self, student_logits, teacher_logits, labels, *, student_feats, teacher_feats,
                batch=None, epoch=1, label_smoothing=0.0):
        with torch.autocast(student_logits.device.type, enabled=False):
            s = _as_float(student_logits)
            ce = hard_label_ce(s, labels, label_smoothing)
            sf = {k: _as_float(student_feats[k]) for k in self.student_points}
            tf = {k: teacher_feats[k].to(s.dtype) for k in self.teacher_points}
            return self.distill(s, teacher_logits, labels, ce, sf, tf, batch, epoch,
                                label_smoothing)

    @abstractmethod
    def distill(self, s, teacher_logits, labels, ce, student_feats, teacher_feats, batch, epoch,
                label_smoothing):
        """(loss, {part: unweighted scalar}) from float32 (or float64) logits and features."""


def _as_float(x):
    return x if x.dtype == torch.float64 else x.float()


def stage_names(shapes):
    """'stage1', 'stage2', ... present in a {point: shape} map, in order."""
    n = 0
    while f'stage{n + 1}' in shapes:
        n += 1
    return [f'stage{i}' for i in range(1, n + 1)]


# ---------------------------------------------------------------------------------------------
# FitNets

class ConvRegressor(nn.Module):
    """FitNets' regressor (mdistiller ConvReg): maps a student feature map B x Cs x Hs x Ws to
    the teacher's B x Ct x Ht x Wt, then BatchNorm and ReLU. The convolution follows the sizes:
    Hs = 2 Ht: 3x3 stride 2; 2 Hs = Ht: 4x4 transposed, stride 2; Hs >= Ht: a
    (1 + Hs - Ht) x (1 + Ws - Wt) convolution (1x1 when equal). ValueError otherwise."""

    def __init__(self, student_shape, teacher_shape):
        super().__init__()
        _, cs, hs, ws = student_shape
        _, ct, ht, wt = teacher_shape
        if hs == 2 * ht:
            self.conv = nn.Conv2d(cs, ct, 3, stride=2, padding=1)
        elif hs * 2 == ht:
            self.conv = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1)
        elif hs >= ht:
            self.conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt))
        else:
            raise ValueError(f'FitNets: no regressor maps a {hs}x{ws} student feature to a '
                             f'{ht}x{wt} teacher feature')
        self.bn = nn.BatchNorm2d(ct)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


@register_distiller('fitnet', defaults={'beta': 100.0}, parts=('ce', 'fitnet'),
                    help='loss = CE + beta*MSE(r(S_h), T_h) (FitNets, Romero et al.): h the hint '
                         'layer stage2, r a trained convolutional regressor; --beta weights the '
                         'hint (100).')
class FitNet(Distiller):
    @classmethod
    def points(cls, student_shapes, teacher_shapes):
        hint = f'stage{FITNET_HINT_LAYER}'
        for who, shapes in (('student', student_shapes), ('teacher', teacher_shapes)):
            if hint not in shapes:
                raise ValueError(f'FitNets: the {who} has no hint layer {hint!r}')
        return (hint,), (hint,)

    def __init__(self, params, context):
        super().__init__(params, context)
        hint = self.student_points[0]
        self.regressor = ConvRegressor(context.student_shapes[hint], context.teacher_shapes[hint])

    def distill(self, s, teacher_logits, labels, ce, student_feats, teacher_feats, batch, epoch,
                label_smoothing):
        hint = self.student_points[0]
        hint_loss = F.mse_loss(self.regressor(student_feats[hint]), teacher_feats[hint])
        return ce + self.params['beta'] * hint_loss, {'ce': ce, 'fitnet': hint_loss}


# ---------------------------------------------------------------------------------------------
# Attention transfer

def attention_map(feat, p=AT_P):
    """normalize_2(mean over channels of F^p), flattened: B x (H*W)."""
    return F.normalize(feat.pow(p).mean(1).flatten(1))


def attention_distance(fs, ft, p=AT_P):
    """mean over batch and positions of (a(S) - a(T))^2; the larger map is first average-pooled
    to the smaller one's size (mdistiller's single_stage_at_loss)."""
    hs, ht = fs.shape[2], ft.shape[2]
    if hs > ht:
        fs = F.adaptive_avg_pool2d(fs, (ht, ht))
    elif hs < ht:
        ft = F.adaptive_avg_pool2d(ft, (hs, hs))
    return (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()


@register_distiller('at', defaults={'beta': 1000.0}, parts=('ce', 'at'),
                    help='loss = CE + beta*sum_j mean (a(S_j) - a(T_j))^2 (attention transfer, '
                         'Zagoruyko & Komodakis): a(F) the L2-normalised channel mean of F^2 of '
                         'each stage, paired in order; --beta weights it (1000).')
class AttentionTransfer(Distiller):
    @classmethod
    def points(cls, student_shapes, teacher_shapes):
        pairs = list(zip(stage_names(student_shapes), stage_names(teacher_shapes)))
        if not pairs:  # the reference zips feats[1:]: stage j with stage j
            raise ValueError('attention transfer: the student or the teacher names no stages')
        return tuple(a for a, _ in pairs), tuple(b for _, b in pairs)

    def distill(self, s, teacher_logits, labels, ce, student_feats, teacher_feats, batch, epoch,
                label_smoothing):
        at = sum(attention_distance(student_feats[a], teacher_feats[b])
                 for a, b in zip(self.student_points, self.teacher_points))
        return ce + self.params['beta'] * at, {'ce': ce, 'at': at}


# ---------------------------------------------------------------------------------------------
# Contrastive representation distillation

class Embed(nn.Module):
    """CRD's embedding head: a linear map of the flattened feature, then L2 normalisation."""

    def __init__(self, dim_in, dim_out=CRD_FEAT_DIM):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        x = self.linear(x.flatten(1))
        return x / x.pow(2).sum(1, keepdim=True).sqrt()


def contrast_loss(scores, n_data, eps=CRD_EPS):
    """CRD's NCE loss h of B x (K+1) scores (column 0 the positive): -(1/B) sum_i
    [log(P_i0 / (P_i0 + K/N + eps)) + sum_k>=1 log((K/N) / (P_ik + K/N + eps))]."""
    b, k = scores.shape[0], scores.shape[1] - 1
    noise = k / n_data
    positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    negative = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(positive.sum() + negative.sum()) / b


def draw_negatives(labels_of_batch, train_labels, k, generator):
    """B x K indices of training images of other classes than each row's label: uniform without
    replacement, or with replacement for a class with fewer than K such images (as
    RepDistiller's CIFAR100InstanceSample, mode 'exact')."""
    n = len(train_labels)
    b = len(labels_of_batch)
    other = train_labels[None, :] != labels_of_batch[:, None]            # B x N
    pool = other.sum(1)
    keys = torch.rand(b, n, generator=generator, device=train_labels.device)
    if k <= int(pool.min()):
        # the K largest random keys among the allowed images: a uniform sample without replacement
        return keys.masked_fill(~other, -1.0).topk(k, dim=1).indices
    # some class has too few others: draw positions in each row's sorted pool with replacement
    order = keys.masked_fill(~other, 2.0).argsort(dim=1)                 # allowed ones first
    picks = (torch.rand(b, k, generator=generator, device=train_labels.device)
             * pool[:, None]).long().clamp_max(n - 1)
    return order.gather(1, picks)


def batch_generator(batch, device):
    """A generator keyed by (seed, epoch, batch index): the same draws after a resume and on
    every rank."""
    state = np.random.SeedSequence([int(batch.seed), int(batch.epoch), int(batch.index),
                                    0xC4D]).generate_state(2)
    return torch.Generator(device).manual_seed(int(state[0]) << 32 | int(state[1]))


class CRDBase(Distiller):
    """CRD's embeddings, memories and NCE loss (RepDistiller crd/criterion.py, memory.py).

    Memories M_s, M_t: N x D, one row per training image, initialised uniform in
    [-1/sqrt(D/3), 1/sqrt(D/3)]. For anchor i with negatives j_1..j_K (other classes), scores
    P1_ik = exp(M_t[j_k] . e_s(i) / tau) / Z1 and P2_ik = exp(M_s[j_k] . e_t(i) / tau) / Z2,
    j_0 = i; Z = N * mean(exp(./tau)) of the first batch, then kept. After the step, without
    gradient, M[i] <- normalize(m M[i] + (1 - m) e(i)). The scores are taken as (M @ e) and a
    gather: B x N numbers instead of the reference's B x (K+1) x D, the same dot products.
    """
    @classmethod
    def points(cls, student_shapes, teacher_shapes):
        for who, shapes in (('student', student_shapes), ('teacher', teacher_shapes)):
            if 'pooled' not in shapes:
                raise ValueError(f"CRD: the {who} names no 'pooled' embedding")
        return ('pooled',), ('pooled',)

    def __init__(self, params, context):
        super().__init__(params, context)
        d = CRD_FEAT_DIM
        self.embed_s = Embed(math.prod(context.student_shapes['pooled'][1:]), d)
        self.embed_t = Embed(math.prod(context.teacher_shapes['pooled'][1:]), d)
        n = len(context.train_labels)
        stdv = 1.0 / math.sqrt(d / 3)
        self.register_buffer('memory_s', torch.rand(n, d).mul_(2 * stdv).add_(-stdv))
        self.register_buffer('memory_t', torch.rand(n, d).mul_(2 * stdv).add_(-stdv))
        self.register_buffer('z', torch.full((2,), -1.0))  # Z1, Z2; < 0 until the first batch
        self.register_buffer('train_labels', context.train_labels.clone(), persistent=False)
        self.nce_k, self.nce_t, self.nce_m = CRD_NCE_K, CRD_NCE_T, CRD_NCE_M

    def crd(self, student_feat, teacher_feat, indices, negatives):
        """The NCE loss h(P1) + h(P2) for embeddings of the batch's pooled features; updates the
        memories and sets Z on the first call. indices: B training-set indices; negatives: B x K.
        """
        e_s = self.embed_s(student_feat)
        e_t = self.embed_t(teacher_feat)
        idx = torch.cat([indices[:, None], negatives], 1)                   # B x (K+1)
        out_s = torch.exp((e_s @ self.memory_t.to(e_s.dtype).T).gather(1, idx) / self.nce_t)
        out_t = torch.exp((e_t @ self.memory_s.to(e_t.dtype).T).gather(1, idx) / self.nce_t)
        n = len(self.memory_s)
        if not getattr(self, '_z_known', False):
            if not bool((self.z > 0).all()):  # first batch: Z from it, averaged over ranks
                z = torch.stack([out_s.mean(), out_t.mean()]).detach().to(self.z.dtype) * n
                self.z.copy_(all_reduce_sum(z) / _world_size())
            self._z_known = True
        out_s = out_s / self.z[0].to(out_s.dtype)
        out_t = out_t / self.z[1].to(out_t.dtype)
        loss = contrast_loss(out_s, n) + contrast_loss(out_t, n)
        with torch.no_grad():  # every rank applies every rank's rows, in the same order
            rows = all_gather_cat(indices)
            for name, e in (('memory_s', e_s), ('memory_t', e_t)):
                memory = getattr(self, name)
                e = all_gather_cat(e.detach().to(memory.dtype))
                updated = memory[rows] * self.nce_m + e * (1 - self.nce_m)
                # out of place: the scores' backward still needs the memory they were taken from
                setattr(self, name, memory.index_copy(
                    0, rows, updated / updated.pow(2).sum(1, keepdim=True).sqrt()))
        return loss

    def batch_loss(self, labels, student_feats, teacher_feats, batch):
        """The NCE loss of this batch's pooled features, against its keyed negatives."""
        return self.crd(student_feats['pooled'], teacher_feats['pooled'], batch.indices,
                        self.negatives(labels, batch))

    def negatives(self, labels, batch):
        """This rank's rows of the global batch's draw."""
        g = batch_generator(batch, self.train_labels.device)
        every = draw_negatives(self.train_labels[batch.global_indices], self.train_labels,
                               self.nce_k, g)
        return every[batch.row_lo:batch.row_lo + len(labels)]


def _world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_available() \
        and torch.distributed.is_initialized() else 1


@register_distiller('crd', defaults={'beta': 0.8}, parts=('ce', 'crd'),
                    help='loss = CE + beta*NCE (contrastive representation distillation, Tian '
                         'et al.): embeddings of the pooled features against a momentum memory '
                         'of every training image, 16384 negatives, tau 0.07; --beta weights '
                         'it (0.8).')
class CRD(CRDBase):
    def distill(self, s, teacher_logits, labels, ce, student_feats, teacher_feats, batch, epoch,
                label_smoothing):
        crd = self.batch_loss(labels, student_feats, teacher_feats, batch)
        return ce + self.params['beta'] * crd, {'ce': ce, 'crd': crd}


@register_distiller('crd_kd', defaults={'temperature': 4.0, 'beta': 0.8},
                    parts=('ce', 'kd', 'crd'),
                    help='loss = CE + T^2*KL(teacher||student) + beta*NCE: crd with KD, as '
                         "RepDistiller's -a 1 -b 0.8; --temperature is T (4) and --beta "
                         'weights the NCE term (0.8).')
class CRDWithKD(CRDBase):
    def distill(self, s, teacher_logits, labels, ce, student_feats, teacher_feats, batch, epoch,
                label_smoothing):
        crd = self.batch_loss(labels, student_feats, teacher_feats, batch)
        t = self.params['temperature']
        # kd_loss at alpha 0 is exactly T^2 KL: the KD term with weight 1 next to CE
        kd, _ = kd_loss(s, teacher_logits.to(s.dtype), labels, temperature=t, alpha=0.0)
        return ce + kd + self.params['beta'] * crd, {'ce': ce, 'kd': kd, 'crd': crd}


# ---------------------------------------------------------------------------------------------
# Building

def is_feature_method(loss_name):
    return get_loss(loss_name).distiller is not None


@torch.no_grad()
def point_shapes(model, points, device):
    """{point: torch.Size} of `model`'s points at batch 1 (one eval-mode forward on zeros: the
    running statistics are untouched)."""
    capture = FeatureCapture(model, points)
    was_training = model.training
    model.eval()
    try:
        with capture:
            dtype = next(model.parameters()).dtype
            model(torch.zeros(1, 3, 32, 32, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        capture.remove()
    return {k: v.shape for k, v in capture.pop().items()}


def build_distiller(loss_name, params, context):
    """The Distiller of feature method `loss_name` with hyper-parameters `params` (its defaults
    filled in). ValueError (a message for the user) when the models lack what it reads."""
    spec = get_loss(loss_name)
    return spec.distiller({**spec.defaults, **params}, context)


@dataclass
class FeaturePlan:
    """What the feature methods of a students' phase read: each student architecture's points
    and shapes, and the union of the teacher points some student needs (the teacher's form
    returns exactly those)."""
    student_points: dict     # arch -> {point: spec}
    student_shapes: dict     # arch -> {point: torch.Size}
    teacher_points: dict     # {point: spec}, the union needed
    teacher_shapes: dict     # {point: torch.Size}, all of the teacher's
    num_classes: int

    def build(self, loss_name, params, arch, train_labels):
        """The Distiller of one student, or None for a logit loss."""
        if not is_feature_method(loss_name):
            return None
        context = BuildContext(self.student_shapes[arch], self.teacher_shapes, train_labels,
                               self.num_classes)
        return build_distiller(loss_name, params, context)


def plan_features(students, teacher, teacher_points, device, num_classes):
    """The FeaturePlan of `students` [(arch, loss name, student module built as arch)] against
    `teacher` (eager, with its points {name: spec}), or None when no student uses a feature
    method. ValueError (a message for the user) when a model lacks the points a method reads."""
    students = [s for s in students if is_feature_method(s[1])]
    if not students:
        return None
    teacher_shapes = point_shapes(teacher, teacher_points, device)
    plan = FeaturePlan({}, {}, {}, teacher_shapes, num_classes)
    for arch, loss_name, module in students:
        if arch not in plan.student_points:
            plan.student_points[arch] = feature_points(arch, module)
            if not plan.student_points[arch]:
                raise ValueError(f'--loss {loss_name}: model {arch!r} names no feature points; '
                                 f'register it with register_model({arch!r}, points=...)')
            plan.student_shapes[arch] = point_shapes(module, plan.student_points[arch], device)
        _, needed = get_loss(loss_name).distiller.points(plan.student_shapes[arch],
                                                         teacher_shapes)
        plan.teacher_points.update({k: teacher_points[k] for k in needed})
    return plan
