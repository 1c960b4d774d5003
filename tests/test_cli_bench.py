"""bench/reference_kd.py and bench/cli_bench.py end to end on the tiny CIFAR files (one thread)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from models import StudentNet, TeacherNet

ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


def run_script(script, *args, timeout=300, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'bench', script), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(ENV, **(env or {})))


def test_reference_kd_writes_both_students(cifar_dir, tmp_path):
    teacher = tmp_path / 'teacher.pth'
    torch.manual_seed(0)
    torch.save(TeacherNet().state_dict(), teacher)
    out = tmp_path / 'out'
    proc = run_script('reference_kd.py', '--epochs', 1, '--subset', 64, '--data-dir', cifar_dir,
                      '--teacher-checkpoint', teacher, '--out-dir', out, '--device', 'cpu')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '[kd] epoch 1/1' in proc.stdout and '[base] epoch 1/1' in proc.stdout
    assert 'total wall time' in proc.stdout
    for name in ('kd', 'base'):
        path = out / f'best_student_{name}.pth'
        StudentNet().load_state_dict(torch.load(path, weights_only=True))


def test_cli_bench_times_both_ways(cifar_dir, tmp_path):
    results_path = tmp_path / 'cli_results.json'
    scratch = tmp_path / 'scratch'  # TMPDIR: where the bench's mkdtemp folder goes
    scratch.mkdir()
    proc = run_script('cli_bench.py', '--data-dir', cifar_dir, '--subset', 64, '--epochs', 1,
                      '--quick-subset', 64, '--quick-epochs', 1, '--skip', 'b', 'd',
                      '--json', results_path, env={'TMPDIR': str(scratch)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(results_path) as f:
        results = json.load(f)
    assert set(results['runs']) == {'a', 'c'}   # (b) is (a)'s measurement on other sizes
    seeds = results['runs']['c']
    assert seeds['ours']['median'] > 0 and seeds['without stored logits']['median'] > 0
    assert seeds['speedup'] == pytest.approx(seeds['without stored logits']['median']
                                             / seeds['ours']['median'])
    assert '--seeds 0 1 2' in seeds['ours']['command']
    # with the stored logits the teacher's test pass is skipped; without them it runs once
    assert any('reused from' in line for line in seeds['ours']['teacher_logits_lines'])
    assert 'teacher-without-logits' in seeds['without stored logits']['command']
    for key in ('a',):
        run = results['runs'][key]
        ours, reference = run['ours']['median'], run['reference']['median']
        assert ours > 0 and reference > 0
        assert run['speedup'] == pytest.approx(reference / ours)
        assert run['ours']['command'].startswith('python main.py')
        assert run['reference']['command'].startswith('python bench/reference_kd.py')
    assert '--val-fraction 0' in results['runs']['a']['ours']['command']
    assert results['machine']['omp_num_threads'] == '1'
    assert results['machine']['cpu'] and results['machine']['torch'] == torch.__version__
    assert '| run | this project (s) | the other way (s) | speed-up |' in proc.stdout
    assert '$TMP/' in results['runs']['a']['ours']['command']  # temporary paths shown as $TMP
    assert not [p for p in scratch.iterdir() if p.name.startswith('cli_bench-')]  # removed
