"""Contrastive representation distillation (Tian et al., ICLR 2020), as RepDistiller's
crd/criterion.py and crd/memory.py, with mdistiller's CIFAR-100 configuration (CFG.CRD):

- crd: CE + 0.8 * NCE loss over 128-d embeddings of the pooled features against a momentum
  memory of every training image (16384 negatives of other classes, tau 0.07, m 0.5);
- crd_kd: crd with KD, CE + T^2 KL (T = 4) + 0.8 * NCE, as RepDistiller's `-a 1 -b 0.8`.
"""
import math

import numpy as np
import torch
import torch.nn as nn

from kd.methods.base import Distiller
from kd.engine.distributed import all_gather_cat, all_reduce_sum
from kd.methods.losses import kd_loss
from kd.methods.registry import HyperParameter, register_distiller

CRD_FEAT_DIM = 128      # embedding size
CRD_NCE_K = 16384       # negatives per sample
CRD_NCE_T = 0.07        # temperature of the scores
CRD_NCE_M = 0.5         # momentum of the memory update
CRD_EPS = 1e-7          # ContrastLoss's eps
# crd's and crd_kd's own settings (constants of the method: in a setting's name only when
# changed), defaulting to the values above
CRD_SETTINGS = (
    HyperParameter('dim', 'd', 'embedding size', default=CRD_FEAT_DIM, low=1, integer=True,
                   axis=False, help='the size of the embeddings of the pooled features (128)'),
    HyperParameter('k', 'k', 'negatives K', default=CRD_NCE_K, low=1, integer=True, axis=False,
                   help='negatives (images of other classes) per image (16384)'),
    HyperParameter('tau', 'tau', 'temperature tau', default=CRD_NCE_T, low=0.0, low_open=True,
                   axis=False, help='the temperature of the scores (0.07)'),
    HyperParameter('momentum', 'm', 'memory momentum', default=CRD_NCE_M, low=0.0, high=1.0,
                   axis=False, help='the momentum of the memory update (0.5)'),
)


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
    def points(cls, student_shapes, teacher_shapes, params=None):
        for who, shapes in (('student', student_shapes), ('teacher', teacher_shapes)):
            if 'pooled' not in shapes:
                raise ValueError(f"CRD: the {who} names no 'pooled' embedding")
        return ('pooled',), ('pooled',)

    def __init__(self, params, context):
        super().__init__(params, context)
        d = self.params['dim']
        self.embed_s = Embed(math.prod(context.student_shapes['pooled'][1:]), d)
        self.embed_t = Embed(math.prod(context.teacher_shapes['pooled'][1:]), d)
        n = len(context.train_labels)
        stdv = 1.0 / math.sqrt(d / 3)
        self.register_buffer('memory_s', torch.rand(n, d).mul_(2 * stdv).add_(-stdv))
        self.register_buffer('memory_t', torch.rand(n, d).mul_(2 * stdv).add_(-stdv))
        self.register_buffer('z', torch.full((2,), -1.0))  # Z1, Z2; < 0 until the first batch
        self.register_buffer('train_labels', context.train_labels.clone(), persistent=False)
        self.nce_k, self.nce_t = self.params['k'], self.params['tau']
        self.nce_m = self.params['momentum']

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


@register_distiller('crd', defaults={'beta': 0.8}, settings=CRD_SETTINGS, parts=('ce', 'crd'),
                    help='loss = CE + beta*NCE (contrastive representation distillation, Tian '
                         'et al.): embeddings of the pooled features against a momentum memory '
                         'of every training image, 16384 negatives, tau 0.07; --beta weights '
                         'it (0.8).')
class CRD(CRDBase):
    def distill(self, x):
        crd = self.batch_loss(x.labels, x.student_feats, x.teacher_feats, x.batch)
        return x.ce + self.params['beta'] * crd, {'ce': x.ce, 'crd': crd}


@register_distiller('crd_kd', defaults={'temperature': 4.0, 'beta': 0.8},
                    settings=CRD_SETTINGS, parts=('ce', 'kd', 'crd'),
                    help='loss = CE + T^2*KL(teacher||student) + beta*NCE: crd with KD, as '
                         "RepDistiller's -a 1 -b 0.8; --temperature is T (4) and --beta "
                         'weights the NCE term (0.8).')
class CRDWithKD(CRDBase):
    def distill(self, x):
        crd = self.batch_loss(x.labels, x.student_feats, x.teacher_feats, x.batch)
        t = self.params['temperature']
        # kd_loss at alpha 0 is exactly T^2 KL: the KD term with weight 1 next to CE
        kd, _ = kd_loss(x.logits, x.teacher_logits.to(x.logits.dtype), x.labels,
                        temperature=t, alpha=0.0)
        return x.ce + kd + self.params['beta'] * crd, {'ce': x.ce, 'kd': kd, 'crd': crd}
