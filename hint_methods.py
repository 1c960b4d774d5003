"""Feature-map methods: the student's feature maps are taught to match the teacher's, through a
trained connector where the shapes differ.

- fitnet: FitNets (Romero et al., ICLR 2015), CE + 100 * MSE(regressor(student hint), teacher
  hint);
- at: attention transfer (Zagoruyko & Komodakis, ICLR 2017), CE + 1000 * sum over stages of the
  squared distance between normalised attention maps, p = 2.

Each with its authors' CIFAR-100 configuration (mdistiller engine/cfg.py).
"""
import torch.nn as nn
import torch.nn.functional as F

from distiller_base import Distiller, stage_names
from losses import register_distiller

# FitNets (mdistiller CFG.FITNET): the hint is feats[HINT_LAYER], post-activation
FITNET_HINT_LAYER = 2
# attention transfer (mdistiller CFG.AT.P): attention maps are the channel mean of |F|^p
AT_P = 2


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
