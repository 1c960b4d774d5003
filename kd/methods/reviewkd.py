"""Knowledge review (ReviewKD: Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge
Review", CVPR 2021), as mdistiller's distillers/ReviewKD.py with its CIFAR-100 configuration
(engine/cfg.py CFG.REVIEWKD, configs/cifar100/reviewkd.yaml).

- reviewkd: CE + 5 * min(epoch / 20, 1) * sum over levels of the hierarchical context loss
  between the student's stages, fused deepest first by attention-based fusion, and the
  teacher's pre-activation stages.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from kd.methods.base import Distiller, stage_names
from kd.methods.registry import HyperParameter, register_distiller

# the defaults of reviewkd's beta and its settings 'warmup' and 'mid_channels'
REVIEWKD_WEIGHT = 5.0          # REVIEWKD.REVIEWKD_WEIGHT (configs/cifar100/reviewkd.yaml)
REVIEWKD_WARMUP_EPOCHS = 20    # REVIEWKD.WARMUP_EPOCHS: the review term ramps up linearly
REVIEWKD_MAX_MID_CHANNEL = 512  # REVIEWKD.MAX_MID_CHANNEL: the ABFs' width, at most
REVIEWKD_STUDENT_PREACT = False  # REVIEWKD.STU_PREACT: the student's post-activation stages
HCL_POOL_SIZES = (4, 2, 1)     # hcl_loss's pyramid of pooled sizes, each weighted half the last


class ABF(nn.Module):
    """Attention-based fusion (mdistiller ABF): x (B x Cin x H x W, one student level) goes
    through a 1x1 convolution and BatchNorm to Cmid channels; with `fuse`, the residual of the
    deeper level (B x Cmid x h x w) is resized to `shape` (nearest) and the two are mixed by two
    per-pixel sigmoid attention maps of a 1x1 convolution of their concatenation,
    x' = x a_0 + r a_1. x' is resized to `out_shape` (nearest) when it differs, then a 3x3
    convolution and BatchNorm give the output (B x Cout x out_shape), compared to the teacher;
    x' is the residual handed to the next, shallower level. The two main convolutions start
    kaiming-uniform with a = 1, as the reference's."""

    def __init__(self, in_channels, mid_channels, out_channels, fuse):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.att_conv = nn.Conv2d(2 * mid_channels, 2, 1) if fuse else None
        nn.init.kaiming_uniform_(self.conv1.weight, a=1)
        nn.init.kaiming_uniform_(self.conv2.weight, a=1)

    def forward(self, x, residual, shape, out_shape):
        x = self.bn1(self.conv1(x))
        if self.att_conv is not None:
            residual = F.interpolate(residual, shape, mode='nearest')
            att = torch.sigmoid(self.att_conv(torch.cat([x, residual], dim=1)))
            x = x * att[:, 0:1] + residual * att[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_shape):
            x = F.interpolate(x, out_shape, mode='nearest')
        return self.bn2(self.conv2(x)), x


def hcl_loss(students, teachers):
    """The hierarchical context loss (mdistiller hcl_loss): sum over levels of
    (MSE(S, T) + sum_k w_k MSE(pool_k(S), pool_k(T))) / (1 + sum_k w_k), pool_k the adaptive
    average pool to k x k for k in 4, 2, 1 below the level's height h (k >= h skipped) and
    w = 1/2, 1/4, 1/8 over the sizes used. S, T: B x C x h x w of the same shape."""
    total = 0.0
    for fs, ft in zip(students, teachers):
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft)
        weight, norm = 1.0, 1.0
        for size in HCL_POOL_SIZES:
            if size >= h:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size),
                                              F.adaptive_avg_pool2d(ft, size))
            norm += weight
        total = total + loss / norm
    return total


def _as_map(feat):
    """A B x D pooled feature as a B x D x 1 x 1 map; maps unchanged."""
    return feat[:, :, None, None] if feat.dim() == 2 else feat


def _spatial(shape):
    """(H, W) of a 1 x C x H x W point, (1, 1) of a 1 x D pooled one."""
    return tuple(shape[2:]) if len(shape) == 4 else (1, 1)


@register_distiller('reviewkd', defaults={'beta': REVIEWKD_WEIGHT}, parts=('ce', 'reviewkd'),
                    settings=(
                        HyperParameter('warmup', 'w', 'warm-up epochs',
                                       default=REVIEWKD_WARMUP_EPOCHS, low=0, integer=True,
                                       axis=False,
                                       help='epochs over which the review term ramps up '
                                            'linearly (20; 0: full weight from the start)'),
                        HyperParameter('mid_channels', 'mc', 'ABF width',
                                       default=REVIEWKD_MAX_MID_CHANNEL, low=1, integer=True,
                                       axis=False,
                                       help='the attention-based fusions\' width, at most '
                                            '(512)')),
                    help='loss = CE + beta*min(epoch/20, 1)*sum_j HCL(ABF_j(S_j..S_n), T_j) '
                         '(knowledge review, Chen et al.): the student\'s stages and pooled '
                         'feature fused deepest first by trained attention-based fusion, against '
                         'the teacher\'s pre-activation stages and pooled feature, HCL an MSE '
                         'over a 4/2/1 pooling pyramid; --beta weights it (5).')
class ReviewKD(Distiller):
    """ReviewKD (mdistiller distillers/ReviewKD.py, CFG.REVIEWKD with REVIEWKD_WEIGHT 5).

    Levels, shallow to deep: the student's post-activation stages 'stage1'..'stageN' and
    'pooled' (B x D, as a B x D x 1 x 1 map), against the teacher's 'stage1_pre'..'stageN_pre'
    and 'pooled' (mdistiller feats[1:] + pooled_feat against preact_feats[1:] + pooled_feat;
    the reference's zip drops the student's stem, which is therefore not read). When the two
    have different numbers of stages, the deepest ones are paired (stage N-k+1..N of each, k the
    smaller count) and the shallower stages of the deeper model are left out (mdistiller's CIFAR
    config names one pair of equal depth; for a deeper student its zips leave out the same
    stages, for a deeper teacher they would pair the outputs with its shallowest stages).

    One ABF per level, built from the shapes (mdistiller's IN_CHANNELS = the student's channels,
    OUT_CHANNELS = the teacher's, SHAPES / OUT_SHAPES = the student's / teacher's spatial sizes
    deepest first, mid channels min(512, D_student)); the deepest (pooled) level has no fusion.
    Going deepest first, level j's ABF fuses S_j with the residual of level j+1 and outputs
    a map of T_j's shape. loss = CE + beta * min(epoch / 20, 1) * sum_j HCL(out_j, T_j); parts:
    'ce' and 'reviewkd' the unweighted HCL sum (no beta, no warm-up). The ABFs train with the
    student (their BatchNorms need more than one image per batch at the 1x1 pooled level). The
    terms run in float32 (float64 in a float64 distiller).
    """

    @classmethod
    def points(cls, student_shapes, teacher_shapes, params=None):
        s_stages, t_stages = stage_names(student_shapes), stage_names(teacher_shapes)
        k = min(len(s_stages), len(t_stages))
        if not k:
            raise ValueError('ReviewKD: the student or the teacher names no stages')
        s_suffix = '_pre' if REVIEWKD_STUDENT_PREACT else ''
        student = tuple(f'{s}{s_suffix}' for s in s_stages[-k:]) + ('pooled',)
        teacher = tuple(f'{t}_pre' for t in t_stages[-k:]) + ('pooled',)
        for who, names, shapes in (('student', student, student_shapes),
                                   ('teacher', teacher, teacher_shapes)):
            missing = [p for p in names if p not in shapes]
            if missing:
                raise ValueError(f'ReviewKD: the {who} has no point {missing[0]!r}')
        return student, teacher

    def __init__(self, params, context):
        super().__init__(params, context)
        s_shapes = [context.student_shapes[p] for p in self.student_points]
        t_shapes = [context.teacher_shapes[p] for p in self.teacher_points]
        # mdistiller's configuration, in its orders: channels shallow to deep, sizes deepest first
        self.in_channels = [s[1] for s in s_shapes]
        self.out_channels = [t[1] for t in t_shapes]
        self.shapes = [_spatial(s) for s in s_shapes[::-1]]
        self.out_shapes = [_spatial(t) for t in t_shapes[::-1]]
        self.mid_channels = min(self.params['mid_channels'], self.in_channels[-1])
        last = len(self.in_channels) - 1
        # deepest first, as the reference's reversed list: only the pooled level has no fusion
        self.abfs = nn.ModuleList(
            ABF(self.in_channels[i], self.mid_channels, self.out_channels[i], fuse=i < last)
            for i in range(last, -1, -1))

    def review(self, student_feats):
        """The ABFs' outputs, shallow to deep, from the student's levels {point: tensor}."""
        x = [_as_map(student_feats[p]) for p in self.student_points[::-1]]
        results, residual = [], None
        for feat, abf, shape, out_shape in zip(x, self.abfs, self.shapes, self.out_shapes):
            out, residual = abf(feat, residual, shape, out_shape)
            results.append(out)
        return results[::-1]

    def distill(self, x):
        targets = [_as_map(x.teacher_feats[p]) for p in self.teacher_points]
        hcl = hcl_loss(self.review(x.student_feats), targets)
        epochs = self.params['warmup']
        ramp = min(float(x.epoch) / epochs, 1.0) if epochs else 1.0
        return x.ce + self.params['beta'] * ramp * hcl, {'ce': x.ce, 'reviewkd': hcl}
