"""Files written by an older version of this program (commit 58b5138, before the modules moved
into a package) still load, evaluate to the numbers they were recorded with, and resume.

tests/fixtures/old_run/ holds, as that version wrote them (tests/fixtures/make_old_run.md says
how), on the data of conftest.write_cifar's defaults:
  run/          a finished teacher run (resnet8, 3 epochs) and a finished students run (resnet8,
                kd T=4 alpha=0.1 and the baseline, 3 epochs): checkpoints, records, results,
                manifests, the teacher's test logits, both finished last_*.pt
  interrupted/  the same KD student (--no-baseline), stopped by SIGTERM one step into epoch 2
                (last_students.pt at epoch 1, batch 1 of 11; no records or results yet)
The fixture is copied to tmp_path before use: nothing writes into tests/fixtures.
Only public surfaces are used: main.main, models.build_model, torch.load(weights_only=True).
"""
import csv
import hashlib
import json
import os
import shutil

import pytest
import torch

import main
from models import build_model

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'old_run')

# sha256 of the files conftest.write_cifar(folder) wrote when the fixture was made: the runs
# recorded their images' digests, so other bytes would make every check below refuse or differ
CIFAR_SHA256 = {
    'batches.meta': '0a7ef2e3e57966c6f19ba46eb956e41ca407940292e21a5026db8643bc6faa9d',
    'data_batch_1': '7facdc3bcfd4882a8be2dbc4b56ec366757a3ab9ef25dfebdd6d156cce1afe3c',
    'data_batch_2': 'a940012f496d7eb8beac41d45e5ff0cee8cd2a709d88dfc8046614ed97e9c01b',
    'data_batch_3': 'c7cde6f1bac88ddd1333fdcecf6d7995d4645c12e3009886e8263615c984809e',
    'data_batch_4': 'db08d333dd3d83358d7a15b56171acef87564f643ce86368d9f125a158580547',
    'data_batch_5': '4843f438d6a7f3a7acdea9ab2acb23834e85cc62220e55acacdecd80a04b39c4',
    'test_batch': 'c8c074281c03fc2b80b249f2906da0bff1cd2442641fb3339128b1d68ac58b37',
}

# what the old version printed and recorded (run/results.json), on 1 CPU thread:
# test accuracy of the selected weights, of the last epoch, and the selected epoch
OLD_NUMBERS = {
    'teacher': {'test_acc': 71.0, 'last_test_acc': 83.0},
    'student_kd': {'test_acc': 48.0, 'last_test_acc': 54.0, 'best_epoch': [2]},
    'student_base': {'test_acc': 71.0, 'last_test_acc': 83.0, 'best_epoch': [1]},
}
TABLE_LABELS = {'teacher': 'Teacher (resnet8)', 'student_kd': 'Student (KD)',
                'student_base': 'Student (baseline)'}
COMMON = ['--batch-size', '16', '--epochs', '3', '--device', 'cpu', '--no-amp']
STUDENTS = ['--student-arch', 'resnet8', '--temperature', '4', '--alpha', '0.1']


@pytest.fixture(autouse=True)
def one_thread():
    """The fixture was written on one thread; training sums then add up in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def old(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / 'old_run')
    return tmp_path / 'old_run'


def results(folder):
    with open(os.path.join(folder, 'results.json')) as f:
        return json.load(f)['models']


def weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_close_states(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), k


def table_test_acc(out, name):
    """The test accuracy of `name` in the table main prints (label, val, test, params)."""
    rows = [line for line in out.splitlines() if line.startswith(TABLE_LABELS[name] + ' ')]
    assert rows, f'no row for {TABLE_LABELS[name]!r} in:\n{out}'
    return float(rows[-1].split()[-2])


def log_rows(path):
    """The epoch rows of a log_<model>.csv, the columns that depend on the computation only."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    keep = ('epoch', 'lr', 'train_loss', 'train_ce', 'train_kd', 'train_acc', 'val_acc',
            'test_acc')
    return [{k: float(r[k]) for k in keep} for r in rows]


def test_the_data_is_the_data_the_old_runs_used(cifar_dir):
    folder = os.path.join(cifar_dir, 'cifar-10-batches-py')
    for name, digest in CIFAR_SHA256.items():
        with open(os.path.join(folder, name), 'rb') as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, name


def test_the_fixture_records_the_old_numbers():
    recorded = results(os.path.join(FIXTURE, 'run'))
    for name, expected in OLD_NUMBERS.items():
        assert {k: recorded[name][k] for k in expected} == expected, name


def test_every_old_checkpoint_and_state_loads_strictly():
    checked = 0
    for sub in ('run', 'interrupted'):
        folder = os.path.join(FIXTURE, sub)
        for f in sorted(os.listdir(folder)):
            if not (f.startswith('best_') and f.endswith('.pth')):
                continue
            state = weights(os.path.join(folder, f))
            build_model('resnet8', 10).load_state_dict(state, strict=True)
            record = os.path.join(folder, f[:-len('.pth')] + '.json')
            if os.path.exists(record):  # an interrupted run has written no records yet
                with open(record) as r:
                    info = json.load(r)
                assert (info['arch'], info['num_classes']) == ('resnet8', 10)
                with open(os.path.join(folder, f), 'rb') as w:
                    assert hashlib.sha256(w.read()).hexdigest() == info['sha256'], f
            checked += 1
    assert checked == 4  # run: teacher, student_kd, student_base; interrupted: student_kd
    # the training states load with weights_only too, their models strictly
    for path, names in (('run/last_teacher.pt', ['teacher']),
                        ('run/last_students.pt', ['student_kd', 'student_base']),
                        ('interrupted/last_students.pt', ['student_kd'])):
        state = weights(os.path.join(FIXTURE, path))
        for name in names:
            build_model('resnet8', 10).load_state_dict(state['models'][name], strict=True)


def test_evaluate_reports_the_recorded_test_accuracies(old, cifar_dir, capsys):
    recorded = results(old / 'run')
    assert main.main(['--evaluate', '--out-dir', str(old / 'run'), '--data-dir', cifar_dir,
                      '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    for name in ('teacher', 'student_kd', 'student_base'):
        assert table_test_acc(out, name) == recorded[name]['test_acc'] \
            == OLD_NUMBERS[name]['test_acc'], name
    # the unfinished run's best so far: epoch 1's weights, whose test accuracy its log holds
    assert main.main(['--evaluate', '--student-arch', 'resnet8', '--out-dir',
                      str(old / 'interrupted'), '--data-dir', cifar_dir, '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    first = log_rows(old / 'interrupted' / 'log_student_kd.csv')
    assert len(first) == 1 and table_test_acc(out, 'student_kd') == first[0]['test_acc'] == 44.0


def test_resume_finishes_the_interrupted_old_run_as_the_uninterrupted_one(old, cifar_dir, capsys):
    folder = old / 'interrupted'
    assert weights(folder / 'last_students.pt')['finished'] is False
    code = main.main([*STUDENTS, '--no-baseline', '--teacher-checkpoint',
                      str(old / 'run' / 'best_teacher.pth'), '--data-dir', cifar_dir, *COMMON,
                      '--out-dir', str(folder), '--resume'])
    out = capsys.readouterr().out
    assert code == 0, out
    assert 'from epoch 2 of 3, batch 2 of 11' in out
    state = weights(folder / 'last_students.pt')
    assert state['finished'] is True and state['epoch'] == 3

    # the same KD student as the old uninterrupted run's (run/: kd and baseline in lockstep,
    # which trains the KD student bit-identically to a run without the baseline)
    uninterrupted = old / 'run'
    got, want = results(folder)['student_kd'], results(uninterrupted)['student_kd']
    for key in ('test_acc', 'last_test_acc', 'best_epoch', 'best_val_acc'):
        assert got[key] == want[key], key
    assert {k: got[k] for k in OLD_NUMBERS['student_kd']} == OLD_NUMBERS['student_kd']
    resumed_log = log_rows(folder / 'log_student_kd.csv')
    old_log = log_rows(uninterrupted / 'log_student_kd.csv')
    assert [r['epoch'] for r in resumed_log] == [1, 2, 3]
    for a, b in zip(resumed_log, old_log):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    assert_close_states(weights(folder / 'best_student_kd.pth'),
                        weights(uninterrupted / 'best_student_kd.pth'))
    assert_close_states(state['models']['student_kd'],
                        weights(uninterrupted / 'last_students.pt')['models']['student_kd'])


def test_resume_of_the_finished_old_runs_trains_nothing_and_keeps_the_checkpoints(
        old, cifar_dir, capsys):
    folder = old / 'run'
    before = {f: (folder / f).read_bytes() for f in os.listdir(folder) if f.endswith('.pth')}
    for phase in (['--train-teacher', '--teacher-arch', 'resnet8'], STUDENTS):
        code = main.main([*phase, '--data-dir', cifar_dir, *COMMON, '--out-dir', str(folder),
                          '--resume'])
        out = capsys.readouterr().out
        assert code == 0, out
        assert 'finished all 3 epochs already' in out and 'nothing to train' in out
    assert {f: (folder / f).read_bytes() for f in before} == before
    now = results(folder)
    for name, expected in OLD_NUMBERS.items():
        assert now[name]['test_acc'] == expected['test_acc'], name
