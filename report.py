"""Statistics, tables and plots: what a reader needs to judge the KD gain."""
import csv
import json
import math
import os
import platform
import subprocess

import torch
import torch.nn.functional as F

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


def expected_calibration_error(logits, labels, bins=15):
    """ECE in percent: sum over equal-width confidence bins of |accuracy - confidence| * share."""
    probs = F.softmax(logits.float(), dim=1)
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            share = in_bin.float().mean().item()
            gap = (correct[in_bin].mean() - confidence[in_bin].mean()).abs().item()
            ece += gap * share
    return 100.0 * ece


def agreement(teacher_logits, student_logits):
    """Top-1 agreement with the teacher (percent) and mean KL(teacher || student) at T=1."""
    top1 = (teacher_logits.argmax(1) == student_logits.argmax(1)).float().mean().item()
    kl = F.kl_div(F.log_softmax(student_logits.float(), 1), F.log_softmax(teacher_logits.float(), 1),
                  reduction='batchmean', log_target=True).item()
    return {'agreement': 100.0 * top1, 'kl_to_teacher': kl}


# ---------------------------------------------------------------------------------------------
# Aggregating seeds

AGGREGATED = ('test_acc', 'last_test_acc', 'best_val_acc', 'ece', 'agreement', 'kl_to_teacher')


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
        for key in AGGREGATED:
            values = [e[key] for e in entries if e.get(key) is not None]
            if len(values) == len(entries):
                out[key] = mean(values)
                out[key + '_std'] = sample_std(values)
                out[key + '_per_seed'] = values
        models[name] = out
    return models


def kd_gain(per_seed, name='student_kd'):
    """The paired `name` - baseline test-accuracy difference over the seeds that trained both."""
    seeds = [s for s in per_seed if name in per_seed[s] and 'student_base' in per_seed[s]]
    if not seeds:
        return None
    gain = paired_difference([per_seed[s][name]['test_acc'] for s in seeds],
                             [per_seed[s]['student_base']['test_acc'] for s in seeds])
    gain['seeds'] = seeds
    return gain


def gains(per_seed):
    """{student: its paired difference to the baseline} for every distilled student."""
    names = [n for n in per_seed[next(iter(per_seed))]
             if n not in ('teacher', 'student_base', 'teacher_in_use')]
    out = {n: kd_gain(per_seed, n) for n in names}
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
    lines = ['| Model | Params | Test acc. (%) | Last-epoch acc. (%) | ECE (%) | '
             'Agreement w/ teacher (%) | KL to teacher | Seeds | Val. acc. (%) | Loss |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|---|']
    order = (['teacher'] if 'teacher' in models else []) + ranked_students(models)
    for name in order:
        e = models[name]
        lines.append(f"| {model_label(name, e)} | {e['params'] / 1e6:.2f}M | "
                     f"{_pm(e, 'test_acc')} | {_pm(e, 'last_test_acc')} | {_pm(e, 'ece')} | "
                     f"{_pm(e, 'agreement')} | {_pm(e, 'kl_to_teacher', 3)} | "
                     f"{len(e['seeds'])} | {_pm(e, 'best_val_acc')} | {describe_loss(e)} |")
    lines.append('')
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
    if len(all_gains) <= 1:
        lines.append(describe_gain(results.get('kd_gain')))
    return '\n'.join(lines)


def describe_gain(gain, label='KD'):
    if not gain:
        return f'{label} − baseline: not measured (train both students with the same seeds).'
    per_seed = ', '.join(f'{d:+.2f}' for d in gain['per_seed'])
    text = f"{label} − baseline (paired, test accuracy): {gain['mean']:+.2f} points over " \
           f"{gain['n']} seed{'s' if gain['n'] != 1 else ''} ({per_seed})"
    if gain['ci95'] is None:
        return text + '; n is too small for a confidence interval (run at least 2 seeds).'
    lo, hi = gain['ci95']
    verdict = 'excludes 0' if lo > 0 or hi < 0 else 'includes 0: not distinguishable from noise'
    return text + f'; 95% CI [{lo:+.2f}, {hi:+.2f}] (Student t, n−1 = {gain["n"] - 1}), {verdict}.'


def describe_loss(entry):
    loss = entry.get('loss')
    if not loss:
        return '-'
    params = entry.get('loss_params') or {}
    short = {'temperature': 'T', 'alpha': 'α'}
    return loss + ''.join(f' {short.get(k, k)}={v:g}' for k, v in params.items())


def describe_gains(results):
    """The console lines on the paired differences to the baseline, best on validation first."""
    all_gains = results.get('gains') or {}
    if len(all_gains) <= 1:
        return [describe_gain(results.get('kd_gain'))]
    return [describe_gain(all_gains[n], n) for n in ranked_students(results['models'])
            if n in all_gains]


def results_markdown(results):
    cfg = results.get('config', {})
    run = results.get('run', {})
    git = results.get('git') or {}
    commit = (git.get('commit') or 'unknown')[:12]  # None outside a git checkout
    if cfg.get('val_fraction'):
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
             f"Recipe: {cfg.get('epochs')} epochs, batch {cfg.get('batch_size')}, lr "
             f"{cfg.get('lr')}, weight decay {cfg.get('weight_decay')}; students ranked by "
             f"validation accuracy; for kd and ls, α weights the hard labels.", '']
    return '\n'.join(lines)


def print_table(models, log=print):
    """The console table: the teacher, then the students best on validation first."""
    width = max([22] + [len(model_label(n, e)) for n, e in models.items()])
    log(f"{'Model':<{width}} {'Test acc.':>16} {'Params':>8}")
    for name in (['teacher'] if 'teacher' in models else []) + ranked_students(models):
        e = models[name]
        log(f"{model_label(name, e):<{width}} {_pm(e, 'test_acc'):>16} {e['params'] / 1e6:>7.2f}M")
    if 'student_kd' in models and 'student_base' in models:
        diff = models['student_kd']['test_acc'] - models['student_base']['test_acc']
        log(f"{'KD − baseline':<{width}} {diff:>+16.2f}")


# ---------------------------------------------------------------------------------------------
# Curves

def read_csv(path):
    with open(path, newline='') as f:
        return [{k: (float(v) if v not in ('', None) else None) for k, v in row.items()}
                for row in csv.DictReader(f)]


def plot_curves(run_dirs, path, log=print):
    """curves.png: accuracy and loss per epoch for each model, mean over runs with a min-max band.

    run_dirs: {model: [folders holding log_<model>.csv]}. Returns the path, or None when
    matplotlib cannot be imported (said through `log`; the caller silences the per-seed calls
    so a run says it once) or there is nothing to plot. A plot never fails the run.
    """
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except Exception as e:  # missing, or installed but broken: the run must not fail for a plot
        what = 'is not installed' if isinstance(e, ImportError) else f'cannot be used ({e})'
        log(f'matplotlib {what}: skipping curves.png (pip install matplotlib)')
        return None
    try:
        return _draw_curves(plt, run_dirs, path)
    except Exception as e:  # a damaged CSV or a plotting error: keep the results, skip the plot
        plt.close('all')
        log(f'could not draw {path}: {e}; skipping it')
        return None


def _draw_curves(plt, run_dirs, path):
    series = {}
    for model, folders in run_dirs.items():
        runs = [read_csv(os.path.join(d, f'log_{model}.csv')) for d in folders
                if os.path.exists(os.path.join(d, f'log_{model}.csv'))]
        runs = [r for r in runs if r]
        if runs:
            series[model] = runs
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = [('test_acc', 'val_acc', 'Accuracy (%)'), ('train_loss', None, 'Training loss')]
    colors = {'teacher': 'tab:gray', 'student_kd': 'tab:blue', 'student_base': 'tab:orange'}
    colors.update({m: f'C{i + 3}' for i, m in enumerate(m for m in series if m not in colors)})
    for ax, (key, key2, ylabel) in zip(axes, panels):
        for model, runs in series.items():
            # one colour per model; dashed = validation, solid = test or training
            for k, style in ((key, '-'), (key2, '--')):
                if k is None or any(row[k] is None for r in runs for row in r):
                    continue
                n = min(len(r) for r in runs)
                epochs = [runs[0][i]['epoch'] for i in range(n)]
                values = [[r[i][k] for r in runs] for i in range(n)]
                avg = [mean(v) for v in values]
                kind = 'test' if k == 'test_acc' else 'val' if k == 'val_acc' else 'train'
                line, = ax.plot(epochs, avg, style, label=f'{model_label(model)} ({kind})',
                                color=colors.setdefault(model, f'C{len(colors) % 10}'))
                if len(runs) > 1 and style == '-':
                    ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values],
                                    color=line.get_color(), alpha=0.2)
        ax.set_xlabel('Epoch')
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    n_runs = max(len(r) for r in series.values())
    fig.suptitle(f'Mean over {n_runs} seed(s)' + (', band: min-max' if n_runs > 1 else ''))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def grid_cells(models):
    """{loss: {(T, alpha): (validation accuracy, name)}} for losses trained on a grid of settings."""
    cells = {}
    for name, e in models.items():
        if name in ('teacher', 'student_base') or not e.get('loss') or e.get('best_val_acc') is None:
            continue
        params = e.get('loss_params') or {}
        cells.setdefault(e['loss'], {})[(params.get('temperature'), params.get('alpha'))] = \
            (e['best_val_acc'], name)
    return {loss: c for loss, c in cells.items() if len(c) > 1}


def plot_grid(models, path, log=print):
    """grid.png: a heat map per loss, temperature x alpha, of validation accuracy (the mean over
    seeds), the baseline's in the title. Nothing is drawn when no loss has two settings."""
    cells = grid_cells(models)
    if not cells:
        return None
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except Exception:
        log('matplotlib is not available: skipping grid.png (pip install matplotlib)')
        return None
    try:
        fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.8), squeeze=False)
        for ax, (loss, grid) in zip(axes[0], cells.items()):
            temps = sorted({t for t, _ in grid}, key=lambda v: (v is None, v))
            alphas = sorted({a for _, a in grid}, key=lambda v: (v is None, v))
            values = [[grid.get((t, a), (float('nan'),))[0] for a in alphas] for t in temps]
            image = ax.imshow(values, cmap='viridis', aspect='auto')
            finite = [v for row in values for v in row if v == v]
            middle = (min(finite) + max(finite)) / 2
            for i, row in enumerate(values):
                for j, v in enumerate(row):
                    if v == v:  # dark text on the light (high) cells of viridis
                        ax.text(j, i, f'{v:.2f}', ha='center', va='center', fontsize=9,
                                color='k' if v > middle else 'w')
            ax.set_xticks(range(len(alphas)), ['-' if a is None else f'{a:g}' for a in alphas])
            ax.set_yticks(range(len(temps)), ['-' if t is None else f'{t:g}' for t in temps])
            ax.set_xlabel('alpha (weight of the labels)')
            ax.set_ylabel('temperature T')
            ax.set_title(f'{loss}: validation accuracy (%)', fontsize=10)
            fig.colorbar(image, ax=ax)
        base = models.get('student_base', {}).get('best_val_acc')
        if base is not None:
            fig.suptitle(f'baseline (no teacher): {base:.2f}% on validation', fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
    except Exception as e:  # a plot never fails the run
        plt.close('all')
        log(f'could not draw {path}: {e}; skipping it')
        return None


# ---------------------------------------------------------------------------------------------
# The run record and the results files

def versions():
    import numpy
    import torch
    out = {'python': platform.python_version(), 'torch': torch.__version__,
           'numpy': numpy.__version__}
    try:
        import torchvision
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


def device_name(device):
    import torch
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)'


def write_results(out_dir, phase, summaries, config, run_info, curve_dirs, log=print):
    """Merge this phase into OUT_DIR/results.json and rewrite results.md and curves.png.

    summaries: {seed: train.train_phase's summary}; run_info: data_dir, subset, device name.
    """
    from checkpoint import atomic_write_text
    path = os.path.join(out_dir, 'results.json')
    results = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                results = json.load(f)
        except (OSError, ValueError):
            results = {}
    models = {n: e for n, e in results.get('models', {}).items() if phase_of(n) != phase}
    if phase == 'students':
        results.pop('kd_gain', None)
        results.pop('gains', None)
    per_seed = {s: v['models'] for s, v in summaries.items()}
    models.update(aggregate_models(per_seed))
    results['models'] = models
    if phase == 'students':
        results['gains'] = gains(per_seed)
        results['kd_gain'] = results['gains'].get('student_kd')
        teacher_accs = [v['models']['teacher_in_use']['test_acc'] for v in summaries.values()]
        results['teacher_in_use'] = {'checkpoint': config.get('teacher_checkpoint'),
                                     'sha256': config.get('teacher_sha256'),
                                     'test_acc': teacher_accs[0]}
    seeds = list(summaries)
    results['seeds'] = seeds
    results.setdefault('phases', {})[phase] = {
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
    atomic_write_text(path, json.dumps(results, indent=2) + '\n')
    atomic_write_text(os.path.join(out_dir, 'results.md'), results_markdown(results))
    folders = {n: results['phases'][phase_of(n)]['folders'] for n in models
               if phase_of(n) in results['phases']}
    plot_curves(folders, os.path.join(out_dir, 'curves.png'), log=log)
    if phase == 'students':
        plot_grid(models, os.path.join(out_dir, 'grid.png'), log=log)
    return results
