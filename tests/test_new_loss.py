"""A new logit loss with a hyper-parameter of its own is one file: written to a temporary module,
imported, it trains from the command line (in-process), with --set reaching its setting, its
setting names and checkpoints from its declaration."""
import importlib.util
import json
import os
import sys

import pytest
import torch

import main
from kd.methods.registry import LOSSES

FIXTURE_TEACHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures',
                               'old_run', 'run', 'best_teacher.pth')

# the whole of the new loss: its formula, its declared setting, its registration
NEW_LOSS = '''
"""A test loss: CE + margin * T^2 KL(teacher || student)."""
import torch.nn.functional as F

from kd.methods.losses import hard_label_ce
from kd.methods.registry import HyperParameter, register_loss

SEEN = []   # the margins the loss was called with


@register_loss('tmp_margin', defaults={'temperature': 4.0},
               settings=(HyperParameter('margin', 'm', 'margin', default=0.5, low=0.0,
                                        help='the weight of the KL term'),),
               parts=('ce', 'kd'), help='loss = CE + margin*T^2*KL (a test loss).')
def margin_loss(student_logits, teacher_logits, labels, *, epoch=1, temperature=4.0,
                margin=0.5, **options):
    SEEN.append(margin)
    s, t = student_logits.float(), teacher_logits.detach().float()
    ce = hard_label_ce(s, labels, **options)
    kd = F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1),
                  reduction='batchmean', log_target=True) * temperature ** 2
    return ce + margin * kd, {'ce': ce, 'kd': kd}
'''


@pytest.fixture
def new_loss(tmp_path):
    """The module of NEW_LOSS, imported from tmp_path (registered), removed afterwards."""
    path = tmp_path / 'tmp_margin_loss.py'
    path.write_text(NEW_LOSS)
    spec = importlib.util.spec_from_file_location('tmp_margin_loss', path)
    module = importlib.util.module_from_spec(spec)
    sys.modules['tmp_margin_loss'] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        LOSSES.pop('tmp_margin', None)
        sys.modules.pop('tmp_margin_loss', None)


def test_a_new_loss_trains_from_the_command_line(new_loss, cifar_dir, tmp_path, capsys):
    out = tmp_path / 'out'
    code = main.main(['--loss', 'tmp_margin', '--set', 'tmp_margin.margin=0.25,0.75',
                      '--no-baseline', '--student-arch', 'resnet8',
                      '--teacher-checkpoint', FIXTURE_TEACHER, '--data-dir', cifar_dir,
                      '--out-dir', str(out), '--epochs', '1', '--batch-size', '16',
                      '--device', 'cpu', '--no-amp'])
    printed = capsys.readouterr().out
    assert code == 0, printed
    names = ['tmp_margin_T4_m0.25', 'tmp_margin_T4_m0.75']
    assert 'tmp_margin: T=4 (its default), margin=0.25, 0.75' in printed
    assert set(new_loss.SEEN) == {0.25, 0.75}
    with open(out / 'results.json') as f:
        models = json.load(f)['models']
    for name, margin in zip(names, (0.25, 0.75)):
        assert models[name]['loss'] == 'tmp_margin'
        assert models[name]['loss_params'] == {'temperature': 4.0, 'margin': margin}
        weights = torch.load(out / f'best_{name}.pth', weights_only=True)
        assert weights and all(torch.is_tensor(v) for v in weights.values())
    # its setting in --help, refusals from its declaration
    assert main.main(['--loss', 'tmp_margin', '--set', 'tmp_margin.margin=-1',
                      '--out-dir', str(tmp_path / 'bad')]) == 2
    assert 'margin must be a number >= 0, got -1' in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'bad')
