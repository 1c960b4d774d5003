"""kd.report against hand-computed values: statistics, agreement, ECE, aggregation, tables, plot."""
import math
import os
import sys

import pytest
import torch

from kd.engine.metrics import agreement, expected_calibration_error
from kd.report.curves import plot_curves, read_csv
from kd.report.stats import (aggregate_models, kd_gain, mean, paired_difference, sample_std,
                             t_quantile_975)
from kd.report.tables import describe_gain, results_markdown, results_table


# ---------------------------------------------------------------------------------------------
# Basic statistics

def test_mean_and_sample_std():
    assert mean([1, 2, 3, 4]) == 2.5
    # population std of this classic set is 2; the sample std divides by n - 1 = 7
    values = [2, 4, 4, 4, 5, 5, 7, 9]
    assert sample_std(values) == pytest.approx(math.sqrt(32 / 7))
    assert sample_std([1, 2, 3]) == pytest.approx(1.0)
    assert sample_std([3, 3]) == 0.0
    assert sample_std([5]) is None and sample_std([]) is None


@pytest.mark.parametrize('df, expected, tol', [
    (1, 12.706, 1e-3), (2, 4.303, 1e-3), (4, 2.776, 1e-3), (10, 2.228, 1e-3), (30, 2.042, 1e-3),
    # beyond the table: the expansion against reference values
    (31, 2.0395, 1e-3), (60, 2.0003, 1e-3), (120, 1.9799, 1e-3), (10 ** 6, 1.96, 1e-3)])
def test_t_quantiles(df, expected, tol):
    assert t_quantile_975(df) == pytest.approx(expected, abs=tol)


def test_t_quantiles_decrease_towards_normal_and_reject_df0():
    values = [t_quantile_975(df) for df in range(1, 200)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[-1] > 1.959964
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_paired_difference_by_hand():
    out = paired_difference([11, 12, 13], [10, 10, 10])  # diffs 1, 2, 3
    assert out['per_seed'] == [1, 2, 3] and out['n'] == 3
    assert out['mean'] == pytest.approx(2.0) and out['std'] == pytest.approx(1.0)
    half = 4.303 * 1.0 / math.sqrt(3)   # t(0.975, df=2) * sd / sqrt(n) = 2.4843
    assert out['ci95'] == pytest.approx([2 - half, 2 + half], abs=1e-9)
    assert out['ci95'][0] == pytest.approx(-0.4843, abs=1e-4)
    assert 'note' not in out


def test_paired_difference_two_seeds_uses_df1():
    out = paired_difference([80.0, 83.0], [79.0, 80.0])  # diffs 1, 3: mean 2, sd sqrt(2)
    half = 12.706 * math.sqrt(2) / math.sqrt(2)
    assert out['ci95'] == pytest.approx([2 - half, 2 + half])


def test_paired_difference_n1_has_no_interval():
    out = paired_difference([81.5], [80.0])
    assert out['n'] == 1 and out['mean'] == pytest.approx(1.5)
    assert out['ci95'] is None and out['std'] is None
    assert 'too few' in out['note']


# ---------------------------------------------------------------------------------------------
# Agreement and calibration

def _logits(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def test_agreement_by_hand():
    teacher = _logits([[0.8, 0.2], [0.1, 0.9]])
    student = _logits([[0.4, 0.6], [0.3, 0.7]])   # disagrees on row 1, agrees on row 2
    out = agreement(teacher, student)
    assert out['agreement'] == pytest.approx(50.0)
    kl1 = 0.8 * math.log(0.8 / 0.4) + 0.2 * math.log(0.2 / 0.6)
    kl2 = 0.1 * math.log(0.1 / 0.3) + 0.9 * math.log(0.9 / 0.7)
    assert out['kl_to_teacher'] == pytest.approx((kl1 + kl2) / 2, abs=1e-6)
    # the direction is KL(teacher || student), not the reverse
    rev1 = 0.4 * math.log(0.4 / 0.8) + 0.6 * math.log(0.6 / 0.2)
    rev2 = 0.3 * math.log(0.3 / 0.1) + 0.7 * math.log(0.7 / 0.9)
    assert abs(out['kl_to_teacher'] - (rev1 + rev2) / 2) > 0.03


def test_agreement_identical_logits():
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    out = agreement(logits, logits.clone())
    assert out['agreement'] == 100.0
    assert out['kl_to_teacher'] == pytest.approx(0.0, abs=1e-6)
    # softmax ignores a constant shift per row: still identical distributions
    shifted = agreement(logits, logits + 3.0)
    assert shifted['agreement'] == 100.0 and shifted['kl_to_teacher'] == pytest.approx(0, abs=1e-5)


def test_ece_two_bins_by_hand():
    # 4 predictions at confidence 0.9, all right (gap 0.1); 4 at 0.7, two right (gap 0.2).
    logits = _logits([[0.9, 0.1]] * 4 + [[0.7, 0.3]] * 4).float()
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    assert expected_calibration_error(logits, labels) == pytest.approx(15.0, abs=1e-4)
    # one bin only sees the overall gap: |0.75 - 0.8| = 5 points
    assert expected_calibration_error(logits, labels, bins=1) == pytest.approx(5.0, abs=1e-4)


def test_ece_calibrated_and_overconfident():
    logits = _logits([[0.75, 0.25]] * 4).float()
    assert expected_calibration_error(logits, torch.tensor([0, 0, 0, 1])) == \
        pytest.approx(0.0, abs=1e-4)
    assert expected_calibration_error(logits, torch.tensor([1, 1, 1, 1])) == \
        pytest.approx(75.0, abs=1e-4)
    # confidence 1.0 lands in the last bin, not outside every bin
    sure = torch.tensor([[100.0, 0.0], [100.0, 0.0]])
    assert expected_calibration_error(sure, torch.tensor([0, 1])) == pytest.approx(50.0, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Aggregation over seeds

def _entry(test_acc, last, ece, agree=None, kl=None, best_epoch=2, params=1000):
    e = {'test_acc': test_acc, 'last_test_acc': last, 'best_epoch': best_epoch,
         'best_val_acc': test_acc + 1, 'params': params, 'ece': ece, 'precision': 'fp32'}
    if agree is not None:
        e.update(agreement=agree, kl_to_teacher=kl)
    return e


@pytest.fixture
def per_seed():
    return {
        0: {'student_kd': _entry(80.0, 79.0, 3.0, 90.0, 0.30, 2),
            'student_base': _entry(78.0, 78.0, 5.0, 85.0, 0.50, 3),
            'teacher_in_use': {'test_acc': 93.0}},
        1: {'student_kd': _entry(82.0, 80.0, 4.0, 91.0, 0.20, 3),
            'student_base': _entry(81.0, 80.0, 6.0, 86.0, 0.40, 3),
            'teacher_in_use': {'test_acc': 93.0}},
        2: {'student_kd': _entry(84.0, 84.0, 5.0, 92.0, 0.10, 1),
            'student_base': _entry(81.0, 81.0, 7.0, 87.0, 0.60, 2),
            'teacher_in_use': {'test_acc': 93.0}},
    }


def test_aggregate_models(per_seed):
    models = aggregate_models(per_seed)
    assert set(models) == {'student_kd', 'student_base'}   # teacher_in_use is not a trained model
    kd, base = models['student_kd'], models['student_base']
    assert kd['seeds'] == [0, 1, 2] and kd['best_epoch'] == [2, 3, 1] and kd['params'] == 1000
    assert kd['test_acc'] == pytest.approx(82.0) and kd['test_acc_std'] == pytest.approx(2.0)
    assert kd['test_acc_per_seed'] == [80.0, 82.0, 84.0]
    assert base['test_acc'] == pytest.approx(80.0)
    assert base['test_acc_std'] == pytest.approx(math.sqrt(3))   # deviations -2, 1, 1
    assert kd['last_test_acc'] == pytest.approx(81.0)
    assert kd['last_test_acc_std'] == pytest.approx(math.sqrt(7))  # deviations -2, -1, 3
    assert kd['ece'] == pytest.approx(4.0) and kd['ece_std'] == pytest.approx(1.0)
    assert kd['agreement'] == pytest.approx(91.0) and kd['kl_to_teacher'] == pytest.approx(0.2)


def test_aggregate_skips_a_metric_missing_for_some_seed(per_seed):
    del per_seed[1]['student_kd']['agreement']
    kd = aggregate_models(per_seed)['student_kd']
    assert 'agreement' not in kd and 'agreement_std' not in kd
    assert kd['kl_to_teacher'] == pytest.approx(0.2)


def test_aggregate_single_seed_has_no_std(per_seed):
    kd = aggregate_models({0: per_seed[0]})['student_kd']
    assert kd['test_acc'] == 80.0 and kd['test_acc_std'] is None


def test_kd_gain(per_seed):
    gain = kd_gain(per_seed)   # diffs 2, 1, 3
    assert gain['seeds'] == [0, 1, 2] and gain['per_seed'] == [2.0, 1.0, 3.0]
    assert gain['n'] == 3 and gain['mean'] == pytest.approx(2.0)
    half = 4.303 / math.sqrt(3)
    assert gain['ci95'] == pytest.approx([2 - half, 2 + half])


def test_kd_gain_needs_both_students(per_seed):
    for s in per_seed.values():
        del s['student_base']
    assert kd_gain(per_seed) is None


def test_kd_gain_uses_only_seeds_with_both(per_seed):
    del per_seed[2]['student_base']
    gain = kd_gain(per_seed)
    assert gain['seeds'] == [0, 1] and gain['per_seed'] == [2.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Tables and text

def _results(per_seed):
    return {'models': aggregate_models(per_seed), 'kd_gain': kd_gain(per_seed),
            'config': {'epochs': 2, 'batch_size': 32, 'lr': 0.025, 'weight_decay': 5e-4,
                       'temperature': 4.0, 'alpha': 0.1, 'val_fraction': 0.1, 'subset': 40},
            'run': {'data_dir': '/data/cifar', 'device': 'cpu (x86_64, 2 threads)'},
            'versions': {'torch': torch.__version__},
            'git': {'commit': 'abcdef0123456789', 'dirty': True}}


def test_results_table(per_seed):
    text = results_table(_results(per_seed))
    lines = text.splitlines()
    kd_line = next(line for line in lines if line.startswith('| Student (KD)'))
    assert '82.00 ± 2.00' in kd_line and '81.00 ± 2.65' in kd_line and '| 3 |' in kd_line
    base_line = next(line for line in lines if line.startswith('| Student (baseline)'))
    assert '80.00 ± 1.73' in base_line
    assert 'Teacher' not in text.split('KD − baseline')[0]   # no teacher row when not trained
    # 2 ± 4.303/sqrt(3) = [-0.48, +4.48]
    assert '95% CI [-0.48, +4.48]' in text and 'includes 0' in text
    assert '+2.00 points over 3 seeds (+2.00, +1.00, +3.00)' in text


def test_describe_gain_variants():
    assert 'excludes 0' in describe_gain(paired_difference([81, 82.1, 80.9], [79, 80, 79]))
    one = describe_gain(paired_difference([81.0], [80.0]))
    assert '+1.00 points over 1 seed ' in one and 'too small' in one and 'CI' not in one
    assert 'not measured' in describe_gain(None)


def test_results_markdown(per_seed):
    text = results_markdown(_results(per_seed))
    assert text.startswith('# Results')
    assert '±' in text and '95% CI' in text
    assert '--subset 40' in text and 'git abcdef012345 (dirty tree)' in text
    assert 'validation split 0.1' in text


def test_results_markdown_outside_git_and_without_validation(per_seed):
    results = _results(per_seed)
    results['git'] = {'commit': None, 'dirty': None}   # what main.git_state gives outside git
    results['config']['val_fraction'] = 0.0
    text = results_markdown(results)
    assert 'git unknown.' in text
    assert 'no validation split' in text and 'last epoch' in text


def test_results_markdown_teacher_only():
    per_seed = {0: {'teacher': _entry(90.0, 89.0, 2.0, params=11_000_000)}}
    text = results_markdown({'models': aggregate_models(per_seed), 'config': {}, 'run': {}})
    assert '| Teacher (ResNet-18) | 11.00M | 91.00 | 90.00 |' in text   # validation, test
    assert 'not measured' in text


# ---------------------------------------------------------------------------------------------
# Curves

CSV_HEADER = 'epoch,lr,train_loss,train_ce,train_kd,train_acc,val_acc,test_acc,seconds,images_per_s'


def _write_log(folder, model, rows):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f'log_{model}.csv'), 'w') as f:
        f.write(CSV_HEADER + '\n')
        for r in rows:
            f.write(','.join('' if v is None else str(v) for v in r) + '\n')


def _fake_runs(tmp_path):
    dirs = [str(tmp_path / 'seed0'), str(tmp_path / 'seed1')]
    for i, d in enumerate(dirs):
        _write_log(d, 'student_kd', [(1, 0.1, 2.0, 1.5, 0.4, 30 + i, 35, 33, 1.0, 100),
                                     (2, 0.0, 1.0, 0.9, 0.2, 50 + i, 55, 52, 1.0, 100)])
        _write_log(d, 'student_base', [(1, 0.1, 2.1, 2.1, None, 28, 30, 31, 1.0, 100),
                                       (2, 0.0, 1.2, 1.2, None, 45, 50, 49 + i, 1.0, 100)])
    return dirs


def test_read_csv(tmp_path):
    dirs = _fake_runs(tmp_path)
    rows = read_csv(os.path.join(dirs[0], 'log_student_base.csv'))
    assert len(rows) == 2 and rows[1]['epoch'] == 2.0 and rows[0]['train_kd'] is None
    assert rows[0]['test_acc'] == 31.0


def test_plot_curves_writes_png(tmp_path):
    dirs = _fake_runs(tmp_path)
    path = str(tmp_path / 'curves.png')
    said = []
    folders = {'teacher': dirs, 'student_kd': dirs, 'student_base': dirs}  # no teacher logs
    assert plot_curves(folders, path, log=said.append) == path
    assert said == []
    import matplotlib.image
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= 200 and image.shape[1] >= 400


def test_plot_curves_nothing_to_plot(tmp_path):
    path = str(tmp_path / 'curves.png')
    assert plot_curves({'teacher': [str(tmp_path)]}, path, log=lambda *_: None) is None
    assert not os.path.exists(path)


def test_plot_curves_without_matplotlib(tmp_path, monkeypatch):
    dirs = _fake_runs(tmp_path)
    for name in [m for m in sys.modules if m == 'matplotlib' or m.startswith('matplotlib.')]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, 'matplotlib', None)   # import matplotlib -> ImportError
    said = []
    path = str(tmp_path / 'curves.png')
    assert plot_curves({'student_kd': dirs}, path, log=said.append) is None
    assert len(said) == 1 and 'matplotlib is not installed' in said[0]
    assert not os.path.exists(path)


def test_plot_curves_damaged_csv_does_not_raise(tmp_path):
    d = tmp_path / 'seed0'
    d.mkdir()
    (d / 'log_student_kd.csv').write_text(CSV_HEADER + '\n1,0.1,not-a-number,,,,,,,\n')
    said = []
    path = str(tmp_path / 'curves.png')
    assert plot_curves({'student_kd': [str(d)]}, path, log=said.append) is None
    assert len(said) == 1 and 'could not draw' in said[0]
