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

HYPER_PARAMETERS = ('temperature', 'alpha', 'beta', 'gamma')   # in grid and name order
_ABBREVIATIONS = {'temperature': 'T', 'alpha': 'a', 'beta': 'b', 'gamma': 'g'}

# Decoupled KD, as in the authors' configuration (mdistiller/engine/cfg.py, CFG.DKD)
DKD_TCKD_WEIGHT = 1.0    # CFG.DKD.ALPHA
DKD_NCKD_WEIGHT = 8.0    # CFG.DKD.BETA
DKD_WARMUP_EPOCHS = 20   # CFG.DKD.WARMUP
# Logit standardisation: the epsilon added to the standard deviation in the authors' normalize()
LS_EPS = 1e-7


@dataclass(frozen=True)
class DistillLoss:
    """One registered loss: its function, the defaults of the hyper-parameters it takes, whether
    it needs a teacher, one sentence on how --alpha / --temperature / --beta map onto its
    weights, and the epochs over which its distillation weight ramps up (0: full weight from
    the start).

    `parts` are the names of the loss parts it returns ('ce' first). A feature method
    (distillers.py) has `fn` None and `distiller`, the class of its distillers.Distiller module
    (built per student: it owns the method's connectors and memories).
    """
    name: str
    fn: Callable
    defaults: Mapping[str, float]
    uses_teacher: bool
    help: str
    warmup_epochs: int = 0
    parts: tuple = ('ce',)
    distiller: type = None

    def __deepcopy__(self, memo):  # immutable and registered once: copies share it
        return self


LOSSES = {}


def register_loss(name, *, defaults=None, uses_teacher=True, help, parts, warmup_epochs=0):
    """Decorator: register the logit loss `fn` under `name` in LOSSES (a second loss of the
    same name is refused).

    defaults maps the hyper-parameters the loss takes (a subset of HYPER_PARAMETERS) to
    their default values; parts: the names of the parts it returns ('ce' first; the CSV columns
    of a run); warmup_epochs is how many epochs the function's own ramp of the distillation
    weight lasts (reports say when a run was shorter). The function is returned unchanged.
    """
    defaults = _checked_defaults(name, defaults)

    def decorator(fn):
        _register(name, defaults, fn=fn, uses_teacher=bool(uses_teacher), help=help,
                  warmup_epochs=int(warmup_epochs), parts=tuple(parts))
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
    """The defaults in HYPER_PARAMETERS order, as floats; ValueError for an unknown key."""
    defaults = dict(defaults or {})
    unknown = set(defaults) - set(HYPER_PARAMETERS)
    if unknown:
        raise ValueError(f'loss {name!r}: unknown hyper-parameters {sorted(unknown)}; '
                         f'a loss may take {", ".join(HYPER_PARAMETERS)}')
    return MappingProxyType({k: float(defaults[k]) for k in HYPER_PARAMETERS if k in defaults})


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


@register_loss('kd', defaults={'temperature': 4.0, 'alpha': 0.1}, parts=('ce', 'kd'),
               help='loss = alpha*CE + (1-alpha)*T^2*KL(teacher||student) (Hinton et al.): '
                    '--alpha weights the hard labels (0.1 puts 0.9 on the teacher) and '
                    '--temperature is T.')
def kd_loss(student_logits, teacher_logits, labels, *, epoch=1, temperature=4.0, alpha=0.1,
            **options):
    """Hinton et al.'s knowledge distillation.

        loss = alpha * CE(s, y) + (1 - alpha) * T^2 * KL(softmax(t / T) || softmax(s / T))

    alpha weights the hard labels. parts: {'ce': CE, 'kd': T^2 * KL}.
    """
    del epoch
    t = float(temperature)
    s = _as_float(student_logits)
    te = _as_float(teacher_logits.detach())
    ce = hard_label_ce(s, labels, **options)
    kd = _kl_logits(te / t, s / t) * t * t
    return alpha * ce + (1 - alpha) * kd, {'ce': ce, 'kd': kd}


@register_loss('dkd', defaults={'temperature': 4.0}, warmup_epochs=DKD_WARMUP_EPOCHS,
               parts=('ce', 'tckd', 'nckd'),
               help='loss = CE + min(epoch/20, 1)*T^2*(1*TCKD + 8*NCKD), TCKD and NCKD the KLs of the '
                    'binary target/rest and the non-target softmaxes at T (Zhao et al., authors\' '
                    'CIFAR weights): --temperature is T and --alpha does not apply.')
def dkd_loss(student_logits, teacher_logits, labels, *, epoch=1, temperature=4.0, **options):
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022), as in the authors' code.

        loss = CE(s, y) + min(epoch / 20, 1) * (1 * TCKD + 8 * NCKD)
        TCKD = T^2 * KL([p_y(t), 1 - p_y(t)] || [p_y(s), 1 - p_y(s)]),  p = softmax(logits / T)
        NCKD = T^2 * KL(softmax(t_{-y} / T) || softmax(s_{-y} / T))

    where z_{-y} are the logits without the target class. The authors subtract 1000 from the
    target's logit/T before the softmax; dropping that column is the exact limit of it and stays
    right however large the logits. log(1 - p_y) is computed as
    logsumexp(z_{-y} / T) - logsumexp(z / T), so a confident teacher never takes log(0).
    parts: {'ce', 'tckd', 'nckd'}, unweighted by 1, 8 and the warm-up factor.
    """
    t = float(temperature)
    s = _as_float(student_logits)
    te = _as_float(teacher_logits.detach())
    ce = hard_label_ce(s, labels, **options)

    def binary_and_rest(logits):
        z = logits / t
        rest = _non_target(z, labels)
        lse_all = torch.logsumexp(z, dim=1, keepdim=True)
        log_target = z.gather(1, labels[:, None]) - lse_all
        log_other = torch.logsumexp(rest, dim=1, keepdim=True) - lse_all
        return torch.cat([log_target, log_other], dim=1), rest

    log_bin_s, rest_s = binary_and_rest(s)
    log_bin_t, rest_t = binary_and_rest(te)
    tckd = F.kl_div(log_bin_s, log_bin_t, reduction='batchmean', log_target=True) * t * t
    nckd = _kl_logits(rest_t, rest_s) * t * t
    warmup = min(float(epoch) / DKD_WARMUP_EPOCHS, 1.0)
    loss = ce + warmup * (DKD_TCKD_WEIGHT * tckd + DKD_NCKD_WEIGHT * nckd)
    return loss, {'ce': ce, 'tckd': tckd, 'nckd': nckd}


@register_loss('ls', defaults={'temperature': 2.0, 'alpha': 0.1}, parts=('ce', 'kd'),
               help='loss = alpha*CE + 10*(1-alpha)*T^2*KL on z-scored logits (Sun et al.): the '
                    'default --alpha 0.1 gives the authors\' weights 0.1 and 9, --temperature '
                    'is T.')
def ls_loss(student_logits, teacher_logits, labels, *, epoch=1, temperature=2.0, alpha=0.1,
            **options):
    """KD with logit standardisation (Sun et al., CVPR 2024).

        zs(z) = (z - mean(z)) / (std(z) + 1e-7)      per sample, std with the n - 1 estimator
        loss  = alpha * CE(s, y) + 10 * (1 - alpha) * T^2 * KL(softmax(zs(t) / T) || softmax(zs(s) / T))

    The CE is on the raw logits. alpha = 0.1 gives the authors' CIFAR weights, 0.1 and 9.
    parts: {'ce': CE, 'kd': T^2 * KL on the standardised logits}.
    """
    del epoch
    t = float(temperature)
    s = _as_float(student_logits)
    te = _as_float(teacher_logits.detach())
    ce = hard_label_ce(s, labels, **options)
    kd = _kl_logits(_zscore(te) / t, _zscore(s) / t) * t * t
    return alpha * ce + 10 * (1 - alpha) * kd, {'ce': ce, 'kd': kd}


# ---------------------------------------------------------------------------------------------
# Grids of settings

def _check_values(key, values):
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f'no value given for {key}')
    for v in values:
        if key == 'temperature' and not (math.isfinite(v) and v > 0):
            raise ValueError(f'temperature must be a positive number, got {v:g}')
        if key == 'alpha' and not 0 <= v <= 1:
            raise ValueError(f'alpha must be in [0, 1], got {v:g}')
        if key in ('beta', 'gamma') and not (math.isfinite(v) and v >= 0):
            raise ValueError(f'{key} must be a number >= 0, got {v:g}')
    return values


def expand_grid(loss_names, temperatures=None, alphas=None, betas=None, gammas=None):
    """[(loss_name, params)]: for each loss in order, every combination of the given values of
    the hyper-parameters it takes (its default where a list is None; values for a
    hyper-parameter it does not take are ignored), duplicates removed, order stable (loss, then
    temperature, alpha, beta). Unknown names raise KeyError, before anything is built."""
    specs = [get_loss(name) for name in loss_names]
    given = {'temperature': temperatures, 'alpha': alphas, 'beta': betas, 'gamma': gammas}
    checked = {k: None if v is None else _check_values(k, v) for k, v in given.items()}
    out = []
    for spec in specs:
        keys = list(spec.defaults)
        axes = [checked[k] if checked[k] is not None else [spec.defaults[k]] for k in keys]
        for combo in itertools.product(*axes):
            item = (spec.name, dict(zip(keys, combo)))
            if item not in out:
                out.append(item)
    return out


def setting_name(loss_name, params):
    """A short name for one setting, e.g. 'kd_T4_a0.1', 'dkd_T4', 'ls_T2_a0.1', 'ce'.

    Only the hyper-parameters the loss takes appear (a missing one shows its default); numbers
    are formatted with :g.
    """
    spec = get_loss(loss_name)
    parts = [spec.name]
    for key, default in spec.defaults.items():
        parts.append(f'{_ABBREVIATIONS[key]}{float(params.get(key, default)):g}')
    return '_'.join(parts)
