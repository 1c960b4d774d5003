"""Feature-map methods: the student's feature maps are taught to match the teacher's, through a
trained connector where the shapes differ.

- fitnet: FitNets (Romero et al., ICLR 2015), CE + 100 * MSE(regressor(student hint), teacher
  hint);
- at: attention transfer (Zagoruyko & Komodakis, ICLR 2017), CE + 1000 * sum over stages of the
  squared distance between normalised attention maps, p = 2;
- nst: neuron selectivity transfer (Huang & Wang, arXiv 2017), CE + 50 * sum over stages of the
  squared MMD, polynomial kernel of degree 2, between the channels' normalised maps;
- vid: variational information distillation (Ahn et al., CVPR 2019), CE + sum over stages of
  the Gaussian negative log-likelihood of the teacher's map under a regressor of the student's,
  with a learned variance per channel;
- ofd: overhaul of feature distillation (Heo et al., ICCV 2019), CE + 0.001 * sum over stages
  of the partial L2 distance between connector(student pre-activation) and the teacher's
  pre-activation, with a margin per channel from the teacher's BatchNorm.

Each with its authors' CIFAR-100 configuration (mdistiller engine/cfg.py).
"""
import math
from statistics import NormalDist

import torch
import torch.nn as nn
import torch.nn.functional as F

from kd.methods.base import Distiller, stage_names
from kd.methods.registry import HyperParameter, register_distiller

# FitNets (mdistiller CFG.FITNET): the hint is feats[HINT_LAYER], post-activation (the default
# of fitnet's setting 'hint'; so are AT_P of at's 'p' and VID_INIT_PRED_VAR of vid's 'init_var')
FITNET_HINT_LAYER = 2
# attention transfer (mdistiller CFG.AT.P): attention maps are the channel mean of |F|^p
AT_P = 2
# VID (mdistiller CFG.VID.INIT_PRED_VAR, CFG.VID.EPS): each channel's variance starts at 5; eps
# is added to the softplus that keeps it positive
VID_INIT_PRED_VAR = 5.0
VID_EPS = 1e-5
# OFD (mdistiller CFG.OFD.CONNECTOR.KERNEL_SIZE): the connectors are 1x1 convolutions
OFD_CONNECTOR_KERNEL_SIZE = 1
# OFD (mdistiller OFD.py): a channel whose BN output is negative with probability at most this
# gets the margin -3 s instead of E[x | x < 0]
OFD_MIN_NEGATIVE_MASS = 0.001


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
                    settings=(HyperParameter(
                        'hint', 'h', 'hint stage', default=FITNET_HINT_LAYER, low=1,
                        integer=True, axis=False,
                        help='the stage whose output is the hint, in both models (stage2)'),),
                    help='loss = CE + beta*MSE(r(S_h), T_h) (FitNets, Romero et al.): h the hint '
                         'layer stage2, r a trained convolutional regressor; --beta weights the '
                         'hint (100).')
class FitNet(Distiller):
    @classmethod
    def points(cls, student_shapes, teacher_shapes, params=None):
        hint = f'stage{cls.settings(params)["hint"]}'
        for who, shapes in (('student', student_shapes), ('teacher', teacher_shapes)):
            if hint not in shapes:
                raise ValueError(f'FitNets: the {who} has no hint layer {hint!r}')
        return (hint,), (hint,)

    def __init__(self, params, context):
        super().__init__(params, context)
        hint = self.student_points[0]
        self.regressor = ConvRegressor(context.student_shapes[hint], context.teacher_shapes[hint])

    def distill(self, x):
        hint = self.student_points[0]
        hint_loss = F.mse_loss(self.regressor(x.student_feats[hint]), x.teacher_feats[hint])
        return x.ce + self.params['beta'] * hint_loss, {'ce': x.ce, 'fitnet': hint_loss}


# ---------------------------------------------------------------------------------------------
# Attention transfer

def attention_map(feat, p=AT_P):
    """normalize_2(mean over channels of F^p), flattened: B x (H*W)."""
    return F.normalize(feat.pow(p).mean(1).flatten(1))


def pool_to_smaller(fs, ft):
    """(fs, ft) with the map of greater height average-pooled to the other's height, square (as
    mdistiller's AT, NST and VID losses do: CIFAR maps are square)."""
    hs, ht = fs.shape[2], ft.shape[2]
    if hs > ht:
        fs = F.adaptive_avg_pool2d(fs, (ht, ht))
    elif hs < ht:
        ft = F.adaptive_avg_pool2d(ft, (hs, hs))
    return fs, ft


def attention_distance(fs, ft, p=AT_P):
    """mean over batch and positions of (a(S) - a(T))^2; the larger map is first average-pooled
    to the smaller one's size (mdistiller's single_stage_at_loss)."""
    fs, ft = pool_to_smaller(fs, ft)
    return (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()


def zipped_stages(student_shapes, teacher_shapes, method):
    """(student stages, teacher stages) paired in order, stage j with stage j (the reference
    zips feats[1:]); ValueError when either model names none."""
    pairs = list(zip(stage_names(student_shapes), stage_names(teacher_shapes)))
    if not pairs:
        raise ValueError(f'{method}: the student or the teacher names no stages')
    return tuple(a for a, _ in pairs), tuple(b for _, b in pairs)


@register_distiller('at', defaults={'beta': 1000.0}, parts=('ce', 'at'),
                    settings=(HyperParameter(
                        'p', 'p', 'attention exponent p', default=AT_P, low=1,
                        integer=True, axis=False,
                        help='the exponent of the attention maps, mean over channels of '
                             '|F|^p (2)'),),
                    help='loss = CE + beta*sum_j mean (a(S_j) - a(T_j))^2 (attention transfer, '
                         'Zagoruyko & Komodakis): a(F) the L2-normalised channel mean of F^2 of '
                         'each stage, paired in order; --beta weights it (1000).')
class AttentionTransfer(Distiller):
    @classmethod
    def points(cls, student_shapes, teacher_shapes, params=None):
        return zipped_stages(student_shapes, teacher_shapes, 'attention transfer')

    def distill(self, x):
        at = sum(attention_distance(x.student_feats[a], x.teacher_feats[b], self.params['p'])
                 for a, b in zip(self.student_points, self.teacher_points))
        return x.ce + self.params['beta'] * at, {'ce': x.ce, 'at': at}


# ---------------------------------------------------------------------------------------------
# Neuron selectivity transfer

def polynomial_kernel_mean(a, b):
    """mean over the batch and every pair of channels (i of a, j of b) of (a_i . b_j)^2, for
    B x C x N maps: the degree-2 polynomial kernel k(x, y) = (x . y)^2 (c = 0). One batched
    product, where the reference broadcasts a B x Cb x Ca x N tensor (the same sums)."""
    return (a @ b.transpose(1, 2)).pow(2).mean()


def nst_distance(fs, ft):
    """The squared MMD between the student's and the teacher's channels, each channel's map
    (flattened, the larger map average-pooled to the smaller one's size) L2-normalised:
    mean k(T, T) + mean k(S, S) - 2 mean k(S, T), the teacher's term without gradient
    (mdistiller's single_stage_nst_loss)."""
    fs, ft = pool_to_smaller(fs, ft)
    fs = F.normalize(fs.flatten(2), dim=2)
    ft = F.normalize(ft.flatten(2), dim=2)
    return (polynomial_kernel_mean(ft, ft).detach() + polynomial_kernel_mean(fs, fs)
            - 2 * polynomial_kernel_mean(fs, ft))


@register_distiller('nst', defaults={'beta': 50.0}, parts=('ce', 'nst'),
                    help='loss = CE + beta*sum_j MMD^2(S_j, T_j) (neuron selectivity transfer, '
                         'Huang & Wang): the channels of each stage, their maps L2-normalised, '
                         'compared under the kernel (x.y)^2, stages paired in order; --beta '
                         'weights it (50).')
class NeuronSelectivityTransfer(Distiller):
    """Neuron selectivity transfer (Huang & Wang, "Like What You Like: Knowledge Distill via
    Neuron Selectivity Transfer", arXiv 1707.01219, 2017), as mdistiller's NST.py.

    For each stage j (stage j of the student with stage j of the teacher, in order, as the
    reference zips feats[1:]), S_j: B x Cs x H x W and T_j: B x Ct x H' x W' (the larger map
    average-pooled to the smaller one's size), each channel's flattened map L2-normalised:
    nst = sum_j [mean_{b,i,i'} (t_i . t_i')^2 + mean_{b,i,i'} (s_i . s_i')^2
                 - 2 mean_{b,i,i'} (s_i . t_i')^2],
    the teacher's term without gradient; loss = CE + beta * nst. No parameters of its own.
    Runs in float32 (float64 stays float64).
    """

    @classmethod
    def points(cls, student_shapes, teacher_shapes, params=None):
        return zipped_stages(student_shapes, teacher_shapes, 'NST')

    def distill(self, x):
        nst = sum(nst_distance(x.student_feats[a], x.teacher_feats[b])
                  for a, b in zip(self.student_points, self.teacher_points))
        return x.ce + self.params['beta'] * nst, {'ce': x.ce, 'nst': nst}


# ---------------------------------------------------------------------------------------------
# Variational information distillation

def conv1x1(in_channels, out_channels):
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


def vid_regressor(student_channels, teacher_channels):
    """VID's mean of the teacher's map given the student's: conv1x1-ReLU-conv1x1-ReLU-conv1x1
    without biases, Cs -> Ct -> Ct -> Ct channels (PyTorch's default initialisation, as the
    reference)."""
    return nn.Sequential(conv1x1(student_channels, teacher_channels), nn.ReLU(),
                         conv1x1(teacher_channels, teacher_channels), nn.ReLU(),
                         conv1x1(teacher_channels, teacher_channels))


def vid_nll(regressor, log_scale, fs, ft, eps=VID_EPS):
    """mean over batch, channels and positions of 0.5 ((mu - t)^2 / var + log var): mu =
    regressor(S) (S and T at the smaller map's size), var = softplus(log_scale) + eps per
    channel (mdistiller's vid_loss; softplus is its log(1 + exp(.)) without the overflow)."""
    fs, ft = pool_to_smaller(fs, ft)
    mu = regressor(fs)
    var = (F.softplus(log_scale) + eps).to(mu.dtype).view(1, -1, 1, 1)
    return (0.5 * ((mu - ft).pow(2) / var + torch.log(var))).mean()


@register_distiller('vid', defaults={'beta': 1.0}, parts=('ce', 'vid'),
                    settings=(HyperParameter(
                        'init_var', 'v', 'initial variance', default=VID_INIT_PRED_VAR,
                        low=VID_EPS, low_open=True, axis=False,
                        help='the variance each channel starts at (5)'),),
                    help='loss = CE + beta*sum_j mean 0.5((r_j(S_j) - T_j)^2/v_j + log v_j) '
                         '(variational information distillation, Ahn et al.): r_j a trained '
                         '1x1-convolution regressor, v_j a trained variance per channel '
                         '(starting at 5), stages paired in order; --beta weights it (1).')
class VariationalInformationDistillation(Distiller):
    """Variational information distillation (Ahn, Hu, Damianou, Lawrence & Dai, "Variational
    Information Distillation for Knowledge Transfer", CVPR 2019), as mdistiller's VID.py, the
    authors' code (github.com/ssahn0215/variational-information-distillation).

    For each stage j (paired in order, as the reference zips feats[1:]), S_j: B x Cs x H x W,
    T_j: B x Ct x H' x W' (the larger map average-pooled to the smaller one's size), a
    regressor r_j (vid_regressor, Cs -> Ct) and a log-scale a_j: Ct, var_j = softplus(a_j) +
    1e-5, a_j initialised to log(exp(5 - 1e-5) - 1) so var_j starts at 5:
    vid = sum_j mean_{b,c,h,w} 0.5 ((r_j(S_j) - T_j)^2 / var_j + log var_j);
    loss = CE + beta * vid.

    The log-scales are parameters of this module, so they train with the regressors: the
    authors' code and RepDistiller (whose VIDLoss holds them as nn.Parameters of a trained
    criterion) learn the variance, which is the method (a variational lower bound maximised
    over the variational distribution). mdistiller keeps them in a plain list, so its optimizer
    never sees them and they stay at their initial value: a known bug, not followed here.
    Runs in float32 (float64 stays float64).
    """

    @classmethod
    def points(cls, student_shapes, teacher_shapes, params=None):
        return zipped_stages(student_shapes, teacher_shapes, 'VID')

    def __init__(self, params, context):
        super().__init__(params, context)
        # softplus^-1(init_var - eps): the variance starts at init_var (5)
        start = math.log(math.expm1(self.params['init_var'] - VID_EPS))
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()
        for a, b in zip(self.student_points, self.teacher_points):
            cs, ct = context.student_shapes[a][1], context.teacher_shapes[b][1]
            self.regressors.append(vid_regressor(cs, ct))
            self.log_scales.append(nn.Parameter(torch.full((ct,), start)))

    def distill(self, x):
        vid = sum(vid_nll(r, log_scale, x.student_feats[a], x.teacher_feats[b])
                  for r, log_scale, a, b in zip(self.regressors, self.log_scales,
                                                self.student_points, self.teacher_points))
        return x.ce + self.params['beta'] * vid, {'ce': x.ce, 'vid': vid}


# ---------------------------------------------------------------------------------------------
# Overhaul of feature distillation

def ofd_margin(weight, bias, min_negative_mass=OFD_MIN_NEGATIVE_MASS):
    """OFD's margin per channel of a BatchNorm's output, x ~ N(m, s^2) with s = |gamma|, m =
    beta: E[x | x < 0] = m - s phi(m/s) / Phi(-m/s) when Phi(-m/s) > 0.001, else -3 s
    (mdistiller's OFD.init_ofd_modules; a zero scale, which the reference divides by, gives
    the limit min(m, 0)). weight, bias: C tensors; returns C float32 values."""
    normal = NormalDist()
    margins = []
    for s, m in zip(weight.double().abs().tolist(), bias.double().tolist()):
        if s == 0:
            margins.append(min(m, 0.0))
            continue
        negative_mass = normal.cdf(-m / s)
        if negative_mass > min_negative_mass:
            margins.append(m - s * normal.pdf(m / s) / negative_mass)
        else:
            margins.append(-3 * s)
    return torch.tensor(margins, dtype=torch.float32)


def ofd_connector(student_channels, teacher_channels, kernel_size=OFD_CONNECTOR_KERNEL_SIZE):
    """OFD's connector: conv (no bias, He-normal: N(0, 2 / (k k Ct))) then BatchNorm (1, 0), Cs
    -> Ct channels (mdistiller's ConnectorConvBN)."""
    conv = nn.Conv2d(student_channels, teacher_channels, kernel_size,
                     padding=(kernel_size - 1) // 2, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (kernel_size * kernel_size
                                                      * teacher_channels)))
    return nn.Sequential(conv, nn.BatchNorm2d(teacher_channels))


def partial_l2(source, target, margin):
    """OFD's distance, summed over channels and positions and averaged over the batch: per
    element (s - m)^2 where s > m >= t, (s - t)^2 where s > t > m and t <= 0, (s - t)^2 where
    t > 0, else 0 (a student value below a negative teacher's does not count; the teacher's
    negatives count only down to the margin m)."""
    margin = margin.to(source.dtype)
    loss = ((source - margin).pow(2) * ((source > margin) & (target <= margin))
            + (source - target).pow(2) * ((source > target) & (target > margin) & (target <= 0))
            + (source - target).pow(2) * (target > 0))
    return loss.sum() / source.shape[0]


def pre_activation_stages(shapes):
    """'stage1_pre', 'stage2_pre', ... of a {point: shape} map, in order, while present."""
    names = []
    for stage in stage_names(shapes):
        if f'{stage}_pre' not in shapes:
            break
        names.append(f'{stage}_pre')
    return names


@register_distiller('ofd', defaults={'beta': 0.001}, parts=('ce', 'ofd'),
                    help='loss = CE + beta*sum_j d_p(c_j(S_j), T_j)/2^(n-j) (overhaul of '
                         'feature distillation, Heo et al.): S_j, T_j the pre-activations of '
                         'the last n stages of both, c_j a trained 1x1 conv-BN connector, d_p '
                         'the partial L2 with margins from the teacher\'s BatchNorms; --beta '
                         'weights it (0.001).')
class OverhaulFeatureDistillation(Distiller):
    """Overhaul of feature distillation (Heo, Kim, Yun, Park, Kwak & Choi, "A Comprehensive
    Overhaul of Feature Distillation", ICCV 2019), as mdistiller's OFD.py.

    Points: the pre-activations 'stage1_pre'..'stageN_pre' (the reference's preact_feats[1:]),
    the last n = min(Ns, Nt) of each paired in order (mdistiller's _align_list). For stage j of
    n (1-based), S_j: B x Cs x H x W, T_j: B x Ct x H' x W' average-pooled to H x W, connector
    c_j (ofd_connector, Cs -> Ct) and margins m_j: Ct from the teacher's BatchNorm before the
    ReLU at that point (ofd_margin; BuildContext.teacher_bn, which kd.models.registry.bn_before_relu
    names):
    ofd = sum_j partial_l2(c_j(S_j), T_j, m_j) / 2^(n - j);  loss = CE + beta * ofd.
    The margins are buffers (saved in the resume state), float32 as in the reference, computed
    once from the teacher's weights at build time. The margins follow the aligned teacher
    stages (the reference indexes them from the teacher's first stage, which differs only when
    the teacher has more stages than the student). A teacher that names no such BatchNorm is
    refused. Runs in float32 (float64 stays float64).
    """

    @classmethod
    def points(cls, student_shapes, teacher_shapes, params=None):
        student, teacher = (pre_activation_stages(student_shapes),
                            pre_activation_stages(teacher_shapes))
        n = min(len(student), len(teacher))
        if not n:
            who = 'student' if not student else 'teacher'
            raise ValueError(f"OFD: the {who} names no pre-activation points 'stage1_pre'...")
        return tuple(student[-n:]), tuple(teacher[-n:])

    @classmethod
    def check_teacher(cls, teacher_points, teacher_bn):
        missing = [p for p in teacher_points if p not in (teacher_bn or {})]
        if missing:
            raise ValueError(
                f'OFD: the teacher names no BatchNorm before the ReLU at {", ".join(missing)} '
                f'(its margins come from it); give the teacher\'s class a bn_before_relu() '
                f'method or register it with register_model(name, bn_before_relu='
                f'{{"stage1_pre": "module.path", ...}}), or choose another method')

    def __init__(self, params, context):
        super().__init__(params, context)
        self.connectors = nn.ModuleList()
        for i, (a, b) in enumerate(zip(self.student_points, self.teacher_points)):
            self.connectors.append(ofd_connector(context.student_shapes[a][1],
                                                 context.teacher_shapes[b][1]))
            self.register_buffer(f'margin{i}', ofd_margin(*context.teacher_bn[b]).view(
                1, -1, 1, 1))

    def margins(self):
        return [getattr(self, f'margin{i}') for i in range(len(self.connectors))]

    def distill(self, x):
        n = len(self.connectors)
        ofd = 0
        for i, (connector, margin, a, b) in enumerate(zip(self.connectors, self.margins(),
                                                          self.student_points,
                                                          self.teacher_points)):
            source = connector(x.student_feats[a])
            target = F.adaptive_avg_pool2d(x.teacher_feats[b], source.shape[-2:]).detach()
            ofd = ofd + partial_l2(source, target, margin) / 2 ** (n - i - 1)
        return x.ce + self.params['beta'] * ofd, {'ce': x.ce, 'ofd': ofd}
