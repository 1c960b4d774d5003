"""--seeds end to end on the tiny data: per-seed folders, CSV logs, aggregated results, curves.

One teacher run and one students run (two seeds each) are shared by the assertions; the runs
without matplotlib / tensorboard are single small students runs reusing that teacher.
"""
import csv
import json
import os

import pytest

from conftest import run_cli

CSV_FIELDS = ['epoch', 'lr', 'train_loss', 'train_ce', 'train_kd', 'train_acc', 'val_acc',
              'test_acc', 'seconds', 'images_per_s']
MODELS = ('teacher', 'student_kd', 'student_base')
SUBSET = '20'   # 18 training (one step), 2 validation, 20 test images per seed
# One thread per run: with 2 cores shared by other test runs, torch's default thread pool
# spins against the other processes and the same run takes 5-10x longer.
ENV = {'OMP_NUM_THREADS': '1'}


@pytest.fixture(scope='module')
def seeds_run(cifar_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('seeds'))
    common = ['--data-dir', cifar_dir, '--out-dir', out, '--batch-size', '32', '--device', 'cpu',
              '--subset', SUBSET, '--seeds', '0', '1']
    teacher = run_cli('--train-teacher', '--epochs', '1', *common, env=ENV)
    assert teacher.returncode == 0, teacher.stdout[-2000:] + teacher.stderr[-3000:]
    students = run_cli('--epochs', '2', *common, env=ENV)
    assert students.returncode == 0, students.stdout[-2000:] + students.stderr[-3000:]
    with open(os.path.join(out, 'results.json')) as f:
        results = json.load(f)
    return {'out': out, 'teacher': teacher, 'students': students, 'results': results}


def _read(path, mode='r'):
    with open(path, mode) as f:
        return f.read()


def _shadow_package(folder, name):
    """A package `name` whose import fails, to put first on PYTHONPATH."""
    pkg = os.path.join(folder, name)
    os.makedirs(pkg, exist_ok=True)
    with open(os.path.join(pkg, '__init__.py'), 'w') as f:
        f.write(f'raise ImportError("No module named {name!r} (simulated by the test)")\n')
    return str(folder)


def _pythonpath(*first):
    rest = os.environ.get('PYTHONPATH')
    return os.pathsep.join(list(first) + ([rest] if rest else []))


# ---------------------------------------------------------------------------------------------
# Per-seed folders

def test_seed_folders_hold_checkpoints_and_logs(seeds_run):
    for seed in (0, 1):
        folder = os.path.join(seeds_run['out'], f'seed{seed}')
        for name in MODELS:
            assert os.path.getsize(os.path.join(folder, f'best_{name}.pth')) > 0
            assert os.path.exists(os.path.join(folder, f'log_{name}.csv'))


@pytest.mark.parametrize('name, epochs', [('teacher', 1), ('student_kd', 2), ('student_base', 2)])
def test_csv_one_row_per_epoch(seeds_run, name, epochs):
    for seed in (0, 1):
        with open(os.path.join(seeds_run['out'], f'seed{seed}', f'log_{name}.csv'),
                  newline='') as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        # the columns of a phase: the parts of its losses (the teacher's CE has no KD part)
        fields = [k for k in CSV_FIELDS if name != 'teacher' or k != 'train_kd']
        assert reader.fieldnames == fields
        assert [int(r['epoch']) for r in rows] == list(range(1, epochs + 1))
        for r in rows:
            for key in fields:
                if key == 'train_kd':
                    continue
                assert r[key] != '', (name, key)
                float(r[key])
            assert 0 <= float(r['test_acc']) <= 100 and float(r['images_per_s']) > 0
            if name == 'student_kd':
                assert r['train_kd'] != '' and float(r['train_kd']) >= 0
            else:
                assert r.get('train_kd', '') == ''
            if name != 'student_kd':  # plain cross-entropy: the loss is the CE
                assert float(r['train_ce']) == pytest.approx(float(r['train_loss']))


def test_top_level_checkpoints_are_the_first_seeds(seeds_run):
    out = seeds_run['out']
    for name in MODELS:
        top = _read(os.path.join(out, f'best_{name}.pth'), 'rb')
        assert top == _read(os.path.join(out, 'seed0', f'best_{name}.pth'), 'rb'), name
    # the seeds really are different runs
    assert _read(os.path.join(out, 'seed0', 'best_student_kd.pth'), 'rb') != \
        _read(os.path.join(out, 'seed1', 'best_student_kd.pth'), 'rb')


# ---------------------------------------------------------------------------------------------
# results.json / results.md

def test_results_json_aggregates_seeds(seeds_run):
    results = seeds_run['results']
    assert results['seeds'] == [0, 1]
    assert set(results['models']) == set(MODELS)
    # both seeds' students distilled from the top-level best_teacher.pth, seed 0's teacher:
    # the teacher row is that one, measured on the students' test images
    teacher = results['models']['teacher']
    assert teacher['seeds'] == [0] and teacher['test_acc'] == results['teacher_in_use']['test_acc']
    with open(os.path.join(seeds_run['out'], 'seed0', 'results.json')) as f:
        assert json.load(f)['models']['teacher']['test_acc'] == teacher['test_acc']
    for name in MODELS[1:]:
        entry = results['models'][name]
        assert entry['seeds'] == [0, 1]
        for key in ('test_acc', 'last_test_acc', 'ece'):
            assert isinstance(entry[key + '_std'], float), (name, key)
            assert len(entry[key + '_per_seed']) == 2
    for name in ('student_kd', 'student_base'):
        entry = results['models'][name]
        assert 0 <= entry['agreement'] <= 100 and entry['kl_to_teacher'] >= 0
        assert len(entry['agreement_per_seed']) == 2


def test_results_json_kd_gain(seeds_run):
    results = seeds_run['results']
    gain = results['kd_gain']
    assert gain['n'] == 2 and gain['seeds'] == [0, 1]
    kd = results['models']['student_kd']['test_acc_per_seed']
    base = results['models']['student_base']['test_acc_per_seed']
    assert gain['per_seed'] == pytest.approx([k - b for k, b in zip(kd, base)])
    lo, hi = gain['ci95']
    assert lo <= gain['mean'] <= hi
    # n = 2: t(0.975, 1) = 12.706 and sd = |d0 - d1| / sqrt(2)
    d0, d1 = gain['per_seed']
    assert hi - gain['mean'] == pytest.approx(12.706 * abs(d0 - d1) / 2, abs=1e-6)


def test_results_json_run_record(seeds_run):
    out = seeds_run['out']
    for path in (os.path.join(out, 'results.json'), os.path.join(out, 'seed0', 'results.json'),
                 os.path.join(out, 'seed1', 'results.json')):
        with open(path) as f:
            results = json.load(f)
        assert results['config']['lr'] == pytest.approx(0.025)   # resolved: 0.1 * 32 / 128
        assert results['config']['epochs'] == 2 and results['config']['subset'] == int(SUBSET)
        assert {'commit', 'dirty'} <= set(results['git'])
        assert results['versions']['torch'] and results['versions']['python']
        run = results['run']
        assert run['device'].startswith('cpu')
        assert run['data_dir'] and os.path.isdir(run['data_dir'])
        assert run['subset'] == int(SUBSET)
        assert set(run['wall_seconds']) == {'teacher', 'students'}
        assert all(v >= 0 for v in run['wall_seconds'].values())
        assert set(results['phases']) == {'teacher', 'students'}
    with open(os.path.join(out, 'seed1', 'results.json')) as f:
        assert json.load(f)['run']['seeds'] == [1]
    assert seeds_run['results']['run']['seeds'] == [0, 1]


def test_results_md(seeds_run):
    text = _read(os.path.join(seeds_run['out'], 'results.md'))
    assert '±' in text and 'CI' in text and f'--subset {SUBSET}' in text
    for label in ('Teacher (ResNet-18)', 'Student (KD)', 'Student (baseline)'):
        assert label in text
    assert 'KD − baseline (paired' in seeds_run['students'].stdout


def test_curves_png(seeds_run):
    path = os.path.join(seeds_run['out'], 'curves.png')
    assert _read(path, 'rb')[:8] == b'\x89PNG\r\n\x1a\n'
    import matplotlib.image
    image = matplotlib.image.imread(path)
    assert 300 <= image.shape[0] <= 2000 and 600 <= image.shape[1] <= 4000
    assert image.std() > 0   # not a blank canvas


# ---------------------------------------------------------------------------------------------
# Optional packages

def _small_students_run(seeds_run, cifar_dir, out, *extra, env=None):
    return run_cli('--epochs', '1', '--no-baseline', '--subset', SUBSET, '--batch-size', '32',
                   '--device', 'cpu', '--data-dir', cifar_dir, '--out-dir', out,
                   '--teacher-checkpoint', os.path.join(seeds_run['out'], 'best_teacher.pth'),
                   *extra, env=dict(ENV, **(env or {})))


def test_without_matplotlib_or_tensorboard_the_run_succeeds_and_says_so_once(
        seeds_run, cifar_dir, tmp_path):
    # matplotlib is installed here and tensorboard is not: failing shadow packages hide both
    shadow = str(tmp_path / 'shadow')
    _shadow_package(shadow, 'matplotlib')
    _shadow_package(shadow, 'tensorboard')
    out = str(tmp_path / 'out')
    result = _small_students_run(seeds_run, cifar_dir, out, '--seeds', '0', '1', '--tensorboard',
                                 env={'PYTHONPATH': _pythonpath(shadow)})
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    assert text.count('matplotlib is not installed') == 1, text[-3000:]
    assert 'curves.png' in text
    for dirpath, _, names in os.walk(out):
        assert 'curves.png' not in names, dirpath
    assert os.path.exists(os.path.join(out, 'results.json'))
    assert os.path.exists(os.path.join(out, 'results.md'))
    said = [line for line in text.splitlines()
            if 'tensorboard' in line.lower() and 'not installed' in line.lower()]
    assert len(said) == 1, text[-3000:]
    assert 'pip install tensorboard' in said[0]
    assert not os.path.exists(os.path.join(out, 'tensorboard'))
    assert os.path.exists(os.path.join(out, 'best_student_kd.pth'))


def test_every_seed_holds_out_the_teachers_validation_images(seeds_run):
    out = seeds_run['out']
    teacher = json.loads(_read(os.path.join(out, 'best_teacher.json')))
    assert teacher['split_seed'] == 0 and teacher['subset'] == int(SUBSET)
    fingerprints = {teacher['val_images_sha256']}
    for seed in (0, 1):
        for name in MODELS:
            record = json.loads(_read(os.path.join(out, f'seed{seed}', f'best_{name}.json')))
            assert record['seed'] == seed and record['split_seed'] == 0
            fingerprints.add(record['val_images_sha256'])
    assert len(fingerprints) == 1   # one split for the teacher and every seed of the students
    results = seeds_run['results']
    assert results['phases']['students']['config']['val_images_sha256'] in fingerprints
    assert results['phases']['teacher']['config']['val_images_sha256'] in fingerprints
