"""curves.png: each model's accuracy and hard-label loss per epoch, read from its runs' CSVs."""
import csv
import os
from dataclasses import dataclass

from kd.report.labels import model_label, phase_of
from kd.report.plotting import pyplot, save_figure
from kd.report.stats import mean


def read_csv(path):
    with open(path, newline='') as f:
        return [{k: (float(v) if v not in ('', None) else None) for k, v in row.items()}
                for row in csv.DictReader(f)]


def plot_curves(run_dirs, path, log=print, teacher_acc=None, keeps_last=False):
    """curves.png: accuracy and the hard-label loss per epoch (see curves_figure).

    run_dirs: {model: [folders holding log_<model>.csv]}; teacher_acc: the test accuracy (%) of
    the teacher that taught the students, drawn as a reference line; keeps_last: the recipe
    keeps the last epoch's weights (the legend then gives the last validation accuracy, not the
    best). Returns the path, or None
    when matplotlib cannot be imported (said through `log`; the caller silences the per-seed
    calls so a run says it once) or there is nothing to plot. A plot never fails the run.
    """
    plt = pyplot(log, 'curves.png')
    if plt is None:
        return None
    return save_figure(plt, lambda: curves_figure(run_dirs, teacher_acc, keeps_last), path, log)


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




@dataclass(frozen=True)
class _CurvePlan:
    """What curves.png draws, decided before any axis: the series, which are highlighted, and
    the figure's extent."""
    series: dict        # {model: [rows of each run's CSV]}, only the students when there are some
    students: list      # the students among the models read (none: the teacher's own figure)
    scores: dict        # {model: (selection score, what it is)}, see _selection_score
    shown: list         # the distilled students drawn in colour, best first
    others: list        # the distilled students drawn as thin grey lines
    style: dict         # {model: (colour, line width, z-order, gid)}
    n_epochs: int
    n_runs: int
    marker_size: float  # 0: no markers (a long run)
    has_val: bool       # some run had a validation split

    def panels(self):
        """[(CSV column, panel title)] from left to right."""
        return ([('val_acc', 'Validation accuracy (%)')] if self.has_val else []) + \
            [('test_acc', 'Test accuracy (%)'),
             ('train_ce', 'Training cross-entropy on the labels')]


def _curve_styles(series, shown, others):
    """{model: (colour, line width, z-order, gid)}: the baseline black and widest, the shown
    students in colour, the others thin grey beneath them."""
    style = {}
    if 'student_base' in series:
        style['student_base'] = ('black', 2.2, 4, 'baseline')
    for i, m in enumerate(shown):
        style[m] = (_HIGHLIGHT_COLOURS[i], 1.8, 3, 'highlight')
    for m in others:
        style[m] = ('0.72', 0.8, 1, 'other')
    return style


def _plan_curves(run_dirs, keeps_last):
    """The _CurvePlan of the CSVs under run_dirs, or None when no CSV holds a row."""
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
    n_epochs = max(int(row['epoch']) for runs in series.values() for r in runs for row in r)
    has_val = any(row.get('val_acc') is not None for runs in series.values() for r in runs
                  for row in r)
    return _CurvePlan(series=series, students=students, scores=scores, shown=shown,
                      others=others, style=_curve_styles(series, shown, others),
                      n_epochs=n_epochs, n_runs=max(len(runs) for runs in series.values()),
                      marker_size=(5 if n_epochs <= 10 else 3) if n_epochs <= 30 else 0,
                      has_val=has_val)


def _log_scale(ax, ce_values):
    """The cross-entropy panel on a log scale when its values span more than a factor of 10."""
    from matplotlib.ticker import LogFormatter  # optional: imported only when a figure is drawn

    if ce_values and max(ce_values) / min(ce_values) > 10:
        ax.set_yscale('log')   # the loss falls by orders of magnitude over a long run
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False,
                                                  minor_thresholds=(1.5, 0.5)))


def _draw_panel(ax, key, title, plan, teacher_acc):
    """One panel: each model's mean curve of CSV column `key` (with its min-max band for the
    highlighted ones over several seeds), and the teacher's test accuracy as a dashed line."""
    from matplotlib.ticker import MaxNLocator  # optional: imported only when a figure is drawn

    ce_values = []
    # grey first, highlighted on top
    for m in sorted(plan.series, key=lambda m: plan.style[m][2]):
        colour, width, z, gid = plan.style[m]
        xs, avg, lo, hi = _mean_curve(plan.series[m], key)
        if not xs:
            continue
        dots = {'marker': 'o', 'markersize': plan.marker_size * (0.6 if gid == 'other' else 1)} \
            if plan.marker_size else {}
        ax.plot(xs, avg, '-', color=colour, lw=width, zorder=z, gid=gid, **dots)
        if plan.n_runs > 1 and gid != 'other':
            ax.fill_between(xs, lo, hi, color=colour, alpha=0.15, lw=0, zorder=z - 0.5)
        if key == 'train_ce':
            ce_values += [v for v in lo + hi if v > 0]
    if key == 'test_acc' and plan.students and teacher_acc is not None:
        ax.axhline(teacher_acc, ls='--', color='0.3', lw=1.2, gid='teacher', zorder=2)
    if key == 'train_ce':
        _log_scale(ax, ce_values)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel('epoch')
    pad = 0.5 if plan.n_epochs <= 10 else 0.02 * plan.n_epochs
    ax.set_xlim(1 - pad, plan.n_epochs + pad)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)


def _legend_handles(plan, teacher_acc):
    """The legend's entries: the baseline, the shown students with their selection scores, one
    entry for the grey others, the teacher's line; a teacher-only figure names its models."""
    from matplotlib.lines import Line2D  # optional: imported only when a figure is drawn

    score_name = {'val': 'best val.', 'last_val': 'last val.', 'test': 'last test'}
    dots = {'marker': 'o', 'markersize': plan.marker_size} if plan.marker_size else {}
    if not plan.students:
        return [Line2D([], [], color=plan.style[m][0], lw=1.8, label=model_label(m), **dots)
                for m in plan.series]
    handles = []
    if 'student_base' in plan.series:
        handles.append(Line2D([], [], color='black', lw=2.2, label=model_label('student_base'),
                              **dots))
    for m in plan.shown:
        score, what = plan.scores[m]
        handles.append(Line2D([], [], color=plan.style[m][0], lw=1.8, **dots,
                              label=model_label(m) + (f' ({score_name[what]} {score:.2f}%)'
                                                      if score is not None else '')))
    if plan.others:
        what = {'val': 'validation', 'last_val': 'last validation'}.get(
            plan.scores[plan.others[0]][1], 'last test accuracy')
        handles.append(Line2D([], [], color='0.72', lw=0.8, label=(
            f'{len(plan.others)} other student{"s" if len(plan.others) != 1 else ""}, below the '
            f'{len(plan.shown)} best on {what} (all in results.md)')))
    if teacher_acc is not None:
        handles.append(Line2D([], [], color='0.3', ls='--', lw=1.2,
                              label=f'teacher, test accuracy {teacher_acc:.2f}%'))
    return handles


def _curves_title(plan):
    who = 'Students' if plan.students else ', '.join(model_label(m) for m in plan.series)
    return (f'{who}: {plan.n_epochs} epoch{"s" if plan.n_epochs != 1 else ""}, '
            + (f'mean over {plan.n_runs} seeds (band: min–max)' if plan.n_runs > 1 else '1 seed')
            + ('' if plan.has_val else '; no validation split, ranked by the last test accuracy'))


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

    plan = _plan_curves(run_dirs, keeps_last)
    if plan is None:
        return None
    panels = plan.panels()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4),
                             layout='constrained', squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        _draw_panel(ax, key, title, plan, teacher_acc)
    handles = _legend_handles(plan, teacher_acc)
    fig.legend(handles=handles, loc='outside lower center', ncol=min(3, len(handles)),
               fontsize=9, frameon=False)
    fig.suptitle(_curves_title(plan), fontsize=11)
    return fig
