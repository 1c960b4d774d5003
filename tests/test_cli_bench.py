"""The benchmarks (bench/reference_kd.py, cli_bench.py, stack_bench.py, roofline.py,
methods_bench.py) end to end on the tiny CIFAR files (one thread)."""
import json

import pytest
import torch

from conftest import run_bench
from kd.methods.registry import LOSSES
from kd.models import StudentNet, TeacherNet

pytestmark = pytest.mark.slow  # long end-to-end runs: python -m pytest -m slow


def test_reference_kd_writes_both_students(cifar_dir, tmp_path):
    teacher = tmp_path / 'teacher.pth'
    torch.manual_seed(0)
    torch.save(TeacherNet().state_dict(), teacher)
    out = tmp_path / 'out'
    proc = run_bench('reference_kd.py', '--epochs', 1, '--subset', 64, '--data-dir', cifar_dir,
                      '--teacher-checkpoint', teacher, '--out-dir', out, '--device', 'cpu')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '[kd] epoch 1/1' in proc.stdout and '[base] epoch 1/1' in proc.stdout
    assert 'total wall time' in proc.stdout
    for name in ('kd', 'base'):
        path = out / f'best_student_{name}.pth'
        StudentNet().load_state_dict(torch.load(path, weights_only=True))


def test_cli_bench_times_both_ways(cifar_dir, tmp_path):
    """(c): our --seeds run against the same run whose teacher has no stored test logits.
    ((a), (b) and (d) use the same measure() with other commands; the reference script has
    its own test above.)"""
    results_path = tmp_path / 'cli_results.json'
    scratch = tmp_path / 'scratch'  # TMPDIR: where the bench's mkdtemp folder goes
    scratch.mkdir()
    proc = run_bench('cli_bench.py', '--data-dir', cifar_dir, '--subset', 64, '--epochs', 1,
                      '--quick-subset', 64, '--skip', 'a', 'b', 'd',
                      '--json', results_path, env={'TMPDIR': str(scratch)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(results_path) as f:
        results = json.load(f)
    assert set(results['runs']) == {'c'}
    seeds = results['runs']['c']
    ours, other = seeds['ours']['median'], seeds['without stored logits']['median']
    assert ours > 0 and other > 0 and seeds['speedup'] == pytest.approx(other / ours)
    assert seeds['ours']['command'].startswith('python main.py --seeds 0 1 2')
    # with the stored logits the teacher's test pass is skipped; without them it runs once
    assert any('reused from' in line for line in seeds['ours']['teacher_logits_lines'])
    assert 'teacher-without-logits' in seeds['without stored logits']['command']
    assert '$TMP/' in seeds['ours']['command']  # temporary paths shown as $TMP
    assert results['machine']['omp_num_threads'] == '1'
    assert results['machine']['cpu'] and results['machine']['torch'] == torch.__version__
    assert '| run | this project (s) | the other way (s) | speed-up |' in proc.stdout
    assert not [p for p in scratch.iterdir() if p.name.startswith('cli_bench-')]  # removed


def test_stack_bench_times_single_loop_and_stacked(tmp_path):
    out = tmp_path / 'stack.json'
    proc = run_bench('stack_bench.py', '--device', 'cpu', '--students', 3, '--batch-size', 8,
                      '--steps', 1, '--json', out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(out) as f:
        seconds = json.load(f)['seconds_per_step']
    assert set(seconds) == {'single student', '3 students, loop', '3 students, stacked'}
    assert all(v > 0 for v in seconds.values())
    assert '3 students, stacked' in proc.stdout and 'vs single' in proc.stdout


def test_roofline_reports_rates_against_the_peak_and_the_floors_they_imply(tmp_path):
    out = tmp_path / 'roofline.json'
    proc = run_bench('roofline.py', '--batch-size', 32, '--matrix', 256, '--repeats', 1,
                      '--json', out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(out) as f:
        r = json.load(f)
    peak = r['peak_flops']['bfloat16']
    assert peak > 0 and r['peak_flops']['float32'] > 0
    teacher, student = r['models']['airbench94'], r['models']['airbench94_small']
    assert teacher['macs'] > 100e6 > 20e6 > student['macs'] > 10e6
    for m in (teacher, student):   # a training step counts as 3 forwards of 2 FLOP per MAC
        assert m['train_fraction_of_peak'] == pytest.approx(
            m['train_images_per_s'] * 6 * m['macs'] / peak, abs=2e-3)
    images = 50_000 * 10
    floors = r['floors']
    assert floors['teacher_seconds'] == pytest.approx(images / teacher['train_images_per_s'],
                                                      abs=0.1)
    assert floors['students_seconds_per_seed'] == pytest.approx(
        images * (1 / teacher['inference_images_per_s'] + 2 / student['train_images_per_s']),
        abs=0.1)
    assert floors['teacher_seconds_at_peak'] == pytest.approx(
        images * 6 * teacher['macs'] / peak, abs=0.1)
    lines = proc.stdout.splitlines()
    assert lines[1].startswith('(a) matrix-multiply peak: bf16 ')
    assert any(line.strip().startswith('airbench94_small') for line in lines)
    assert lines[-1].strip().startswith('KD + baseline, a seed')


def test_methods_bench_times_every_registered_method(tmp_path):
    out = tmp_path / 'methods.json'
    proc = run_bench('methods_bench.py', '--teacher', 'resnet8x4', '--student', 'resnet8',
                      '--batch-size', 4, '--steps', 1, '--train-size', 200, '--device', 'cpu',
                      '--json', out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(out) as f:
        results = json.load(f)
    # every method, the baseline first; kdsvd refuses stages of other channel counts
    assert list(results['seconds_per_step']) == [n for n in LOSSES if n != 'kdsvd']
    assert 'channel' in results['refused']['kdsvd'] and 'kdsvd' in proc.stdout
    assert all(v > 0 for v in results['seconds_per_step'].values())
    assert results['teacher_seconds'] > 0 and "the teacher's forward" in proc.stdout
