"""The user's own models (issue 28): a torchvision model as teacher and a user's file as student,
distilled at points named by module path; the record rebuilds them for --evaluate and --resume;
the refusals of names, files, classes and points that do not exist, and of a changed file."""
import json
import math
import os
import signal
import textwrap

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.optim.optimizer import register_optimizer_step_post_hook

import main
from conftest import snapshot
from kd.models import ArchError, build_model, check_model, source_sha256
from kd.models.features import given_points
from kd.run.teacher_form import fastest_teacher

USER_NET = '''
import torch.nn as nn


class MyNet(nn.Module):
    """Two named blocks, a pooling and a classifier."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1),
                                    nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.block2(self.block1(x))).flatten(1))
'''

LOSSES = ['kd', 'fitnet', 'at']
NAMES = ['kd_T4_a0.1', 'fitnet_b100', 'at_b1000', 'student_base']


def write_user_net(folder):
    path = os.path.join(folder, 'my_net.py')
    with open(path, 'w') as f:
        f.write(USER_NET)
    return path


@pytest.fixture(scope='module')
def own(cifar_dir, tmp_path_factory):
    """A user's file, a torchvision teacher's weights as a user saves them (a {'state_dict':}
    of a DataParallel's 'module.' names, no record), and one students run at named points."""
    folder = tmp_path_factory.mktemp('own')
    net = write_user_net(str(folder))
    torch.manual_seed(0)
    teacher = torchvision.models.resnet18(num_classes=10)
    checkpoint = str(folder / 'teacher.pth')
    torch.save({'state_dict': {f'module.{k}': v for k, v in teacher.state_dict().items()}},
               checkpoint)
    args = ['--teacher-arch', 'torchvision:resnet18', '--teacher-checkpoint', checkpoint,
            '--student-arch', f'{net}:MyNet', '--loss', *LOSSES,
            '--teacher-points', 'layer2,layer3', '--student-points', 'block1,block2',
            '--epochs', '2', '--subset', '64', '--batch-size', '8', '--device', 'cpu',
            '--no-amp', '--data-dir', cifar_dir]
    out = folder / 'out'
    assert main.main(args + ['--out-dir', str(out)]) == 0
    return {'folder': folder, 'net': net, 'args': args, 'out': out, 'teacher': teacher}


def results(out):
    with open(os.path.join(out, 'results.json')) as f:
        return json.load(f)


def test_a_torchvision_teacher_and_a_user_file_student_distil_at_named_points(own, capsys):
    config = results(own['out'])['config']
    assert config['teacher_arch'] == 'torchvision:resnet18'
    assert config['student_arch'] == f'{own["net"]}:MyNet'
    assert config['teacher_points'] == ['layer2', 'layer3']
    assert config['student_points'] == ['block1', 'block2']
    assert config['student_arch_sha256'] == source_sha256(f'{own["net"]}:MyNet')
    assert 'teacher_arch_sha256' not in config  # a library's model has no file of the user's
    # FitNets' hint is the second point of each (stage2), AT pairs both, each logs its part
    for name, part in (('fitnet_b100', 'fitnet'), ('at_b1000', 'at')):
        with open(own['out'] / f'log_{name}.csv') as f:
            header, row = f.read().splitlines()[:2]
        value = float(row.split(',')[header.split(',').index(f'train_{part}')])
        assert math.isfinite(value) and value > 0
    # the teacher's weights came through the wrappers, and its form kept the points
    assert results(own['out'])['config']['teacher_form']['chosen'] == 'folded'
    # every student is a plain state_dict of the user's class, its record names the file
    namespace = {}
    exec(compile(USER_NET, 'my_net', 'exec'), namespace)
    for name in NAMES:
        namespace['MyNet']().load_state_dict(
            torch.load(own['out'] / f'best_{name}.pth', weights_only=True))
        with open(own['out'] / f'best_{name}.json') as f:
            record = json.load(f)
        assert record['arch'] == f'{own["net"]}:MyNet'
        assert record['arch_sha256'] == config['student_arch_sha256']
    # --evaluate rebuilds them from the records and reproduces the run's numbers
    capsys.readouterr()
    assert main.main(['--evaluate', '--out-dir', str(own['out']), '--data-dir',
                      own['args'][own['args'].index('--data-dir') + 1], '--device', 'cpu']) == 0
    captured = capsys.readouterr()
    assert 'warning' not in captured.err + captured.out
    models = results(own['out'])['models']
    for name, label in zip(NAMES, NAMES[:3] + ['Student (baseline)']):
        row = next(line for line in captured.out.splitlines() if line.startswith(label))
        assert f'{models[name]["test_acc"]:.2f}' in row


def test_one_point_each_pairs_them_for_fitnet(own, tmp_path, capsys):
    """--teacher-points layer3 --student-points block2: FitNets' hint is that pair (hint=1)."""
    args = list(own['args'])
    args[args.index('--teacher-points') + 1] = 'layer3'
    args[args.index('--student-points') + 1] = 'block2'
    args[args.index('--loss') + 1:args.index('--loss') + 4] = ['fitnet']
    args[args.index('--epochs') + 1] = '1'
    assert main.main(args + ['--out-dir', str(tmp_path), '--no-baseline']) == 0
    with open(tmp_path / 'best_student_kd.json') as f:
        assert json.load(f)['loss_params'] == {'beta': 100.0, 'hint': 1}


def test_resume_after_an_interruption_equals_the_uninterrupted_run(own, tmp_path, capsys):
    state = tmp_path / 'last_students.pt'
    sent = []

    def stop_after_epoch_1(optimizer, args, kwargs):  # SIGTERM mid-epoch 2, as a user would
        if not sent and state.exists():
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
    handle = register_optimizer_step_post_hook(stop_after_epoch_1)
    try:
        assert main.main(own['args'] + ['--out-dir', str(tmp_path)]) == 128 + signal.SIGTERM
    finally:
        handle.remove()
    assert not torch.load(state, weights_only=True)['finished']
    assert main.main(own['args'] + ['--out-dir', str(tmp_path), '--resume']) == 0
    want, got = results(own['out'])['models'], results(tmp_path)['models']
    assert {n: got[n]['test_acc'] for n in NAMES} == {n: want[n]['test_acc'] for n in NAMES}
    for name in NAMES:
        a = torch.load(tmp_path / f'best_{name}.pth', weights_only=True)
        b = torch.load(own['out'] / f'best_{name}.pth', weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)


def refused(args, folder, capsys):
    """main.main(args) exits 2 with one line on stderr and writes nothing in folder."""
    before = snapshot(folder)
    code = main.main(args + ['--out-dir', str(folder)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and 'Traceback' not in err, err
    assert snapshot(folder) == before
    return err


def replaced(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def test_names_files_classes_and_points_that_do_not_exist_are_refused(own, tmp_path, capsys):
    args = own['args']
    err = refused(replaced(args, '--teacher-arch', 'torchvision:resnet19'), tmp_path, capsys)
    assert "no classification model 'resnet19'" in err and 'resnet18' in err
    err = refused(replaced(args, '--student-arch', 'resnet9'), tmp_path, capsys)
    assert "unknown model 'resnet9'" in err and 'resnet8' in err
    missing = str(tmp_path / 'nowhere.py')
    err = refused(replaced(args, '--student-arch', f'{missing}:MyNet'), tmp_path, capsys)
    assert f'{missing}: no such file' in err
    err = refused(replaced(args, '--student-arch', f'{own["net"]}:MyNett'), tmp_path, capsys)
    assert "has no class 'MyNett' (nearest: MyNet)" in err
    err = refused(replaced(args, '--student-points', 'block1,block3'), tmp_path, capsys)
    assert "has no module 'block3'" in err and 'block1' in err and 'block2' in err
    err = refused(replaced(args, '--teacher-points', 'layer2,layer5'), tmp_path, capsys)
    assert "the teacher torchvision:resnet18 has no module 'layer5'" in err and 'layer4' in err
    err = refused(replaced(args, '--student-points', 'block1:out'), tmp_path, capsys)
    assert "ending in ':in'" in err


def test_a_changed_user_file_is_refused_on_resume_and_warned_on_evaluate(own, tmp_path,
                                                                          capsys):
    """A run's own copy of the file: editing it after training is told, never silent."""
    folder = tmp_path / 'run'
    folder.mkdir()
    net = write_user_net(str(tmp_path))
    args = replaced(own['args'], '--student-arch', f'{net}:MyNet')
    args = replaced(args, '--epochs', '1')
    assert main.main(args + ['--out-dir', str(folder)]) == 0
    with open(net, 'a') as f:
        f.write('\nWIDTH = 16  # an edit after the run\n')
    err = refused(args + ['--resume', '--epochs', '2'], folder, capsys)
    assert 'student_arch_sha256' in err and '--restart' in err
    assert main.main(['--evaluate', '--out-dir', str(folder), '--device', 'cpu', '--data-dir',
                      args[args.index('--data-dir') + 1]]) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith('warning:')]
    assert warnings and all(f'{net}:MyNet is not the file' in w for w in warnings)
    os.remove(net)  # gone: --evaluate cannot rebuild it, and says so in one line
    err = refused(['--evaluate', '--device', 'cpu', '--data-dir',
                   args[args.index('--data-dir') + 1]], folder, capsys)
    assert 'cannot be built now' in err and 'no such file' in err


def test_a_module_class_builds_and_is_identified_by_its_file(tmp_path, monkeypatch):
    (tmp_path / 'user_pkg').mkdir()
    (tmp_path / 'user_pkg' / '__init__.py').write_text('')
    (tmp_path / 'user_pkg' / 'nets.py').write_text(USER_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model('user_pkg.nets:MyNet', num_classes=7)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    assert source_sha256('user_pkg.nets:MyNet') == source_sha256(
        f'{tmp_path / "user_pkg" / "nets.py"}:MyNet')
    with pytest.raises(ArchError, match="no such module"):
        check_model('user_pkg.nope:MyNet')
    assert type(build_model('torchvision:shufflenet_v2_x0_5', 5)).__name__ == 'ShuffleNetV2'
    # an auxiliary classifier would make training forwards return a tuple: built without it
    googlenet = build_model('torchvision:googlenet', 3).train()
    assert googlenet(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


class Untraceable(nn.Module):
    """torch.fx cannot trace a branch on a tensor's value: the teacher stays eager, by hooks."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            y = y.relu()
        return self.fc(y.mean((2, 3)))


def test_a_teacher_fx_cannot_trace_gives_its_points_by_hooks():
    torch.manual_seed(0)
    teacher = Untraceable().eval()
    points = given_points(('conv', 'fc:in'), teacher)
    assert points == {'stage1': 'conv', 'stage2': 'fc:in', 'stage1_pre': 'conv',
                      'stage2_pre': 'fc:in', 'pooled': 'fc:in'}
    logs = []
    form, record = fastest_teacher(teacher, (8, 3, 32, 32), torch.device('cpu'), None, 10,
                                   log=logs.append, points=points)
    assert record['chosen'] == 'eager' and 'not possible' in logs[0]
    x = torch.randn(2, 3, 32, 32)
    logits, feats = form(x)
    assert torch.equal(logits, teacher(x))
    assert torch.equal(feats['stage1'], teacher.conv(x))
    assert torch.equal(feats['pooled'], teacher.conv(x).relu().mean((2, 3))) or \
        torch.equal(feats['pooled'], teacher.conv(x).mean((2, 3)))


def test_timm_models_build_when_timm_is_installed():
    pytest.importorskip('timm')
    check_model('timm:resnet10t')
    model = build_model('timm:resnet10t', num_classes=5).eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ArchError, match="timm has no model 'resnet10tt'"):
        check_model('timm:resnet10tt')


def test_a_teacher_of_a_user_file_trains_and_its_edited_file_is_warned(cifar_dir, tmp_path,
                                                                       capsys):
    """--train-teacher with a user's file: best_teacher.json records its content; the students
    of a later run are told when the file is no longer the one the teacher trained with."""
    net = write_user_net(str(tmp_path))
    common = ['--epochs', '1', '--subset', '64', '--batch-size', '8', '--device', 'cpu',
              '--no-amp', '--data-dir', cifar_dir, '--out-dir', str(tmp_path / 'out')]
    assert main.main(['--train-teacher', '--teacher-arch', f'{net}:MyNet', *common]) == 0
    with open(tmp_path / 'out' / 'best_teacher.json') as f:
        record = json.load(f)
    assert record['arch'] == f'{net}:MyNet'
    assert record['arch_sha256'] == source_sha256(f'{net}:MyNet')
    with open(net, 'a') as f:
        f.write('\n# edited\n')
    capsys.readouterr()
    # its points by module path; the teacher arch comes from its record
    assert main.main(['--loss', 'at', '--teacher-points', 'block1,block2', '--student-arch',
                      'cnn', '--no-baseline', *common]) == 0
    out = capsys.readouterr().out
    assert f'warning: {net}:MyNet is not the file' in out
    assert results(tmp_path / 'out')['config']['teacher_arch_sha256'] == \
        source_sha256(f'{net}:MyNet')


def test_a_feature_method_without_the_teachers_points_is_refused(own, tmp_path, capsys):
    args = list(own['args'])
    del args[args.index('--teacher-points'):args.index('--teacher-points') + 2]
    err = refused(args, tmp_path, capsys)
    assert err == ('error: --loss fitnet at: the teacher torchvision:resnet18 names no feature '
                   'points; give them by module path (--teacher-points PATH,...)')


BIG_POOL = '''
import torch.nn as nn
import torch.nn.functional as F


class BigPool(nn.Module):
    """Pools 40x40 windows: it needs images of at least 40x40."""
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(F.avg_pool2d(self.conv(x), 40).flatten(1))
'''


def test_a_model_of_yours_that_cannot_run_on_the_images_is_refused_in_one_line(
        cifar_dir, tmp_path, capsys):
    """A model that declares no size is tried at the dataset's size before training: what its
    forward raises becomes one line naming the size (exit 2), not a traceback."""
    net = tmp_path / 'big_pool.py'
    net.write_text(BIG_POOL)
    code = main.main(['--train-teacher', '--teacher-arch', f'{net}:BigPool', '--epochs', '1',
                      '--batch-size', '8', '--subset', '16', '--device', 'cpu', '--no-amp',
                      '--data-dir', cifar_dir, '--out-dir', str(tmp_path / 'out')])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: model '{net}:BigPool' cannot run on 32x32 images: ")
    assert not list((tmp_path / 'out').glob('*.pt*'))
    from kd.models.sizes import image_size_problem
    assert image_size_problem(f'{net}:BigPool', (3, 48, 48)) is None
