"""The whole workflow on CIFAR-100 with the RepDistiller pair resnet32x4 -> resnet8x4, on tiny
CIFAR-100-format files: teacher, students over two seeds, --evaluate, --resume and torchrun;
and the refusals when a checkpoint does not fit the run."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_cli, write_cifar100

pytestmark = pytest.mark.slow  # long end-to-end runs: python -m pytest -m slow

SUBSET = '100'
COMMON = ['--dataset', 'cifar100', '--subset', SUBSET, '--batch-size', '32', '--device', 'cpu']


@pytest.fixture(scope='module')
def c100_run(tmp_path_factory):
    data = write_cifar100(str(tmp_path_factory.mktemp('c100data')))
    out = str(tmp_path_factory.mktemp('c100run'))
    common = COMMON + ['--data-dir', data, '--out-dir', out]
    teacher = run_cli('--train-teacher', '--teacher-arch', 'resnet32x4', '--epochs', '1', *common)
    assert teacher.returncode == 0, teacher.stdout[-2000:] + teacher.stderr[-2000:]
    # no --teacher-arch: the students' phase rebuilds the teacher from its record
    students = run_cli('--student-arch', 'resnet8x4', '--epochs', '1', '--seeds', '0', '1',
                       *common)
    assert students.returncode == 0, students.stdout[-2000:] + students.stderr[-2000:]
    with open(os.path.join(out, 'results.json')) as f:
        results = json.load(f)
    return {'data': data, 'out': out, 'common': common, 'results': results}


def test_teacher_and_students_record_architecture_and_classes(c100_run):
    out, results = c100_run['out'], c100_run['results']
    with open(os.path.join(out, 'best_teacher.json')) as f:
        record = json.load(f)
    assert (record['arch'], record['num_classes'], record['dataset']) == \
        ('resnet32x4', 100, 'cifar100')
    models = results['models']
    assert models['teacher']['arch'] == 'resnet32x4'
    assert models['teacher']['params'] == 7_433_860          # RepDistiller's 7.43M
    for name in ('student_kd', 'student_base'):
        assert models[name]['arch'] == 'resnet8x4' and models[name]['params'] == 1_233_540
        assert models[name]['seeds'] == [0, 1]
    config = results['phases']['students']['config']
    assert config['dataset'] == 'cifar100' and config['num_classes'] == 100
    assert config['teacher_arch'] == 'resnet32x4' and config['student_arch'] == 'resnet8x4'
    state = torch.load(os.path.join(out, 'seed1', 'last_students.pt'), weights_only=True)
    assert state['config']['student_arch'] == 'resnet8x4' and state['config']['num_classes'] == 100
    assert state['models']['student_kd']['fc.weight'].shape == (100, 256)
    assert results['gains']['student_kd']['n'] == 2


def test_evaluate_rebuilds_every_model_from_its_record(c100_run):
    r = run_cli('--evaluate', *c100_run['common'])
    assert r.returncode == 0, r.stderr
    models = c100_run['results']['models']
    teacher_line = next(line for line in r.stdout.splitlines() if line.startswith('Teacher'))
    assert 'resnet32x4' in teacher_line
    assert f"{models['teacher']['test_acc']:.2f}" in teacher_line
    kd_line = next(line for line in r.stdout.splitlines() if line.startswith('Student (KD)'))
    seed0 = models['student_kd']['test_acc_per_seed'][0]   # top-level files are seed 0's
    assert f'{seed0:.2f}' in kd_line


@pytest.mark.parametrize('extra, needle', [
    (['--teacher-arch', 'resnet18'], 'is a resnet32x4'),
    (['--dataset', 'cifar10'], 'trained on cifar100 (100 classes), these students are for cifar10 '
                               '(10 classes)'),
])
def test_a_teacher_that_does_not_fit_is_refused(c100_run, tmp_path, extra, needle):
    args = [a for a in c100_run['common'] if a != c100_run['out']]
    args = args[:args.index('--out-dir')] + args[args.index('--out-dir') + 1:]
    if '--dataset' in extra:
        args = args[:args.index('--dataset')] + args[args.index('--dataset') + 2:]
    r = run_cli('--epochs', '1', *args, *extra, '--out-dir', str(tmp_path / 'o'),
                '--teacher-checkpoint', os.path.join(c100_run['out'], 'best_teacher.pth'))
    assert r.returncode == 2, r.stdout[-1000:] + r.stderr
    assert needle in r.stderr and 'Traceback' not in r.stderr
    assert not os.path.exists(tmp_path / 'o' / 'results.json')


def test_evaluate_refuses_a_student_arch_other_than_its_record(c100_run):
    r = run_cli('--evaluate', '--student-arch', 'wrn_16_2', *c100_run['common'])
    assert r.returncode == 2 and 'is a resnet8x4' in r.stderr and 'wrn_16_2' in r.stderr


def test_resume_continues_a_cifar100_run(c100_run, tmp_path):
    out = str(tmp_path / 'resume')
    args = ['--student-arch', 'resnet8x4', '--no-baseline', *c100_run['common'][:-1], out,
            '--teacher-checkpoint', os.path.join(c100_run['out'], 'best_teacher.pth')]
    first = run_cli('--epochs', '1', *args)
    assert first.returncode == 0, first.stderr
    path = os.path.join(out, 'last_students.pt')
    state = torch.load(path, weights_only=True)   # as if stopped after epoch 1 of 2
    state['finished'], state['config']['epochs'] = False, 2
    torch.save(state, path)
    resumed = run_cli('--epochs', '2', *args, '--resume')
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr
    assert 'students 2/2' in resumed.stdout and 'students 1/2' not in resumed.stdout
    with open(os.path.join(out, 'log_student_kd.csv')) as f:
        assert len(f.read().splitlines()) == 3   # header and both epochs


def test_torchrun_students_on_cifar100(c100_run, tmp_path):
    out = str(tmp_path / 'ddp')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(ROOT, 'main.py'), '--student-arch', 'resnet8x4', '--epochs', '1',
           '--no-baseline', *c100_run['common'][:-1], out,
           '--teacher-checkpoint', os.path.join(c100_run['out'], 'best_teacher.pth')]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(os.path.join(out, 'results.json')) as f:
        results = json.load(f)
    assert results['phases']['students']['config']['world_size'] == 2
    assert results['models']['student_kd']['arch'] == 'resnet8x4'
