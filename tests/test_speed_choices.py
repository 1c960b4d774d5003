"""Issue-10 behaviour: the teacher's test logits computed once, the precision decided, a frozen
(BatchNorm-folded) teacher equal to the eager one, the time estimate, and --test-every."""
import csv
import json
import os
import shutil

import pytest
import torch
import torch.nn as nn

from kd import recipes as r
from kd.engine import timing
from conftest import run_cli
from kd.models import build_model, model_names
from kd.run.advice import cpu_run_advice
from kd.run.teacher import cached_test_logits, logits_key, logits_path, save_test_logits
from kd.engine.progress import DurationEstimate, PhaseWork, format_duration
from kd.run.teacher_form import fastest_teacher, fold_batchnorm
from kd.run.tuning import measure_precisions


def _randomise_batchnorm(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


@pytest.mark.parametrize('name', model_names())
def test_folded_teacher_gives_the_eager_outputs(name):
    torch.manual_seed(0)
    model = _randomise_batchnorm(build_model(name, num_classes=100))
    folded = fold_batchnorm(model)
    x = torch.randn(6, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        eager, fast = model(x), folded(x)
    assert (eager - fast).abs().max() <= 1e-5 * max(1.0, eager.abs().max().item())
    before = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    after = sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert after < before          # convolution -> BatchNorm pairs were folded
    assert all(not p.requires_grad for p in folded.parameters())
    # the original is untouched (still training-capable)
    assert all(p.requires_grad for p in model.parameters())


def test_fastest_teacher_returns_an_equivalent_form_and_its_record():
    torch.manual_seed(0)
    teacher = _randomise_batchnorm(build_model('resnet8x4'))
    form, record = fastest_teacher(teacher, (8, 3, 32, 32), torch.device('cpu'), None,
                                   forwards_ahead=10, log=lambda *_: None)
    assert record['chosen'] == 'folded'   # the same arithmetic, one pass fewer: always used
    assert set(record['seconds_per_batch']) == {'eager', 'folded'}
    assert 'compile_seconds' not in record   # 10 forwards never repay a compilation
    x = torch.randn(5, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(form(x), teacher(x), atol=1e-4, rtol=1e-4)


def test_precision_measurement_reports_both_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = build_model('cnn')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rates = measure_precisions(model, (8, 3, 32, 32), torch.device('cpu'), training=True)
    assert set(rates) == {'fp32', 'bf16'} and all(v > 0 for v in rates.values())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_cached_logits_are_used_only_for_the_same_weights_and_test_images(tmp_path):
    path = str(tmp_path / 'best_teacher.pth')
    logits = torch.randn(20, 10)
    key = logits_key('abc', 'cifar10', 'f' * 64, 20)
    save_test_logits(path, logits, key)
    assert os.path.exists(logits_path(path))
    assert torch.equal(cached_test_logits(path, key), logits)
    for changed in (dict(key, sha256='other'), dict(key, test_images_sha256='e' * 64),
                    dict(key, num_test=19),
                    dict(key, dataset='cifar100')):
        assert cached_test_logits(path, changed) is None
    with open(logits_path(path), 'wb') as f:
        f.write(b'damaged')
    assert cached_test_logits(path, key) is None


def test_students_reuse_the_teachers_logits_and_recompute_for_another_checkpoint(
        trained_run, tmp_path):
    out = trained_run['out']
    said = [line for line in trained_run['students'].stdout.splitlines()
            if line.startswith('teacher: test-set logits')]
    assert said and 'reused from' in said[0]
    # another checkpoint (the same weights, saved again: another hash) has no stored logits
    other = tmp_path / 'teacher'
    other.mkdir()
    state = torch.load(os.path.join(out, 'best_teacher.pth'), weights_only=True)
    state['linear.bias'] = state['linear.bias'] + 0.5
    torch.save(state, other / 'best_teacher.pth')  # no record: the original's names other weights
    shutil.copy(os.path.join(out, 'best_teacher_test_logits.pt'),
                other / 'best_teacher_test_logits.pt')
    r = run_cli('--epochs', '1', '--subset', '100', '--batch-size', '32', '--device', 'cpu',
                '--data-dir', trained_run['common'][1], '--out-dir', str(tmp_path / 'run'),
                '--teacher-checkpoint', str(other / 'best_teacher.pth'), '--no-baseline')
    assert r.returncode == 0, r.stderr
    assert 'teacher: computing its test-set logits' in r.stdout
    with open(tmp_path / 'run' / 'results.json') as f:
        results = json.load(f)
    # the recomputed logits are the other teacher's: its accuracy, not the stored one's
    with open(os.path.join(out, 'results.json')) as f:
        assert results['teacher_in_use']['sha256'] != json.load(f)['teacher_in_use']['sha256']


def test_evaluate_reuses_the_logits_and_recomputes_for_another_subset(trained_run):
    common = ['--evaluate', '--out-dir', trained_run['out'], '--data-dir',
              trained_run['common'][1], '--device', 'cpu', '--batch-size', '32']
    same = run_cli(*common, '--subset', '100')
    assert same.returncode == 0 and 'reused from' in same.stdout
    other = run_cli(*common, '--subset', '50')
    assert other.returncode == 0 and 'computing its test-set logits (50 images' in other.stdout


def test_the_precision_decision_is_recorded_in_results(trained_run):
    with open(os.path.join(trained_run['out'], 'results.json')) as f:
        results = json.load(f)
    for phase in ('teacher', 'students'):
        config = results['phases'][phase]['config']
        decisions = config['precision_decisions']
        assert decisions, phase
        for figures in decisions.values():
            assert figures['fp32'] > 0 and figures['bf16'] > 0
            faster = 'bf16' if figures['bf16'] >= 1.2 * figures['fp32'] else 'fp32'
            assert figures['chosen'] == faster
            assert figures['source'] in ('measured', 'stored') and figures['decided']
        assert config['precision_source'] in ('measured', 'stored', 'stored and measured')
        arch = 'resnet18' if phase == 'teacher' else 'cnn'
        chosen = decisions[f'{arch} (training), batch 32x3x32x32']['chosen']
        assert set(config['precision'].values()) == {chosen}
    students = results['phases']['students']['config']
    assert students['precision_decisions']['resnet18 (inference), batch 32x3x32x32'][
        'chosen'] == students['teacher_precision']
    assert students['teacher_form']['chosen'] == 'folded'


def test_selected_students_report_the_selected_epochs_test_accuracy(trained_run):
    with open(os.path.join(trained_run['out'], 'results.json')) as f:
        results = json.load(f)
    for name in ('student_kd', 'student_base'):
        entry = results['models'][name]
        with open(os.path.join(trained_run['out'], f'log_{name}.csv')) as f:
            rows = [line.split(',') for line in f.read().splitlines()]
        header, rows = rows[0], rows[1:]
        row = rows[entry['best_epoch'][0] - 1]
        assert float(row[header.index('test_acc')]) == pytest.approx(entry['test_acc'])


@pytest.mark.slow  # 4 epochs with the ResNet-18 teacher: 21 s on 2 cores
def test_test_every_leaves_the_skipped_epochs_empty(trained_run, tmp_path):
    out = str(tmp_path / 'run')
    r = run_cli('--epochs', '4', '--test-every', '3', '--val-fraction', '0.1', '--subset', '100',
                '--batch-size', '32', '--device', 'cpu', '--data-dir', trained_run['common'][1],
                '--out-dir', out, '--teacher-checkpoint',
                os.path.join(trained_run['out'], 'best_teacher.pth'), '--no-baseline')
    assert r.returncode == 0, r.stderr
    with open(os.path.join(out, 'log_student_kd.csv'), newline='') as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(out, 'results.json')) as f:
        entry = json.load(f)['models']['student_kd']
    best_so_far = -1.0
    for row in rows:
        epoch, val = int(row['epoch']), float(row['val_acc'])
        new_best = val > best_so_far
        best_so_far = max(best_so_far, val)
        # tested: every 3rd epoch, the last one, and each epoch that became the selected one
        assert (row['test_acc'] != '') == (epoch in (3, 4) or new_best), row
    assert float(rows[entry['best_epoch'][0] - 1]['test_acc']) == pytest.approx(entry['test_acc'])


def test_the_estimate_is_printed_once_and_recorded(trained_run, tmp_path):
    out = str(tmp_path / 'run')
    # batch 16: 6 steps an epoch, the 2 of warm-up and some timed ones
    r = run_cli('--epochs', '2', '--subset', '100', '--batch-size', '16', '--device', 'cpu',
                '--data-dir', trained_run['common'][1], '--out-dir', out, '--teacher-checkpoint',
                os.path.join(trained_run['out'], 'best_teacher.pth'), '--no-baseline')
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if 'should take about' in line]
    assert len(lines) == 1 and lines[0].startswith('students: ') and 'images/s' in lines[0]
    with open(os.path.join(out, 'results.json')) as f:
        phase = json.load(f)['phases']['students']
    estimate = phase['estimate']['0']
    assert estimate['estimated_seconds'] > 0 and estimate['images_per_s'] > 0
    assert phase['train_seconds']['0'] > 0   # the actual time beside it


def test_a_long_cpu_estimate_suggests_the_quick_run(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(timing, 'perf_counter', lambda: now[0])
    lines = []
    quick = ['python main.py --train-teacher --epochs 3 --subset 2000 --out-dir quick']
    cpu = torch.device('cpu')
    timer = DurationEstimate('teacher', PhaseWork(200, 352, 128, 1, 5000, 10000), cpu,
                             lines.append, on_estimate=cpu_run_advice(cpu, quick))
    out = [type('R', (), {'loss': torch.zeros(())})()]
    for _ in range(2 + 20):
        now[0] += 5.0   # each step takes 5 s, as a teacher step on a laptop CPU
        timer.on_step(128, out)
    assert len(lines) == 3
    assert lines[0].startswith('teacher: ') and '200 epochs should take about' in lines[0]
    assert lines[2] == '  ' + quick[0]
    assert timer.estimate['images_per_s'] == pytest.approx(128 / 5)
    assert timer.estimate['estimated_seconds'] > 200 * 352 * 5
    assert format_duration(30) == '30 s' and format_duration(3 * 86400) == '3.0 days'


def test_the_teacher_form_follows_no_timing_and_compiles_only_under_compile():
    """The folded form, whatever the timings and the forwards ahead (each form rounds
    differently, so a timed choice would change the students' numbers run to run); with
    --compile the folded model compiled with Inductor's freezing, which reproduces it."""
    torch.manual_seed(0)
    teacher = _randomise_batchnorm(build_model('cnn')).to(memory_format=torch.channels_last)
    teacher.eval()
    for forwards in (1, 10 ** 9):   # a run of any length
        form, record = fastest_teacher(teacher, (8, 3, 32, 32), torch.device('cpu'), None,
                                       forwards_ahead=forwards, log=lambda *_: None)
        assert record['chosen'] == 'folded' and 'compile_seconds' not in record
    form, record = fastest_teacher(teacher, (8, 3, 32, 32), torch.device('cpu'), None,
                                   forwards_ahead=1, log=lambda *_: None, compile_model=True)
    assert record['chosen'] == 'compiled' and record['compile_seconds'] > 0
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert torch.allclose(form(x), teacher(x), atol=1e-4)


def test_the_estimate_counts_the_last_epochs_test_time_augmentation(monkeypatch):
    """With 6 TTA views, the last epoch evaluates validation and test images 5 more times: the
    estimate grows by exactly that many forwards (a third of a training step per image)."""
    out = [type('R', (), {'loss': torch.zeros(())})()]

    def estimate(views):
        now = [0.0]
        monkeypatch.setattr(timing, 'perf_counter', lambda: now[0])
        work = PhaseWork(10, 352, 128, 1, 5000, 10000, test_every=10, final_views=views)
        timer = DurationEstimate('teacher', work, torch.device('cpu'), lambda *_: None)
        for _ in range(2 + 20):
            now[0] += 3.0
            timer.on_step(128, out)
        return timer.estimate['estimated_seconds']

    per_image_forward = 3.0 / 128 / 3
    assert estimate(6) - estimate(1) == pytest.approx(5 * (5000 + 10000) * per_image_forward,
                                                      abs=0.2)
    assert r.tta_view_count(r.get_recipe('fast')) == 6
    assert r.tta_view_count(r.get_recipe('standard')) == 1
