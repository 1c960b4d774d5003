"""A registry of distillation losses, and helpers to expand a command-line grid of settings.

Every loss is a pure function

    fn(student_logits, teacher_logits, labels, *, epoch=1, **hyper, **options) -> (loss, parts)

with its formula in its docstring. CE(s, y) in the formulas is the cross-entropy on the labels
(`hard_label_ce`); `options` are the recipe's settings of it: `label_smoothing` (0 in the
standard recipe, 0.2 in fast). Any other option is refused (TypeError). `epoch` is the 1-based current epoch (a float is fine);
`hyper` are the loss's keyword hyper-parameters among `temperature` and `alpha`, whose defaults
(the authors' CIFAR configuration) are in `LOSSES[name].defaults`. `parts` maps names to scalar
tensors for logging: always 'ce' (plain cross-entropy on the labels, unweighted) and the
distillation terms, unweighted by the mixing weights but including their T^2 factor.

All softmax / KL math runs in float32 whatever the input dtype (float64 inputs stay float64),
no gradient reaches the teacher's logits, and every KL divergence is summed over classes and
averaged over the batch.
"""
import itertools
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

import torch
import torch.nn.functional as F



@dataclass(frozen=True)
class HyperParameter:
    """One hyper-parameter a loss may take: its key in a loss's params and defaults, its
    command-line flag (`--` + name with dashes), its mark in setting names and its label.

    A switch (logit standardisation) takes the values False / True, written 'off' / 'on' on the
    command line; in a setting name it adds its mark only when on. The others are floats,
    written with :g and marked by their symbol before the value ('T4').
    """
    name: str
    symbol: str
    label: str
    switch: bool = False

    @property
    def flag(self):
        return '--' + self.name.replace('_', '-')

    def text(self, value):
        """The value for reading: '4', '0.1', 'on' (:g, six significant digits)."""
        if self.switch:
            return 'on' if value else 'off'
        return f'{float(value):g}'

    def arg(self, value):
        """The value as a command line gives it back exactly: '4.0', '0.1234567', 'on'."""
        return self.text(value) if self.switch else str(float(value))


# in grid and name order
HYPER = {h.name: h for h in (
    HyperParameter('temperature', 'T', 'temperature T'),
    HyperParameter('alpha', 'a', 'α (weight of the labels)'),
    HyperParameter('beta', 'b', 'β (weight of the distillation term)'),
    HyperParameter('gamma', 'g', 'γ (weight of the second term)'),
    HyperParameter('logit_standardization', 'ls', 'logit standardisation', switch=True),
)}
HYPER_PARAMETERS = tuple(HYPER)
_ABBREVIATIONS = {h.name: h.symbol for h in HYPER.values()}

# Decoupled KD, as in the authors' configuration (mdistiller/engine/cfg.py, CFG.DKD)
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


@dataclass(frozen=True)
class DistillLoss:
    """One registered loss: its function, the defaults of the hyper-parameters it takes, whether
    it needs a teacher, one sentence on how --alpha / --temperature / --beta map onto its
    weights, and the epochs over which its distillation weight ramps up (0: full weight from
    the start).

    `parts` are the names of the loss parts it returns ('ce' first). A loss that takes the
    logit standardisation switch has `ls_defaults` (None otherwise): the defaults that change
    when it is on. The switch is never among `defaults`: a setting's params hold
    'logit_standardization': True only when it is on, so settings without it keep their names
    and params. A feature method
    (distillers.py) has `fn` None and `distiller`, the class of its distillers.Distiller module
    (built per student: it owns the method's connectors and memories).
    """
    name: str
    fn: Callable
    defaults: Mapping[str, object]
    uses_teacher: bool
    help: str
    warmup_epochs: int = 0
    parts: tuple = ('ce',)
    distiller: type = None
    ls_defaults: Mapping[str, float] = None

    @property
    def takes_ls(self):
        """Whether the loss takes the logit standardisation switch."""
        return self.ls_defaults is not None

    def defaults_for(self, logit_standardization=False):
        """The defaults with logit standardisation off or on (on: the switch itself, True, and
        its authors' values, e.g. T 2)."""
        if logit_standardization and self.takes_ls:
            return MappingProxyType({**self.defaults, **self.ls_defaults,
                                     'logit_standardization': True})
        return self.defaults

    def __deepcopy__(self, memo):  # immutable and registered once: copies share it
        return self


LOSSES = {}


def register_loss(name, *, defaults=None, uses_teacher=True, help, parts, warmup_epochs=0,
                  ls_defaults=None):
    """Decorator: register the logit loss `fn` under `name` in LOSSES (a second loss of the
    same name is refused).

    defaults maps the hyper-parameters the loss takes (a subset of HYPER_PARAMETERS) to
    their default values; parts: the names of the parts it returns ('ce' first; the CSV columns
    of a run); warmup_epochs is how many epochs the function's own ramp of the distillation
    weight lasts (reports say when a run was shorter); ls_defaults: for a loss that takes the
    logit standardisation switch (a `logit_standardization` keyword), the defaults that change
    when it is on ({} when none do); None: it does not take it. The function is returned unchanged.
    """
    defaults = _checked_defaults(name, defaults)
    ls_defaults = None if ls_defaults is None else _checked_defaults(name, ls_defaults)

    def decorator(fn):
        _register(name, defaults, fn=fn, uses_teacher=bool(uses_teacher), help=help,
                  warmup_epochs=int(warmup_epochs), parts=tuple(parts), ls_defaults=ls_defaults)
        return fn

    return decorator


def register_distiller(name, *, defaults=None, parts, help, warmup_epochs=0):
    """Decorator: register a feature method, the distillers.Distiller subclass it decorates,
    under `name` in LOSSES, as register_loss does; parts: the loss parts its forward returns
    ('ce' first). The class is returned unchanged."""
    defaults = _checked_defaults(name, defaults)

    def decorator(cls):
        _register(name, defaults, fn=None, uses_teacher=True, help=help,
                  warmup_epochs=int(warmup_epochs), distiller=cls, parts=tuple(parts))
        return cls

    return decorator


def _checked_defaults(name, defaults):
    """The defaults in HYPER_PARAMETERS order, as floats (a switch as a bool); ValueError for
    an unknown key."""
    defaults = dict(defaults or {})
    unknown = set(defaults) - set(HYPER_PARAMETERS)
    if unknown:
        raise ValueError(f'loss {name!r}: unknown hyper-parameters {sorted(unknown)}; '
                         f'a loss may take {", ".join(HYPER_PARAMETERS)}')
    return MappingProxyType({k: _typed(k, defaults[k]) for k in HYPER_PARAMETERS
                             if k in defaults})


def _typed(key, value):
    return bool(value) if HYPER[key].switch else float(value)


def _register(name, defaults, **fields):
    if name in LOSSES:
        raise ValueError(f'a loss named {name!r} is already registered')
    LOSSES[name] = DistillLoss(name, defaults=defaults, **fields)


def get_loss(name):
    """The DistillLoss registered as `name`; KeyError naming the known losses otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f'unknown loss {name!r}; known losses: {", ".join(sorted(LOSSES))}') \
            from None


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


@register_loss('dkd', defaults={'temperature': 4.0},
               ls_defaults={'temperature': LS_TEMPERATURE}, warmup_epochs=DKD_WARMUP_EPOCHS,
               parts=('ce', 'tckd', 'nckd'),
               help='loss = CE + min(epoch/20, 1)*T^2*(1*TCKD + 8*NCKD), TCKD and NCKD the KLs of the '
                    'binary target/rest and the non-target softmaxes at T (Zhao et al., authors\' '
                    'CIFAR weights): --temperature is T and --alpha does not apply; '
                    + LS_SWITCH_HELP.format(factor=LS_WEIGHT['dkd']) + '.')
def dkd_loss(student_logits, teacher_logits, labels, *, epoch=1, temperature=4.0,
             logit_standardization=False, **options):
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022), as in the authors' code.

        loss = CE(s, y) + min(epoch / 20, 1) * (1 * TCKD + 8 * NCKD)
        TCKD = T^2 * KL([p_y(t), 1 - p_y(t)] || [p_y(s), 1 - p_y(s)]),  p = softmax(logits / T)
        NCKD = T^2 * KL(softmax(t_{-y} / T) || softmax(s_{-y} / T))

    where z_{-y} are the logits without the target class. The authors subtract 1000 from the
    target's logit/T before the softmax; dropping that column is the exact limit of it and stays
    right however large the logits. log(1 - p_y) is computed as
    logsumexp(z_{-y} / T) - logsumexp(z / T), so a confident teacher never takes log(0).
    With logit_standardization, TCKD and NCKD are taken on z-scored logits and both weights are
    multiplied by 9 (the authors' --logit-stand --kd-weight 9). parts: {'ce', 'tckd', 'nckd'},
    unweighted by 1, 8, the warm-up factor and the LS factor.
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
    warmup = min(float(epoch) / DKD_WARMUP_EPOCHS, 1.0)
    factor = LS_WEIGHT['dkd'] if logit_standardization else 1.0
    loss = ce + warmup * factor * (DKD_TCKD_WEIGHT * tckd + DKD_NCKD_WEIGHT * nckd)
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


# ---------------------------------------------------------------------------------------------
# Grids of settings

def _check_values(key, values):
    """The values of hyper-parameter `key` as floats (a switch's 'off' / 'on' or bools as bools);
    ValueError naming the bad one."""
    values = list(values)
    if not values:
        raise ValueError(f'no value given for {key}')
    if HYPER[key].switch:
        out = []
        for v in values:
            if isinstance(v, str) and v.lower() in ('on', 'off'):
                out.append(v.lower() == 'on')
            elif isinstance(v, bool):
                out.append(v)
            else:
                raise ValueError(f'{key.replace("_", " ")} must be on or off, got {v!r}')
        return out
    values = [float(v) for v in values]
    for v in values:
        if key == 'temperature' and not (math.isfinite(v) and v > 0):
            raise ValueError(f'temperature must be a positive number, got {v:g}')
        if key == 'alpha' and not 0 <= v <= 1:
            raise ValueError(f'alpha must be in [0, 1], got {v:g}')
        if key in ('beta', 'gamma') and not (math.isfinite(v) and v >= 0):
            raise ValueError(f'{key} must be a number >= 0, got {v:g}')
    return values


def takes(spec, key):
    """Whether loss `spec` (a DistillLoss) takes hyper-parameter `key`."""
    return key in spec.defaults or (key == 'logit_standardization' and spec.takes_ls)


def expand_grid(loss_names, temperatures=None, alphas=None, betas=None, gammas=None,
                logit_standardization=None):
    """[(loss_name, params)]: for each loss in order, every combination of the given values of
    the hyper-parameters it takes (its default where a list is None; values for a
    hyper-parameter it does not take are ignored), duplicates removed, order stable (loss, then
    logit standardisation off before on, then temperature, alpha, beta, gamma). With logit
    standardisation on, the loss's LS defaults apply (kd, dkd: T 2) and params hold
    'logit_standardization': True; off, params do not name it. Unknown names raise KeyError,
    before anything is built."""
    specs = [get_loss(name) for name in loss_names]
    given = {'temperature': temperatures, 'alpha': alphas, 'beta': betas, 'gamma': gammas,
             'logit_standardization': logit_standardization}
    checked = {k: None if v is None else _check_values(k, v) for k, v in given.items()}
    out = []
    for spec in specs:
        switch = checked['logit_standardization'] if spec.takes_ls else None
        for on in sorted(set(switch or [False])):
            defaults = spec.defaults_for(on)
            keys = [k for k in defaults if k != 'logit_standardization']
            axes = [checked[k] if checked[k] is not None else [defaults[k]] for k in keys]
            for combo in itertools.product(*axes):
                params = dict(zip(keys, combo))
                if on:
                    params['logit_standardization'] = True
                item = (spec.name, params)
                if item not in out:
                    out.append(item)
    return out


def setting_name(loss_name, params):
    """A short name for one setting, e.g. 'kd_T4_a0.1', 'dkd_T4', 'ls_T2_a0.1', 'ce',
    'dkd_T2_ls' (logit standardisation on), 'rkd_b25_g50'.

    Only the hyper-parameters the loss takes appear (a missing one shows its default); numbers
    are formatted with :g; the switch adds '_ls' when on.
    """
    spec = get_loss(loss_name)
    on = bool(params.get('logit_standardization', False)) and spec.takes_ls
    parts = [spec.name]
    for key, default in spec.defaults_for(on).items():
        if HYPER[key].switch:
            continue
        parts.append(f'{_ABBREVIATIONS[key]}{float(params.get(key, default)):g}')
    if on:
        parts.append(HYPER['logit_standardization'].symbol)
    return '_'.join(parts)
