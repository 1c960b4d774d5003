"""One run per phase in a folder: the README's quick run, then a grid, then --seeds in one
--out-dir leave the last students' run at the top and the earlier ones under previous/, the
teacher untouched; --evaluate reports the last runs' checkpoints on the test images they used."""
import fcntl
import glob
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios

import pytest

from conftest import ROOT, run_cli, snapshot
from kd.run.outdir import Manifest, owned_files, set_aside, write_manifest

SUBSET = '40'   # of the 100 test images of cifar_dir: --evaluate must take these 40, not 100
GRID = ['--loss', 'kd', 'ls', '--temperature', '2', '4']
GRID_NAMES = {'kd_T2_a0.1', 'kd_T4_a0.1', 'ls_T2_a0.1', 'ls_T4_a0.1', 'student_base'}
TEACHER_FILES = ('best_teacher.pth', 'best_teacher.json', 'best_teacher_test_logits.pt',
                 'log_teacher.csv', 'last_teacher.pt', 'run_teacher.json')
SET_ASIDE = 'The previous students run is set aside in '


def _json(path):
    with open(path) as f:
        return json.load(f)


def _top(files):
    return {k: v for k, v in files.items() if not k.startswith('previous' + os.sep)}


@pytest.fixture(scope='module')
def sequence(cifar_dir, tmp_path_factory):
    """Teacher, then the quick run, a grid and --seeds 0 1 in one folder; a snapshot after
    each."""
    out = str(tmp_path_factory.mktemp('one_folder'))
    common = ['--data-dir', cifar_dir, '--out-dir', out, '--subset', SUBSET, '--epochs', '1',
              '--batch-size', '32', '--device', 'cpu', '--no-amp']
    steps = {}
    for step, flags in (('teacher', ['--train-teacher']), ('quick', []), ('grid', GRID),
                        ('seeds', ['--seeds', '0', '1'])):
        r = run_cli(*flags, *common)
        assert r.returncode == 0, (step, r.stdout[-2000:] + r.stderr[-3000:])
        steps[step] = {'run': r, 'files': snapshot(out)}
    return {'out': out, 'steps': steps, 'common': common, 'data': cifar_dir}


def _archive(out, earlier, later):
    """The previous/ folder that appeared between two snapshots."""
    new = {p.split(os.sep)[1] for p in later if p.startswith('previous' + os.sep)} - \
        {p.split(os.sep)[1] for p in earlier if p.startswith('previous' + os.sep)}
    assert len(new) == 1, new
    return new.pop()


def test_each_fresh_students_run_sets_the_earlier_one_aside_byte_for_byte(sequence):
    out, steps = sequence['out'], sequence['steps']
    assert SET_ASIDE not in steps['quick']['run'].stdout   # nothing earlier to set aside
    for earlier, later in (('quick', 'grid'), ('grid', 'seeds')):
        before, after = steps[earlier]['files'], steps[later]['files']
        name = _archive(out, before, after)
        assert re.match(r'students-\d{8}-\d{6}(-\d+)?$', name)
        said = [line for line in steps[later]['run'].stdout.splitlines() if SET_ASIDE in line]
        assert len(said) == 1 and os.path.join('previous', name) in said[0], said
        archived = {p[len(os.path.join('previous', name)) + 1:]: v for p, v in after.items()
                    if p.startswith(os.path.join('previous', name) + os.sep)}
        # every file of the earlier students run, unchanged; the results files as they were
        students_files = {p for p in _top(before) if not p.startswith(TEACHER_FILES)}
        assert set(archived) == students_files
        assert all(archived[p] == before[p] for p in archived)
    grid_archive = _archive(out, steps['quick']['files'], steps['grid']['files'])
    kept = os.path.join(out, 'previous', grid_archive)
    assert {'log_student_kd.csv', 'best_student_kd.pth', 'best_student_kd.json'} <= \
        set(os.listdir(kept))
    seeds_archive = os.path.join(out, 'previous', _archive(out, steps['grid']['files'],
                                                           steps['seeds']['files']))
    assert os.path.exists(os.path.join(seeds_archive, 'grid.png'))
    assert _json(os.path.join(seeds_archive, 'run_students.json'))['models'].keys() == \
        GRID_NAMES | {'student_kd'}


def test_the_folder_describes_the_last_students_run_alone(sequence):
    out, files = sequence['out'], _top(sequence['steps']['seeds']['files'])
    students = {p for p in files if not p.startswith(TEACHER_FILES)}
    # --seeds: the per-seed folders, seed 0's checkpoints on top, no top-level CSV or grid
    assert {p for p in students if os.sep not in p} == {
        'best_student_kd.pth', 'best_student_kd.json', 'best_student_base.pth',
        'best_student_base.json', 'run_students.json', 'results.json', 'results.md',
        'curves.png'}
    for seed in (0, 1):
        for name in ('student_kd', 'student_base'):
            record = _json(os.path.join(out, f'seed{seed}', f'best_{name}.json'))
            assert record['model'] == name and record['seed'] == seed
            rows = files[os.path.join(f'seed{seed}', f'log_{name}.csv')].decode().splitlines()
            assert rows[0].split(',')[:5] == ['epoch', 'lr', 'train_loss', 'train_ce',
                                              'train_kd'] and len(rows) == 2   # one epoch
    assert files['best_student_kd.pth'] == files[os.path.join('seed0', 'best_student_kd.pth')]
    results = _json(os.path.join(out, 'results.json'))
    assert set(results['models']) == {'teacher', 'student_kd', 'student_base'}
    assert results['phases']['students']['seeds'] == [0, 1]
    assert [s['name'] for s in results['phases']['students']['config']['students']] == \
        ['student_kd', 'student_base']
    assert 'kd_T2' not in files['results.md'].decode()
    manifest = _json(os.path.join(out, 'run_students.json'))
    assert manifest['finished'] and set(manifest['models']) == {'student_kd', 'student_base'}
    assert manifest['folders'] == ['seed0', 'seed1']
    assert all(os.path.exists(os.path.join(out, f)) for f in manifest['files'])


def test_the_teacher_files_are_never_moved(sequence):
    steps = sequence['steps']
    teacher = {p: v for p, v in steps['teacher']['files'].items() if p.startswith(TEACHER_FILES)}
    assert len(teacher) == len(TEACHER_FILES)
    for step in ('quick', 'grid', 'seeds'):
        assert {p: steps[step]['files'][p] for p in teacher} == teacher, step
    assert not [p for p in steps['seeds']['files'] if 'previous' in p and 'teacher' in p]


def test_evaluate_reports_the_last_runs_on_their_test_images(sequence):
    out = sequence['out']
    results = _json(os.path.join(out, 'results.json'))
    # stderr on a terminal of 100 columns: the progress bars show there
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'main.py'), '--evaluate', '--out-dir', out,
         '--data-dir', sequence['data'], '--device', 'cpu', '--no-amp'],
        stdout=subprocess.PIPE, stderr=slave, text=True,
        env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1'))
    os.close(slave)
    err = b''
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:   # the terminal closed: the process is done
            break
        if not chunk:
            break
        err += chunk
    stdout = proc.communicate(timeout=300)[0]
    os.close(master)
    assert proc.returncode == 0, stdout + err.decode(errors='replace')
    assert b'evaluate student_kd' in err and b'evaluate student_base' in err
    assert f'Test set: {SUBSET} images, the first {SUBSET} of the 100 test images, as in the ' \
           f'runs that trained these checkpoints' in stdout
    rows = {line.split('  ')[0]: line for line in stdout.splitlines()
            if re.match(r'(Teacher|Student) \(', line)}
    assert set(rows) == {'Teacher (ResNet-18)', 'Student (KD)', 'Student (baseline)'}
    assert f"{results['models']['teacher']['test_acc']:.2f}" in rows['Teacher (ResNet-18)']
    for name, label in (('student_kd', 'Student (KD)'), ('student_base', 'Student (baseline)')):
        seed0 = results['models'][name]['test_acc_per_seed'][0]   # the top-level files
        assert f'{seed0:.2f}' in rows[label], (rows[label], seed0)
    assert 'note:' not in stdout

    other = run_cli('--evaluate', '--subset', '60', *sequence['common'][2:4], '--data-dir',
                    sequence['data'], '--device', 'cpu', '--no-amp')
    assert other.returncode == 0, other.stderr
    assert f"note: --subset 60: these accuracies are on other test images than results.md's " \
           f"(the runs that trained these checkpoints used the first {SUBSET} of the 100 test " \
           f"images)" in other.stdout
    assert 'Test set: 60 images, the first 60 of the 100 test images (--subset)' in other.stdout


def test_evaluate_in_a_folder_of_an_older_version_takes_the_last_run_from_results(
        sequence, tmp_path):
    """No manifests, and the grid's files still beside the last run's, as older versions left
    them: results.json's record of the last students' run names its models."""
    out = tmp_path / 'old'
    shutil.copytree(sequence['out'], out, ignore=shutil.ignore_patterns('previous'))
    grid = glob.glob(os.path.join(sequence['out'], 'previous', 'students-*', 'best_kd_T2_a0.1.*'))
    for path in grid:
        shutil.copy(path, out)
    for phase in ('teacher', 'students'):
        os.unlink(out / f'run_{phase}.json')
    r = run_cli('--evaluate', '--out-dir', str(out), '--data-dir', sequence['data'],
                '--device', 'cpu', '--no-amp')
    assert r.returncode == 0, r.stderr
    assert 'kd_T2_a0.1' not in r.stdout and 'Student (KD)' in r.stdout
    assert f'Test set: {SUBSET} images' in r.stdout


# ---------------------------------------------------------------------------------------------
# Setting aside, without training

def _write(path, text='x'):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)


def _results(phases):
    models = {'teacher': {'test_acc': 50.0, 'params': 1, 'seeds': [0]}} \
        if 'teacher' in phases else {}
    if 'students' in phases:
        models.update({n: {'test_acc': 20.0, 'params': 1, 'seeds': [0], 'best_val_acc': 10.0}
                       for n in ('student_kd', 'student_base')})
    return {'models': models, 'phases': {p: {'seeds': [0], 'config': {'phase': p},
                                             'folders': []} for p in phases},
            'config': {'phase': phases[-1]}, 'seeds': [0]}


def test_a_folder_of_an_older_version_is_set_aside_by_file_name(tmp_path):
    """No manifest: the phase's files are known by their names, in OUT_DIR and seed<N>/."""
    out = str(tmp_path)
    students = ['best_student_kd.pth', 'best_student_kd.json', 'best_kd_T2_a0.1.pth',
                'log_student_kd.csv', 'log_kd_T2_a0.1.csv', 'grid.png', 'last_students.pt',
                os.path.join('seed0', 'best_student_base.pth'),
                os.path.join('seed0', 'log_student_base.csv')]
    teacher = ['best_teacher.pth', 'best_teacher.json', 'best_teacher_test_logits.pt',
               'log_teacher.csv', 'last_teacher.pt', os.path.join('seed0', 'best_teacher.pth'),
               'notes.txt']
    for rel in students + teacher:
        _write(os.path.join(out, rel), rel)
    with open(os.path.join(out, 'results.json'), 'w') as f:
        json.dump(_results(['teacher', 'students']), f)
    assert owned_files(out, 'students') == sorted(students)
    said = []
    archive = set_aside(out, 'students', log=said.append)
    assert len(said) == 1 and archive in said[0]
    for rel in students:
        assert not os.path.exists(os.path.join(out, rel))
        with open(os.path.join(archive, rel)) as f:
            assert f.read() == rel
    assert all(os.path.exists(os.path.join(out, rel)) for rel in teacher)
    # results.json keeps the teacher here; the archive has the whole earlier file
    assert set(_json(os.path.join(out, 'results.json'))['models']) == {'teacher'}
    assert set(_json(os.path.join(archive, 'results.json'))['models']) == \
        {'teacher', 'student_kd', 'student_base'}
    assert 'Student (KD)' not in open(os.path.join(out, 'results.md')).read()
    assert set_aside(out, 'students', log=said.append) is None   # nothing left to move


def test_a_new_teacher_run_moves_the_teacher_files_only(tmp_path):
    out = str(tmp_path)
    for rel in ('best_teacher.pth', 'best_teacher.json', 'best_student_kd.pth',
                'log_student_kd.csv', 'other.pth'):
        _write(os.path.join(out, rel))
    with open(os.path.join(out, 'results.json'), 'w') as f:
        json.dump(_results(['teacher', 'students']), f)
    write_manifest(out, Manifest('teacher', {'teacher': {'arch': 'resnet18'}}, ['.'],
                                 ['best_teacher.pth', 'best_teacher.json', 'other.pth'],
                                 subset=None, dataset='cifar10', seeds=[0]), finished=True)
    archive = set_aside(out, 'teacher', log=lambda *_: None)
    assert sorted(os.listdir(archive)) == ['best_teacher.json', 'best_teacher.pth', 'other.pth',
                                           'results.json', 'run_teacher.json']
    assert sorted(os.listdir(out)) == ['best_student_kd.pth', 'log_student_kd.csv', 'previous',
                                       'results.json', 'results.md']
    assert set(_json(os.path.join(out, 'results.json'))['models']) == \
        {'student_kd', 'student_base'}


def test_the_students_teacher_checkpoint_is_never_moved(tmp_path):
    """A student distilled from an earlier student: its teacher stays where it is."""
    out = str(tmp_path)
    for rel in ('best_student_kd.pth', 'best_student_kd.json', 'best_student_base.pth'):
        _write(os.path.join(out, rel))
    keep = [os.path.join(out, 'best_student_kd.pth'), os.path.join(out, 'best_student_kd.json')]
    archive = set_aside(out, 'students', keep=keep, log=lambda *_: None)
    assert os.listdir(archive) == ['best_student_base.pth']
    assert all(os.path.exists(p) for p in keep)
