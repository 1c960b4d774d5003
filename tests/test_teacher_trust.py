"""The teacher the students use is the one they report: unfinished or replaced teachers are
refused, checkpoints of the field's reference code load, and every refusal says why in full."""
import argparse
import json
import os
import pickle
import shutil
import signal
import zipfile

import pytest
import torch

import main
from kd.files.checkpoint import CheckpointError, file_sha256, load_file, load_weights
from conftest import run_cli, snapshot
from kd.models import StudentNet, TeacherNet
from kd.run.teacher import TeacherMismatch, check_data, refuse_other_split
from test_reliability import start_cli, wait_for_epoch
from kd.engine.evaluate import accuracy, predict
from kd.data.loader import get_cifar10_loaders

FAST = ['--epochs', '1', '--subset', '100', '--batch-size', '32', '--device', 'cpu', '--no-amp']


def copy_teacher(trained_run, folder):
    """best_teacher.pth, its record and its stored logits, copied into folder."""
    os.makedirs(folder, exist_ok=True)
    for name in ('best_teacher.pth', 'best_teacher.json', 'best_teacher_test_logits.pt'):
        shutil.copy(os.path.join(trained_run['out'], name), folder)
    return os.path.join(folder, 'best_teacher.pth')


@pytest.mark.slow  # a ResNet-18 epoch, stopped, then refused runs: 21 s on 2 cores
def test_students_refuse_the_teacher_of_an_interrupted_restart(trained_run, tmp_path, capsys):
    """The issue's sequence: a finished teacher, then --train-teacher --restart stopped by
    Ctrl-C after its first epoch, which has overwritten best_teacher.pth."""
    data = trained_run['common'][1]
    folder = tmp_path / 'teacher'
    copy_teacher(trained_run, folder)
    proc = start_cli(['--train-teacher', '--restart', '--epochs', '30', '--data-dir', data,
                      '--out-dir', str(folder), *FAST[2:]])
    wait_for_epoch(folder / 'last_teacher.pt', 1, proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130

    before = snapshot(tmp_path)
    # in the teacher's own folder, and from elsewhere with --teacher-checkpoint
    for extra in (['--out-dir', str(folder)],
                  ['--out-dir', str(tmp_path / 'students'),
                   '--teacher-checkpoint', str(folder / 'best_teacher.pth')]):
        assert main.main(FAST + ['--data-dir', data] + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith('error:') and err.count('\n') == 1 and 'Traceback' not in err
        assert 'unfinished teacher run' in err and 'last_teacher.pt: epoch 1 of 30' in err
        assert '--resume' in err and '--teacher-checkpoint' in err
    assert snapshot(tmp_path) == before

    # --evaluate reports these weights as they are, and says where they come from
    assert main.main(['--evaluate', '--out-dir', str(folder), '--data-dir', data,
                      *FAST[2:]]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith('note:') and 'unfinished' in line for line in out.splitlines())


def other_teacher_weights():
    torch.manual_seed(123)
    return TeacherNet().state_dict()


@pytest.mark.parametrize('how', ['checkpoint replaced by hand', 'record copied from elsewhere'])
def test_students_refuse_a_teacher_its_record_does_not_describe(how, trained_run, tmp_path,
                                                               capsys):
    folder = tmp_path / 'teacher'
    if how == 'checkpoint replaced by hand':
        path = copy_teacher(trained_run, folder)
    else:
        folder.mkdir()
        path = str(folder / 'best_teacher.pth')
        shutil.copy(os.path.join(trained_run['out'], 'best_teacher.json'), folder)
    torch.save(other_teacher_weights(), path)
    before = snapshot(tmp_path)
    code = main.main(FAST + ['--data-dir', trained_run['common'][1],
                             '--out-dir', str(tmp_path / 'o'), '--teacher-checkpoint', path])
    err = capsys.readouterr().err
    assert code == 2 and err.count('\n') == 1
    assert f'{path} is not the checkpoint its record' in err
    assert file_sha256(path)[:12] in err and 'Train the teacher again' in err
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# Checkpoints of the field's reference code

def repdistiller_checkpoint(state_dict, key='model', prefix='module.'):
    """As RepDistiller / mdistiller save a teacher (and DataParallel names its weights)."""
    return {'epoch': 240, key: {prefix + k: v for k, v in state_dict.items()},
            'best_acc': torch.tensor(41.0), 'optimizer': {'state': {}, 'param_groups': [
                {'lr': 0.05, 'momentum': 0.9, 'params': [0, 1]}]},
            'opt': argparse.Namespace(model='resnet18', learning_rate=0.05)}


@pytest.mark.parametrize('key', ['model', 'state_dict', 'net'])
def test_weights_load_from_a_training_checkpoint(key, tmp_path):
    reference = StudentNet().state_dict()
    path = str(tmp_path / 'ckpt.pth')
    torch.save(repdistiller_checkpoint(reference, key), path)
    said = []
    model = load_weights(StudentNet(), path, log=said.append)
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference)
    assert len(said) == 1 and f"its {key!r} entry" in said[0] and "'epoch'" in said[0]


def test_a_checkpoint_without_weights_is_refused_naming_its_keys(tmp_path):
    path = str(tmp_path / 'ckpt.pth')
    torch.save({'epoch': 3, 'best_acc': 71.2, 'model': {'note': 'moved elsewhere'}}, path)
    with pytest.raises(CheckpointError) as e:
        load_weights(StudentNet(), path)
    assert "holds no weights" in str(e.value)
    assert "'epoch', 'best_acc', 'model'" in str(e.value)


@pytest.fixture(scope='module')
def wrapped_teacher(trained_run, tmp_path_factory):
    """The trained teacher saved as RepDistiller would, without a record, in a folder whose
    results.json still reports an earlier teacher (99%); then students and --evaluate there."""
    folder = str(tmp_path_factory.mktemp('wrapped'))
    plain = torch.load(os.path.join(trained_run['out'], 'best_teacher.pth'), weights_only=True)
    torch.save(repdistiller_checkpoint(plain), os.path.join(folder, 'best_teacher.pth'))
    with open(os.path.join(trained_run['out'], 'results.json')) as f:
        stale = json.load(f)
    stale['models']['teacher']['test_acc'] = 99.0
    with open(os.path.join(folder, 'results.json'), 'w') as f:
        json.dump(stale, f)
    data = trained_run['common'][1]
    students = run_cli(*FAST, '--data-dir', data, '--out-dir', folder)
    evaluate = run_cli('--evaluate', *FAST[2:], '--data-dir', data, '--out-dir', folder)
    # the teacher's accuracy on these 100 test images, computed here from its plain weights
    teacher = TeacherNet()
    teacher.load_state_dict(plain)
    _, test = get_cifar10_loaders(batch_size=100, data_dir=data, subset=100)
    expected = accuracy(*predict(teacher.eval(), test))
    return {'folder': folder, 'students': students, 'evaluate': evaluate, 'expected': expected}


def test_students_distil_from_a_wrapped_teacher_and_report_it(wrapped_teacher):
    r = wrapped_teacher['students']
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert "the weights are its 'model' entry" in r.stdout
    # a reference-format file has no record: taken as trained on every training image, so the
    # students' validation images were not unseen by it; said, and recorded with the teacher
    assert ('best_teacher.pth has no record (' in r.stdout
            and 'so it is taken as trained on all 200 training images' in r.stdout
            and "the students' validation images (val_fraction=0.1) are not unseen by it"
            in r.stdout)
    with open(os.path.join(wrapped_teacher['folder'], 'results.json')) as f:
        results = json.load(f)
    teacher = results['models']['teacher']
    assert teacher['split'] == ('no record: taken as trained on every training image '
                                '(no held-out split)')
    # the teacher that ran, measured on this run's test images, not the stale 99%
    assert teacher['test_acc'] == pytest.approx(wrapped_teacher['expected'])
    assert teacher['sha256'] == file_sha256(os.path.join(wrapped_teacher['folder'],
                                                         'best_teacher.pth'))
    assert teacher['arch'] == 'resnet18' and teacher['params'] == 11_173_962
    row = next(line for line in r.stdout.splitlines() if line.startswith('Teacher'))
    assert f"{wrapped_teacher['expected']:.2f}" in row and '99.00' not in row
    with open(os.path.join(wrapped_teacher['folder'], 'results.md')) as f:
        assert '99.00' not in f.read()


def test_evaluate_reads_a_wrapped_teacher(wrapped_teacher):
    r = wrapped_teacher['evaluate']
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    assert "the weights are its 'model' entry" in r.stdout
    row = next(line for line in r.stdout.splitlines() if line.startswith('Teacher'))
    assert f"{wrapped_teacher['expected']:.2f}" in row


# ---------------------------------------------------------------------------------------------
# Files that are not checkpoints, and weights of another model

class RunsAShellCommand:
    def __reduce__(self):
        return (os.system, ('echo never',))


def write_cases(tmp_path):
    good = tmp_path / 'good.pth'
    torch.save(StudentNet().state_dict(), good)
    cases = {}
    cases['empty'] = (tmp_path / 'empty.pth', b'', 'it is empty (0 bytes)')
    cases['text'] = (tmp_path / 'notes.pth', b'{"lr": 0.1}\n',
                     "it is a text file, not a PyTorch file (it begins '{\"lr\": 0.1}')")
    cases['truncated'] = (tmp_path / 'truncated.pth', good.read_bytes()[:50000],
                          'it is a truncated or damaged zip archive')
    archive = tmp_path / 'archive.pth'
    with zipfile.ZipFile(archive, 'w') as z:
        z.writestr('readme.txt', 'hello')
    cases['other zip'] = (archive, archive.read_bytes(),
                          'it is a zip archive of something else, not a PyTorch file (it holds '
                          'readme.txt)')
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        cases[f'pickle {protocol} running code'] = (
            tmp_path / f'evil{protocol}.pth',
            pickle.dumps({'conv1.weight': RunsAShellCommand()}, protocol=protocol),
            'it would need to import os.system, which a weights-only load refuses')
    cases['plain pickle'] = (tmp_path / 'plain.pkl', pickle.dumps({'a': 1}, protocol=2),
                             'it is a plain pickle, not a file written by torch.save')
    cases['random bytes'] = (tmp_path / 'random.pth', bytes(range(256)) * 8,
                             'it is not a PyTorch file')
    return cases


@pytest.mark.parametrize('case', ['empty', 'text', 'truncated', 'other zip', 'pickle 2 running code',
                                  f'pickle {pickle.HIGHEST_PROTOCOL} running code',
                                  'plain pickle', 'random bytes'])
def test_a_file_that_is_not_a_checkpoint_says_why_in_full(case, tmp_path, recwarn):
    path, content, reason = write_cases(tmp_path)[case]
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        load_file(str(path), 'TeacherNet checkpoint')
    message = str(e.value)
    assert message.startswith(f'cannot load {path} as a TeacherNet checkpoint: ')
    assert reason in message
    assert 'weights_only' not in message and 'Weights only' not in message
    assert len(message.splitlines()) == 1
    assert not [w for w in recwarn if 'pickle protocol' in str(w.message)]


def test_a_student_checkpoint_as_teacher_names_what_it_holds(trained_run, tmp_path, capsys):
    no_record = tmp_path / 'student.pth'
    shutil.copy(os.path.join(trained_run['out'], 'best_student_kd.pth'), no_record)
    assert main.main(['--teacher-checkpoint', str(no_record), '--out-dir', str(tmp_path / 'o'),
                      '--data-dir', str(tmp_path / 'no-data')]) == 1
    err = capsys.readouterr().err
    assert f'{no_record} holds the weights of a cnn, not of a resnet18: ' in err
    teacher_keys = len(TeacherNet().state_dict())
    student_keys = len(StudentNet().state_dict())
    assert f"{teacher_keys} of TeacherNet's {teacher_keys} keys are missing (e.g. " in err
    assert f'{student_keys} keys are not TeacherNet\'s (e.g. ' in err
    assert 'Error(s) in loading' not in err and err.count('\n') == 1


def test_a_teacher_for_other_classes_without_record_says_so(tmp_path, capsys):
    path = tmp_path / 'teacher10.pth'
    torch.save(TeacherNet(num_classes=10).state_dict(), path)
    assert main.main(['--dataset', 'cifar100', '--teacher-checkpoint', str(path),
                      '--out-dir', str(tmp_path / 'o'), '--data-dir', str(tmp_path / 'x')]) == 1
    err = capsys.readouterr().err
    assert f"{path} holds a resnet18 for 10 classes, but this run's dataset has 100: " in err
    assert '2 tensors differ in shape (e.g. linear.weight: 10x512 in the file, 100x512 in ' \
           'TeacherNet)' in err


# ---------------------------------------------------------------------------------------------
# Another dataset

def test_a_teacher_of_another_dataset_is_named_as_such(trained_run, tmp_path, capsys):
    code = main.main(['--dataset', 'cifar100', '--out-dir', str(tmp_path / 'o'),
                      '--data-dir', str(tmp_path / 'x'), '--teacher-checkpoint',
                      os.path.join(trained_run['out'], 'best_teacher.pth')])
    err = capsys.readouterr().err
    assert code == 2
    assert 'was trained on cifar10 (10 classes), these students are for cifar100 ' \
           '(100 classes)' in err
    assert 'split' not in err and 'None' not in err and '--dataset cifar100' in err


def test_no_subset_is_shown_as_all():
    split = {'dataset': 'cifar10', 'split_seed': 0, 'val_fraction': 0.1, 'subset': None}
    with pytest.raises(TeacherMismatch) as e:
        refuse_other_split('t.pth', dict(split, subset=100), split)
    assert '--subset 100 for the teacher but all here' in str(e.value)


def test_a_training_state_as_teacher_says_to_use_the_best_checkpoint(trained_run, tmp_path,
                                                                     capsys):
    state = os.path.join(trained_run['out'], 'last_students.pt')
    assert os.path.exists(state)
    assert main.main(['--teacher-checkpoint', state, '--out-dir', str(tmp_path / 'o'),
                      '--data-dir', str(tmp_path / 'no-data')]) == 1
    err = capsys.readouterr().err
    assert (f'{state} is a training state of this program (what --resume continues from), not '
            f'a checkpoint of weights: use the best_<model>.pth beside it') in err
    assert 'the weights are its' not in err and err.count('\n') == 1
