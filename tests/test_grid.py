"""A grid of students in one run: names, files, ranking, paired gains over seeds, the promoted
best_student_kd.pth, --evaluate, and torchrun, on the tiny data."""
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_cli

GRID = ['--loss', 'kd', 'ls', '--temperature', '2', '4', '--alpha', '0.1']
NAMES = ['kd_T2_a0.1', 'kd_T4_a0.1', 'ls_T2_a0.1', 'ls_T4_a0.1', 'student_base']


@pytest.fixture(scope='module')
def grid_run(trained_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('grid'))
    common = ['--subset', '100', '--batch-size', '32', '--device', 'cpu', '--data-dir',
              trained_run['common'][1], '--teacher-checkpoint',
              os.path.join(trained_run['out'], 'best_teacher.pth')]
    # float32 pinned: the stacked run below must compute in the same precision
    r = run_cli(*GRID, '--epochs', '1', '--seeds', '0', '1', '--no-amp', '--out-dir', out,
                *common)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(os.path.join(out, 'results.json')) as f:
        results = json.load(f)
    return {'out': out, 'run': r, 'results': results, 'common': common}


def test_every_setting_is_a_named_student_with_its_files(grid_run):
    out, models = grid_run['out'], grid_run['results']['models']
    # and the teacher they distilled from, trained in another folder, as it ran here
    assert set(models) == set(NAMES) | {'teacher'}
    assert models['teacher']['checkpoint'] == grid_run['common'][-1]
    for seed in (0, 1):
        for name in NAMES:
            for ext in ('.pth', '.json'):
                assert os.path.exists(os.path.join(out, f'seed{seed}', f'best_{name}{ext}'))
            assert os.path.exists(os.path.join(out, f'seed{seed}', f'log_{name}.csv'))
    assert models['ls_T4_a0.1']['loss'] == 'ls'
    assert models['ls_T4_a0.1']['loss_params'] == {'temperature': 4.0, 'alpha': 0.1}
    assert os.path.exists(os.path.join(out, 'grid.png'))


def test_paired_gains_over_seeds_and_the_ranked_table(grid_run):
    results = grid_run['results']
    gains = results['gains']
    assert set(gains) == set(NAMES) - {'student_base'}
    for name, gain in gains.items():
        per_seed = [results['models'][name]['test_acc_per_seed'][i]
                    - results['models']['student_base']['test_acc_per_seed'][i] for i in (0, 1)]
        assert gain['n'] == 2 and gain['per_seed'] == pytest.approx(per_seed)
        assert gain['ci95'] is not None
    with open(os.path.join(grid_run['out'], 'results.md')) as f:
        text = f.read()
    rows = [line.split(' | ')[0].strip('| ') for line in text.splitlines()
            if line.startswith('| ') and ('_a0.1' in line or 'baseline' in line)][:5]
    vals = [results['models'][n]['best_val_acc'] for n in NAMES]
    assert sorted(vals, reverse=True) == [results['models'][
        {'Student (baseline)': 'student_base'}.get(r, r)]['best_val_acc'] for r in rows]
    assert 'Student − baseline (paired, test acc.)' in text
    out = grid_run['run'].stdout
    assert 'Confirm it over seeds' in out
    epoch_lines = [line for line in out.splitlines() if line.startswith('students ')]
    assert len(epoch_lines) == 2   # one epoch, two seeds
    assert all(len(line) <= 120 and 'baseline' in line and 'best' in line
               for line in epoch_lines)
    assert 'Val. acc. ↓' in out


def test_best_student_kd_is_the_distilled_student_best_on_validation(grid_run):
    folder = os.path.join(grid_run['out'], 'seed0')
    with open(os.path.join(folder, 'best_student_kd.json')) as f:
        chosen = json.load(f)
    records = {}
    for name in NAMES[:-1]:
        with open(os.path.join(folder, f'best_{name}.json')) as f:
            records[name] = json.load(f)
    assert chosen['best_val_acc'] == max(r['best_val_acc'] for r in records.values())
    with open(os.path.join(folder, 'best_student_kd.pth'), 'rb') as f, \
            open(os.path.join(folder, f"best_{chosen['model']}.pth"), 'rb') as g:
        assert f.read() == g.read()


def test_evaluate_lists_every_student_of_the_grid(grid_run):
    r = run_cli('--evaluate', '--out-dir', grid_run['out'], *grid_run['common'])
    assert r.returncode == 0, r.stderr
    for name in NAMES[:-1]:
        assert any(line.startswith(name) for line in r.stdout.splitlines()), name


@pytest.mark.slow
def test_torchrun_trains_a_grid(grid_run, tmp_path):
    out = str(tmp_path / 'ddp')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(ROOT, 'main.py'), *GRID, '--epochs', '1', '--out-dir', out,
           *grid_run['common']]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(os.path.join(out, 'results.json')) as f:
        results = json.load(f)
    assert set(results['models']) == set(NAMES) | {'teacher'}
    assert results['config']['stacking']['stacked'] is False   # DDP wraps each student


@pytest.mark.slow  # the whole grid again, stacked (21 s); test_stacked checks the steps
def test_the_stacked_grid_equals_the_loop(grid_run, tmp_path):
    """The same grid and seed with the students stacked into one vmapped computation."""
    out = tmp_path / 'stacked'
    r = run_cli(*GRID, '--epochs', '1', '--seed', '0', '--no-amp', '--stack-students', 'on',
                '--out-dir', str(out), *grid_run['common'])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    with open(out / 'results.json') as f:
        stacked = json.load(f)
    assert stacked['config']['stacking']['stacked'] is True
    loop_dir = os.path.join(grid_run['out'], 'seed0')
    for name in NAMES:
        assert stacked['models'][name]['best_epoch'] == [1]
        a = torch.load(os.path.join(loop_dir, f'best_{name}.pth'), weights_only=True)
        b = torch.load(out / f'best_{name}.pth', weights_only=True)
        worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
        assert worst < 1e-3, (name, worst)   # float32 rounding, amplified by training


@pytest.mark.slow  # a second whole run (15 s); the command's flags are checked without it below
def test_the_printed_confirm_command_runs_as_printed_with_the_runs_flags(grid_run):
    said = [line for line in grid_run['run'].stdout.splitlines() if 'Confirm it over seeds' in line]
    command = shlex.split(said[0].split('paired with the baseline: ', 1)[1])
    # this run's precision, batch, device, data and teacher: the seeds confirm what ran here
    for flags in (['--no-amp'], ['--batch-size', '32'], ['--device', 'cpu'], ['--subset', '100'],
                  ['--data-dir', grid_run['common'][7]], ['--seeds', '0', '1', '2', '3', '4']):
        assert any(command[i:i + len(flags)] == flags for i in range(len(command))), flags
    r = subprocess.run([sys.executable] + command[1:], capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_the_confirm_command_keeps_the_split_and_the_recipe():
    import main
    from kd.run.commands import rerun_command
    config = main.parse_config([
        '--loss', 'kd', '--temperature', '2', '4', '--val-fraction', '0.2', '--split-seed', '3',
        '--batch-size', '64', '--lr', '0.3', '--out-dir', 'runs', '--teacher-checkpoint', 't.pth'])
    models = {'kd_T2_a0.1': {'best_val_acc': 50.0, 'loss': 'kd',
                             'loss_params': {'temperature': 2.0, 'alpha': 0.1234567}},
              'kd_T4_a0.1': {'best_val_acc': 40.0, 'loss': 'kd',
                             'loss_params': {'temperature': 4.0, 'alpha': 0.1}},
              'student_base': {'best_val_acc': 45.0, 'loss': 'ce'}}
    line = rerun_command(models, config)
    command = shlex.split(line.split('paired with the baseline: ', 1)[1])
    assert command[2:] == [
        '--loss', 'kd', '--temperature', '2.0', '--alpha', '0.1234567', '--epochs', '200',
        '--val-fraction', '0.2', '--split-seed', '3', '--batch-size', '64', '--lr', '0.3',
        '--teacher-checkpoint', 't.pth', '--out-dir', 'runs/kd_T2_a0.1',
        '--seeds', '0', '1', '2', '3', '4']
    main.parse_config(command[2:])
