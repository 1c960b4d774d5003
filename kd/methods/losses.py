"""The logit losses: ce, kd, dkd, ls and dist, registered in the method registry (registry.py).

Every loss is a pure function

    fn(student_logits, teacher_logits, labels, *, epoch=1, **settings, **options) -> (loss, parts)

with its formula in its docstring. CE(s, y) in the formulas is the cross-entropy on the labels
(`hard_label_ce`); `options` are the recipe's settings of it: `label_smoothing` (0 in the
standard recipe, 0.2 in fast). Any other option is refused (TypeError). `epoch` is the 1-based
current epoch (a float is fine); `settings` are the loss's declared settings (the shared knobs
`temperature` and `alpha`, ..., and its own, e.g. DKD's `warmup`), whose defaults (the authors'
CIFAR configuration) are the function's keyword defaults and `LOSSES[name].settings`. `parts`
maps names to scalar tensors for logging: always 'ce' (plain cross-entropy on the labels,
unweighted) and the distillation terms, unweighted by the mixing weights but including their
T^2 factor.

All softmax / KL math runs in float32 whatever the input dtype (float64 inputs stay float64),
no gradient reaches the teacher's logits, and every KL divergence is summed over classes and
averaged over the batch.
"""
import torch
import torch.nn.functional as F

from kd.methods.registry import HyperParameter, register_loss

# Decoupled KD, as in the authors' configuration (mdistiller/engine/cfg.py, CFG.DKD): the
# defaults of dkd's settings tckd_weight, nckd_weight and warmup
DKD_TCKD_WEIGHT = 1.0    # CFG.DKD.ALPHA
DKD_NCKD_WEIGHT = 8.0    # CFG.DKD.BETA
DKD_WARMUP_EPOCHS = 20   # CFG.DKD.WARMUP
# Logit standardisation (Sun et al., CVPR 2024; sunshangquan/logit-standardization-KD): the
# epsilon added to the standard deviation in the authors' normalize(), and what their
# --logit-stand flag (tools/train.py, --base-temp 2 --kd-weight 9) does to each loss: the
# temperature becomes 2 and the distillation weight is multiplied (KD: KD_WEIGHT 0.9 -> 9, so
# 10x; DKD: ALPHA and BETA x 9). They publish no DIST setting: there it only standardises.
LS_EPS = 1e-7
LS_TEMPERATURE = 2.0       # --base-temp
LS_WEIGHT = {'kd': 10.0, 'dkd': 9.0, 'dist': 1.0}
# DIST (Huang et al., NeurIPS 2022; hunto/image_classification_sota, dist_cifar.yaml: kd
# 'dist_t4', kd_loss_weight 2, DIST(beta=1, gamma=1)): CE + 2 * T^2 (inter + intra)
DIST_TEMPERATURE = 4.0
DIST_INTER_WEIGHT = 2.0    # kd_loss_weight * beta
DIST_INTRA_WEIGHT = 2.0    # kd_loss_weight * gamma
DIST_EPS = 1e-8            # pearson_correlation's eps

# dkd's own settings (constants of the method: in a setting's name only when changed)
DKD_SETTINGS = (
    HyperParameter('warmup', 'w', 'warm-up epochs', default=DKD_WARMUP_EPOCHS, low=0,
                   integer=True, axis=False,
                   help='epochs over which the distillation weight ramps up linearly '
                        '(0: full weight from the start)'),
    HyperParameter('tckd_weight', 'tw', 'TCKD weight', default=DKD_TCKD_WEIGHT, low=0.0,
                   axis=False, help='weight of the target-class term TCKD (the authors\' alpha)'),
    HyperParameter('nckd_weight', 'nw', 'NCKD weight', default=DKD_NCKD_WEIGHT, low=0.0,
                   axis=False, help='weight of the non-target-class term NCKD (the authors\' '
                                    'beta)'),
)


# ---------------------------------------------------------------------------------------------
# Shared pieces

def _as_float(x):
    """float32 for any floating dtype (bf16, fp16, float32), float64 kept as is."""
    return x if x.dtype == torch.float64 else x.float()


def _kl_logits(teacher_logits, student_logits):
    """KL(softmax(teacher) || softmax(student)), summed over classes, averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits, dim=1), F.log_softmax(teacher_logits, dim=1),
                    reduction='batchmean', log_target=True)


def hard_label_ce(logits, labels, label_smoothing=0.0):
    """CE(s, y): cross-entropy on the labels, batch mean, with the recipe's label smoothing
    (the target puts 1 - label_smoothing + label_smoothing / C on the label and
    label_smoothing / C on every class). logits: B x C; labels: B int64."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def _non_target(logits, labels):
    """B x (C-1): each row's logits without its label's column, in class order.

    Gathered with computed indices (no boolean mask), so nothing waits on the device.
    """
    b, c = logits.shape
    cols = torch.arange(c - 1, device=logits.device).expand(b, c - 1)
    cols = cols + (cols >= labels[:, None]).long()
    return logits.gather(1, cols)


def _zscore(logits):
    """(z - mean) / (std + 1e-7) per sample, with torch.std's default unbiased (n - 1) estimator,
    as the authors' normalize() computes it."""
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)   # correction=1, the authors' logit.std(dim=-1)
    return (logits - mean) / (std + LS_EPS)


# ---------------------------------------------------------------------------------------------
# The losses

@register_loss('ce', defaults={}, uses_teacher=False, parts=('ce',),
               help='Cross-entropy on the labels only (no teacher); '
                    '--alpha and --temperature do not apply.')
def ce_loss(student_logits, teacher_logits, labels, *, epoch=1, **options):
    """The baseline: loss = CE(student, labels). teacher_logits is ignored (may be None).

    parts: {'ce'}.
    """
    del teacher_logits, epoch
    ce = hard_label_ce(_as_float(student_logits), labels, **options)
    return ce, {'ce': ce}


def _standardized(student, teacher, on):
    """Both logits z-scored (logit standardisation) when `on`, else as they are."""
    return (_zscore(student), _zscore(teacher)) if on else (student, teacher)


LS_SWITCH_HELP = ('--logit-standardization on z-scores both logits first (Sun et al.; its '
                  'authors\' T=2 by default and the distillation weight x{factor:g})')


@register_loss('kd', defaults={'temperature': 4.0, 'alpha': 0.1},
               ls_defaults={'temperature': LS_TEMPERATURE}, parts=('ce', 'kd'),
               help='loss = alpha*CE + (1-alpha)*T^2*KL(teacher||student) (Hinton et al.): '
                    '--alpha weights the hard labels (0.1 puts 0.9 on the teacher) and '
                    '--temperature is T; ' + LS_SWITCH_HELP.format(factor=LS_WEIGHT['kd'])
                    + ', which is ls.')
def kd_loss(student_logits, teacher_logits, labels, *, epoch=1, temperature=4.0, alpha=0.1,
            logit_standardization=False, **options):
    """Hinton et al.'s knowledge distillation ("Distilling the Knowledge in a Neural Network",
    2015).

        loss = alpha * CE(s, y) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T))

    alpha weights the hard labels. With logit_standardization, s and t in the KL are z-scored
    (zs below) and the KL's weight is 10 * (1 - alpha), the authors' KD_WEIGHT 9 at alpha 0.1:
    that is the `ls` loss. parts: {'ce': CE, 'kd': T^2 * KL}.
    """
    del epoch
    t = float(temperature)
    s = _as_float(student_logits)
    te = _as_float(teacher_logits.detach())
    ce = hard_label_ce(s, labels, **options)
    zs, zt = _standardized(s, te, logit_standardization)
    kd = _kl_logits(zt / t, zs / t) * t * t
    weight = (1 - alpha) * (LS_WEIGHT['kd'] if logit_standardization else 1.0)
    return alpha * ce + weight * kd, {'ce': ce, 'kd': kd}


@register_loss('dkd', defaults={'temperature': 4.0}, settings=DKD_SETTINGS,
               ls_defaults={'temperature': LS_TEMPERATURE}, parts=('ce', 'tckd', 'nckd'),
               help='loss = CE + min(epoch/20, 1)*T^2*(1*TCKD + 8*NCKD), TCKD and NCKD the KLs of the '
                    'binary target/rest and the non-target softmaxes at T (Zhao et al., authors\' '
                    'CIFAR weights): --temperature is T and --alpha does not apply; '
                    + LS_SWITCH_HELP.format(factor=LS_WEIGHT['dkd']) + '.')
def dkd_loss(student_logits, teacher_logits, labels, *, epoch=1, temperature=4.0,
             logit_standardization=False, warmup=DKD_WARMUP_EPOCHS,
             tckd_weight=DKD_TCKD_WEIGHT, nckd_weight=DKD_NCKD_WEIGHT, **options):
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022), as in the authors' code.

        loss = CE(s, y) + min(epoch / warmup, 1) * (tckd_weight * TCKD + nckd_weight * NCKD)
        TCKD = T^2 * KL([p_y(t), 1 - p_y(t)] || [p_y(s), 1 - p_y(s)]),  p = softmax(logits / T)
        NCKD = T^2 * KL(softmax(t_{-y} / T) || softmax(s_{-y} / T))

    where z_{-y} are the logits without the target class. The authors subtract 1000 from the
    target's logit/T before the softmax; dropping that column is the exact limit of it and stays
    right however large the logits. log(1 - p_y) is computed as
    logsumexp(z_{-y} / T) - logsumexp(z / T), so a confident teacher never takes log(0).
    With logit_standardization, TCKD and NCKD are taken on z-scored logits and both weights are
    multiplied by 9 (the authors' --logit-stand --kd-weight 9). The settings default to the
    authors' CIFAR values: warmup 20 epochs (0: no ramp), tckd_weight 1, nckd_weight 8.
    parts: {'ce', 'tckd', 'nckd'}, unweighted by the weights, the warm-up factor and the LS
    factor.
    """
    t = float(temperature)
    s = _as_float(student_logits)
    te = _as_float(teacher_logits.detach())
    ce = hard_label_ce(s, labels, **options)
    zs, zt = _standardized(s, te, logit_standardization)

    def binary_and_rest(logits):
        z = logits / t
        rest = _non_target(z, labels)
        lse_all = torch.logsumexp(z, dim=1, keepdim=True)
        log_target = z.gather(1, labels[:, None]) - lse_all
        log_other = torch.logsumexp(rest, dim=1, keepdim=True) - lse_all
        return torch.cat([log_target, log_other], dim=1), rest

    log_bin_s, rest_s = binary_and_rest(zs)
    log_bin_t, rest_t = binary_and_rest(zt)
    tckd = F.kl_div(log_bin_s, log_bin_t, reduction='batchmean', log_target=True) * t * t
    nckd = _kl_logits(rest_t, rest_s) * t * t
    ramp = min(float(epoch) / warmup, 1.0) if warmup else 1.0
    factor = LS_WEIGHT['dkd'] if logit_standardization else 1.0
    loss = ce + ramp * factor * (tckd_weight * tckd + nckd_weight * nckd)
    return loss, {'ce': ce, 'tckd': tckd, 'nckd': nckd}


@register_loss('ls', defaults={'temperature': LS_TEMPERATURE, 'alpha': 0.1}, parts=('ce', 'kd'),
               help='loss = alpha*CE + 10*(1-alpha)*T^2*KL on z-scored logits (Sun et al.): kd '
                    'with --logit-standardization on; the default --alpha 0.1 gives the '
                    'authors\' weights 0.1 and 9, --temperature is T.')
def ls_loss(student_logits, teacher_logits, labels, *, epoch=1, temperature=LS_TEMPERATURE,
            alpha=0.1, **options):
    """KD with logit standardisation (Sun et al., "Logit Standardization in Knowledge
    Distillation", CVPR 2024): kd_loss with logit_standardization on.

        zs(z) = (z - mean(z)) / (std(z) + 1e-7)      per sample, std with the n - 1 estimator
        loss  = alpha * CE(s, y) + 10 * (1 - alpha) * T^2 * KL(softmax(zs(t) / T) || softmax(zs(s) / T))

    The CE is on the raw logits. alpha = 0.1 gives the authors' CIFAR weights, 0.1 and 9.
    parts: {'ce': CE, 'kd': T^2 * KL on the standardised logits}.
    """
    return kd_loss(student_logits, teacher_logits, labels, epoch=epoch, temperature=temperature,
                   alpha=alpha, logit_standardization=True, **options)


def _pearson_rows(a, b):
    """B: the Pearson correlation of each row of a with the same row of b (B x C), with the
    authors' eps 1e-8 added to the product of the norms."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + DIST_EPS)


@register_loss('dist', defaults={'temperature': DIST_TEMPERATURE, 'beta': DIST_INTER_WEIGHT,
                                 'gamma': DIST_INTRA_WEIGHT},
               ls_defaults={}, parts=('ce', 'dist_inter', 'dist_intra'),
               help='loss = CE + beta*T^2*(1 - mean_i rho(p_s_i, p_t_i)) + gamma*T^2*(1 - mean_c '
                    'rho(p_s_c, p_t_c)), rho the Pearson correlation of the softmaxes at T per '
                    'image (inter-class) and per class over the batch (intra-class) (DIST, Huang '
                    'et al.): --temperature is T (4), --beta and --gamma weight the inter- and '
                    'intra-class relations (2, 2), --alpha does not apply; '
                    '--logit-standardization on z-scores both logits first.')
def dist_loss(student_logits, teacher_logits, labels, *, epoch=1, temperature=DIST_TEMPERATURE,
              beta=DIST_INTER_WEIGHT, gamma=DIST_INTRA_WEIGHT, logit_standardization=False,
              **options):
    """DIST: knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022), as the
    authors' lib/models/losses/dist_kd.py and CIFAR configuration (dist_cifar.yaml).

        p_s = softmax(s / T), p_t = softmax(t / T)                          B x C
        inter = 1 - mean over images i of rho(p_s[i, :], p_t[i, :])
        intra = 1 - mean over classes c of rho(p_s[:, c], p_t[:, c])
        loss  = CE(s, y) + beta * T^2 * inter + gamma * T^2 * intra

    rho(a, b) = <a - mean a, b - mean b> / (|a - mean a| |b - mean b| + 1e-8). The authors'
    CIFAR loss is CE + 2 * (T^2 inter + T^2 intra) at T = 4: beta = gamma = 2. With
    logit_standardization the logits are z-scored before the softmaxes. parts: {'ce',
    'dist_inter': T^2 * inter, 'dist_intra': T^2 * intra}.
    """
    del epoch
    t = float(temperature)
    s = _as_float(student_logits)
    te = _as_float(teacher_logits.detach())
    ce = hard_label_ce(s, labels, **options)
    zs, zt = _standardized(s, te, logit_standardization)
    p_s, p_t = F.softmax(zs / t, dim=1), F.softmax(zt / t, dim=1)
    inter = (1 - _pearson_rows(p_s, p_t).mean()) * t * t
    intra = (1 - _pearson_rows(p_s.T, p_t.T).mean()) * t * t
    return ce + beta * inter + gamma * intra, {'ce': ce, 'dist_inter': inter,
                                                'dist_intra': intra}


