"""The `reference` recipe: the benchmark tables' training (RepDistiller train_student.py,
mdistiller engine/cfg.py for CIFAR-100)."""
import pytest
import torch

from main import parse_config
from kd.models import StudentNet
from kd.recipes import get_recipe, learning_rate, make_optimizer


def test_the_reference_recipe_is_the_tables_training():
    r = get_recipe('reference')
    # RepDistiller: --epochs 240 --learning_rate 0.05 --lr_decay_epochs 150,180,210
    # --lr_decay_rate 0.1 --weight_decay 5e-4 --momentum 0.9 --batch_size 64
    assert (r.epochs, r.batch_size, r.lr, r.weight_decay, r.momentum) == (240, 64, 0.05, 5e-4, 0.9)
    assert (r.schedule, r.milestones, r.lr_decay, r.nesterov) == ('multistep', (150, 180, 210),
                                                                   0.1, False)
    assert (r.label_smoothing, r.crop_padding, r.flip, r.lookahead_every, r.tta) == \
        (0.0, 4, 'random', 0, 'none')


@pytest.mark.parametrize('epoch,factor', [(0, 1), (149, 1), (150, 0.1), (179, 0.1),
                                          (180, 0.01), (209, 0.01), (210, 0.001), (239, 0.001)])
def test_multistep_decays_from_each_milestone_epoch(epoch, factor):
    # the reference sets lr * 0.1 ** sum(epoch > milestones) at each 1-based epoch's start: from
    # the 151st epoch, the 0-based epoch 150, on; every step of an epoch has its lr
    r = get_recipe('reference')
    for step in (epoch * 7, epoch * 7 + 6):
        assert learning_rate(r, 0.05, step, 7) == pytest.approx(0.05 * factor)


def test_the_reference_optimizer_has_plain_momentum_and_the_lr_follows_the_batch():
    r = get_recipe('reference')
    optimizer = make_optimizer(StudentNet(widths=(8, 8, 8, 8)), r)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults['nesterov'] is False and optimizer.defaults['momentum'] == 0.9
    config = parse_config(['--recipe', 'reference', '--dataset', 'cifar100'])
    assert (config.epochs, config.batch_size, config.lr) == (240, 64, 0.05)
    assert config.student_model == 'resnet8x4'
    assert parse_config(['--recipe', 'reference', '--batch-size', '128']).lr == pytest.approx(0.1)
    assert parse_config(['--recipe', 'reference', '--lr', '0.01']).lr == 0.01
