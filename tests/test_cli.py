"""The command line end to end on tiny CIFAR-format data: teacher, students, --evaluate."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import main
from conftest import ROOT, run_cli, snapshot
from kd.models import StudentNet, TeacherNet

SNIPPET = r'''
import torch
from kd.models import TeacherNet, StudentNet
from kd.data.loader import get_cifar10_loaders
device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
teacher = TeacherNet().to(device)
teacher.load_state_dict(torch.load('best_teacher.pth'))
teacher.eval()
student_kd = StudentNet().to(device)
student_kd.load_state_dict(torch.load('best_student_kd.pth'))
student_kd.eval()
student_base = StudentNet().to(device)
student_base.load_state_dict(torch.load('best_student_base.pth'))
student_base.eval()
_, testloader = get_cifar10_loaders(batch_size=128)
def evaluate_model(model, testloader):
    correct = 0
    total = 0
    with torch.no_grad():
        for images, labels in testloader:
            images, labels = images.to(device), labels.to(device)
            outputs = model(images)
            _, predicted = torch.max(outputs.data, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    return 100 * correct / total
print(f"Teacher Accuracy: {evaluate_model(teacher, testloader):.2f}%")
print(f"Student (KD) Accuracy: {evaluate_model(student_kd, testloader):.2f}%")
print(f"Student (Base) Accuracy: {evaluate_model(student_base, testloader):.2f}%")
'''


def test_checkpoints_are_plain_cpu_state_dicts(trained_run):
    for name, cls in [('teacher', TeacherNet), ('student_kd', StudentNet),
                      ('student_base', StudentNet)]:
        path = os.path.join(trained_run['out'], f'best_{name}.pth')
        state = torch.load(path, map_location='cpu', weights_only=True)
        assert isinstance(state, dict)
        assert all(v.device.type == 'cpu' for v in state.values())
        assert not any(k.startswith(('module.', '_orig_mod.')) for k in state)
        cls().load_state_dict(state, strict=True)


def test_results_json_merges_both_phases(trained_run):
    with open(os.path.join(trained_run['out'], 'results.json')) as f:
        results = json.load(f)
    assert set(results['models']) == {'teacher', 'student_kd', 'student_base'}
    for entry in results['models'].values():
        for key in ('test_acc', 'last_test_acc', 'best_epoch', 'params'):
            assert key in entry
        assert 0 <= entry['test_acc'] <= 100
    assert results['models']['teacher']['params'] > 8 * results['models']['student_kd']['params']
    assert results['config']['alpha'] == 0.1 and results['config']['temperature'] == 4.0
    assert results['versions']['torch'] == torch.__version__
    assert 'commit' in results['git']
    assert results['run']['subset'] == 100
    assert results['run']['subset_by_phase'] == {'teacher': 100, 'students': 100}


def test_console_output_has_config_epoch_lines_and_table(trained_run):
    out = trained_run['students'].stdout
    assert out.startswith('Configuration:')
    assert '  losses               kd: T=4 (its default), alpha=0.1 (its default)' in out
    epoch_lines = [l for l in out.splitlines() if l.startswith('students ')]
    assert len(epoch_lines) == 2 and len({len(l) for l in epoch_lines}) == 1  # fixed width
    assert 'Student (KD)' in out and 'Student (baseline)' in out and 'KD − baseline' in out


def test_csv_and_selection_on_validation(trained_run):
    with open(os.path.join(trained_run['out'], 'log_student_kd.csv')) as f:
        rows = f.read().splitlines()
    assert rows[0].split(',')[:4] == ['epoch', 'lr', 'train_loss', 'train_ce']
    assert len(rows) == 3
    with open(os.path.join(trained_run['out'], 'results.json')) as f:
        kd = json.load(f)['models']['student_kd']
    assert kd['best_epoch'] in ([1], [2])


def test_evaluate_prints_the_table(trained_run, cifar_dir):
    r = run_cli('--evaluate', *trained_run['common'])
    assert r.returncode == 0, r.stderr
    for label in ('Teacher (ResNet-18)', 'Student (KD)', 'Student (baseline)', 'KD − baseline'):
        assert label in r.stdout
    with open(os.path.join(trained_run['out'], 'results.json')) as f:
        results = json.load(f)
    line = [l for l in r.stdout.splitlines() if l.startswith('Student (KD)')][0]
    assert f"{results['models']['student_kd']['test_acc']:.2f}" in line


def test_readme_snippet_runs_unchanged(trained_run, cifar_dir, tmp_path):
    for name in ('teacher', 'student_kd', 'student_base'):
        shutil.copy(os.path.join(trained_run['out'], f'best_{name}.pth'), tmp_path)
    shutil.copytree(cifar_dir, tmp_path / 'data')
    (tmp_path / 'snippet.py').write_text(SNIPPET)
    r = subprocess.run([sys.executable, 'snippet.py'], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [l.split(':')[0] for l in lines] == ['Teacher Accuracy', 'Student (KD) Accuracy',
                                                 'Student (Base) Accuracy']
    assert all(0 <= float(l.split(': ')[1].rstrip('%')) <= 100 for l in lines)


BAD_FLAGS = [
    ['--alpha', '1.5'], ['--alpha', '-0.1'], ['--alpha', 'nan'], ['--temperature', '0'],
    ['--temperature', '-1'], ['--epochs', '0'], ['--epochs', '-3'], ['--batch-size', '0'],
    ['--subset', '0'], ['--subset', '-5'], ['--lr', '-0.1'], ['--no-such-flag'],
    ['--val-fraction', '1'], ['--device', 'tpu'], ['--seed', '-1'], ['--seeds', '0', '-2'],
]


@pytest.mark.parametrize('flags', BAD_FLAGS, ids=[' '.join(f) for f in BAD_FLAGS])
def test_bad_flags_exit_2_with_one_line_and_touch_nothing(flags, tmp_path, capsys):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'best_teacher.pth').write_bytes(b'keep me')
    (out / 'results.json').write_text('{"keep": true}')
    before = snapshot(out)
    assert main.main([*flags, '--out-dir', str(out), '--data-dir', str(tmp_path / 'nodata')]) == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith('error:')
    assert snapshot(out) == before


def test_bad_flag_in_a_real_process_exits_2_without_traceback(tmp_path):
    r = run_cli('--alpha', '2', '--out-dir', tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == 'error: --alpha must be in [0, 1], got 2.0'
    assert list(tmp_path.iterdir()) == []


def test_help_states_the_alpha_convention_and_defaults():
    r = run_cli('--help')
    assert r.returncode == 0
    text = ' '.join(r.stdout.split())
    assert 'alpha=0.1 puts 0.9 on the teacher' in text
    assert '(default: 200)' in text and '(default: 128)' in text and '(default: 4.0;' in text
    # every distillation term carries its T^2, as in the README's formulas
    assert 'dkd: loss = CE + min(epoch/20, 1)*T^2*(1*TCKD + 8*NCKD)' in text
