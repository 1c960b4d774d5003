"""What a run says is what ran: the resolved configuration, file modes, and the messages of a
non-finite loss, a second Ctrl-C and a resume."""
import json
import os
import signal

import pytest
import torch

import main
from kd.engine.loop import LoopCallbacks, LoopOptions, PhaseFiles, train_phase
from kd.engine.signals import NonFiniteLoss, StopNow, StopSignal
from kd.engine.trainee import Trainee
from kd.recipes.base import Recipe
from conftest import run_cli
from kd.methods.registry import LOSSES, DistillLoss
from kd.methods.losses import ce_loss
from kd.models import build_model
from kd.run.configuration import print_configuration, resolved_configuration
from kd.run.specs import phase_specs

FAST = ['--epochs', '1', '--subset', '100', '--batch-size', '32', '--device', 'cpu']


def printed_configuration(stdout):
    """The lines under 'Configuration:' up to the first line that is not indented."""
    lines = stdout.splitlines()
    start = lines.index('Configuration:')
    block = []
    for line in lines[start + 1:]:
        if not line.startswith('  ') or line.startswith('  --subset'):
            break
        block.append(line)
    return block


@pytest.fixture(scope='module')
def umask_run(cifar_dir, tmp_path_factory):
    """A teacher (two seeds) then a students' run of two losses, written under umask 022."""
    out = str(tmp_path_factory.mktemp('modes'))
    common = [*FAST, '--data-dir', cifar_dir, '--out-dir', out]
    previous = os.umask(0o022)
    try:
        teacher = run_cli('--train-teacher', '--teacher-arch', 'cnn', '--seeds', '0', '1',
                          *common)
        assert teacher.returncode == 0, teacher.stderr
        students = run_cli('--loss', 'kd', 'ls', '--no-amp', *common)
        assert students.returncode == 0, students.stderr
    finally:
        os.umask(previous)
    return {'out': out, 'teacher': teacher, 'students': students}


def test_every_written_file_follows_the_umask(umask_run):
    modes = {}
    for folder, _, names in os.walk(umask_run['out']):
        for name in names:
            path = os.path.join(folder, name)
            modes[os.path.relpath(path, umask_run['out'])] = os.stat(path).st_mode & 0o777
    # checkpoints, states, records, logits, CSVs, results, plots, per seed and at the top
    for expected in ('best_teacher.pth', 'best_teacher.json', 'best_teacher_test_logits.pt',
                     'seed0/last_teacher.pt', 'seed1/log_teacher.csv', 'seed0/results.json',
                     'last_students.pt', 'best_kd_T4_a0.1.pth', 'best_student_kd.pth',
                     'log_ls_T2_a0.1.csv', 'results.json', 'results.md', 'curves.png'):
        assert expected in modes
    assert modes == {name: 0o644 for name in modes}


def test_teacher_configuration_has_no_student_settings_and_no_none(umask_run):
    block = printed_configuration(umask_run['teacher'].stdout)
    text = '\n'.join(block)
    for absent in ('None', 'alpha', 'temperature', 'T=', 'loss', 'student', 'baseline'):
        assert absent not in text, absent
    labels = {line.split('  ')[1].strip() for line in block if line[2] != ' '}
    assert {'teacher arch', 'lr', 'amp', 'seeds', 'subset'} <= labels
    assert '  teacher arch         cnn' in block
    assert '  lr                   0.025 (0.1 x batch size 32 / 128)' in block
    assert '  amp                  auto (decided below)' in block
    assert '  subset               100' in block


def test_students_configuration_gives_each_loss_its_resolved_t_and_alpha(umask_run):
    block = printed_configuration(umask_run['students'].stdout)
    assert 'None' not in '\n'.join(block)
    assert '  losses               kd: T=4 (its default), alpha=0.1 (its default)' in block
    assert '                       ls: T=2 (its default), alpha=0.1 (its default)' in block
    assert '  teacher arch         cnn' in block   # read from the checkpoint's record
    assert '  amp                  fp32 (--no-amp)' in block
    # results.json records the same view, and the resolved settings of every loss
    with open(os.path.join(umask_run['out'], 'results.json')) as f:
        config = json.load(f)['phases']['students']['config']
    lines = []
    print_configuration(config['configuration'], lines.append)
    assert lines[1:] == block
    assert config['loss_settings'] == {'kd': {'temperature': [4.0], 'alpha': [0.1]},
                                       'ls': {'temperature': [2.0], 'alpha': [0.1]}}
    assert 'temperature' not in config and 'alpha' not in config   # a grid: no single value


def test_configuration_of_a_grid_and_of_dkd():
    config = main.parse_config(['--loss', 'kd', 'dkd', '--temperature', '2', '8', '--alpha',
                                '0.5', '--no-baseline', '--amp', '--lr', '0.05'])
    view = resolved_configuration(config, torch.device('cpu'), specs=phase_specs(config),
                                  teacher_arch='resnet18')
    assert view['losses'] == ['kd: T=2, 8, alpha=0.5', 'dkd: T=2, 8, --alpha does not apply']
    assert view['students'] == '4: kd_T2_a0.5, kd_T8_a0.5, dkd_T2, dkd_T8'
    assert view['baseline'] == 'off (--no-baseline)'
    assert view['lr'] == '0.05' and view['amp'] == 'bf16 (--amp)'
    # a feature method's --beta does not reach kd, and --temperature does not reach fitnet
    config = main.parse_config(['--loss', 'kd', 'fitnet', '--beta', '5', '--temperature', '2'])
    view = resolved_configuration(config, torch.device('cpu'), specs=phase_specs(config),
                                  teacher_arch='resnet18')
    assert view['losses'] == ['kd: T=2, alpha=0.1 (its default), --beta does not apply',
                              'fitnet: beta=5, --temperature does not apply']
    assert None not in view.values()


# ---------------------------------------------------------------------------------------------
# Stopping: what the messages say is kept

def tiny_data():
    from kd.data.loader import make_loaders
    g = torch.Generator().manual_seed(0)
    arrays = (torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g),
              torch.arange(40) % 10,
              torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g),
              torch.arange(10) % 10)
    return make_loaders(batch_size=8, val_fraction=0.25, arrays=arrays)


def train_with_loss(monkeypatch, tmp_path, fn, stop=None, epochs=2):
    """train_phase for a small student whose 'ce' loss is fn (called for training
    batches only), into tmp_path."""
    def loss(s, t, labels, *, epoch=1):
        out = ce_loss(s, t, labels, epoch=epoch)
        return fn(out, epoch) if len(labels) > 2 else out  # not the part-names probe
    monkeypatch.setitem(LOSSES, 'ce', DistillLoss('ce', loss, {}, False, ''))
    from kd.models import build_model
    os.makedirs(tmp_path, exist_ok=True)
    recipe = Recipe(epochs=epochs)
    trainee = Trainee('teacher', build_model('wrn_16_2', 10), 'ce', recipe, torch.device('cpu'))
    return train_phase('teacher', [trainee], tiny_data(), recipe, PhaseFiles(str(tmp_path)),
                       options=LoopOptions(torch.device('cpu'), progress_bar=False),
                       callbacks=LoopCallbacks(log=lambda *_: None, stop=stop))


def test_a_nan_after_a_good_epoch_names_that_epochs_checkpoints(monkeypatch, tmp_path):
    nan_in_epoch_2 = lambda out, epoch: (out[0] * float('nan'), out[1]) if epoch == 2 else out
    with pytest.raises(NonFiniteLoss) as e:
        train_with_loss(monkeypatch, tmp_path, nan_in_epoch_2)
    state = os.path.join(tmp_path, 'last_teacher.pt')
    assert str(e.value) == (
        f'the teacher loss became NaN or infinite in epoch 2, batch 1; training stopped, kept: '
        f'the best_*.pth in {tmp_path} selected in epoch 1 and the state of epoch 1 in {state}. '
        f'Try a lower --lr with --restart.')
    assert torch.load(state, weights_only=True)['epoch'] == 1
    assert os.path.exists(os.path.join(tmp_path, 'best_teacher.pth'))


def test_a_second_ctrl_c_says_which_state_is_kept(monkeypatch, tmp_path):
    def ctrl_c_twice(epoch):
        def fn(out, e):
            if e == epoch:
                signal.raise_signal(signal.SIGINT)   # the first asks to stop at the batch's end
                signal.raise_signal(signal.SIGINT)   # the second stops at once
            return out
        return fn

    for epoch, kept in ((2, f'the state of epoch 1 in {tmp_path}/last_teacher.pt'), (1, None)):
        stop = StopSignal()
        stop.install()
        try:
            with pytest.raises(StopNow) as e:
                train_with_loss(monkeypatch, tmp_path / str(epoch), ctrl_c_twice(epoch), stop)
        finally:
            stop.uninstall()
        assert e.value.kept == (kept and kept.replace(str(tmp_path), str(tmp_path / str(epoch))))
        assert e.value.signum == signal.SIGINT
        assert os.path.exists(tmp_path / str(epoch) / 'last_teacher.pt') == (epoch == 2)


@pytest.mark.parametrize('kept, needle', [
    (None, 'Interrupted before any training state of this run was saved; run the same command '
           'again to start over.'),
    ('the state of epoch 3 in out/last_students.pt',
     'Interrupted; kept: the state of epoch 3 in out/last_students.pt. Resume with: python'),
])
def test_the_second_ctrl_c_message(monkeypatch, capsys, kept, needle):
    def run(args):
        raise StopNow(signal.SIGTERM, kept)
    monkeypatch.setattr(main, 'run', run)
    assert main.main(['--epochs', '1']) == 143
    err = capsys.readouterr().err
    assert needle in err and 'last finished epoch' not in err


def test_resume_without_a_saved_state_says_so_and_trains_from_the_start(cifar_dir, tmp_path,
                                                                        capsys):
    """--resume in a folder with no state: a job script may always pass it; the run says that it
    starts from the beginning, then trains and writes its checkpoint."""
    out = tmp_path / 'empty'
    code = main.main(['--train-teacher', '--resume', '--teacher-arch', 'cnn', '--no-amp', *FAST,
                      '--data-dir', cifar_dir, '--out-dir', str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert f'--resume: no saved teacher state in {out}; starting from the beginning' in stdout
    assert 'resuming seed' not in stdout
    build_model('cnn').load_state_dict(torch.load(out / 'best_teacher.pth', weights_only=True))
