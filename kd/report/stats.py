"""Statistics over seeds: means, spreads, paired differences to the baseline with their
95% confidence intervals, and the per-model aggregation results.json holds."""
import math

# Two-sided 95% quantiles of Student's t, df = 1..30 (standard tables).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile_975(df):
    """The 0.975 quantile of Student's t with df degrees of freedom."""
    if df < 1:
        raise ValueError('df must be at least 1')
    if df <= 30:
        return _T975[df - 1]
    z = 1.959964  # Cornish-Fisher expansion around the normal quantile; < 1e-4 off beyond 30
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean(values):
    return sum(values) / len(values)


def sample_std(values):
    """Standard deviation with n - 1 in the denominator; None for fewer than two values."""
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def paired_difference(a, b):
    """Mean of a_i - b_i with its 95% Student-t confidence interval (None when n < 2)."""
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    out = {'per_seed': diffs, 'n': n, 'mean': mean(diffs) if n else None, 'std': None,
           'ci95': None, 'note': 'n < 2: too few seeds for a confidence interval'}
    if n >= 2:
        del out['note']
        sd = sample_std(diffs)
        half = t_quantile_975(n - 1) * sd / math.sqrt(n)
        out.update(std=sd, ci95=[out['mean'] - half, out['mean'] + half])
    return out


# ---------------------------------------------------------------------------------------------
# Aggregating seeds

AGGREGATED = ('test_acc', 'last_test_acc', 'best_val_acc', 'ece', 'agreement', 'kl_to_teacher',
              'test_acc_tta', 'val_acc_tta')


def aggregate_models(per_seed):
    """per_seed: {seed: {model: entry}} -> {model: mean/std of each metric, and per-seed values}."""
    models = {}
    seeds = list(per_seed)
    names = [n for n in per_seed[seeds[0]] if n != 'teacher_in_use']
    for name in names:
        entries = [per_seed[s][name] for s in seeds]
        out = {'seeds': seeds, 'params': entries[0]['params'],
               'best_epoch': [e['best_epoch'] for e in entries],
               'precision': entries[0].get('precision')}
        for key in ('arch', 'loss', 'loss_params'):
            if key in entries[0]:
                out[key] = entries[0][key]
        if all('sha256' in e for e in entries):  # each seed's checkpoint
            out['sha256_per_seed'] = [e['sha256'] for e in entries]
        for key in AGGREGATED:
            values = [e[key] for e in entries if e.get(key) is not None]
            if len(values) == len(entries):
                out[key] = mean(values)
                out[key + '_std'] = sample_std(values)
                out[key + '_per_seed'] = values
        models[name] = out
    return models


def kd_gain(per_seed, name='student_kd', key='test_acc'):
    """The paired `name` - baseline difference in `key` (test accuracy, or test_acc_tta) over
    the seeds that trained both."""
    seeds = [s for s in per_seed if name in per_seed[s] and 'student_base' in per_seed[s]
             and per_seed[s][name].get(key) is not None]
    if not seeds:
        return None
    gain = paired_difference([per_seed[s][name][key] for s in seeds],
                             [per_seed[s]['student_base'][key] for s in seeds])
    gain['seeds'] = seeds
    return gain


def gains(per_seed, key='test_acc'):
    """{student: its paired difference to the baseline in `key`} for every distilled student."""
    names = [n for n in per_seed[next(iter(per_seed))]
             if n not in ('teacher', 'student_base', 'teacher_in_use')]
    out = {n: kd_gain(per_seed, n, key) for n in names}
    return {n: g for n, g in out.items() if g is not None}

