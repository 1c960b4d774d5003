"""Resume after SIGKILL and SIGTERM, atomic writes, safe loading, and every bad input refused."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import main
from kd.files.checkpoint import CheckpointError, atomic_save, load_weights
from conftest import ROOT, run_cli, snapshot
from kd.models import StudentNet, TeacherNet

EPOCHS = '3'


def student_args(trained_run, out):
    # KD and CRD: a resume must also restore a feature method's embeddings, memories and Z
    return ['--loss', 'kd', 'crd', '--epochs', EPOCHS, '--subset', '100', '--data-dir', trained_run['common'][1], '--out-dir', str(out),
            '--batch-size', '32', '--device', 'cpu', '--no-amp',  # measured precision could differ
            '--teacher-checkpoint', os.path.join(trained_run['out'], 'best_teacher.pth')]


# main.py under a step hook that sends SIGTERM once `state` exists: right after the first
# optimizer step that follows the end of epoch 1, so the stop always falls mid-epoch
TERM_AFTER_EPOCH_1 = r'''
import os, runpy, signal, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
root, state = sys.argv[1], sys.argv[2]
sent = []
def hook(optimizer, args, kwargs):
    if not sent and os.path.exists(state):
        sent.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
register_optimizer_step_post_hook(hook)
sys.path.insert(0, root)
sys.argv = [os.path.join(root, 'main.py'), *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def start_cli(args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'main.py'), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # the thread count of run_cli: float sums then add up in one order
                            env=dict(os.environ, PYTHONUNBUFFERED='1',
                                     OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1')))


def wait_for_epoch(path, epoch, proc, timeout=240):
    """Wait until the saved state at path has finished `epoch` epochs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if os.path.exists(path):
            try:
                if torch.load(path, weights_only=True)['epoch'] >= epoch:
                    return
            except Exception:
                pass  # never torn (atomic), but it may be replaced while we read
        time.sleep(0.1)
    raise AssertionError(f'{path} never reached epoch {epoch}')


def results_of(out):
    with open(os.path.join(out, 'results.json')) as f:
        models = json.load(f)['models']
    return {n: (m['test_acc'], m.get('last_test_acc'), m.get('best_epoch'))
            for n, m in models.items()}


def logs_of(out):
    rows = {}
    for name in ('kd_T4_a0.1', 'crd_b0.8', 'student_base'):
        with open(os.path.join(out, f'log_{name}.csv')) as f:
            # drop timing columns, keep every number that depends on the computation
            rows[name] = [line.split(',')[:8] for line in f.read().splitlines()]
    return rows


@pytest.fixture(scope='module')
def uninterrupted(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp('uninterrupted')
    r = run_cli(*student_args(trained_run, out))
    assert r.returncode == 0, r.stderr
    return out


# the sigterm test below resumes mid-epoch to the same numbers in the default selection; a
# SIGKILL (no handler) and its resume is the slow selection's
@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(trained_run, uninterrupted, tmp_path):
    proc = start_cli(student_args(trained_run, tmp_path))
    wait_for_epoch(tmp_path / 'last_students.pt', 1, proc)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    r = run_cli(*student_args(trained_run, tmp_path), '--resume')
    assert r.returncode == 0, r.stderr
    assert results_of(tmp_path) == results_of(uninterrupted)
    assert logs_of(tmp_path) == logs_of(uninterrupted)
    for name in ('student_kd', 'crd_b0.8', 'student_base'):
        a = torch.load(tmp_path / f'best_{name}.pth', weights_only=True)
        b = torch.load(uninterrupted / f'best_{name}.pth', weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_mid_epoch_refuses_silent_restart_and_resumes(
        trained_run, uninterrupted, tmp_path, capsys):
    state_path = tmp_path / 'last_students.pt'
    proc = subprocess.Popen(
        [sys.executable, '-c', TERM_AFTER_EPOCH_1, ROOT, str(state_path),
         *student_args(trained_run, tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED='1',
                 OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1')))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert 'Traceback' not in err
    assert '--resume' in err and 'Resume with: python' in err
    state = torch.load(state_path, weights_only=True)
    assert not state['finished'] and state['epoch'] == 1

    # an unfinished run is never thrown away silently
    before = snapshot(tmp_path)
    assert main.main(student_args(trained_run, tmp_path)) == 2
    err = capsys.readouterr().err
    assert '--resume' in err and '--restart' in err
    assert snapshot(tmp_path) == before

    # a resume that would change the run is refused, naming the keys
    assert main.main(student_args(trained_run, tmp_path) + ['--resume', '--alpha', '0.5']) == 2
    assert 'alpha' in capsys.readouterr().err
    assert snapshot(tmp_path) == before

    # so is a precision the resumed run would not use (it keeps the saved one)
    assert main.main(student_args(trained_run, tmp_path) + ['--resume', '--amp']) == 2
    err = capsys.readouterr().err
    assert f"cannot resume {tmp_path / 'last_students.pt'} with --amp: that run trained in fp32" \
        in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before

    r = run_cli(*student_args(trained_run, tmp_path), '--resume')
    assert r.returncode == 0, r.stderr
    steps = int(r.stdout.split(' steps per epoch')[0].split()[-1])
    assert (f"resuming seed 0 from epoch {state['epoch'] + 1} of {EPOCHS}, batch "
            f"{state['batch'] + 1} of {steps} (state saved ") in r.stdout
    assert 0 < state['batch'] < steps   # stopped mid-epoch
    assert results_of(tmp_path) == results_of(uninterrupted)
    assert logs_of(tmp_path) == logs_of(uninterrupted)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / 'best_student_kd.pth'
    atomic_save({'w': torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b'half a checkpoint')
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError):
        atomic_save({'w': torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)['w'], torch.ones(3))
    assert os.listdir(tmp_path) == ['best_student_kd.pth']  # no temporary file left behind


WRITER = r'''
import sys, torch
sys.path.insert(0, {root!r})
from kd.files.checkpoint import atomic_save
i = 0
while True:
    i += 1
    atomic_save({{'i': torch.full((200000,), float(i))}}, {path!r})
'''


def test_a_kill_at_any_instant_leaves_a_whole_file(tmp_path):
    path = str(tmp_path / 'state.pt')
    script = WRITER.format(root=ROOT, path=path)
    for delay in (0.7, 0.93, 1.21, 1.58):
        proc = subprocess.Popen([sys.executable, '-c', script])
        time.sleep(delay)
        proc.kill()
        proc.wait()
        if os.path.exists(path):
            value = torch.load(path, weights_only=True)['i']
            assert torch.all(value == value[0])  # one complete write, never a mix


class CreatesAFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def write_malicious(path, target):
    with open(path, 'wb') as f:
        pickle.dump({'conv1.weight': CreatesAFile(target)}, f)


def test_malicious_pickle_as_teacher_is_refused_and_never_runs(tmp_path, capsys):
    target = str(tmp_path / 'pwned')
    evil = tmp_path / 'evil.pth'
    write_malicious(evil, target)
    code = main.main(['--teacher-checkpoint', str(evil), '--out-dir', str(tmp_path / 'out'),
                      '--data-dir', str(tmp_path / 'nodata')])
    err = capsys.readouterr().err
    assert code == 1 and str(evil) in err and 'Traceback' not in err
    assert not os.path.exists(target)


def test_malicious_pickle_as_student_for_evaluate_is_refused(trained_run, tmp_path, capsys):
    out = tmp_path / 'out'
    out.mkdir()
    shutil.copy(os.path.join(trained_run['out'], 'best_teacher.pth'), out)
    target = str(tmp_path / 'pwned')
    write_malicious(out / 'best_student_kd.pth', target)
    code = main.main(['--evaluate', '--out-dir', str(out), '--data-dir', trained_run['common'][1]])
    err = capsys.readouterr().err
    assert code == 1 and 'best_student_kd.pth' in err and 'StudentNet' in err
    assert not os.path.exists(target)


def test_load_weights_names_the_file_and_the_expected_model(tmp_path):
    path = tmp_path / 'student.pth'
    torch.save(StudentNet().state_dict(), path)
    with pytest.raises(CheckpointError, match=r'student\.pth.*TeacherNet'):
        load_weights(TeacherNet(), str(path))
    prefixed = {'module.' + k: v for k, v in StudentNet().state_dict().items()}
    torch.save(prefixed, path)
    load_weights(StudentNet(), str(path))  # wrapper prefixes from other tools are accepted


def bad_input_cases(trained_run, tmp_path):
    data = trained_run['common'][1]
    teacher = os.path.join(trained_run['out'], 'best_teacher.pth')
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(os.urandom(4096))
    student_as_teacher = tmp_path / 'student.pth'
    torch.save(StudentNet().state_dict(), student_as_teacher)
    truncated = tmp_path / 'truncated'
    shutil.copytree(data, truncated)
    batch = truncated / 'cifar-10-batches-py' / 'data_batch_3'
    batch.write_bytes(batch.read_bytes()[:5000])
    a_file = tmp_path / 'a_file'
    a_file.write_text('not a folder')
    fast = ['--epochs', '1', '--batch-size', '32']
    return {
        # the command it suggests keeps the flags that say which data and folder
        'no teacher checkpoint': (fast + ['--data-dir', data], 1,
                                  f'train one first with python main.py --train-teacher '
                                  f'--data-dir {data} --out-dir {tmp_path / "out"}, or give one '
                                  f'with --teacher-checkpoint'),
        'garbage teacher': (fast + ['--data-dir', data, '--teacher-checkpoint', str(garbage)],
                            1, 'garbage.pth'),
        'student state_dict as teacher': (
            fast + ['--data-dir', data, '--teacher-checkpoint', str(student_as_teacher)],
            1, 'TeacherNet'),
        'missing teacher path': (
            fast + ['--data-dir', data, '--teacher-checkpoint', str(tmp_path / 'nope.pth')],
            1, f'no teacher checkpoint at {tmp_path / "nope.pth"}: check the path given to '
               f'--teacher-checkpoint'),
        'no data and no network': (fast + ['--train-teacher', '--data-dir',
                                           str(tmp_path / 'empty')], 1, '--data-dir'),
        'truncated data batch': (fast + ['--teacher-checkpoint', teacher, '--data-dir',
                                         str(truncated), '--subset', '100'], 1, 'data_batch_3'),
        'out-dir is a file': (fast + ['--train-teacher', '--data-dir', data, '--out-dir',
                                      str(a_file)], 2, 'is a file'),
        'out-dir cannot be written': (fast + ['--train-teacher', '--data-dir', data,
                                              '--out-dir', str(a_file / 'sub')], 2,
                                      'cannot be written'),
        'cuda without cuda': (fast + ['--train-teacher', '--data-dir', data, '--device', 'cuda'],
                              2, 'CUDA'),
        # rejected only once the data is known: still exit 2, one line, nothing written
        'val-fraction leaves no image': (fast + ['--train-teacher', '--data-dir', data,
                                                 '--subset', '100', '--val-fraction', '0.001'],
                                         2, '--val-fraction 0.001 leaves 0 of 100'),
        'teacher of another split': (fast + ['--data-dir', data, '--teacher-checkpoint', teacher,
                                             '--subset', '100', '--split-seed', '1'],
                                     2, '--split-seed 0 for the teacher but 1 here'),
        'teacher of another subset': (fast + ['--data-dir', data, '--teacher-checkpoint', teacher],
                                      2, '--subset 100 for the teacher but all here'),
    }


CASES = ['no teacher checkpoint', 'garbage teacher', 'student state_dict as teacher',
         'missing teacher path', 'no data and no network', 'truncated data batch',
         'out-dir is a file', 'out-dir cannot be written', 'cuda without cuda',
         'val-fraction leaves no image', 'teacher of another split', 'teacher of another subset']


@pytest.mark.parametrize('case', CASES)
def test_bad_input_is_refused_cleanly_and_changes_nothing(case, trained_run, tmp_path, capsys):
    if case == 'cuda without cuda' and torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    args, code, needle = bad_input_cases(trained_run, tmp_path)[case]
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'best_student_kd.pth').write_bytes(b'an earlier result')
    if '--out-dir' not in args:
        args = args + ['--out-dir', str(out)]
    before = snapshot(tmp_path)
    assert main.main(args) == code
    err = capsys.readouterr().err
    assert needle in err and err.startswith('error:') and 'Traceback' not in err
    after = snapshot(tmp_path)
    after.pop('empty/.keep', None)
    assert {k: v for k, v in after.items() if not k.startswith('empty')} == before


def test_non_finite_loss_stops_naming_epoch_and_batch_and_keeps_checkpoints(
        trained_run, tmp_path):
    shutil.copy(os.path.join(trained_run['out'], 'best_student_kd.pth'), tmp_path)
    before = snapshot(tmp_path)
    r = run_cli(*student_args(trained_run, tmp_path), '--lr', '1e30')
    assert r.returncode == 1
    assert 'NaN or infinite in epoch 1, batch' in r.stderr and 'Traceback' not in r.stderr
    # nothing of this run was written, and the message says so (an earlier file stays as it was)
    assert 'no checkpoint or training state of this run had been written. Try a lower --lr.' \
        in r.stderr
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# Resume on another number of GPUs

def _fake_cuda(monkeypatch, current_device):
    restored = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: current_device + 1)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: current_device)
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device='cuda': restored.append(
        state))
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', lambda states: pytest.fail(
        'restores every saved GPU'))
    return restored


def test_a_state_listing_more_gpus_than_the_machine_has_resumes(monkeypatch):
    from kd.files.checkpoint import capture_rng_state, restore_rng_state
    state = capture_rng_state()   # taken on this CPU machine: no CUDA state in it
    assert 'cuda' not in state
    # an older state that listed the generators of 8 visible GPUs
    eight = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    restored = _fake_cuda(monkeypatch, current_device=0)
    restore_rng_state(dict(state, cuda=eight))
    assert len(restored) == 1 and torch.equal(restored[0], eight[0])
    # fewer GPUs than the saved one's index: nothing to restore there, and no error
    restored = _fake_cuda(monkeypatch, current_device=9)
    restore_rng_state(dict(state, cuda=eight))
    assert restored == []
    # the current format keeps the current device's generator only
    restored = _fake_cuda(monkeypatch, current_device=2)
    restore_rng_state(dict(state, cuda_device=eight[5]))
    assert len(restored) == 1 and torch.equal(restored[0], eight[5])
    # and a state saved on a GPU resumes on a CPU-only machine
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    restore_rng_state(dict(state, cuda_device=eight[5]))


@pytest.mark.slow
def test_resume_from_a_state_saved_with_eight_gpus_finishes(trained_run, tmp_path):
    """A run killed on an 8-GPU machine (its state lists 8 CUDA generators) resumes here."""
    args = student_args(trained_run, tmp_path)
    at = args.index('--epochs') + 1   # one epoch only, then a longer run resumes it
    first = run_cli(*args[:at], '1', *args[at + 1:])
    assert first.returncode == 0, first.stderr
    path = tmp_path / 'last_students.pt'
    state = torch.load(path, weights_only=True)
    state['rng']['cuda'] = [torch.zeros(16, dtype=torch.uint8)] * 8
    state['finished'] = False
    state['config']['epochs'] = int(EPOCHS)
    torch.save(state, path)
    # without --no-amp: a resumed run keeps the precision it started with, and records it
    resumed = run_cli(*[a for a in args if a != '--no-amp'], '--resume')
    assert resumed.returncode == 0, resumed.stderr
    assert 'Traceback' not in resumed.stderr
    assert f'resuming seed 0 from epoch 2 of {EPOCHS}, batch 1 of ' in resumed.stdout
    with open(tmp_path / 'results.json') as f:
        config = json.load(f)['phases']['students']['config']
    assert config['epochs'] == int(EPOCHS)
    assert config['amp'] is False and set(config['precision'].values()) == {'fp32'}
