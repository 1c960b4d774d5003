"""Statistics, tables and plots: what a reader needs to judge the KD gain."""
import csv
import json
import math
import os
import platform
import subprocess

import numpy as np
import torch

from kd.files.checkpoint import atomic_write_text
from kd.methods.losses import HYPER, HYPER_PARAMETERS, get_loss

MODEL_LABELS = {'teacher': 'Teacher (ResNet-18)', 'student_kd': 'Student (KD)',
                'student_base': 'Student (baseline)'}


def model_label(name, entry=None):
    """Teacher (ResNet-18), Student (KD), Student (baseline), or a grid student's own name."""
    arch = (entry or {}).get('arch')
    if name == 'teacher' and arch not in (None, 'resnet18'):
        return f'Teacher ({arch})'
    return MODEL_LABELS.get(name, name)


def phase_of(name):
    return 'teacher' if name == 'teacher' else 'students'

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


def ranked_students(models):
    """Students by validation accuracy, best first (test accuracy only reports)."""
    students = [n for n in models if n != 'teacher']
    return sorted(students, key=lambda n: -(models[n].get('best_val_acc') or -1.0))


# ---------------------------------------------------------------------------------------------
# Tables

def _pm(entry, key, digits=2):
    if entry is None or entry.get(key) is None:
        return '-'
    std = entry.get(key + '_std')
    return f'{entry[key]:.{digits}f}' + (f' ± {std:.{digits}f}' if std is not None else '')


def results_table(results):
    """A Markdown table of every model in results.json, students ranked by validation accuracy,
    then the paired differences to the baseline."""
    models = results.get('models', {})
    ranked = _ranked_on_validation(models)
    val_head = 'Val. acc. (%) ↓' if ranked else 'Val. acc. (%)'
    lines = [f'| Model | Params | {val_head} | Test acc. (%) | Last-epoch acc. (%) | ECE (%) | '
             'Agreement w/ teacher (%) | KL to teacher | Seeds | Loss |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|---|']
    order = (['teacher'] if 'teacher' in models else []) + ranked_students(models)
    for name in order:
        e = models[name]
        lines.append(f"| {model_label(name, e)} | {e['params'] / 1e6:.2f}M | "
                     f"{_pm(e, 'best_val_acc')} | {_pm(e, 'test_acc')} | "
                     f"{_pm(e, 'last_test_acc')} | {_pm(e, 'ece')} | "
                     f"{_pm(e, 'agreement')} | {_pm(e, 'kl_to_teacher', 3)} | "
                     f"{len(e['seeds'])} | {describe_loss(e)} |")
    lines.append('')
    if ranked:
        keeps_last = ((results.get('config') or {}).get('recipe_values') or {}).get(
            'select') == 'last'
        why = ('it would select a setting; the recipe keeps each run\'s last epoch'
               if keeps_last else 'it selects the checkpoints')
        lines += [f'↓ The students are ranked by validation accuracy ({why}); '
                  'the test accuracy only reports.', '']
    all_gains = results.get('gains') or {}
    if len(all_gains) > 1:
        lines += ['| Student − baseline (paired, test acc.) | Mean | Per seed | 95% CI |',
                  '|---|---:|---|---|']
        for name in [n for n in ranked_students(models) if n in all_gains]:
            g = all_gains[name]
            ci = '-' if g['ci95'] is None else f"[{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}]"
            lines.append(f"| {name} | {g['mean']:+.2f} | "
                         f"{', '.join(f'{d:+.2f}' for d in g['per_seed'])} | {ci} |")
        lines.append('')
        if any(g['ci95'] is None for g in all_gains.values()):
            lines += [NO_INTERVAL, '']
    if len(all_gains) <= 1:
        lines.append(describe_gain(results.get('kd_gain')))
    lines += tta_lines(results)
    return '\n'.join(lines)


def tta_lines(results):
    """Under a recipe with test-time augmentation: each model's test accuracy with it beside the
    single view, and the students' paired differences with it (Markdown lines; none without)."""
    models = results.get('models', {})
    names = [n for n in (['teacher'] if 'teacher' in models else []) + ranked_students(models)
             if models[n].get('test_acc_tta') is not None]
    if not names:
        return []
    lines = ['', '| Model | Test acc., TTA (%) | Test acc., single view (%) | '
                 'Val. acc., TTA (%) |', '|---|---:|---:|---:|']
    for name in names:
        e = models[name]
        lines.append(f"| {model_label(name, e)} | {_pm(e, 'test_acc_tta')} | "
                     f"{_pm(e, 'test_acc')} | {_pm(e, 'val_acc_tta')} |")
    lines.append('')
    lines += [describe_gain(g, ('KD' if n == 'student_kd' else n) + ' with TTA')
              for n, g in (results.get('gains_tta') or {}).items()]
    lines.append('TTA: the mean of the logits of 6 views (the image and its mirror, each also '
                 'shifted by one pixel up-left and down-right; weights 1/4, 1/4, 1/8 x 4), '
                 'evaluated for the kept (last-epoch) weights.')
    return lines


NO_INTERVAL = 'n is too small for a confidence interval (run at least 2 seeds).'


def describe_gain(gain, label='KD', interval_note=True):
    """One sentence on a paired difference to the baseline (test accuracy, points).

    interval_note=False leaves out why a single seed has no interval (a list of gains says it
    once, see describe_gains)."""
    if not gain:
        return f'{label} − baseline: not measured (train both students with the same seeds).'
    per_seed = ', '.join(f'{d:+.2f}' for d in gain['per_seed'])
    text = f"{label} − baseline (paired, test accuracy): {gain['mean']:+.2f} points over " \
           f"{gain['n']} seed{'s' if gain['n'] != 1 else ''} ({per_seed})"
    if gain['ci95'] is None:
        return text + ('; ' + NO_INTERVAL if interval_note else '.')
    lo, hi = gain['ci95']
    verdict = 'excludes 0' if lo > 0 or hi < 0 else 'includes 0: not distinguishable from noise'
    return text + f'; 95% CI [{lo:+.2f}, {hi:+.2f}] (Student t, n−1 = {gain["n"] - 1}), {verdict}.'


def describe_loss(entry):
    loss = entry.get('loss')
    if not loss:
        return '-'
    params = entry.get('loss_params') or {}
    short = {'temperature': 'T', 'alpha': 'α', 'beta': 'β', 'gamma': 'γ'}
    return loss + ''.join(' LS' if k in HYPER and HYPER[k].switch else f' {short.get(k, k)}={v:g}'
                          for k, v in params.items() if v is not False)


def describe_gains(results):
    """The console lines on the paired differences to the baseline, best on validation first;
    why there is no confidence interval is said once, after them."""
    all_gains = results.get('gains') or {}
    if len(all_gains) <= 1:
        return [describe_gain(results.get('kd_gain'))]
    lines = [describe_gain(all_gains[n], n, interval_note=False)
             for n in ranked_students(results['models']) if n in all_gains]
    if any(g['ci95'] is None for g in all_gains.values()):
        lines.append(NO_INTERVAL[0].upper() + NO_INTERVAL[1:])
    return lines


def results_markdown(results):
    cfg = results.get('config', {})
    run = results.get('run', {})
    git = results.get('git') or {}
    commit = (git.get('commit') or 'unknown')[:12]  # None outside a git checkout
    if (cfg.get('recipe_values') or {}).get('select') == 'last':
        selection = (f"the recipe ({cfg.get('recipe')}) keeps the last epoch's weights; the "
                     f"validation split ({cfg.get('val_fraction')}) and the test set only report.")
    elif cfg.get('val_fraction'):
        selection = (f"validation split {cfg.get('val_fraction')} of the training images selects "
                     f"the checkpoints, the test set only reports.")
    else:
        selection = 'no validation split: the last epoch\'s weights are kept, the test set only reports.'
    lines = ['# Results', '', results_table(results), '',
             f"Data: {run.get('data_dir', '?')}"
             + (f" (--subset {cfg['subset']}: not the full dataset)" if cfg.get('subset') else '')
             + '; ' + selection,
             f"Device: {run.get('device', '?')}; torch {results.get('versions', {}).get('torch')}; "
             f"git {commit}" + (' (dirty tree)' if git.get('dirty') else '') + '.',
             f"Recipe: {cfg.get('recipe', 'standard')}, {cfg.get('epochs')} epochs, batch "
             f"{cfg.get('batch_size')}, lr {cfg.get('lr')}, weight decay {cfg.get('weight_decay')}; students ranked by "
             f"validation accuracy; for kd and ls, α weights the hard labels.", '']
    return '\n'.join(lines)


def _ranked_on_validation(models):
    """Whether some student has a validation accuracy (none with --val-fraction 0 or from
    --evaluate), i.e. whether ranked_students orders by it."""
    return any(e.get('best_val_acc') is not None for n, e in models.items() if n != 'teacher')


def print_table(models, log=print):
    """The console table: the teacher, then the students best on validation first, each with
    its validation and test accuracy (%, mean ± std over seeds; '-' where not measured, as for
    --evaluate, which only tests) and parameters."""
    width = max([22] + [len(model_label(n, e)) for n, e in models.items()])
    ranked = _ranked_on_validation(models)
    if ranked:
        log('Students ranked by validation accuracy (↓); the test set only reports.')
    tta = any(e.get('test_acc_tta') is not None for e in models.values())
    log(f"{'Model':<{width}} {'Val. acc. ↓' if ranked else 'Val. acc.':>16} {'Test acc.':>16} "
        f"{'Params':>8}" + (f" {'Test acc. TTA':>16}" if tta else ''))
    for name in (['teacher'] if 'teacher' in models else []) + ranked_students(models):
        e = models[name]
        log(f"{model_label(name, e):<{width}} {_pm(e, 'best_val_acc'):>16} "
            f"{_pm(e, 'test_acc'):>16} {e['params'] / 1e6:>7.2f}M"
            + (f" {_pm(e, 'test_acc_tta'):>16}" if tta else ''))
    if 'student_kd' in models and 'student_base' in models:
        diff = models['student_kd']['test_acc'] - models['student_base']['test_acc']
        log(f"{'KD − baseline':<{width}} {'':>16} {diff:>+16.2f}")


def warmup_notes(models, epochs):
    """Sentences for the losses of `models` whose distillation weight ramps up over more epochs
    than the run had (DKD's over losses.DKD_WARMUP_EPOCHS): such students never trained at their
    full weight, so a ranking of them says little about the method."""
    notes = []
    for loss in dict.fromkeys(e.get('loss') for e in models.values() if e.get('loss')):
        try:  # the longest ramp among its settings (a 'warmup' setting may change it)
            ramp = max(get_loss(loss).warmup_for(e.get('loss_params') or {})
                       for e in models.values() if e.get('loss') == loss)
        except KeyError:   # a loss from another version of the code: nothing known about it
            continue
        if epochs < ramp:
            notes.append(f'{loss} never reached its full distillation weight: it ramps up over '
                         f'{ramp} epochs and this run had {epochs} (it ended at {epochs}/{ramp} '
                         f'of it), so this run does not judge {loss} as its authors train it.')
    return notes


# ---------------------------------------------------------------------------------------------
# Curves

def read_csv(path):
    with open(path, newline='') as f:
        return [{k: (float(v) if v not in ('', None) else None) for k, v in row.items()}
                for row in csv.DictReader(f)]


def _pyplot(log, what):
    """matplotlib.pyplot on the Agg backend, or None (said through `log`) when it is missing or
    broken: a run never fails for a plot."""
    try:
        import matplotlib  # optional: a run without it writes no plots
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except Exception as e:
        reason = 'is not installed' if isinstance(e, ImportError) else f'cannot be used ({e})'
        log(f'matplotlib {reason}: skipping {what} (pip install matplotlib)')
        return None
    return plt


def _save(plt, make_figure, path, log):
    """Draw with make_figure() (None: nothing to draw) and write it to path; returns the path or
    None. A damaged CSV or a plotting error is said through `log` and skips the plot."""
    try:
        fig = make_figure()
        if fig is None:
            return None
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
    except Exception as e:
        plt.close('all')
        log(f'could not draw {path}: {e}; skipping it')
        return None


def plot_curves(run_dirs, path, log=print, teacher_acc=None, keeps_last=False):
    """curves.png: accuracy and the hard-label loss per epoch (see curves_figure).

    run_dirs: {model: [folders holding log_<model>.csv]}; teacher_acc: the test accuracy (%) of
    the teacher that taught the students, drawn as a reference line; keeps_last: the recipe
    keeps the last epoch's weights (the legend then gives the last validation accuracy, not the
    best). Returns the path, or None
    when matplotlib cannot be imported (said through `log`; the caller silences the per-seed
    calls so a run says it once) or there is nothing to plot. A plot never fails the run.
    """
    plt = _pyplot(log, 'curves.png')
    if plt is None:
        return None
    return _save(plt, lambda: curves_figure(run_dirs, teacher_acc, keeps_last), path, log)


CURVE_HIGHLIGHTS = 5   # distilled students drawn in colour; the others are thin grey lines
_HIGHLIGHT_COLOURS = ['tab:blue', 'tab:orange', 'tab:green', 'tab:red', 'tab:purple']


def _read_series(run_dirs):
    """{model: [rows of each run's CSV]} for the models with at least one non-empty CSV."""
    series = {}
    for model, folders in run_dirs.items():
        runs = [read_csv(os.path.join(d, f'log_{model}.csv')) for d in folders
                if os.path.exists(os.path.join(d, f'log_{model}.csv'))]
        runs = [r for r in runs if r]
        if runs:
            series[model] = runs
    return series


def _mean_curve(runs, key):
    """(epochs, mean, min, max) over the runs, at the epochs where every run has a value of key
    (the test accuracy is measured every --test-every epochs only)."""
    out = ([], [], [], [])
    for i in range(min(len(r) for r in runs)):
        values = [r[i].get(key) for r in runs]
        if any(v is None for v in values):
            continue
        for column, v in zip(out, (int(runs[0][i]['epoch']), mean(values), min(values),
                                   max(values))):
            column.append(v)
    return out


def _selection_score(runs, keeps_last=False):
    """(score, what it is): the mean over runs of each run's best validation accuracy (what
    selects the checkpoints), or its last epoch's when the recipe keeps the last epoch
    (keeps_last), or without a validation split the last epoch's test accuracy."""
    pick = (lambda v: v[-1]) if keeps_last else max
    best = [pick(v) for r in runs if (v := [row['val_acc'] for row in r
                                            if row.get('val_acc') is not None])]
    if len(best) == len(runs):
        return mean(best), 'last_val' if keeps_last else 'val'
    last = [r[-1].get('test_acc') for r in runs]
    return (mean(last), 'test') if all(v is not None for v in last) else (None, None)


def curves_figure(run_dirs, teacher_acc=None, keeps_last=False):
    """The figure of curves.png, or None when no CSV holds a row.

    Panels, per epoch: validation accuracy (%; it selects the checkpoints, absent without a
    validation split), test accuracy (%) and the training cross-entropy on the labels (the
    part every loss has, so the panel compares like with like). Each line is the mean over the
    runs (seeds), with a min-max band for the highlighted models when there are several.
    With students, the teacher is not plotted as a curve (its run is usually longer) but as a
    dashed line at teacher_acc in the test panel; the baseline (black) and the
    CURVE_HIGHLIGHTS distilled students best on validation are in colour, any others thin grey
    (keeps_last: by the last epoch's validation accuracy, the weights kept). The legend sits below the panels; epochs are integers; with few epochs every point has a
    marker, so a 1-epoch run shows its points.
    """
    import matplotlib.pyplot as plt  # optional: imported only when a figure is drawn
    from matplotlib.lines import Line2D
    from matplotlib.ticker import LogFormatter, MaxNLocator

    series = _read_series(run_dirs)
    if not series:
        return None
    students = [m for m in series if phase_of(m) == 'students']
    if students:
        series = {m: series[m] for m in students}
    scores = {m: _selection_score(runs, keeps_last) for m, runs in series.items()}
    distilled = sorted((m for m in series if m != 'student_base'),
                       key=lambda m: -(scores[m][0] if scores[m][0] is not None else -1.0))
    shown = distilled[:CURVE_HIGHLIGHTS]
    others = distilled[CURVE_HIGHLIGHTS:]
    style = {}   # model -> (colour, line width, z-order, gid)
    if 'student_base' in series:
        style['student_base'] = ('black', 2.2, 4, 'baseline')
    for i, m in enumerate(shown):
        style[m] = (_HIGHLIGHT_COLOURS[i], 1.8, 3, 'highlight')
    for m in others:
        style[m] = ('0.72', 0.8, 1, 'other')

    n_epochs = max(int(row['epoch']) for runs in series.values() for r in runs for row in r)
    n_runs = max(len(runs) for runs in series.values())
    marker_size = (5 if n_epochs <= 10 else 3) if n_epochs <= 30 else 0
    has_val = any(row.get('val_acc') is not None for runs in series.values() for r in runs
                  for row in r)
    panels = ([('val_acc', 'Validation accuracy (%)')] if has_val else []) + \
        [('test_acc', 'Test accuracy (%)'), ('train_ce', 'Training cross-entropy on the labels')]

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4),
                             layout='constrained', squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        ce_values = []
        for m in sorted(series, key=lambda m: style[m][2]):   # grey first, highlighted on top
            colour, width, z, gid = style[m]
            xs, avg, lo, hi = _mean_curve(series[m], key)
            if not xs:
                continue
            dots = {'marker': 'o', 'markersize': marker_size * (0.6 if gid == 'other' else 1)} \
                if marker_size else {}
            ax.plot(xs, avg, '-', color=colour, lw=width, zorder=z, gid=gid, **dots)
            if n_runs > 1 and gid != 'other':
                ax.fill_between(xs, lo, hi, color=colour, alpha=0.15, lw=0, zorder=z - 0.5)
            if key == 'train_ce':
                ce_values += [v for v in lo + hi if v > 0]
        if key == 'test_acc' and students and teacher_acc is not None:
            ax.axhline(teacher_acc, ls='--', color='0.3', lw=1.2, gid='teacher', zorder=2)
        if key == 'train_ce' and ce_values and max(ce_values) / min(ce_values) > 10:
            ax.set_yscale('log')   # the loss falls by orders of magnitude over a long run
            ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False,
                                                      minor_thresholds=(1.5, 0.5)))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel('epoch')
        pad = 0.5 if n_epochs <= 10 else 0.02 * n_epochs
        ax.set_xlim(1 - pad, n_epochs + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)

    score_name = {'val': 'best val.', 'last_val': 'last val.', 'test': 'last test'}
    dots = {'marker': 'o', 'markersize': marker_size} if marker_size else {}
    handles = []
    if 'student_base' in series:
        handles.append(Line2D([], [], color='black', lw=2.2, label=model_label('student_base'),
                              **dots))
    for m in shown:
        score, what = scores[m]
        handles.append(Line2D([], [], color=style[m][0], lw=1.8, **dots, label=model_label(m) + (
            f' ({score_name[what]} {score:.2f}%)' if score is not None else '')))
    if others:
        what = {'val': 'validation', 'last_val': 'last validation'}.get(
            scores[others[0]][1], 'last test accuracy')
        handles.append(Line2D([], [], color='0.72', lw=0.8, label=(
            f'{len(others)} other student{"s" if len(others) != 1 else ""}, below the '
            f'{len(shown)} best on {what} (all in results.md)')))
    if students and teacher_acc is not None:
        handles.append(Line2D([], [], color='0.3', ls='--', lw=1.2,
                              label=f'teacher, test accuracy {teacher_acc:.2f}%'))
    if not students:
        handles = [Line2D([], [], color=style[m][0], lw=1.8, label=model_label(m), **dots)
                   for m in series]
    fig.legend(handles=handles, loc='outside lower center', ncol=min(3, len(handles)),
               fontsize=9, frameon=False)
    who = 'Students' if students else ', '.join(model_label(m) for m in series)
    fig.suptitle(f'{who}: {n_epochs} epoch{"s" if n_epochs != 1 else ""}, '
                 + (f'mean over {n_runs} seeds (band: min–max)' if n_runs > 1 else '1 seed')
                 + ('' if has_val else '; no validation split, ranked by the last test accuracy'),
                 fontsize=11)
    return fig


GRID_LABELS = {k: h.label for k, h in HYPER.items()}


def _param(entry, key):
    """A setting's value of `key`; the switch reads off where its params do not name it."""
    params = entry.get('loss_params') or {}
    return params.get(key, False) if HYPER[key].switch else params.get(key)


def grid_axes(models, loss):
    """(row hyper-parameter, column hyper-parameter or None) of `loss`'s heat map: the first
    two that vary among its settings, in HYPER_PARAMETERS order, else the first two it takes
    (kd: T and α; crd_kd: T and β; fitnet: β; dist gridded over γ alone: γ)."""
    entries = [e for e in models.values() if e.get('loss') == loss]
    taken = {k for e in entries for k in (e.get('loss_params') or {})}
    varying = [k for k in HYPER_PARAMETERS if k in taken
               and len({_param(e, k) for e in entries}) > 1]
    keys = varying + [k for k in HYPER_PARAMETERS if k in taken and k not in varying]
    return (keys[0] if keys else None), (keys[1] if len(keys) > 1 else None)


def grid_cells(models):
    """{loss: {(row value, column value): (validation accuracy, name)}} for every loss of a run
    that trained some loss on two or more settings ({} otherwise); the axes are grid_axes'."""
    cells = {}
    for name, e in models.items():
        if name in ('teacher', 'student_base') or not e.get('loss') or e.get('best_val_acc') is None:
            continue
        row, col = grid_axes(models, e['loss'])
        cells.setdefault(e['loss'], {})[(row and _param(e, row), col and _param(e, col))] = \
            (e['best_val_acc'], name)
    return cells if any(len(c) > 1 for c in cells.values()) else {}


def plot_grid(models, path, log=print):
    """grid.png: a heat map per loss over its settings, of validation accuracy (see
    grid_figure). Nothing is drawn when no loss has two settings. Returns the path or None."""
    if not grid_cells(models):
        return None
    plt = _pyplot(log, 'grid.png')
    if plt is None:
        return None
    return _save(plt, lambda: grid_figure(models), path, log)


def grid_figure(models):
    """The figure of grid.png, or None when no loss has two settings.

    One heat map per loss (rows and columns: the first two hyper-parameters it takes, e.g.
    temperature T and α for kd, β for fitnet), each cell the validation accuracy
    (%, mean over seeds) and, under it, its difference to the baseline's. One colour scale for
    all panels, diverging around the baseline: blue above it, red below, white level.
    """
    import matplotlib.pyplot as plt  # optional: imported only when a figure is drawn
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cells = grid_cells(models)
    if not cells:
        return None
    base = models.get('student_base', {}).get('best_val_acc')
    values = [v for grid in cells.values() for v, _ in grid.values()]
    centre = base if base is not None else (min(values) + max(values)) / 2
    half = max(abs(v - centre) for v in values) or 1.0
    norm = Normalize(centre - half, centre + half)
    cmap = plt.get_cmap('RdBu')

    def axis_values(grid, i):
        return sorted({k[i] for k in grid}, key=lambda v: (v is None, v))

    shapes = {loss: (axis_values(g, 0), axis_values(g, 1)) for loss, g in cells.items()}
    widths = [len(alphas) for _, alphas in shapes.values()]
    rows = max(len(temps) for temps, _ in shapes.values())
    fig, axes = plt.subplots(1, len(cells), figsize=(1.5 * sum(widths) + 1.4 * len(cells) + 1.2,
                                                     0.75 * rows + 2.2),
                             layout='constrained', squeeze=False, width_ratios=widths)
    for ax, (loss, grid) in zip(axes[0], cells.items()):
        temps, alphas = shapes[loss]
        table = [[grid.get((t, a), (float('nan'),))[0] for a in alphas] for t in temps]
        ax.imshow(table, cmap=cmap, norm=norm, aspect='auto')
        for i, row in enumerate(table):
            for j, v in enumerate(row):
                if v != v:
                    continue
                text = f'{v:.2f}' + (f'\n{v - base:+.2f}' if base is not None else '')
                # white text on the saturated ends of the scale, black near the middle
                ax.text(j, i, text, ha='center', va='center', fontsize=9,
                        color='w' if abs(norm(v) - 0.5) > 0.3 else 'k')
        row_key, col_key = grid_axes(models, loss)
        if alphas == [None]:
            ax.set_xticks([])
            ax.set_xlabel('one setting' if col_key is None else GRID_LABELS[col_key])
        else:
            ax.set_xticks(range(len(alphas)), [HYPER[col_key].text(a) for a in alphas])
            ax.set_xlabel(GRID_LABELS[col_key])
        ax.set_yticks(range(len(temps)), ['-' if t is None else HYPER[row_key].text(t)
                                          for t in temps])
        ax.set_ylabel(GRID_LABELS.get(row_key, 'no hyper-parameter'))
        ax.set_title(loss, fontsize=10)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes[0].tolist(),
                 label='validation accuracy (%)')
    n_seeds = max(len(models[n].get('seeds') or [0]) for g in cells.values() for _, n in g.values())
    title = 'Validation accuracy (%) per setting' + (
        f', mean over {n_seeds} seeds' if n_seeds > 1 else '')
    if base is not None:
        title += f'; under it, the difference to the baseline ({base:.2f}%): blue above, red below'
    fig.suptitle(title, fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------
# The run record and the results files

def versions():
    out = {'python': platform.python_version(), 'torch': torch.__version__,
           'numpy': np.__version__}
    try:
        import torchvision  # lazily: importing it costs a second in every process
        out['torchvision'] = torchvision.__version__
    except Exception:
        out['torchvision'] = None
    return out


def git_state():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(['git', '-C', here, 'rev-parse', 'HEAD'], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(['git', '-C', here, 'status', '--porcelain', '--untracked-files=no'],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {'commit': commit or None, 'dirty': bool(dirty) if commit else None}
    except (OSError, subprocess.SubprocessError):
        return {'commit': None, 'dirty': None}


def cpu_identity():
    """(model name, instruction-set flags) of this CPU, from /proc/cpuinfo where there is one."""
    model, flags = None, ''
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                key = key.strip()
                if key == 'model name' and model is None:
                    model = value.strip()
                elif key in ('flags', 'Features') and not flags:
                    flags = ' '.join(sorted(value.split()))
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def device_name(device):
    """The device as results and bench figures name it: the GPU's name, or the CPU's model and
    the threads torch uses on it."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f'cpu ({cpu_identity()[0]}, {threads} thread{"s" if threads != 1 else ""})'


def read_results(out_dir):
    """OUT_DIR/results.json as a dict: {} when there is none, None when it cannot be read."""
    path = os.path.join(out_dir, 'results.json')
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) else None


def drop_phase(results, phase):
    """A copy of results.json's dict without `phase`: its models, its entry under 'phases' and,
    for the students, their gains and teacher; the top-level config and seeds become those of
    the phase that is left (if any)."""
    results = dict(results)
    results['models'] = {n: e for n, e in results.get('models', {}).items()
                         if phase_of(n) != phase}
    phases = {p: v for p, v in results.get('phases', {}).items() if p != phase}
    results['phases'] = phases
    if phase == 'students':
        for key in ('kd_gain', 'gains', 'gains_tta', 'teacher_in_use'):
            results.pop(key, None)
    if phases:
        rest = phases[next(iter(phases))]
        results['config'], results['seeds'] = rest.get('config'), rest.get('seeds')
        if isinstance(results.get('run'), dict):
            run = results['run'] = dict(results['run'])
            run['seeds'] = rest.get('seeds')
            for key in ('subset_by_phase', 'wall_seconds'):
                if isinstance(run.get(key), dict):
                    run[key] = {p: v for p, v in run[key].items() if p != phase}
    return results


def write_results_files(out_dir, results, log=print):
    """results.json, results.md and curves.png (every phase's models) of `results`."""
    atomic_write_text(os.path.join(out_dir, 'results.json'), json.dumps(results, indent=2) + '\n')
    atomic_write_text(os.path.join(out_dir, 'results.md'), results_markdown(results))
    phases, models = results.get('phases', {}), results.get('models', {})
    folders = {n: phases[phase_of(n)]['folders'] for n in models if phase_of(n) in phases}
    # the reference line is the teacher that taught the students, wherever its checkpoint lives
    teacher_acc = (results.get('teacher_in_use') or {}).get('test_acc',
                                                            models.get('teacher', {}).get('test_acc'))
    # a recipe that keeps the last epoch (fast) is scored by it in the legend, not by its best
    keeps_last = any(((info.get('config') or {}).get('recipe_values') or {}).get('select')
                     == 'last' for info in phases.values())
    plot_curves(folders, os.path.join(out_dir, 'curves.png'), log=log, teacher_acc=teacher_acc,
                keeps_last=keeps_last)


# The configuration's content digests of the data (see datasets.content_sha256), and their names
DATA_DIGESTS = (('train_images_sha256', 'training'), ('test_images_sha256', 'test'))


def write_results(out_dir, phase, summaries, config, run_info, curve_dirs, log=print):
    """Merge this phase into OUT_DIR/results.json and rewrite results.md and curves.png.

    Another phase already there is kept when it ran on the same images (or cannot tell), and
    dropped, with a note, when its configuration names other training or test images.

    summaries: {seed: train.train_phase's summary}; run_info: data_dir, subset, device name.
    """
    results = drop_phase(read_results(out_dir) or {}, phase)
    for other, entry in list(results.get('phases', {}).items()):
        changed = [what for key, what in DATA_DIGESTS
                   if key in (entry.get('config') or {}) and key in config
                   and entry['config'][key] != config[key]]
        if changed:  # its numbers describe other images: a table mixing both would be wrong
            results = drop_phase(results, other)
            log(f'note: {os.path.join(out_dir, "results.json")} held the {other} phase of a run '
                f'on other {" and ".join(changed)} images; its entries are dropped, the '
                f'{other}\'s numbers are not of this data')
    models = results['models']
    per_seed = {s: v['models'] for s, v in summaries.items()}
    models.update(aggregate_models(per_seed))
    if phase == 'students':
        results['gains'] = gains(per_seed)
        results['kd_gain'] = results['gains'].get('student_kd')
        results['gains_tta'] = gains(per_seed, 'test_acc_tta')
        teacher_accs = [v['models']['teacher_in_use']['test_acc'] for v in summaries.values()]
        results['teacher_in_use'] = {'checkpoint': config.get('teacher_checkpoint'),
                                     'sha256': config.get('teacher_sha256'),
                                     'test_acc': teacher_accs[0]}
        # the teacher row describes the weights these students distilled from, measured on
        # their test images: the teacher phase's entry only when it is of the same weights
        used = summaries[next(iter(summaries))]['models']['teacher_in_use']
        earlier = models.get('teacher') or {}
        same = earlier.get('sha256_per_seed') == [used.get('sha256')]
        teacher = dict(earlier if same else {}, **used)
        for key in ('test_acc', 'ece'):  # measured now, once
            teacher.update({key + '_std': None, key + '_per_seed': [used.get(key)]})
        models = {'teacher': teacher, **{n: e for n, e in models.items() if n != 'teacher'}}
    results['models'] = models
    seeds = list(summaries)
    results['seeds'] = seeds
    results['phases'][phase] = {
        'seeds': seeds, 'config': config,
        # training-loop time (epochs and their evaluations, summed over resumes) and this
        # invocation's wall time per seed, start-up and final evaluation included
        'train_seconds': {str(s): v['elapsed_seconds'] for s, v in summaries.items()},
        'wall_seconds': {str(s): v.get('wall_seconds') for s, v in summaries.items()},
        # the duration printed early in the run, to compare with the actual one
        'estimate': {str(s): v.get('estimate') for s, v in summaries.items()},
        'peak_memory_mb': max((v.get('peak_memory_mb') or 0) for v in summaries.values()),
        'folders': curve_dirs[phase]}
    results['config'] = config
    results['run'] = {'data_dir': os.path.abspath(run_info['data_dir']),
                      'subset': run_info['subset'],
                      'subset_by_phase': {p: v['config'].get('subset')
                                          for p, v in results['phases'].items()},
                      'device': run_info['device'], 'seeds': seeds,
                      'wall_seconds': {p: round(sum(w or 0 for w in v['wall_seconds'].values()), 2)
                                       for p, v in results['phases'].items()}}
    results['versions'] = versions()
    results['git'] = git_state()
    write_results_files(out_dir, results, log)
    if phase == 'students':
        plot_grid(models, os.path.join(out_dir, 'grid.png'), log=log)
    return results
