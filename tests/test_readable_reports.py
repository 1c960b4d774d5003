"""What a person reads at the end of a run: the epoch lines, the final table, the paired gains,
the closing recommendation, curves.png and grid.png, for 1 to many models and epochs."""
import csv
import os

import pytest

from kd.methods.registry import LOSSES, get_loss
from kd.methods.grid import expand_grid, setting_name
from kd.report.curves import curves_figure, plot_curves
from kd.report.grid import grid_figure, plot_grid
from kd.report.stats import aggregate_models, gains
from kd.report.tables import describe_gains, print_table, results_table
from main import parse_config
from kd.run.commands import rerun_command
from kd.engine.epoch_line import EPOCH_LINE_WIDTH, EpochStats, format_epoch_line
from kd.engine.epoch_log import csv_fields

matplotlib = pytest.importorskip('matplotlib')
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

GRID = [setting_name(loss, params)
        for loss, params in expand_grid(['kd', 'dkd', 'ls'], [2, 4, 8], [0.1, 0.5])]  # 15
GRID20 = [setting_name(loss, params)
          for loss, params in expand_grid(['kd', 'dkd', 'ls'], [2, 4, 8, 16], [0.1, 0.5])]


# ---------------------------------------------------------------------------------------------
# The epoch line

def _rows(names, val):
    """Each model's CSV row of an epoch; val[name] is the validation accuracy (%)."""
    return {n: {'train_loss': 12.345, 'train_acc': 55.5, 'val_acc': val[n],
                'test_acc': val[n] - 1} for n in names}


@pytest.mark.parametrize('names', [['student_kd'], ['student_kd', 'student_base'],
                                   GRID + ['student_base'], GRID20 + ['student_base'],
                                   ['kd_T0.123457_a0.123457', 'kd_T2_a0.1', 'student_base']])
@pytest.mark.parametrize('epochs', [3, 200])
def test_the_epoch_line_fits_a_terminal_and_names_the_baseline_and_the_best(names, epochs):
    val = {n: 30.0 + i for i, n in enumerate(names)}
    val['student_base'] = 35.5
    line = format_epoch_line('students', EpochStats(epochs, epochs, 0.0123, 1234.5, 12345),
                             _rows(names, val))
    assert len(line) <= EPOCH_LINE_WIDTH, line
    best = max((n for n in names if n != 'student_base'), key=val.get)
    if 'student_base' in names:
        assert 'base' in line and '35.50' in line
    assert f'{val[best]:.2f}' in line
    assert best in line or best[:10] in line    # a name longer than the room is cut with …
    if len(names) > 3:   # a grid: the others as a count and a range
        others = [val[n] for n in names if n not in ('student_base', best)]
        assert f'{len(others)} others {min(others):.2f}–{max(others):.2f}' in line
        assert len(line) < 130 and 'best' in line


def test_the_teachers_epoch_line_keeps_every_number():
    line = format_epoch_line('teacher', EpochStats(7, 200, 0.1, 12.0, 900),
                             _rows(['teacher'], {'teacher': 61.25}))
    assert 'loss 12.345' in line and 'train  55.50' in line
    assert 'val  61.25' in line and 'test  60.25' in line and len(line) <= EPOCH_LINE_WIDTH


# ---------------------------------------------------------------------------------------------
# Tables, gains and the recommendation

def _model(val, test, loss='kd', params=None, seeds=(0,)):
    return {'best_val_acc': val, 'test_acc': test, 'params': 1_166_506, 'seeds': list(seeds),
            'loss': loss, 'loss_params': params or {}}


def _grid_models(base_val=40.0, best_val=39.0):
    models = {'student_base': _model(base_val, 41.0, 'ce')}
    for i, name in enumerate(GRID):
        loss, *rest = name.split('_')
        params = {'temperature': float(rest[0][1:])}
        if len(rest) > 1:
            params['alpha'] = float(rest[1][1:])
        models[name] = _model(best_val - 0.5 * i, 30.0 + i, loss, params)
    return models


def test_the_console_table_shows_validation_and_test_and_says_how_it_is_sorted():
    models = {'teacher': {'test_acc': 93.1, 'best_val_acc': 92.0, 'params': 11_173_962,
                          'seeds': [0]},
              'student_kd': _model(80.0, 79.5), 'student_base': _model(81.0, 78.25, 'ce')}
    said = []
    print_table(models, said.append)
    header = next(line for line in said if line.startswith('Model'))
    assert 'Val. acc. ↓' in header and 'Test acc.' in header
    assert header.index('Val. acc.') < header.index('Test acc.')
    assert any('ranked by validation accuracy' in line for line in said)
    rows = said[said.index(header) + 1:said.index(header) + 4]
    assert [r.split()[1] for r in rows] == ['(ResNet-18)', '(baseline)', '(KD)']
    base = rows[1].split()
    assert base[2:4] == ['81.00', '78.25']   # validation, then test
    assert said[-1].split()[-1] == '+1.25'   # KD − baseline on test accuracy, in its column
    # --evaluate only tests: no validation column values and no claim of a ranking
    evaluated = {'student_kd': {'test_acc': 79.5, 'params': 1}, 'student_base':
                 {'test_acc': 78.0, 'params': 1}}
    said = []
    print_table(evaluated, said.append)
    assert '↓' not in ' '.join(said) and 'ranked' not in ' '.join(said)


def test_results_md_ranks_on_the_validation_column_it_shows_first():
    per_seed = {0: {n: dict(e, params=1, ece=1.0, last_test_acc=e['test_acc'], best_epoch=1)
                    for n, e in _grid_models().items()}}
    results = {'models': aggregate_models(per_seed), 'gains': gains(per_seed)}
    text = results_table(results)
    header = text.splitlines()[0]
    assert '| Val. acc. (%) ↓ | Test acc. (%) |' in header
    assert 'ranked by validation accuracy' in text
    kd_row = next(line for line in text.splitlines() if line.startswith('| kd_T2_a0.1 |'))
    assert '| 39.00 | 30.00 |' in kd_row
    assert text.count('too small for a confidence interval') == 1


def test_a_grid_on_one_seed_says_once_why_there_is_no_interval():
    per_seed = {0: {n: dict(e, params=1, ece=1.0, last_test_acc=e['test_acc'], best_epoch=1)
                    for n, e in _grid_models().items()}}
    results = {'models': aggregate_models(per_seed), 'gains': gains(per_seed)}
    lines = describe_gains(results)
    assert len(lines) == len(GRID) + 1
    assert sum('too small for a confidence interval' in line for line in lines) == 1
    assert 'too small' in lines[-1] and lines[0].startswith('kd_T2_a0.1 − baseline')


def _args(epochs):
    return parse_config(['--epochs', str(epochs), '--student-arch', 'cnn', '--out-dir', 'out'])


def test_the_recommendation_says_when_the_best_does_not_beat_the_baseline():
    text = rerun_command(_grid_models(base_val=40.0, best_val=39.0), _args(200))
    assert text.startswith('Best on validation: kd_T2_a0.1 (39.00%)')
    assert "does not beat the baseline on validation (39.00% against the baseline's 40.00%)" \
        in text
    assert 'python main.py --loss kd --temperature 2.0 --alpha 0.1' in text
    better = rerun_command(_grid_models(base_val=38.0, best_val=39.0), _args(200))
    assert 'does not beat' not in better and 'Best on validation: kd_T2_a0.1' in better


def test_the_recommendation_notes_a_dkd_warm_up_longer_than_the_run():
    ramp = get_loss('dkd').warmup_epochs
    assert ramp == 20 and all(LOSSES[n].warmup_epochs == 0 for n in ('ce', 'kd', 'ls'))
    short = rerun_command(_grid_models(), _args(ramp - 1))
    assert 'dkd never reached its full distillation weight' in short
    assert f'over {ramp} epochs and this run had {ramp - 1}' in short
    for epochs in (ramp, ramp + 5):
        assert 'never reached' not in rerun_command(_grid_models(), _args(epochs))
    no_dkd = {n: e for n, e in _grid_models().items() if not n.startswith('dkd')}
    assert 'never reached' not in rerun_command(no_dkd, _args(2))


# ---------------------------------------------------------------------------------------------
# curves.png

def _write_logs(folder, name, epochs, start, slope, loss='kd'):
    """A CSV as train.py writes it: accuracies rising by `slope` per epoch from `start`."""
    os.makedirs(folder, exist_ok=True)
    fields = csv_fields(['ce', 'kd'])
    with open(os.path.join(folder, f'log_{name}.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for e in range(1, epochs + 1):
            ce = 2.3 / (1 + 0.5 * e * slope)
            writer.writerow({'epoch': e, 'lr': 0.1, 'train_loss': ce * (3 if loss != 'ce' else 1),
                             'train_ce': ce, 'train_kd': '' if loss == 'ce' else 5.0 / e,
                             'train_acc': start + slope * e, 'val_acc': start + slope * e - 1,
                             'test_acc': start + slope * e - 2, 'seconds': 1,
                             'images_per_s': 100})


def _grid_logs(tmp_path, epochs=3, seeds=1, n_distilled=15, teacher_epochs=10):
    folders = [str(tmp_path / f'seed{s}') for s in range(seeds)]
    teacher_dir = str(tmp_path / 'teacher')
    _write_logs(teacher_dir, 'teacher', teacher_epochs, 40, 5, 'ce')
    run_dirs = {'teacher': [teacher_dir]}
    for s, d in enumerate(folders):
        _write_logs(d, 'student_base', epochs, 30 + s, 2.0, 'ce')
        for i, name in enumerate(GRID[:n_distilled]):
            _write_logs(d, name, epochs, 20 + i + s, 1.0 + 0.1 * i)
    run_dirs.update({n: folders for n in ['student_base'] + GRID[:n_distilled]})
    return run_dirs


def _lines(ax, gid):
    return [line for line in ax.get_lines() if line.get_gid() == gid]


def _check_layout(fig):
    """The legend lies inside the figure and outside every panel; epoch ticks are integers."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    assert fig.bbox.x0 <= legend.x0 and legend.x1 <= fig.bbox.x1
    assert fig.bbox.y0 <= legend.y0 and legend.y1 <= fig.bbox.y1
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent(renderer))
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks)


def test_curves_of_a_17_model_grid_highlight_the_baseline_and_the_best_few(tmp_path):
    run_dirs = _grid_logs(tmp_path)
    fig = curves_figure(run_dirs, teacher_acc=88.5)
    val_ax, test_ax, ce_ax = fig.axes
    assert [ax.get_title() for ax in fig.axes] == [
        'Validation accuracy (%)', 'Test accuracy (%)', 'Training cross-entropy on the labels']
    for ax in fig.axes:
        assert len(_lines(ax, 'baseline')) == 1 and len(_lines(ax, 'highlight')) == 5
        assert len(_lines(ax, 'other')) == 10
        assert ax.get_xlim()[1] < 4   # the teacher's 10 epochs do not stretch the axis
    # the highlighted are the five best on validation: the steepest (last) settings of GRID
    top = sorted((line.get_ydata()[-1] for line in _lines(val_ax, 'highlight')), reverse=True)
    rest = [line.get_ydata()[-1] for line in _lines(val_ax, 'other')]
    assert min(top) >= max(rest)
    teacher, = _lines(test_ax, 'teacher')
    assert list(teacher.get_ydata()) == [88.5, 88.5]
    assert not _lines(val_ax, 'teacher') and not _lines(ce_ax, 'teacher')
    # like with like: the loss panel holds each model's hard-label CE, not its total loss
    base, = _lines(ce_ax, 'baseline')
    assert base.get_ydata()[0] == pytest.approx(2.3 / 2)
    assert all(max(line.get_ydata()) < 2.3 for line in ce_ax.get_lines())
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts[0] == 'Student (baseline)' and len(texts) == 8
    assert '10 other students' in texts[6] and texts[7] == 'teacher, test accuracy 88.50%'
    assert fig._suptitle.get_text() == 'Students: 3 epochs, 1 seed'
    _check_layout(fig)
    plt.close(fig)
    path = str(tmp_path / 'curves.png')
    assert plot_curves(run_dirs, path, log=pytest.fail, teacher_acc=88.5) == path
    assert os.path.getsize(path) > 10_000


def test_curves_of_a_one_epoch_run_show_every_point(tmp_path):
    run_dirs = _grid_logs(tmp_path, epochs=1, n_distilled=1)
    fig = curves_figure({n: run_dirs[n] for n in ('student_base', GRID[0])})
    for ax in fig.axes:
        lines = ax.get_lines()
        assert len(lines) == 2 and all(line.get_marker() == 'o' for line in lines)
        lo, hi = ax.get_xlim()
        assert [t for t in ax.get_xticks() if lo <= t <= hi] == [1]
    assert fig._suptitle.get_text() == 'Students: 1 epoch, 1 seed'
    _check_layout(fig)
    plt.close(fig)


def test_curves_over_five_seeds_have_bands_and_a_plural_title(tmp_path):
    run_dirs = _grid_logs(tmp_path, epochs=40, seeds=5, n_distilled=3)
    fig = curves_figure(run_dirs)
    assert fig._suptitle.get_text() == 'Students: 40 epochs, mean over 5 seeds (band: min–max)'
    val_ax = fig.axes[0]
    assert len(val_ax.collections) == 4   # a band for the baseline and each highlighted student
    assert all(line.get_marker() in ('None', None, '') for line in val_ax.get_lines())
    base, = _lines(val_ax, 'baseline')
    assert base.get_ydata()[0] == pytest.approx(30 + 2 + 2 - 1)   # the mean of 30..34, +2 -1
    _check_layout(fig)
    plt.close(fig)


def test_curves_of_the_teacher_phase_alone(tmp_path):
    run_dirs = _grid_logs(tmp_path)
    fig = curves_figure({'teacher': run_dirs['teacher']}, teacher_acc=88.5)
    assert fig._suptitle.get_text() == 'Teacher (ResNet-18): 10 epochs, 1 seed'
    for ax in fig.axes:
        assert len(ax.get_lines()) == 1 and ax.get_xlim()[1] > 10
    _check_layout(fig)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# grid.png

def test_grid_png_has_one_colour_scale_centred_on_the_baseline(tmp_path):
    models = _grid_models(base_val=40.0, best_val=39.0)
    fig = grid_figure(models)
    heat_maps = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in heat_maps] == ['kd', 'dkd', 'ls']
    norms = {(im.norm.vmin, im.norm.vmax) for ax in heat_maps for im in ax.images}
    assert len(norms) == 1
    (vmin, vmax), = norms
    assert (vmin + vmax) / 2 == pytest.approx(40.0)
    kd, dkd, _ = heat_maps
    assert dkd.get_xlabel() == 'one setting' and kd.get_xlabel() == 'α (weight of the labels)'
    assert kd.get_ylabel() == dkd.get_ylabel() == 'temperature T'
    cells = [t.get_text() for t in kd.texts]
    assert '39.00\n-1.00' in cells   # kd_T2_a0.1: its accuracy and its difference to the baseline
    _check_layout_inside(fig)
    plt.close(fig)
    path = str(tmp_path / 'grid.png')
    assert plot_grid(models, path, log=pytest.fail) == path and os.path.getsize(path) > 10_000


def test_grid_png_keeps_every_beta_of_a_feature_method():
    """fitnet takes β alone: its settings are rows of β (they once all fell on one cell)."""
    models = {'student_base': {'loss': 'ce', 'best_val_acc': 30.0},
              'fitnet_b10': {'loss': 'fitnet', 'loss_params': {'beta': 10.0}, 'best_val_acc': 32.0},
              'fitnet_b100': {'loss': 'fitnet', 'loss_params': {'beta': 100.0},
                              'best_val_acc': 31.0}}
    fig = grid_figure(models)
    fitnet, = [ax for ax in fig.axes if ax.images]
    assert fitnet.get_ylabel() == 'β (weight of the distillation term)'
    assert sorted(t.get_text() for t in fitnet.texts) == ['31.00\n+1.00', '32.00\n+2.00']
    plt.close(fig)


def test_grid_png_draws_a_loss_over_the_hyper_parameters_that_vary():
    """dist takes T, β and γ: gridded over γ and the LS switch, those are its axes (the fixed T
    and β would put every setting on one cell)."""
    base = {'temperature': 4.0, 'beta': 2.0}
    models = {'student_base': {'loss': 'ce', 'best_val_acc': 30.0}}
    for gamma, ls, acc in ((1.0, False, 31.0), (2.0, False, 32.0), (1.0, True, 33.0),
                           (2.0, True, 34.0)):
        params = {**base, 'gamma': gamma, **({'logit_standardization': True} if ls else {})}
        models[f'dist_{gamma}_{ls}'] = {'loss': 'dist', 'loss_params': params,
                                        'best_val_acc': acc}
    fig = grid_figure(models)
    dist, = [ax for ax in fig.axes if ax.images]
    assert dist.get_ylabel() == 'γ (weight of the second term)'
    assert dist.get_xlabel() == 'logit standardisation'
    assert [t.get_text() for t in dist.get_xticklabels()] == ['off', 'on']
    assert sorted(t.get_text() for t in dist.texts) == ['31.00\n+1.00', '32.00\n+2.00',
                                                        '33.00\n+3.00', '34.00\n+4.00']
    plt.close(fig)


def _check_layout_inside(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for artist in [fig._suptitle] + [a for ax in fig.axes for a in (ax.title, ax.xaxis.label)]:
        box = artist.get_window_extent(renderer)
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 + 1, artist.get_text()


def test_curves_of_a_recipe_that_keeps_the_last_epoch_name_its_last_validation_accuracy(
        tmp_path):
    """The fast recipe keeps the last epoch's weights: the legend scores each student by that
    epoch's validation accuracy ('last val.'), not by the best epoch's, which it does not keep."""
    run_dirs = _grid_logs(tmp_path, epochs=3, n_distilled=1)
    path = os.path.join(run_dirs[GRID[0]][0], f'log_{GRID[0]}.csv')
    with open(path) as f:
        rows = list(csv.DictReader(f))
    rows[1]['val_acc'], rows[2]['val_acc'] = '70.0', '60.0'   # the best epoch is not the last
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for keeps_last, label in ((False, 'best val. 70.00%'), (True, 'last val. 60.00%')):
        fig = curves_figure(run_dirs, keeps_last=keeps_last)
        texts = [t.get_text() for t in fig.legends[0].get_texts()]
        assert any(t.endswith(f'({label})') for t in texts), texts
        plt.close(fig)


def test_grid_png_draws_a_method_setting_given_with_set(tmp_path):
    """A grid over a method's own setting (--set dkd.warmup=1,20) gets its heat map, its axis
    named by the setting's declaration."""
    from kd.report.grid import grid_axes, grid_cells
    from kd.report.settings import axis_label, value_text
    models = {'student_base': {'loss': 'ce', 'best_val_acc': 40.0}}
    for warmup, acc in ((1, 41.0), (20, 39.0)):
        params = {'temperature': 4.0, 'warmup': warmup}
        models[setting_name('dkd', params)] = {'loss': 'dkd', 'loss_params': params,
                                               'best_val_acc': acc}
    assert grid_axes(models, 'dkd') == ('warmup', 'temperature')
    assert sorted(grid_cells(models)['dkd']) == [(1, 4.0), (20, 4.0)]
    assert axis_label('warmup', 'dkd') == 'warm-up epochs' and value_text('warmup', 1, 'dkd') == '1'
    assert plot_grid(models, str(tmp_path / 'grid.png'), log=lambda *_: None) is not None
    assert (tmp_path / 'grid.png').stat().st_size > 1000
